"""make_step: engines agree, padding changes nothing, budget and ledger, empty batches, purity.

The pure-noise check is a two-sided chi-square test on the sample variance at false-alarm rate 1e-6;
seeds are hypothesis data (derandomized under ``ci``).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from torch import nn

from dpfunc import (
    DPConfig,
    FlatClipping,
    Key,
    PerLayerClipping,
    chain,
    dp_aggregate,
    dpsgd,
    make_step,
    pad_batch,
    privacy_ledger,
    scale,
    sgd,
    vmap_engine,
)
from dpfunc.bridge import functionalize

ALPHA = 1e-6
seeds = st.integers(0, 2**32 - 1)
clippings = st.sampled_from([FlatClipping(0.5), FlatClipping(5.0), PerLayerClipping(1.0), PerLayerClipping(1.0, per_parameter=True)])


def _model(seed):
    gen = torch.Generator().manual_seed(seed)
    module = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).double()
    apply_fn, params, buffers = functionalize(module)
    params = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in params.items()}

    def loss_fn(params, buffers, x, y):
        return F.cross_entropy(apply_fn(params, buffers, x.unsqueeze(0)), y.unsqueeze(0))

    return loss_fn, params, buffers, gen


def _batch(gen, b):
    return torch.randn(b, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (b,), generator=gen)


def _tensors(tree):
    """All tensors (and plain values) of a nested optimizer state, in order."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for k in sorted(tree) for t in _tensors(tree[k])]
    if isinstance(tree, (tuple, list)):
        return [t for x in tree for t in _tensors(x)]
    return [tree]


def _same(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert len(ta) == len(tb)
    for x, y in zip(ta, tb):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
        else:
            assert x == y


def _snapshot(tree):
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, dict):
        return {k: _snapshot(v) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_snapshot(x) for x in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_snapshot(x) for x in tree)
    return tree


@given(seed=seeds, b=st.integers(1, 8), clipping=clippings, sigma=st.sampled_from([0.0, 1.0]))
def test_default_engine_and_clipping_engine_agree(seed, b, clipping, sigma):
    loss_fn, params, buffers, gen = _model(seed)
    batch = _batch(gen, b)

    def make_tx():
        return dpsgd(0.1, noise_multiplier=sigma, max_grad_norm=clipping, sampling_rate=0.1, num_examples=50, key=Key(seed), momentum=0.5)

    tx = make_tx()
    step_a = make_step(loss_fn, tx)
    step_b = make_step(None, make_tx(), engine=vmap_engine(loss_fn, clipping=clipping))
    pa, sa, ma = step_a(params, tx.init(params), batch, buffers=buffers)
    pb, sb, mb = step_b(params, tx.init(params), batch, buffers=buffers)
    for k in params:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-13, atol=1e-15)
    assert privacy_ledger(sa) == privacy_ledger(sb)
    assert float(ma.loss) == pytest.approx(float(mb.loss), rel=1e-13) and ma.batch_size == mb.batch_size == b
    # one data path: the default engine clips with the transform's clipping, so both report norms
    assert float(ma.mean_grad_norm) == pytest.approx(float(mb.mean_grad_norm), rel=1e-13) and mb.mean_grad_norm > 0
    if isinstance(clipping, FlatClipping):
        assert 0.0 <= mb.clipped_fraction <= 1.0


