"""Data-parallel DP-SGD (dpfunc.distributed): the slice sampler (pure, hypothesis), the one-process
world against make_step, and real gloo runs on localhost (2 and 3 processes, resume across world
sizes, a crashed rank) against the single-process oracle.

Tolerance: float32 parameters agree with the single-process run within 1e-6 (absolute, parameters of
size ~1), not bit for bit: the all-reduce sums per-rank partial sums, a different summation order
than one process's sum over the batch. The noise, drawn after the reduction from the same key, is
bit for bit the same (the zero-gradient probe checks it), and so are the replicas across ranks.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpfunc import FlatClipping, Key, make_step, privacy_ledger, vmap_engine
from dpfunc.distributed import (
    backend_for,
    launch_local,
    make_distributed_step,
    rank_batch_size,
    rank_slice,
    single_process,
    slice_bounds,
)

sys.path.insert(0, str(Path(__file__).parent))
import _distributed_worker as worker  # noqa: E402

WORKER = str(Path(__file__).parent / "_distributed_worker.py")
LAUNCH_TIMEOUT_S = 150  # hard limit per launch; a healthy run on a loaded 2-core machine takes ~30 s


# --------------------------------------------------------------------------- the slice sampler


@given(b=st.integers(0, 300), w=st.integers(1, 17), seed=st.integers(0, 2**32 - 1))
def test_rank_slices_partition_the_poisson_batch_balanced(b, w, seed):
    n = b + torch.randint(0, 50, (), generator=Key(seed).generator()).item()
    idx = torch.randperm(max(n, 1), generator=Key(seed).generator())[:b].sort().values
    slices = [rank_slice(idx, r, w) for r in range(w)]
    assert torch.equal(torch.cat(slices), idx)  # each index exactly once, in order
    sizes = [len(s) for s in slices]
    assert sum(sizes) == b and max(sizes) - min(sizes) <= 1  # balanced
    assert sorted(sizes, reverse=True) == sizes  # the larger slices on the first ranks
    assert [hi - lo for lo, hi in slice_bounds(b, w)] == sizes


@given(padded=st.integers(1, 300), w=st.integers(1, 17), b=st.integers(0, 300))
def test_rank_batch_size_holds_every_slice_of_a_padded_batch(padded, w, b):
    b = min(b, padded)
    size = rank_batch_size(padded, w)
    assert size == math.ceil(padded / w)
    assert all(hi - lo <= size for lo, hi in slice_bounds(b, w))


def test_bad_arguments_are_refused_with_the_function_name():
    with pytest.raises(ValueError, match=r"rank_slice: rank must be an int in \[0, 2\), got 2"):
        rank_slice(torch.arange(5), 2, 2)
    with pytest.raises(ValueError, match="slice_bounds: world_size must be an int >= 1, got 0"):
        slice_bounds(3, 0)
    with pytest.raises(ValueError, match="rank_slice: indices must be a 1-d tensor"):
        rank_slice(torch.zeros(2, 2), 0, 1)
    with pytest.raises(ValueError, match="rank_batch_size: padded_batch_size must be an int >= 1"):
        rank_batch_size(0, 2)
    with pytest.raises(ValueError, match="backend_for: device must be a CPU or CUDA device"):
        backend_for("meta")
    with pytest.raises(TypeError, match="make_distributed_step: world must be"):
        make_distributed_step(worker.loss_fn, worker.make_tx(), world=(0, 1))
    with pytest.raises(ValueError, match="launch_local: nproc must be an int >= 1"):
        launch_local(0, ["true"])


def test_init_world_reads_the_launcher_environment(monkeypatch):
    from dpfunc.distributed import init_world

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_world() == single_process()  # no launcher: one process, no process group
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_world("cpu") == single_process()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="init_world: the environment variable RANK is not set; launch with torchrun"):
        init_world("cpu")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match=r"init_world: RANK must be in \[0, 2\), got 2"):
        init_world("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="init_world: WORLD_SIZE must be an integer, got 'two'"):
        init_world("cpu")
    with pytest.raises(ValueError, match="init_world: timeout_s must be a finite number > 0"):
        init_world("cpu", timeout_s=0)


def test_backend_is_chosen_from_the_device():
    assert backend_for("cpu") == "gloo" and backend_for(None) == "gloo"
    assert backend_for(torch.device("cuda", 1)) == "nccl" and backend_for("cuda") == "nccl"


# --------------------------------------------------------------------------- one process


@settings(max_examples=5)
@given(seed=st.integers(0, 2**32 - 1))
def test_one_process_world_is_make_step_bit_for_bit(seed):
    g = Key(seed).generator()
    x, y = torch.randn(6, 5, generator=g), torch.randn(6, generator=g)
    mask = torch.tensor([True, True, False, True, True, False])
    params = worker.init_params()
    tx = worker.make_tx()
    ref = make_step(None, tx, engine=vmap_engine(worker.loss_fn, clipping=FlatClipping(worker.C)))
    ours = make_distributed_step(worker.loss_fn, tx, world=single_process())
    p1, s1, m1 = ref(params, tx.init(params), (x, y), mask)
    p2, s2, m2 = ours(params, tx.init(params), (x, y), mask)
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    assert privacy_ledger(s1) == privacy_ledger(s2)
    assert int(m1.batch_size) == int(m2.batch_size) == 4
    for a, b in zip(m1, m2):
        assert float(a) == pytest.approx(float(b), rel=1e-5)


def test_an_empty_slice_releases_pure_noise_like_make_step():
    """A rank whose slice is empty (batch smaller than the world) contributes an exact zero."""
    params, tx = worker.init_params(), worker.make_tx()
    empty = (torch.zeros(0, 5), torch.zeros(0))
    ref = make_step(worker.loss_fn, tx)(params, tx.init(params), empty)
    ours = make_distributed_step(worker.loss_fn, tx, world=single_process())(params, tx.init(params), empty)
    assert all(torch.equal(ref[0][k], ours[0][k]) for k in params)
    assert not all(torch.equal(ours[0][k], params[k]) for k in params)  # σ > 0: the noise moved them
    assert int(ours[2].batch_size) == 0 and math.isnan(float(ours[2].loss))


# --------------------------------------------------------------------------- real process groups


def _launch(tmp: Path, nproc: int, *args: str) -> list[int]:
    tmp.mkdir(parents=True, exist_ok=True)
    return launch_local(nproc, [sys.executable, WORKER, str(tmp), *args], timeout_s=LAUNCH_TIMEOUT_S, grace_s=60,
                        log_dir=tmp / "logs", env={"OMP_NUM_THREADS": "1"})


def _logs(tmp: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((tmp / "logs").glob("*")))


def _results(tmp: Path, nproc: int) -> list[dict]:
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2 ranks train steps 0..3 and checkpoint; 3 ranks resume that checkpoint for steps 4..7."""
    two, three = tmp_path_factory.mktemp("w2"), tmp_path_factory.mktemp("w3")
    codes = _launch(two, 2, "--last", "4")
    assert codes == [0, 0], _logs(two)
    codes = _launch(three, 3, "--first", "4", "--last", "8", "--resume", str(two / "ckpt.pt"))
    assert codes == [0, 0, 0], _logs(three)
    return {"two": (two, _results(two, 2)), "three": (three, _results(three, 3))}


