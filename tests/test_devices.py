"""Devices, precision and determinism (issue 21): every device-sensitive check runs on each available
device (the ``device`` argument, see tests/conftest.py: the CPU always, CUDA where there is one).

What is pinned:
  * device strings: the spelling is checked where a config is built, the machine's devices where a
    run starts; both errors name the function, the argument, the value and what is allowed;
  * batches reach the device unchanged (pinned, non-blocking on CUDA); a step on the device equals
    the step on the CPU (σ = 0, float64), and on CUDA runs without a host synchronisation;
  * bf16 forward/backward (autocast): every clipped per-example gradient still has norm ≤ C (both
    engines, property test), and the clipped sum, the noise and the update are float32;
  * checkpoints load on any device (``map_location``) with the same ledger and keys, and a run
    resumed on another device continues that ledger;
  * ``deterministic_algorithms`` sets torch's flags for a block and restores them.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dpfunc import FlatClipping, Key, dpsgd, make_step, privacy_ledger, vmap_engine
from dpfunc.bridge.checkpoint import load_checkpoint, save_checkpoint
from dpfunc.bridge.fast import fast_engine
from dpfunc.bridge.functional import functionalize
from dpfunc.devices import (CUBLAS_WORKSPACE_CONFIG, Precision, available_devices, deterministic_algorithms,
                            mixed_precision, resolve_device, to_device)
from dpfunc.models import SmallCNN

seeds = st.integers(0, 2**32 - 1)
CPU = torch.device("cpu")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; this machine has none")


# ------------------------------------------------------------------------------- choosing a device


def test_resolve_device_spellings():
    assert resolve_device("cpu") == CPU and resolve_device(" CPU ") == CPU and resolve_device(CPU) == CPU
    auto = resolve_device("auto")
    assert auto == (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else CPU)
    assert available_devices()[0] == CPU and len(available_devices()) == 1 + (torch.cuda.device_count() if torch.cuda.is_available() else 0)


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:-1", "cuda:x", "cuda:1:2", "mps", "", 0, None, "cuda:٣"])
def test_bad_device_strings_name_the_argument(bad):
    with pytest.raises(ValueError, match=r"^f: --device must be 'auto', 'cpu', 'cuda' or 'cuda:N'.*got"):
        resolve_device(bad, fn="f", name="--device")


def test_absent_cuda_device_is_refused_with_what_the_machine_offers():
    absent = f"cuda:{torch.cuda.device_count() + 7 if torch.cuda.is_available() else 7}"
    with pytest.raises(ValueError, match=rf"^train: device '{absent}' .*(none available|has \d).*offers: cpu"):
        resolve_device(absent, fn="train", name="device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda' asks for a CUDA device, but this machine has none"):
            resolve_device("cuda")


def test_train_config_device_precision_deterministic():
    from dpfunc.train import TrainConfig, train

    cfg = TrainConfig(device="CUDA:3", precision="bf16")  # spelling only: a saved GPU config loads anywhere
    assert cfg.device == "cuda:3" and cfg.precision == "bf16" and cfg.deterministic is False
    # device and determinism do not define the run (resume elsewhere); precision does
    assert TrainConfig(device="cpu", deterministic=True) == TrainConfig(device="cuda:1")
    assert TrainConfig(precision="bf16") != TrainConfig(precision="fp32")
    for kwargs, match in [({"device": "gpu0"}, "TrainConfig: device must be"), ({"precision": "fp16"}, "TrainConfig: precision must be"),
                          ({"deterministic": 1}, "TrainConfig: deterministic must be a bool")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(**kwargs)
    absent = f"cuda:{torch.cuda.device_count() + 7 if torch.cuda.is_available() else 7}"
    with pytest.raises(ValueError, match=rf"^train: device \(--device\) '{absent}'"):  # before any data is read
        train(TrainConfig(device=absent), data_dir="/nonexistent")


@pytest.mark.parametrize("gpus, spec, expected", [(0, "auto", "cpu"), (1, "auto", "cpu"), (2, "auto", "cuda:1"), (2, "cuda", "cuda:1"),
                                                   (1, "cuda", "needs one GPU per process; it has 1"),
                                                   (2, "cuda:0", "each rank uses the GPU of its LOCAL_RANK"), (2, "cpu", "cpu")])
def test_each_local_rank_gets_its_own_gpu_or_the_cpu(monkeypatch, gpus, spec, expected):
    """A fake machine (torch.cuda patched) with ``gpus`` GPUs, rank 1 of 2 local processes: ``auto`` takes
    cuda:LOCAL_RANK only when every local rank has a GPU, else the CPU; ``cuda`` with too few GPUs and
    ``cuda:N`` (all ranks on one GPU) are refused."""
    from dpfunc.train import TrainConfig, _run_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for name, value in {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    if ":" in expected or expected == "cpu":
        assert _run_device(TrainConfig(device=spec), None) == torch.device(expected)
    else:
        with pytest.raises(ValueError, match=expected):
            _run_device(TrainConfig(device=spec), None)
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: the device as given
    if gpus:
        assert _run_device(TrainConfig(device="cuda:0"), None) == torch.device("cuda", 0)


def test_image_size_224_for_gpu_studies():
    from dpfunc.train import TrainConfig

    assert TrainConfig(model="resnet18", image_size=224).image_size == 224
    with pytest.raises(ValueError, match="TrainConfig: image_size must be 28, 64 or 224, got 128"):
        TrainConfig(image_size=128)


def test_cli_device_flag(capsys):
    from dpfunc.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--device", "gpu"])
    assert "--device must be 'auto', 'cpu', 'cuda' or 'cuda:N'" in capsys.readouterr().err
    absent = f"cuda:{torch.cuda.device_count() + 7 if torch.cuda.is_available() else 7}"
    assert main(["train", "--device", absent, "--dry-run", "--data-dir", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dpfunc train: error: --device '{absent}'") and "offers: cpu" in err


def test_dry_run_names_the_device_auto_picks(capsys, data_dir):
    from dpfunc.cli import main

    assert main(["train", "--dry-run", "--precision", "bf16", "--data-dir", str(data_dir)]) == 0
    plan = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("plan:"))
    assert plan.endswith(f"device {resolve_device('auto')}" + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "")
                         + " (bf16)"), plan


# ------------------------------------------------------------------------------- data to the device


def test_to_device_moves_values_unchanged(device):
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    y = to_device(x, device)
    assert y.device == device and torch.equal(y.cpu(), x)
    assert to_device(y, device) is y  # already there: no copy
    assert to_device(x, CPU) is x


def _tiny_cnn(seed: int) -> torch.nn.Module:
    """Conv → GroupNorm → ReLU → Linear: the layer kinds of the case-study CNN, small enough for property tests."""
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 10 * 10, 2))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def _cnn_step_inputs(seed, device, b=4, dtype=torch.float64, model=None):
    """(model, apply_fn, params, buffers, x, y) on ``device``: the tiny CNN on 12×12 images, or ``SmallCNN`` on 28×28."""
    model = (_tiny_cnn(seed) if model is None else model).to(dtype)
    side = 12 if isinstance(model, torch.nn.Sequential) else 28
    apply_fn, params, buffers = functionalize(model.to(device))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, side, side, generator=gen, dtype=dtype)
    y = torch.randint(0, 2, (b,), generator=gen)
    return model, apply_fn, params, buffers, to_device(x, device), to_device(y, device)


def test_a_step_on_the_device_equals_the_step_on_the_cpu(device):
    """σ = 0 (the noise realisation is device-specific by design), float64: same update on any device."""
    results = []
    for where in (CPU, device):
        model, apply_fn, params, buffers, x, y = _cnn_step_inputs(3, where)
        tx = dpsgd(0.5, noise_multiplier=0.0, max_grad_norm=0.1, sampling_rate=0.5, num_examples=8, key=Key(1), momentum=0.9)
        step = make_step(None, tx, engine=fast_engine(apply_fn, lambda o, t: F.cross_entropy(o, t, reduction="none"), FlatClipping(0.1)))
        state = tx.init(params)
        for _ in range(2):
            params, state, m = step(params, state, (x, y), buffers=buffers)
        assert all(v.device == where for v in params.values()) and m.loss.device == where
        results.append(({k: v.cpu() for k, v in params.items()}, privacy_ledger(state)))
    (p_cpu, ledger_cpu), (p_dev, ledger_dev) = results
    assert ledger_cpu == ledger_dev
    for k in p_cpu:
        torch.testing.assert_close(p_dev[k], p_cpu[k], rtol=1e-9, atol=1e-12)


@requires_cuda
def test_cuda_step_loop_never_synchronises_with_the_host():
    """The training loop's per-step work (Poisson indices → pinned upload → gather → fast-engine step with
    noise) runs under CUDA's sync debug mode 'error': any host synchronisation raises."""
    from dpfunc.sampling import poisson_sample

    device = torch.device("cuda", 0)
    _, apply_fn, params, buffers, _, _ = _cnn_step_inputs(0, device, dtype=torch.float32, model=SmallCNN(key=Key(0)))
    images = to_device(torch.randn(64, 1, 28, 28), device)
    labels = to_device(torch.randint(0, 2, (64,)), device)
    tx = dpsgd(0.5, noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=0.25, num_examples=64, key=Key(1))
    step = make_step(None, tx, engine=fast_engine(apply_fn, lambda o, t: F.cross_entropy(o, t, reduction="none"), FlatClipping(1.0)))
    state = tx.init(params)
    idx = to_device(poisson_sample(Key(0), 64, 0.25), device)
    params, state, _ = step(params, state, (images[idx], labels[idx]), buffers=buffers)  # warm-up (routing, kernels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in range(1, 4):
            idx = to_device(poisson_sample(Key(0).fold_in(t), 64, 0.25), device)
            params, state, m = step(params, state, (images[idx], labels[idx]), buffers=buffers)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert privacy_ledger(state).total_steps == 4 and math.isfinite(float(m.loss))