@given(seed=seeds, b=st.integers(0, 6), extra=st.integers(1, 4), clipping=st.sampled_from([None, FlatClipping(1.0), PerLayerClipping(1.0)]))
def test_padding_changes_nothing(seed, b, extra, clipping):
    """A padded batch with its mask gives the same step as the unpadded batch (same key)."""
    loss_fn, params, buffers, gen = _model(seed)
    batch = _batch(gen, b)
    padded, mask = pad_batch(batch, b + extra)
    # garbage in the padding rows must not matter either
    padded = (torch.where(mask[:, None], padded[0], torch.full_like(padded[0], 1e6)), padded[1])
    tx = dpsgd(0.1, noise_multiplier=1.0, max_grad_norm=clipping or 1.0, sampling_rate=0.1, num_examples=50, key=Key(seed))
    engine = vmap_engine(loss_fn, clipping=clipping) if clipping is not None else None
    step = make_step(loss_fn, tx, engine=engine)
    pa, sa, ma = step(params, tx.init(params), batch, buffers=buffers)
    pb, sb, mb = step(params, tx.init(params), padded, mask=mask, buffers=buffers)
    for k in params:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-13, atol=1e-15)
    assert ma.batch_size == mb.batch_size == b
    if b:
        assert float(ma.loss) == pytest.approx(float(mb.loss), rel=1e-12)
    else:
        assert math.isnan(ma.loss) and math.isnan(mb.loss)


@settings(max_examples=10)  # expensive; fewer examples keep the suite fast
@given(seed=seeds, sigma=st.floats(0.5, 2.0), c=st.floats(0.1, 3.0), q=st.floats(0.05, 1.0), all_masked=st.booleans())
def test_empty_batch_through_make_step_is_pure_noise(seed, sigma, c, q, all_masked):
    d, n = 40_000, 200
    params = {"w": torch.zeros(d, dtype=torch.float64)}

    def loss_fn(p, buffers, x):
        return (p["w"] @ x) ** 2

    tx = dpsgd(1.0, noise_multiplier=sigma, max_grad_norm=c, sampling_rate=q, num_examples=n, key=Key(seed))
    x = torch.ones(3 if all_masked else 0, d, dtype=torch.float64)
    mask = torch.zeros(3, dtype=torch.bool) if all_masked else None
    new, state, metrics = make_step(loss_fn, tx)(params, tx.init(params), (x,), mask=mask)
    assert metrics.batch_size == 0 and math.isnan(metrics.loss)
    assert privacy_ledger(state).total_steps == 1
    update = new["w"] - params["w"]  # lr 1: the update is -noise/(q n)
    s2, std = float(update.var()), sigma * c / (q * n)
    lo = stats.chi2.ppf(ALPHA / 2, d - 1) / (d - 1) * std**2
    hi = stats.chi2.ppf(1 - ALPHA / 2, d - 1) / (d - 1) * std**2
    assert lo <= s2 <= hi


@settings(max_examples=10)  # expensive; fewer examples keep the suite fast
@given(seed=seeds, b=st.integers(0, 5))
def test_step_is_pure_and_deterministic(seed, b):
    loss_fn, params, buffers, gen = _model(seed)
    batch = _batch(gen, b)
    tx = dpsgd(0.1, noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=0.1, num_examples=50, key=Key(seed), momentum=0.9, weight_decay=0.01)
    step = make_step(loss_fn, tx)
    state = tx.init(params)
    params, state, _ = step(params, state, batch, buffers=buffers)  # non-trivial momentum state
    snap = (_snapshot(params), _snapshot(state), _snapshot(batch), _snapshot(buffers))
    p1, s1, m1 = step(params, state, batch, buffers=buffers)
    p2, s2, m2 = step(params, state, batch, buffers=buffers)
    _same((params, state, batch, buffers), snap)
    _same(p1, p2)
    _same(s1, s2)
    assert [x for x in m1 if x == x] == [x for x in m2 if x == x] and [x != x for x in m1] == [x != x for x in m2]  # nan-aware
    assert all(not torch.equal(p1[k], params[k]) for k in params)


def test_ledger_counts_steps():
    loss_fn, params, buffers, gen = _model(0)
    tx = dpsgd(0.1, noise_multiplier=1.1, max_grad_norm=1.0, sampling_rate=0.1, num_examples=50, key=Key(0))
    step = make_step(loss_fn, tx)
    state = tx.init(params)
    for t in range(3):
        params, state, _ = step(params, state, _batch(gen, 4), buffers=buffers)
        assert privacy_ledger(state).total_steps == t + 1
    assert privacy_ledger(state).phases[0].noise_multiplier == 1.1