def _single(first, last, params=None, opt_state=None):
    return worker.train(single_process(), first, last, params, opt_state)


def test_replicas_are_identical_on_every_rank(runs):
    for _, results in runs.values():
        r0 = results[0]
        for r in results[1:]:
            assert all(torch.equal(r0["params"][k], r["params"][k]) for k in r0["params"])  # bit for bit
            assert r["ledger"] == r0["ledger"]
            assert torch.equal(r["probe"], r0["probe"])  # the same noise on every rank
            assert r["metrics"] == r0["metrics"]


def test_two_ranks_equal_one_process_on_the_same_keys(runs):
    params, state, metrics = _single(0, 4)
    r0 = runs["two"][1][0]
    for k in params:
        torch.testing.assert_close(r0["params"][k], params[k], rtol=0, atol=1e-6)
    assert r0["ledger"] == privacy_ledger(state)
    assert [m[1] for m in r0["metrics"]] == [m[1] for m in metrics]  # batch sizes: the same Poisson batches
    for got, want in zip(r0["metrics"], metrics):
        assert got == pytest.approx(want, rel=1e-5, nan_ok=True)


def test_resume_on_a_different_world_size(runs):
    from dpfunc.bridge.checkpoint import load_checkpoint

    ref_params, ref_state, _ = _single(0, 8)
    # 2 ranks -> 3 ranks
    r0 = runs["three"][1][0]
    for k in ref_params:
        torch.testing.assert_close(r0["params"][k], ref_params[k], rtol=0, atol=1e-6)
    assert r0["ledger"] == privacy_ledger(ref_state)
    assert privacy_ledger(ref_state).total_steps == 8
    # 2 ranks -> 1 process, from the checkpoint rank 0 wrote
    ckpt = load_checkpoint(runs["two"][0] / "ckpt.pt")
    params, state, _ = _single(4, 8, ckpt["params"], ckpt["opt_state"])
    for k in ref_params:
        torch.testing.assert_close(params[k], ref_params[k], rtol=0, atol=1e-6)
    assert privacy_ledger(state) == privacy_ledger(ref_state)