# ------------------------------------------------------------------------------- mixed precision


def test_mixed_precision_forward_is_bf16_and_returns_float32():
    w = torch.full((2, 2), 1.0 + 2**-10)  # not representable in bf16: rounded to 1.0 inside autocast
    f = mixed_precision(lambda p, b, x: x @ p["w"], CPU, Precision.BF16)
    out = f({"w": w}, {}, torch.ones(1, 2))
    assert out.dtype == torch.float32 and torch.equal(out, torch.full((1, 2), 2.0))
    g = mixed_precision(lambda p, b, x: x @ p["w"], CPU, Precision.FP32)
    assert torch.equal(g({"w": w}, {}, torch.ones(1, 2)), torch.full((1, 2), 2.0 + 2**-9))
    with pytest.raises(TypeError, match="mixed_precision: precision must be a Precision"):
        mixed_precision(lambda p, b, x: x, CPU, "bf16")


@settings(max_examples=6, deadline=None)
@given(seed=seeds, c=st.sampled_from([1e-3, 0.05, 1.0, 1e3]))
def test_bf16_forward_keeps_every_clipped_gradient_within_c(seed, c, device):
    """Property: with the forward/backward in bf16, each example's clipped contribution (the clipped sum
    of a batch where only that example is real) has norm ≤ C, and the aggregate is float32."""
    b = 3
    model, apply_fn, params, buffers, x, y = _cnn_step_inputs(seed, device, b=b, dtype=torch.float32)
    f = mixed_precision(apply_fn, device, Precision.BF16)
    engines = {"fast": fast_engine(f, lambda o, t: F.cross_entropy(o, t, reduction="none"), FlatClipping(c)),
               "vmap": vmap_engine(lambda p, bf, xi, t: F.cross_entropy(f(p, bf, xi[None]), t[None]), clipping=FlatClipping(c))}
    for name, engine in engines.items():
        full = engine(params, buffers, (x, y), None).grads
        assert all(g.dtype == torch.float32 for g in full.grads.values()) and full.norms.dtype == torch.float32
        for i in range(b):
            one = torch.arange(b, device=device) == i
            g = engine(params, buffers, (x, y), one).grads.grads
            norm = math.sqrt(sum(float(v.double().square().sum()) for v in g.values()))
            assert norm <= c * (1 + 1e-5), f"{name}: example {i} clipped to {norm} > C = {c}"


