"""Pieces of the training driver that have closed-form answers."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpfunc.train import TrainConfig, _plan, ema_update


@given(seed=st.integers(0, 2**32 - 1), decay=st.floats(0.0, 0.99), step=st.integers(0, 1000))
def test_ema_update_is_a_convex_combination_with_warm_up(seed, decay, step):
    g = torch.Generator().manual_seed(seed)
    avg, new = {"w": torch.randn(5, generator=g, dtype=torch.float64)}, {"w": torch.randn(5, generator=g, dtype=torch.float64)}
    out = ema_update(avg, new, decay, step)
    d = min(decay, (1 + step) / (10 + step))
    torch.testing.assert_close(out["w"], d * avg["w"] + (1 - d) * new["w"], rtol=0, atol=1e-12)
    lo, hi = torch.minimum(avg["w"], new["w"]), torch.maximum(avg["w"], new["w"])
    assert bool(((out["w"] >= lo - 1e-12) & (out["w"] <= hi + 1e-12)).all())
    assert torch.equal(avg["w"], avg["w"].clone())  # inputs untouched (pure)


def test_ema_first_step_is_mostly_the_new_iterate():
    out = ema_update({"w": torch.zeros(1)}, {"w": torch.ones(1)}, 0.9, 0)
    assert out["w"].item() == pytest.approx(0.9)  # d = 1/10 at step 0


@pytest.mark.parametrize("n, batch, epochs, steps_per_epoch", [(4708, 256, 15, 18), (4708, 512, 1, 9), (100, 100, 2, 1)])
def test_plan_uses_the_expected_batch_size(n, batch, epochs, steps_per_epoch):
    q, spe, total = _plan(TrainConfig(batch_size=batch, epochs=epochs), n)
    assert q == pytest.approx(batch / n)
    assert (spe, total) == (steps_per_epoch, steps_per_epoch * epochs)


def test_plan_refuses_a_batch_larger_than_the_data():
    # issue 12: --batch-size above n used to become q = 1 without a word
    with pytest.raises(ValueError, match=r"batch_size 256 \(--batch-size\) is larger than the training set \(n = 100\)"):
        _plan(TrainConfig(batch_size=256, epochs=2), 100)


@pytest.mark.parametrize("field, value", [("ema_decay", 1.0), ("ema_decay", -0.1), ("momentum", 1.0), ("delta", 0.0), ("image_size", 32)])
def test_config_refuses_out_of_range_values(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig: {field}"):
        TrainConfig(**{field: value})


@settings(max_examples=5)  # a CNN through two engines per example: a few suffice to catch the wiring
@given(seed=st.integers(0, 2**32 - 1), views=st.integers(1, 3))
def test_both_engines_clip_augmented_views_alike(seed, views):
    """``--augment-views K`` with the fast engine clips what the vmap engine clips: each example's
    K-view mean gradient (float32, the training dtype)."""
    from dpfunc import FlatClipping, Key
    from dpfunc.bridge import functionalize
    from dpfunc.data import augment_views
    from dpfunc.models import SmallCNN
    from dpfunc.train import _make_engine

    module = SmallCNN(key=Key(seed))
    apply_fn, params, buffers = functionalize(module)
    gen = torch.Generator().manual_seed(seed)
    x = augment_views(Key(seed), torch.randn(6, 1, 28, 28, generator=gen), views)
    y = torch.randint(0, 2, (6,), generator=gen)
    outs = [
        _make_engine(TrainConfig(engine=engine, augment_views=views), module, apply_fn, FlatClipping(0.5))(params, buffers, (x, y), None)
        for engine in ("vmap", "fast")
    ]
    torch.testing.assert_close(outs[1].grads.norms, outs[0].grads.norms, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(outs[1].losses, outs[0].losses, rtol=1e-5, atol=1e-6)
    for k in params:
        torch.testing.assert_close(outs[1].grads.grads[k], outs[0].grads.grads[k], rtol=1e-4, atol=1e-6)