def test_noise_is_added_once_for_any_world_size(runs):
    """The probe's gradient is exactly 0, so its update is -noise/(q·n): bit for bit the one-process
    noise, and its variance is σ²C²/(qn)² (χ² test over 4000 coordinates); noise added on every rank
    and summed would have W times that variance (rejected at p < 1e-30 for W = 2)."""
    from scipy.stats import chi2

    single = worker.noise_probe(single_process())
    s2 = (worker.PROBE_SIGMA * worker.PROBE_C / (worker.Q * worker.N)) ** 2
    for name, (_, results) in runs.items():
        z = results[0]["probe"].double()
        assert torch.equal(results[0]["probe"], single), name
        stat = float((z**2).sum() / s2)
        d = z.numel()
        p = 2 * min(chi2.cdf(stat, d), chi2.sf(stat, d))
        assert p > 1e-3, (name, stat, d)
        assert chi2.cdf(stat / results[0]["world_size"], d) < 1e-30  # W·σ² would be rejected


def test_a_crashed_rank_makes_the_others_fail_not_hang(tmp_path):
    codes = _launch(tmp_path, 2, "--last", "4", "--crash-rank", "1")
    assert codes[1] == 3, _logs(tmp_path)
    # rank 0 fails on its own (an exception in its next collective), not killed by the launcher
    assert codes[0] > 0, (codes, _logs(tmp_path))
    err = (tmp_path / "logs" / "rank0.err").read_text()
    assert "RuntimeError: dpfunc.distributed: rank 0 of 2 could not all-reduce" in err, err[-2000:]


def test_a_rank_that_raises_alone_makes_the_others_fail_at_once_not_at_the_timeout(tmp_path):
    """Rank 1 raises in its own work (a bad mask) at step 2; rank 0 learns it from the metrics all-reduce's
    failure count and raises its own clear error in the same step, instead of waiting for the 30 s timeout
    of the process group (whose message would be "could not all-reduce")."""
    codes = _launch(tmp_path, 2, "--last", "3", "--fail-rank", "1")
    assert codes[0] > 0 and codes[1] > 0, (codes, _logs(tmp_path))
    err0 = (tmp_path / "logs" / "rank0.err").read_text()
    err1 = (tmp_path / "logs" / "rank1.err").read_text()
    assert "ValueError: make_distributed_step: mask must have shape" in err1, err1[-2000:]
    assert "1 other rank(s) of 2 failed in this step" in err0, err0[-2000:]
    assert "could not all-reduce" not in err0, err0[-2000:]


BRIDGE_WORKER = str(Path(__file__).parent / "_bridge_distributed_worker.py")