def test_bf16_dp_aggregate_noise_and_update_are_float32(device):
    """The noisy mean and the new parameters are float32 and carry noise below bf16's resolution."""
    model, apply_fn, params, buffers, x, y = _cnn_step_inputs(5, device, b=4, dtype=torch.float32)
    f = mixed_precision(apply_fn, device, Precision.BF16)
    tx = dpsgd(1.0, noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=0.5, num_examples=8, key=Key(2))
    step = make_step(None, tx, engine=fast_engine(f, lambda o, t: F.cross_entropy(o, t, reduction="none"), FlatClipping(1.0)))
    new, state, m = step(params, tx.init(params), (x, y), buffers=buffers)
    for k, p in new.items():
        assert p.dtype == torch.float32 and p.device == device
        update = (p - params[k]).cpu()
        if update.numel() >= 16:  # noise σC/(qn) = 0.25 in float32: most entries are not bf16 numbers
            assert (update != update.bfloat16().float()).float().mean() > 0.5, k
    assert m.loss.dtype == torch.float32


# ------------------------------------------------------------------------------- checkpoints across devices


@pytest.mark.parametrize("map_location", [None, "cpu", CPU, {"cuda:0": "cpu"}, "meta"])
def test_checkpoint_written_on_cpu_loads_with_any_map_location(tmp_path, map_location):
    params = {"w": torch.arange(6.0).reshape(2, 3)}
    tx = dpsgd(0.1, noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=0.1, num_examples=100, key=Key(9), momentum=0.9)
    step = make_step(lambda p, b, x: (p["w"] * x).sum(), tx)
    params, state, _ = step(params, tx.init(params), (torch.ones(3, 2, 3),))
    save_checkpoint(tmp_path / "c.pt", {"params": params, "opt_state": state, "key": Key(9)})
    back = load_checkpoint(tmp_path / "c.pt", map_location=map_location)
    expected = torch.device("meta") if map_location == "meta" else CPU
    assert back["params"]["w"].device == expected
    assert privacy_ledger(back["opt_state"]) == privacy_ledger(state) and back["key"] == Key(9)
    if map_location != "meta":
        assert torch.equal(back["params"]["w"], params["w"])