def test_different_steps_get_different_noise():
    """With zero gradients the update is pure noise; consecutive steps must differ."""
    params = {"w": torch.zeros(1000, dtype=torch.float64)}
    tx = dpsgd(1.0, noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=0.5, num_examples=4, key=Key(0))
    step = make_step(lambda p, b, x: (p["w"] * x).sum() * 0.0, tx)
    state = tx.init(params)
    p1, state, _ = step(params, state, (torch.ones(2, 1000, dtype=torch.float64),))
    p2, state, _ = step(p1, state, (torch.ones(2, 1000, dtype=torch.float64),))
    u1, u2 = p1["w"] - params["w"], p2["w"] - p1["w"]
    assert not torch.allclose(u1, u2)
    assert abs(float(torch.corrcoef(torch.stack([u1, u2]))[0, 1])) < 0.2


class _Budget:
    def __init__(self, max_steps):
        self.max_steps = max_steps

    def check(self, ledger):
        if ledger.total_steps > self.max_steps:
            raise RuntimeError("budget exceeded")


def test_budget_stops_the_step_before_the_engine():
    loss_fn, params, buffers, gen = _model(1)
    calls = []
    inner = vmap_engine(loss_fn, clipping=FlatClipping(1.0))

    def engine(params, buffers, batch, mask):
        calls.append(batch[0].shape[0])
        return inner(params, buffers, batch, mask)

    tx = dpsgd(0.1, noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=0.1, num_examples=50, key=Key(0), budget=_Budget(1))
    step = make_step(None, tx, engine=engine)
    state = tx.init(params)
    params, state, _ = step(params, state, _batch(gen, 3), buffers=buffers)
    assert calls == [3]
    with pytest.raises(RuntimeError, match="budget exceeded"):
        step(params, state, _batch(gen, 3), buffers=buffers)
    assert calls == [3]  # the engine never saw the second batch
    assert privacy_ledger(state).total_steps == 1


def test_tx_without_dp_aggregate_raises():
    loss_fn, params, buffers, gen = _model(2)
    tx = sgd(0.1)
    with pytest.raises(ValueError, match="make_step: tx must contain dp_aggregate"):
        make_step(loss_fn, tx)(params, tx.init(params), _batch(gen, 2), buffers=buffers)


def test_step_argument_errors():
    loss_fn, params, buffers, gen = _model(3)
    tx = dpsgd(0.1, noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=0.1, num_examples=50, key=Key(0))
    step = make_step(loss_fn, tx)
    state = tx.init(params)
    with pytest.raises(ValueError, match="make_step: give loss_fn or engine"):
        make_step(None, tx)
    with pytest.raises(ValueError, match="make_step: mask"):
        step(params, state, _batch(gen, 3), mask=torch.ones(4, dtype=torch.bool), buffers=buffers)
    with pytest.raises(ValueError, match="make_step: batch"):
        step(params, state, torch.ones(3, 4), buffers=buffers)
    with pytest.raises(ValueError, match="make_step: batch"):
        step(params, state, (), buffers=buffers)
    x, y = _batch(gen, 3)
    with pytest.raises(ValueError, match="per_example_grads: batched arguments disagree on the batch size"):
        step(params, state, (x, y[:2]), buffers=buffers)