@pytest.mark.parametrize("engine", ["fast"])
def test_bridge_make_private_on_two_ranks_equals_one_process(tmp_path, engine):
    """make_private(world=...) with an unchanged torch loop on 2 gloo ranks: each rank reads its slice of
    the shared Poisson batch, the clipped sums are all-reduced before the noise, the same noise is added
    once: parameters equal the one-process run on the same key within 1e-6, ledgers equal, replicas
    bit for bit identical."""
    import _bridge_distributed_worker as bridge_worker

    steps = 5
    codes = launch_local(2, [sys.executable, BRIDGE_WORKER, str(tmp_path), "--steps", str(steps), "--engine", engine],
                         timeout_s=LAUNCH_TIMEOUT_S, grace_s=60, log_dir=tmp_path / "logs", env={"OMP_NUM_THREADS": "1"})
    assert codes == [0, 0], _logs(tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    single, ledger = bridge_worker.train(None, steps, engine)
    assert r0["ledger"] == r1["ledger"] == ledger and ledger.total_steps == steps
    for name, value in single.items():
        assert torch.equal(r0["params"][name], r1["params"][name]), name
        assert torch.allclose(r0["params"][name], value, atol=1e-6, rtol=0), (name, (r0["params"][name] - value).abs().max())
    moved = max((single[k] - v).abs().max().item() for k, v in bridge_worker.train(None, 0, engine)[0].items())
    assert moved > 1e-3  # the run really trained (the comparison is not between two initial models)


def test_secure_noise_on_two_ranks_is_drawn_once_from_rank_zeros_entropy(tmp_path):
    """secure=True with secure_entropy=shared_entropy(world): both ranks key ChaCha20 with rank 0's os.urandom
    bytes, draw the same discrete-Gaussian noise, pass the per-step replica check and end bit for bit equal,
    with discrete-Gaussian ledgers; the functional path and the bridge."""
    pytest.importorskip("cryptography")
    from dpfunc.accounting import Mechanism

    codes = _launch(tmp_path / "f", 2, "--last", "3", "--secure-shared")
    assert codes == [0, 0], _logs(tmp_path / "f")
    r0, r1 = _results(tmp_path / "f", 2)
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), name
    assert r0["ledger"] == r1["ledger"] and r0["ledger"].total_steps == 3
    assert all(p.mechanism is Mechanism.DISCRETE_GAUSSIAN for p in r0["ledger"].phases)
    bridge = tmp_path / "b"
    bridge.mkdir()
    codes = launch_local(2, [sys.executable, BRIDGE_WORKER, str(bridge), "--steps", "3", "--secure"],
                         timeout_s=LAUNCH_TIMEOUT_S, grace_s=60, log_dir=bridge / "logs", env={"OMP_NUM_THREADS": "1"})
    assert codes == [0, 0], _logs(bridge)
    b0, b1 = (torch.load(bridge / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert all(torch.equal(b0["params"][k], b1["params"][k]) for k in b0["params"])
    assert all(p.mechanism is Mechanism.DISCRETE_GAUSSIAN for p in b0["ledger"].phases) and b0["ledger"] == b1["ledger"]


def test_bridge_make_private_refuses_what_cannot_run_on_several_ranks():
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from dpfunc.bridge import make_private
    from dpfunc.distributed import World

    two = World(0, 2, None)
    net = nn.Linear(3, 2)
    args = (net, torch.optim.SGD(net.parameters(), lr=0.1), DataLoader(TensorDataset(torch.ones(4, 3), torch.zeros(4).long()), batch_size=2))
    with pytest.raises(ValueError, match="poisson_sampling=True"):
        make_private(*args, key=Key(0), noise_multiplier=1.0, max_grad_norm=1.0, world=two, poisson_sampling=False)
    with pytest.raises(TypeError, match="world must be a dpfunc.distributed.World"):
        make_private(*args, key=Key(0), noise_multiplier=1.0, max_grad_norm=1.0, world=2)


# --------------------------------------------------------------------------- dpfunc train --nproc


def test_train_nproc_relaunches_the_same_flags_on_every_rank(monkeypatch, tmp_path, capsys):
    """`dpfunc train --nproc 3` starts 3 ranks whose command line parses to the parent's flags, with
    the parent's resolved run folder and without --nproc (no process is started here)."""
    import dpfunc.distributed as distributed
    from dpfunc.cli import _add_train, build_parser
    from dpfunc.distributed import launch_train_ranks

    flags = ["train", "--nproc", "3", "--epsilon", "2.5", "--delta", "1e-06", "--epochs", "2", "--batch-size", "16",
             "--max-grad-norm", "0.7", "--engine", "vmap", "--train-subset", "64", "--quiet", "--seed", "0",
             "--momentum", "0.5", "--lr", "0.3", "--overwrite"]
    parent = build_parser(flags).parse_args(flags)
    seen = {}

    def fake_launch(nproc, argv, **kwargs):
        seen.update(nproc=nproc, argv=argv, kwargs=kwargs)
        return [0, 0, 0]

    monkeypatch.setattr(distributed, "launch_local", fake_launch)
    assert launch_train_ranks(parent, _add_train, tmp_path / "run") == 0
    assert seen["nproc"] == 3 and seen["argv"][:4] == [sys.executable, "-m", "dpfunc", "train"]
    child_flags = seen["argv"][3:]
    assert "--nproc" not in child_flags
    child = build_parser(child_flags).parse_args(child_flags)
    assert child.run_dir == str(tmp_path / "run")
    for name, value in vars(parent).items():
        if name not in ("nproc", "run_dir"):
            assert getattr(child, name) == value, name
    monkeypatch.setattr(distributed, "launch_local", lambda nproc, argv, **kw: [0, 7, -9])
    assert launch_train_ranks(parent, _add_train, tmp_path / "run") == 7  # a failed rank fails the command


def test_run_and_exit_outside_a_process_group_is_sys_exit():
    from dpfunc.distributed import run_and_exit

    with pytest.raises(SystemExit) as e:
        run_and_exit(lambda: 3)
    assert e.value.code == 3
    with pytest.raises(ZeroDivisionError):  # no group: the exception propagates unchanged
        run_and_exit(lambda: 1 / 0)


@pytest.mark.parametrize("body, code, stderr", [
    ("return 5", 5, ""),
    ("1 / 0", 1, "ZeroDivisionError"),
    ("sys.exit('bye')", 1, "bye"),
])
def test_run_and_exit_in_a_launched_rank_leaves_by_os_exit_even_after_destroy(body, code, stderr):
    """A rank (WORLD_SIZE > 1) whose group is gone — destroyed, or never made — still skips interpreter
    teardown, where gloo's threads can SIGABRT: atexit handlers do not run, the exit code is main's."""
    import subprocess

    script = ("import atexit, sys\nfrom dpfunc.distributed import run_and_exit\n"
              "atexit.register(lambda: print('teardown ran'))\n"
              f"def main():\n    {body}\nrun_and_exit(main)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "WORLD_SIZE": "2", "RANK": "1"})
    assert done.returncode == code, done.stderr
    assert "teardown ran" not in done.stdout  # os._exit, not sys.exit
    assert stderr in done.stderr


def test_noise_that_differs_between_ranks_is_caught_not_released(tmp_path):
    """secure=True draws its noise from os.urandom on each rank; the replica check refuses the step."""
    codes = _launch(tmp_path, 2, "--last", "1", "--secure")
    # > 0, not just != 0: a rank that raises with a live gloo group used to die by SIGABRT (-6) at
    # interpreter exit now and then; the worker ends through run_and_exit, which exits with the error's code
    assert codes[0] > 0 and codes[1] > 0, (codes, _logs(tmp_path))
    for r in range(2):
        assert "the ranks' updates differ" in (tmp_path / "logs" / f"rank{r}.err").read_text(), _logs(tmp_path)
        assert not (tmp_path / f"rank{r}.pt").exists()