def test_checkpoint_resumes_on_the_device_with_the_same_ledger_and_keys(tmp_path, device):
    """Saved on the CPU, loaded onto ``device``: the tensors are there, the ledger and keys are the saved
    ones, and the next step continues them (step count, noise key of step t from the same Key)."""
    model, apply_fn, params, buffers, x, y = _cnn_step_inputs(1, CPU, dtype=torch.float32)
    tx = dpsgd(0.5, noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=0.5, num_examples=8, key=Key(4), momentum=0.9)
    step = make_step(None, tx, engine=fast_engine(apply_fn, lambda o, t: F.cross_entropy(o, t, reduction="none"), FlatClipping(1.0)))
    params, state, _ = step(params, tx.init(params), (x, y), buffers=buffers)
    save_checkpoint(tmp_path / "c.pt", {"params": params, "buffers": buffers, "opt_state": state, "key": Key(4)})
    back = load_checkpoint(tmp_path / "c.pt", map_location=device)
    assert all(v.device == device for v in back["params"].values())
    momentum = back["opt_state"][1][0].trace  # chain(dp_aggregate, sgd(trace, scale)): the trace is on the device
    assert all(v.device == device for v in momentum.values())
    assert privacy_ledger(back["opt_state"]) == privacy_ledger(state) and back["key"] == Key(4)
    # the module is only a structure here: the resumed step computes with the loaded tensors on ``device``
    apply_dev, _, _ = functionalize(_tiny_cnn(1).to(device))
    step_dev = make_step(None, tx, engine=fast_engine(apply_dev, lambda o, t: F.cross_entropy(o, t, reduction="none"), FlatClipping(1.0)))
    p2, s2, _ = step_dev(back["params"], back["opt_state"], (to_device(x, device), to_device(y, device)), buffers=back["buffers"])
    assert privacy_ledger(s2) == privacy_ledger(state).step(1.0, 0.5) and all(v.device == device for v in p2.values())
    if device == CPU:  # same device: the resumed step is the uninterrupted one, bit for bit
        p_ref, s_ref, _ = step(params, state, (x, y), buffers=buffers)
        assert all(torch.equal(p2[k], p_ref[k]) for k in p_ref)