def test_non_finite_loss_raises_unless_masked():
    params = {"w": torch.ones(2, dtype=torch.float64)}

    def loss_fn(p, buffers, x):
        return torch.log(p["w"] @ x)  # log(0) -> -inf, gradient inf/nan

    tx = dpsgd(0.1, noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=0.5, num_examples=4, key=Key(0))
    x = torch.tensor([[1.0, 1.0], [0.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
    for engine in (None, vmap_engine(loss_fn, clipping=FlatClipping(1.0))):
        step = make_step(loss_fn, tx, engine=engine)
        with pytest.raises(ValueError, match=r"non-finite per-example gradients for examples \[1\]"):
            step(params, tx.init(params), (x,))
        new, _, metrics = step(params, tx.init(params), (x,), mask=torch.tensor([True, False, True]))
        assert torch.isfinite(new["w"]).all() and math.isfinite(metrics.loss)


def test_buffers_are_used_and_not_trained():
    module = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).double().eval()
    apply_fn, params, buffers = functionalize(module)
    assert "1.running_mean" in buffers and "1.running_mean" not in params

    def loss_fn(p, b, x, y):
        return F.cross_entropy(apply_fn(p, b, x.unsqueeze(0)), y.unsqueeze(0))

    tx = dpsgd(0.1, noise_multiplier=0.0, max_grad_norm=1.0, sampling_rate=0.5, num_examples=8, key=Key(0))
    step = make_step(loss_fn, tx)
    x, y = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    pa, _, _ = step(params, tx.init(params), (x, y), buffers=buffers)
    shifted = {k: (v + 2.0 if "running_mean" in k else v) for k, v in buffers.items()}
    pb, _, _ = step(params, tx.init(params), (x, y), buffers=shifted)
    assert set(pa) == set(params)
    assert not torch.allclose(pa["0.weight"], pb["0.weight"])


def test_dp_aggregate_in_a_longer_chain_is_found():
    loss_fn, params, buffers, gen = _model(4)
    tx = chain(chain(dp_aggregate(DPConfig(1.0, 1.0, 0.1, 50), Key(0)), scale(1.0)), sgd(0.1))
    _, state, _ = make_step(loss_fn, tx)(params, tx.init(params), _batch(gen, 2), buffers=buffers)
    assert privacy_ledger(state).total_steps == 1


@settings(max_examples=10)
@given(seed=seeds, b=st.integers(0, 6), momentum=st.sampled_from([0.0, 0.9]))
def test_step_is_bit_identical_to_the_per_leaf_noise_and_update(seed, b, momentum, monkeypatch_module):
    """The multi-tensor (``torch._foreach_*``) noise and update paths against the per-leaf code they
    replaced, through whole steps: the same key gives the same parameters bit for bit."""
    import dpfunc.private
    import dpfunc.step

    def per_leaf_privatize(clipped_sum, key, *, noise_multiplier, sensitivity, expected_batch_size):
        std = noise_multiplier * sensitivity if noise_multiplier > 0 else 0.0
        gen = key.fold_in(0).generator(torch.device("cpu"))
        return {k: (v + (torch.randn(v.shape, generator=gen, dtype=v.dtype) * std if std else torch.zeros_like(v)))
                / expected_batch_size for k, v in clipped_sum.items()}

    def per_leaf_apply(params, updates):
        return {k: (p + updates[k]).to(p.dtype) for k, p in params.items()}

    def per_leaf_sgd(lr, mu):
        def update(u, state, params=None):
            buf, n = state
            if mu:
                buf = {k: v.clone() for k, v in u.items()} if n == 0 else {k: mu * buf[k] + 1.0 * v for k, v in u.items()}
                u = buf
            return {k: v * -lr for k, v in u.items()}, (buf, n + 1)

        return chain.__globals__["GradientTransformation"](lambda p: (None, 0), update)

    loss_fn, params, buffers, gen = _model(seed)
    batches = [_batch(gen, b) for _ in range(3)]
    cfg = dict(noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=0.25, num_examples=12, key=Key(seed))  # q·n = 3: division is not exact
    results = []
    for old in (False, True):
        if old:
            monkeypatch_module.setattr(dpfunc.private, "privatize", per_leaf_privatize)
            monkeypatch_module.setattr(dpfunc.step, "apply_updates", per_leaf_apply)
            tx = chain(dp_aggregate(DPConfig(1.0, 1.0, 0.25, 12), Key(seed)), per_leaf_sgd(0.1, momentum))
        else:
            tx = dpsgd(0.1, momentum=momentum, **cfg)
        step = make_step(loss_fn, tx)
        p, s = dict(params), tx.init(params)
        for batch in batches:
            p, s, _ = step(p, s, batch, buffers=buffers)
        results.append(p)
    monkeypatch_module.undo()
    for k in params:
        assert torch.equal(results[0][k], results[1][k]), k


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()
