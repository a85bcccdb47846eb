"""Checkpoints: round trip, atomic writes, damaged files, bit-for-bit resume, the ledger is never reset."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _bridge_models import build
from dpfunc import DPConfig, Key, PerLayerClipping, PrivacyLedger, dpsgd, make_step, poisson_sample, privacy_ledger
from dpfunc.bridge import CheckpointError, FORMAT_VERSION, functionalize, load_checkpoint, make_private, save_checkpoint
import dpfunc.bridge.checkpoint as ckpt


def _mlp():
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.25), nn.Linear(8, 3))


def _data(n=48):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _functional_run(params, opt_state, key, start, stop, X, Y, step):
    for t in range(start, stop):
        idx = poisson_sample(key.fold_in(t), len(X), 0.25)
        params, opt_state, _ = step(params, opt_state, (X[idx], Y[idx]))
    return params, opt_state


def _core_setup():
    apply_fn, params, buffers = functionalize(build(lambda: nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)), 0))
    tx = dpsgd(0.1, noise_multiplier=1.1, max_grad_norm=1.0, sampling_rate=0.25, num_examples=48, key=Key(3), momentum=0.9)
    step = make_step(lambda p, b, x, y: F.cross_entropy(apply_fn(p, b, x[None]), y[None]), tx)
    return params, tx.init(params), step


def test_round_trip_of_core_state(tmp_path):
    params, opt_state, _ = _core_setup()
    ledger = PrivacyLedger().step(1.1, 0.25, 7).step(0.9, 0.25)
    cfg = DPConfig(PerLayerClipping({"0": 1.0, "2": 0.5}), 1.1, 0.25, 48)
    state = {"params": params, "opt_state": opt_state, "ledger": ledger, "key": Key(2**64 - 1), "step": 12, "config": cfg, "misc": [1, (2.5, None), {"inf": float("inf")}]}
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, state)
    back = load_checkpoint(path)
    assert back["ledger"] == ledger and back["key"] == Key(2**64 - 1) and back["step"] == 12 and back["config"] == cfg
    assert back["misc"] == [1, (2.5, None), {"inf": float("inf")}]
    assert all(torch.equal(back["params"][k], v) for k, v in params.items())
    assert type(back["opt_state"]) is type(opt_state) and privacy_ledger(back["opt_state"]) == privacy_ledger(opt_state)
    flat = lambda s: [x for x in torch.utils._pytree.tree_leaves(s) if isinstance(x, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(flat(back["opt_state"]), flat(opt_state)))
    raw = torch.load(path, weights_only=True)  # plain containers only: no pickled classes
    assert raw["version"] == FORMAT_VERSION


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    good = path.read_bytes()

    def half_write(payload, f):
        f.write(b"\x80\x02partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt, "_write", half_write)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    assert path.read_bytes() == good and load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind
    monkeypatch.undo()
    with pytest.raises(TypeError, match="cannot store Linear"):
        save_checkpoint(tmp_path / "other.pt", {"model": nn.Linear(2, 2)})
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # encoding fails before any file is created


def test_damaged_foreign_and_newer_files_raise_clear_errors(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"w": torch.randn(100)})
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a dpfunc checkpoint"):
        load_checkpoint(tmp_path / "trunc.pt")
    torch.save({"w": torch.ones(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a dpfunc checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    torch.save({"format": "dpfunc-checkpoint", "version": FORMAT_VERSION + 1, "state": {}}, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="newer than this dpfunc"):
        load_checkpoint(tmp_path / "new.pt")
    torch.save({"format": "dpfunc-checkpoint", "version": 1, "state": {"__dpfunc__": "dataclass", "type": "os:system", "fields": {}}}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="only dpfunc classes"):
        load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_functional_resume_is_bit_for_bit(tmp_path):
    X, Y = _data()
    params, opt_state, step = _core_setup()
    full, full_state = _functional_run(params, opt_state, Key(5), 0, 6, X, Y, step)
    part, part_state = _functional_run(params, opt_state, Key(5), 0, 3, X, Y, step)
    save_checkpoint(tmp_path / "c.pt", {"params": part, "opt_state": part_state, "data_key": Key(5), "step": 3})
    del part, part_state
    s = load_checkpoint(tmp_path / "c.pt")
    resumed, resumed_state = _functional_run(s["params"], s["opt_state"], s["data_key"], s["step"], 6, X, Y, step)
    assert all(torch.equal(resumed[k], full[k]) for k in full)
    assert privacy_ledger(resumed_state) == privacy_ledger(full_state) and privacy_ledger(full_state).total_steps == 6


def _bridge(seed_model, X, Y):
    net = build(_mlp, seed_model)
    opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    return make_private(
        net, opt, DataLoader(TensorDataset(X, Y), batch_size=6), key=Key(21), noise_multiplier=1.0, max_grad_norm=0.7,
        max_physical_batch_size=4, grad_sample_mode="vmap",
    )


def _epoch(model, opt, loader, stop_after=None):
    steps = 0
    for x, y in loader:
        F.cross_entropy(model(x), y).backward()
        before = opt.steps
        opt.step()
        opt.zero_grad()
        steps += opt.steps - before
        if stop_after is not None and steps == stop_after and opt.steps > before:
            return


def test_bridge_resume_is_bit_for_bit_and_keeps_the_ledger(tmp_path):
    X, Y = _data()
    # uninterrupted: two epochs of 8 logical steps
    model, opt, loader = _bridge(0, X, Y)
    _epoch(model, opt, loader)
    _epoch(model, opt, loader)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    # interrupted after 3 logical steps, saved, and resumed in a fresh process-like setup
    model, opt, loader = _bridge(0, X, Y)
    _epoch(model, opt, loader, stop_after=3)
    save_checkpoint(tmp_path / "run.pt", {"model": model.state_dict(), "optimizer": opt.state_dict()})
    model, opt, loader = _bridge(1, X, Y)  # a different init: everything must come from the checkpoint
    state = load_checkpoint(tmp_path / "run.pt")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    assert opt.ledger.total_steps == 3  # restored, not reset
    _epoch(model, opt, loader)  # the rest of epoch 1
    assert opt.steps == 8
    _epoch(model, opt, loader)
    assert opt.ledger == PrivacyLedger().step(1.0, 1 / 8, 16)
    for k, v in model.state_dict().items():
        assert torch.equal(v, full[k]), k
    # loading into an optimizer that already spent privacy would drop steps from its ledger: refused
    with pytest.raises(ValueError, match="already taken 16 private steps"):
        opt.load_state_dict(state["optimizer"])
    # a checkpoint of a different configuration is refused
    net = build(_mlp, 0)
    _, other, _ = make_private(net, torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9), DataLoader(TensorDataset(X, Y), batch_size=6), key=Key(21), noise_multiplier=2.0, max_grad_norm=0.7)
    with pytest.raises(ValueError, match="was made with"):
        other.load_state_dict(state["optimizer"])


def test_state_written_by_an_older_dpfunc_gives_a_clear_error(tmp_path):
    # dp_aggregate's state lost noise_multiplier / sampling_rate (they live in the closure since the
    # one-data-path change): a run folder from before must say so, not fail inside a constructor
    from dpfunc.private import DPAggregateState

    old = {"__dpfunc__": "namedtuple", "type": f"{DPAggregateState.__module__}:{DPAggregateState.__qualname__}",
           "fields": {"count": torch.tensor(3), "ledger": ckpt.to_plain(PrivacyLedger().step(1.0, 0.1, 3)),
                      "noise_multiplier": 1.0, "sampling_rate": 0.1, "budget": None}}
    torch.save({"format": "dpfunc-checkpoint", "version": 1, "state": old}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match=r"fields of .*DPAggregateState changed.*another dpfunc version"):
        load_checkpoint(tmp_path / "old.pt")
