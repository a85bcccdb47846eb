"""The iterate average of segmentation runs (``ema_decay``, ``ema_warmup``): the update rule against closed-form
weights, a training run's average against a hand-written average of the iterates it actually produced, and the
argument checks (config, function, command line). Resume with a non-default average: test_segmentation_train."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dpfunc.segmentation import SegmentationConfig, ema_update

pytestmark = pytest.mark.usefixtures("one_thread")


def _closed_form(init: dict, iterates: list[dict], decay: float, warmup: float) -> dict:
    """The average after len(iterates) steps as an explicit weighted sum (float64): the initial parameters weigh
    prod_t d_t, the iterate of step s weighs (1 - d_s) prod_{u > s} d_u, with d_t = min(decay, (1 + t)/(warmup + t))."""
    T = len(iterates)
    d = [min(decay, (1 + t) / (warmup + t)) for t in range(T)]
    weights = []
    for s in range(T):
        w = 1.0 - d[s]
        for u in range(s + 1, T):
            w *= d[u]
        weights.append(w)
    w0 = math.prod(d)
    assert math.isclose(w0 + sum(weights), 1.0, rel_tol=1e-9)  # a convex combination
    return {k: w0 * init[k].double() + sum(w * x[k].double() for w, x in zip(weights, iterates)) for k in init}


@given(seed=st.integers(0, 2**32 - 1), steps=st.integers(1, 25), decay=st.floats(0.0, 0.999),
       warmup=st.floats(1.01, 30.0))
def test_ema_update_equals_the_closed_form_weighted_sum(seed, steps, decay, warmup):
    g = torch.Generator().manual_seed(seed)
    init = {"w": torch.randn(3, 2, generator=g, dtype=torch.float64), "b": torch.randn(2, generator=g, dtype=torch.float64)}
    iterates = [{k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in init.items()} for _ in range(steps)]
    avg = dict(init)
    for t, x in enumerate(iterates):
        avg = ema_update(avg, x, decay=decay, step=t, warmup=warmup)
    expected = iterates[-1] if decay == 0 else _closed_form(init, iterates, decay, warmup)
    for k in init:
        torch.testing.assert_close(avg[k], expected[k], rtol=1e-10, atol=1e-10)


def test_ema_update_special_cases():
    init, ones = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    assert ema_update(init, ones, decay=0.0, step=5)["w"].tolist() == [1.0, 1.0]  # decay 0: the last iterate
    # warmup 2: the uniform mean of the initial parameters and every iterate so far
    avg = dict(init)
    for t in range(4):
        avg = ema_update(avg, {"w": torch.full((2,), float(t + 1))}, decay=0.999, step=t, warmup=2.0)
    torch.testing.assert_close(avg["w"], torch.full((2,), (0 + 1 + 2 + 3 + 4) / 5))
    assert init["w"].tolist() == [0.0, 0.0]  # inputs untouched


def test_ema_update_refuses_bad_arguments():
    a, p = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    for decay in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"ema_update: decay must be in \[0, 1\)"):
            ema_update(a, p, decay=decay, step=0)
    for warmup in (1.0, 0.5, float("inf")):
        with pytest.raises(ValueError, match="ema_update: warmup must be a finite number > 1"):
            ema_update(a, p, decay=0.9, step=0, warmup=warmup)
    with pytest.raises(ValueError, match="ema_update: step"):
        ema_update(a, p, decay=0.9, step=-1)
    with pytest.raises(ValueError, match="ema_update: average and params must have the same names"):
        ema_update(a, {"v": torch.ones(1)}, decay=0.9, step=0)


def test_config_and_command_line_refuse_bad_averages():
    for bad in (1.0, 0.0, -2.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="SegmentationConfig: ema_warmup must be a finite number > 1"):
            SegmentationConfig(ema_warmup=bad)
    for bad in (1.0, -0.5):
        with pytest.raises(ValueError, match=r"SegmentationConfig: ema_decay must be in \[0, 1\)"):
            SegmentationConfig(ema_decay=bad)
    from dpfunc.segmentation._cli_segment import _config, add_parser

    parser = argparse.ArgumentParser(prog="dpfunc")
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["segment", "--data-dir", "x", "--ema-decay", "0.95", "--ema-warmup", "3"])
    cfg = _config(args)
    assert (cfg.ema_decay, cfg.ema_warmup) == (0.95, 3.0)
    assert SegmentationConfig().ema_warmup == 10.0 and SegmentationConfig().ema_decay == 0.9  # the earlier rule by default


def test_cli_messages_name_the_flag_and_the_range(capsys):
    from dpfunc.segmentation._cli_segment import add_parser

    parser = argparse.ArgumentParser(prog="dpfunc")
    add_parser(parser.add_subparsers())
    for flag, bad, words in (("--ema-warmup", "1", "--ema-warmup must be a finite number > 1, got '1'"),
                             ("--ema-warmup", "x", "--ema-warmup must be a number > 1, got 'x'"),
                             ("--ema-decay", "1", "--ema-decay must be in [0, 1), got '1'")):
        with pytest.raises(SystemExit):
            parser.parse_args(["segment", "--data-dir", "x", flag, bad])
        assert words in capsys.readouterr().err


pytest.importorskip("nibabel", reason="the phantom path writes NIfTI: pip install 'dpfunc[segmentation]'")


@pytest.mark.parametrize("decay,warmup", [(0.95, 3.0), (0.0, 10.0)])
def test_a_run_evaluates_the_average_of_the_iterates_it_produced(tmp_path, monkeypatch, decay, warmup):
    """Oracle: record every iterate the DP step returns (wrapping make_step, not the averaging code), then
    rebuild the average by the closed-form weights and compare with the checkpoint's average and with the
    parameters the run selected (the average at its best validation epoch)."""
    import dpfunc.segmentation._train as T
    from dpfunc.bridge.checkpoint import load_checkpoint
    from dpfunc.segmentation import make_phantoms, train_segmentation

    data = make_phantoms(tmp_path / "liver", patients=6, seed=3, size=32, slices=6, progress=False)
    cfg = SegmentationConfig(epsilon=None, noise_multiplier=1.0, accountant="rdp", image_size=32, width=4, depth=2, groups=2,
                             batch_size=2, slices_per_patient=2, epochs=3, ema_decay=decay, ema_warmup=warmup)
    iterates = []
    real_make_step = T.make_step

    def recording_make_step(*a, **kw):
        step = real_make_step(*a, **kw)

        def wrapped(params, state, batch, **kws):
            out = step(params, state, batch, **kws)
            iterates.append({k: v.detach().clone() for k, v in out[0].items()})
            return out
        return wrapped

    monkeypatch.setattr(T, "make_step", recording_make_step)
    _, _, init, _ = T._build(cfg)
    result = train_segmentation(cfg, data_dir=data, run_dir=tmp_path / "run", progress=False, log=lambda s: None,
                                bootstrap_resamples=20)
    assert len(iterates) == result.steps == 6  # 4 training patients, 2 per step, 3 epochs
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    expected = {k: v.double() for k, v in iterates[-1].items()} if decay == 0 else _closed_form(init, iterates, decay, warmup)
    for k in init:
        torch.testing.assert_close(state["average"][k].double(), expected[k], rtol=1e-5, atol=1e-6)
        assert torch.equal(state["params"][k], iterates[-1][k])
    per_epoch = 2
    best = result.best_epoch
    chosen = {k: v.double() for k, v in iterates[best * per_epoch - 1].items()} if decay == 0 else _closed_form(init, iterates[:best * per_epoch], decay, warmup)
    for k in init:
        torch.testing.assert_close(state["best_params"][k].double(), chosen[k], rtol=1e-5, atol=1e-6)