@pytest.mark.slow
def test_train_resumed_with_another_device_setting_continues_the_ledger(tmp_path, data_dir):
    """A run stopped after epoch 1 (device 'cpu') resumes with device 'auto' (CUDA where there is one):
    accepted as the same run, its ledger continues to the full run's steps and ε, and config.json
    records the new device."""
    import json

    from dpfunc.train import TrainConfig, train

    cfg = TrainConfig(epochs=2, batch_size=32, train_subset=64, device="cpu", ema_decay=0.0)

    def stop_after_first_epoch(line):
        if line.startswith("epoch   1/2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, data_dir=data_dir, run_dir=tmp_path, progress=False, log=stop_after_first_epoch, bootstrap_resamples=5)
    half = load_checkpoint(tmp_path / "checkpoint.pt")
    assert privacy_ledger(half["opt_state"]).total_steps == 2
    resumed = TrainConfig(epochs=2, batch_size=32, train_subset=64, device="auto", ema_decay=0.0)
    result = train(resumed, data_dir=data_dir, run_dir=tmp_path, resume=True, progress=False, log=lambda *a: None,
                   bootstrap_resamples=5)
    full = load_checkpoint(tmp_path / "checkpoint.pt", map_location="cpu")
    assert privacy_ledger(full["opt_state"]).total_steps == 4 == result.steps
    from dpfunc import accounting
    assert result.epsilon == pytest.approx(accounting.epsilon(privacy_ledger(full["opt_state"]), cfg.delta, method="pld"))
    assert json.loads((tmp_path / "config.json").read_text())["device"] == "auto"
    assert result.device == str(resolve_device("auto")) or result.device.startswith(str(resolve_device("auto")) + " (")


# ------------------------------------------------------------------------------- determinism


def test_deterministic_algorithms_block_sets_and_restores():
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    with deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == (before[2] or CUBLAS_WORKSPACE_CONFIG)
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
            os.environ.get("CUBLAS_WORKSPACE_CONFIG")) == before
    with deterministic_algorithms(False):
        assert torch.are_deterministic_algorithms_enabled() == before[0]
    with pytest.raises(TypeError, match="deterministic_algorithms: enabled must be a bool"):
        with deterministic_algorithms("yes"):
            pass


def test_deterministic_step_is_reproducible(device):
    """Under deterministic algorithms two runs of the same keyed step agree bit for bit (on any one device)."""
    outs = []
    with deterministic_algorithms(True):
        for _ in range(2):
            model, apply_fn, params, buffers, x, y = _cnn_step_inputs(7, device, dtype=torch.float32)
            tx = dpsgd(0.5, noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=0.5, num_examples=8, key=Key(3))
            step = make_step(None, tx, engine=fast_engine(apply_fn, lambda o, t: F.cross_entropy(o, t, reduction="none"), FlatClipping(1.0)))
            p, _, _ = step(params, tx.init(params), (x, y), buffers=buffers)
            outs.append(p)
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_non_private_divergence_is_reported_once_per_epoch_with_its_step():
    from dpfunc.train import _check_finite_losses, _mean_loss

    losses = [(torch.tensor(0.5), 4), (torch.tensor(float("nan")), 4), (torch.tensor(float("inf")), 4)]
    with pytest.raises(ValueError, match=r"loss became nan at step 11 .*lower --lr \(now 0.05\)"):
        _check_finite_losses(losses, 10, 0.05)
    _check_finite_losses(losses[:1], 0, 0.05)
    assert _mean_loss([(torch.tensor(1.0), torch.tensor(3)), (torch.tensor(9.0), torch.tensor(0)), (2.0, 1)]) == 1.5
    assert math.isnan(_mean_loss([]))


# ------------------------------------------------------------------------------- every command: --device and --threads

#: One command line per command that computes with a model (the run folder / data paths filled in by the test):
#: each must refuse a device this machine lacks before it reads or writes anything.
_COMPUTE_COMMANDS = {
    "train": (["train", "--data-dir", "{missing}", "--run-dir", "{run}"], "train"),
    "evaluate": (["evaluate", "{run}"], "evaluate"),
    "federated": (["federated", "--data-dir", "{missing}", "--run-dir", "{run}"], "federated"),
    "federated-flower": (["federated", "--engine", "flower", "--data-dir", "{missing}", "--run-dir", "{run}"], "federated"),
    "segment": (["segment", "--data-dir", "{missing}", "--run-dir", "{run}"], "segment"),
    "train-task-liver": (["train", "--task", "liver", "--data-dir", "{missing}", "--run-dir", "{run}"], "segment"),
    "attack": (["attack", "--run-dir", "{run}", "--scenario", "dp", "--data-dir", "{missing}"], "attack"),
    "audit": (["audit", "--run-dir", "{run}", "--noise-multiplier", "1", "--data-dir", "{missing}"], "audit"),
    "infer": (["infer", "{run}", "--data-dir", "{missing}"], "infer"),
}


def _absent_cuda() -> str:
    return f"cuda:{torch.cuda.device_count() + 7}" if torch.cuda.is_available() else "cuda"


@pytest.mark.parametrize("name", list(_COMPUTE_COMMANDS))
def test_every_compute_command_refuses_an_absent_device_and_applies_threads(name, tmp_path, monkeypatch, capsys):
    """``--device`` naming a GPU this machine lacks: exit code 2 and one line naming --device, the value and what
    the machine offers, before any data is read or any file written; ``--threads`` was applied first."""
    from dpfunc.cli import main

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)  # record, without changing this process
    argv, shown = _COMPUTE_COMMANDS[name]
    run = tmp_path / "run"
    argv = [a.format(missing=tmp_path / "no-data", run=run) for a in argv]
    absent = _absent_cuda()
    assert main([*argv, "--device", absent, "--threads", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dpfunc {shown}: error: --device '{absent}' ") and "this machine offers: cpu" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert calls == [3]
    assert not run.exists() and not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.parametrize("name", list(_COMPUTE_COMMANDS))
def test_threads_must_be_a_positive_integer(name, tmp_path, capsys):
    from dpfunc.cli import main

    argv = [a.format(missing=tmp_path / "no-data", run=tmp_path / "run") for a in _COMPUTE_COMMANDS[name][0]]
    for bad in ("0", "-2", "two"):
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--threads", bad])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "--threads must be" in err and repr(bad) in err, err


def test_the_compute_flags_are_on_every_command_that_computes():
    """The registry: every subcommand except the two that compute nothing with a model has both flags."""
    from dpfunc.cli import COMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    for name in COMMANDS:
        flags = {s for a in sub.choices[name]._actions for s in a.option_strings}
        has = {"--device", "--threads"} <= flags
        assert has == (name not in ("account", "make-phantoms")), name


def test_set_threads_validates_and_applies():
    from dpfunc.devices import set_threads

    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 == torch.get_num_threads()
        assert set_threads(None) == 1  # None: leave it as it is
    finally:
        torch.set_num_threads(before)
    for bad in (0, -1, 1.0, True, "2"):
        with pytest.raises(ValueError, match=r"^f: --threads must be an int >= 1"):
            set_threads(bad, fn="f", name="--threads")
    assert torch.get_num_threads() == before


def test_tree_to_device_moves_every_tensor_and_keeps_the_rest(device):
    import dataclasses
    from typing import NamedTuple

    from dpfunc.accounting.ledger import PrivacyLedger
    from dpfunc.devices import tree_to_device

    class Pair(NamedTuple):
        a: torch.Tensor
        b: object

    @dataclasses.dataclass(frozen=True)
    class Box:
        t: torch.Tensor
        n: int = 3

    ledger = PrivacyLedger().step(1.0, 0.1, 5)
    tree = {"p": torch.arange(3.0), "s": Pair(torch.ones(2), (Key(1), ledger, [torch.zeros(1)])), "box": Box(torch.eye(2)), "e": {}}
    moved = tree_to_device(tree, device)
    leaves = [moved["p"], moved["s"].a, moved["s"].b[2][0], moved["box"].t]
    assert all(t.device == device for t in leaves)
    assert isinstance(moved["s"], Pair) and isinstance(moved["box"], Box) and moved["box"].n == 3
    assert moved["s"].b[0] == Key(1) and moved["s"].b[1] is ledger and moved["e"] == {}
    back = tree_to_device(moved, CPU)
    assert torch.equal(back["p"], tree["p"]) and torch.equal(back["box"].t, tree["box"].t)
    if device == CPU:  # nothing to move: the very same objects
        assert moved["p"] is tree["p"] and moved["box"] is tree["box"]


def test_a_federated_site_round_computes_on_the_data_device(device):
    """``site_round`` with the shard on ``device`` and the global model on the CPU: the update and the new state
    come back on the CPU, the ledger is the CPU run's, and with σ = 0 (float64) the update equals it."""
    from dpfunc.federated.site import SitePlan, init_site_state, site_round

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 5, generator=gen, dtype=torch.float64), torch.randint(0, 2, (24,), generator=gen)
    params = {"w": torch.randn(5, 2, generator=gen, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}
    plan = SitePlan(24, 8, 1, 0.0, max_grad_norm=0.5, learning_rate=0.5, momentum=0.9)
    engine = vmap_engine(lambda p, b, xi, yi: F.cross_entropy((xi @ p["w"] + p["b"])[None], yi[None]),
                         clipping=FlatClipping(0.5))
    out = []
    for where in (CPU, device):
        state = init_site_state(0, plan, Key(3), params)
        update, new = site_round(params, state, (to_device(x, where), to_device(y, where)), Key(3), plan=plan,
                                 engine=engine, round=0)
        update, new = site_round(update.params, new, (to_device(x, where), to_device(y, where)), Key(3), plan=plan,
                                 engine=engine, round=1)  # the momentum carried on the host between rounds
        assert all(v.device == CPU for v in update.params.values())
        assert all(v.device == CPU for v in new.opt_state[1][0].trace.values())
        out.append((update, new))
    (u_cpu, s_cpu), (u_dev, s_dev) = out
    assert s_dev.ledger == s_cpu.ledger and s_dev.steps == s_cpu.steps == 6
    for k in params:
        torch.testing.assert_close(u_dev.params[k], u_cpu.params[k], rtol=1e-9, atol=1e-12)


def test_infer_plaintext_runs_on_the_device(device, tmp_path, data_dir, capsys):
    """``dpfunc infer --device D --threads 1`` (plaintext): the same predictions as the CPU, the device named."""
    import json
    from dataclasses import asdict

    from dpfunc.cli import main
    from dpfunc.models import build_model
    from dpfunc.train import TrainConfig

    run = tmp_path / "run"
    run.mkdir()
    model = build_model("cnn", key=Key(5))
    save_checkpoint(run / "checkpoint.pt", {"config": asdict(TrainConfig(model="cnn", image_size=28, seed=3)),
                                            "best_params": {n: p.detach().clone() for n, p in model.named_parameters()}})
    before = torch.get_num_threads()
    results = {}
    try:
        for where in ("cpu", str(device)):
            assert main(["infer", str(run), "--data-dir", str(data_dir), "--limit", "16", "--device", where, "--threads", "1"]) == 0
            assert torch.get_num_threads() == 1
            results[where] = json.loads(capsys.readouterr().out)["plaintext"]
    finally:
        torch.set_num_threads(before)
    assert results[str(device)]["device"].startswith(str(device))
    assert results[str(device)]["accuracy"] == results["cpu"]["accuracy"]
    assert results[str(device)]["auc"] == pytest.approx(results["cpu"]["auc"], abs=1e-6)
    assert not (run / "encrypted_inference.json").exists()
    assert main(["infer", str(run), "--encrypted", "--device", "cuda"]) == 2  # gloo: CPU only, said so
    assert "--encrypted computes on the CPU" in capsys.readouterr().err


# ------------------------------------------------------------------------------- the commands on a GPU (CUDA only)
# The CPU case of each is the command's existing small CLI test run with --device cpu (tests/test_cli.py,
# test_federated_job.py, test_segmentation_train.py, test_attacks_cli.py; infer above): these repeat them on
# the GPU and check that what they write reads back on the CPU without map_location.
# DPFUNC_TEST_GPU_CASES_ON_CPU=1 runs them with device cpu too (how they were checked on a machine without a GPU).

_ON_CPU = "the CPU case is the command's existing CLI test with --device cpu"


def _gpu_only(device):
    if device.type == "cpu" and not os.environ.get("DPFUNC_TEST_GPU_CASES_ON_CPU"):
        pytest.skip(_ON_CPU)


def _all_on_cpu(tree) -> bool:
    """Every tensor of a checkpoint as ``torch.load(weights_only=True)`` reads it (plain containers) is on the CPU."""
    found = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            found.append(x.device.type == "cpu")
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(tree)
    return bool(found) and all(found)


def test_federated_command_on_the_device(device, tmp_path, data_dir):
    """Sites on the GPU: checkpoint and model.pt are written on the CPU (load anywhere without map_location)."""
    import json

    from dpfunc.cli import main

    _gpu_only(device)
    run = tmp_path / "fed"
    argv = ["federated", "--sites", "2", "--rounds", "1", "--train-subset", "160", "--batch-size", "40", "--accountant",
            "rdp", "--data-dir", str(data_dir), "--run-dir", str(run), "--bootstrap", "20", "--quiet", "--device", str(device)]
    assert main(argv) == 0
    assert _all_on_cpu(torch.load(run / "checkpoint.pt", weights_only=True))
    assert all(t.device.type == "cpu" for t in torch.load(run / "model.pt", weights_only=True).values())
    m = json.loads((run / "metrics.json").read_text())
    assert m["rounds"] == 1 and all(0 < s["epsilon"] <= 3.0 for s in m["sites"]) and m["device"].startswith(str(device))


def test_segment_command_on_the_device_evaluates_on_the_cpu(device, tmp_path, monkeypatch, capsys):
    """Trained on the GPU; ``dpfunc evaluate --device cpu`` reads the checkpoint and gives the same Dice."""
    import json

    from dpfunc.cli import main

    _gpu_only(device)
    monkeypatch.chdir(tmp_path)
    assert main(["make-phantoms", "--out", "ph", "--patients", "5", "--seed", "1", "--size", "32", "--slices", "5", "--quiet"]) == 0
    flags = ["--data-dir", "ph", "--image-size", "32", "--width", "4", "--depth", "2", "--epochs", "1", "--batch-size", "2",
             "--slices-per-patient", "2", "--accountant", "rdp", "--bootstrap", "20", "--quiet", "--run-dir", "seg"]
    assert main(["segment", *flags, "--epsilon", "5", "--device", str(device)]) == 0
    metrics = json.loads((tmp_path / "seg" / "metrics.json").read_text())
    assert metrics["device"].startswith(str(device))
    capsys.readouterr()
    assert main(["evaluate", "seg", "--bootstrap", "20", "--quiet", "--device", "cpu"]) == 0
    import re

    dice = float(re.search(r"test Dice \(mean over .*?\): ([0-9.]+)", capsys.readouterr().out).group(1))
    assert abs(dice - metrics["test"]["dice"]) <= 0.05  # the same model; CPU and GPU arithmetic may flip a few voxels


def test_attack_and_audit_commands_on_the_device(device, tmp_path, data_dir):
    import json

    from dpfunc.cli import main

    _gpu_only(device)
    assert main(["attack", "--run-dir", str(tmp_path / "a"), "--scenario", "dp", "--noise-multiplier", "1", "--batch-size", "1",
                 "--images", "1", "--iterations", "3", "--data-dir", str(data_dir), "--quiet", "--device", str(device)]) == 0
    out = json.loads((tmp_path / "a" / "attack-dp.json").read_text())
    assert out["device"].startswith(str(device)) and len(out["psnr"]) == 1
    assert main(["audit", "--run-dir", str(tmp_path / "b"), "--noise-multiplier", "1.0", "--epochs", "1", "--batch-size", "4708",
                 "--canaries", "200", "--data-dir", str(data_dir), "--quiet", "--device", str(device)]) == 0
    out = json.loads((tmp_path / "b" / "audit.json").read_text())
    assert out["device"].startswith(str(device)) and 0 <= out["epsilon_lower_bound"] <= out["epsilon_claimed"]


def test_flower_sites_take_device_and_threads_from_their_node_config(tmp_path, monkeypatch):
    """A ClientApp reads ``device`` (default auto) and ``threads`` from its SuperNode's node config; a device the node
    lacks fails the message with a reason naming the node config; the ServerApp gets ``threads`` in its request."""
    import json
    from types import SimpleNamespace

    pytest.importorskip("flwr")
    from dpfunc.federated.flower.apps import _site_device
    from dpfunc.federated.flower.driver import write_app
    from dpfunc.federated.job import FederatedConfig

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert _site_device(SimpleNamespace(node_config={"partition-id": 0, "device": "cpu", "threads": 2})) == CPU
    assert _site_device(SimpleNamespace(node_config={"partition-id": 0})) == resolve_device("auto") and calls == [2]
    with pytest.raises(ValueError, match=rf"^dpfunc ClientApp: node-config device '{_absent_cuda()}' .*offers: cpu"):
        _site_device(SimpleNamespace(node_config={"device": _absent_cuda()}))
    with pytest.raises(ValueError, match=r"^dpfunc ClientApp: node-config threads must be an int >= 1"):
        _site_device(SimpleNamespace(node_config={"threads": 0}))
    app = write_app(FederatedConfig(), run_dir=tmp_path / "run", threads=3)
    assert json.loads((tmp_path / "run" / "flower" / "request.json").read_text())["threads"] == 3 and app.is_dir()
