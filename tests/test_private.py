"""dp_aggregate / dpsgd / dpadam: normalisation (invariant 5), the SGD limit, the ledger, validation.

The statistical check (pure-noise update of an empty batch) is a two-sided chi-square test on the
sample variance at false-alarm rate 1e-6, with seeds drawn by (derandomized under ``ci``) hypothesis.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from dpfunc import (
    ClippedSum,
    DPAggregateState,
    DPConfig,
    FlatClipping,
    Key,
    PerLayerClipping,
    PrivacyLedger,
    adam,
    apply_updates,
    chain,
    clip_and_sum,
    dp_aggregate,
    dpadam,
    dpsgd,
    find_dp_state,
    make_step,
    privacy_ledger,
    sgd,
)

ALPHA = 1e-6
seeds = st.integers(0, 2**32 - 1)


def assert_std(x, std):
    x = x.reshape(-1).to(torch.float64)
    n = x.numel()
    s2 = float(x.var())
    lo = stats.chi2.ppf(ALPHA / 2, n - 1) / (n - 1) * std**2
    hi = stats.chi2.ppf(1 - ALPHA / 2, n - 1) / (n - 1) * std**2
    assert lo <= s2 <= hi


def _grads(gen, b):
    return {"fc.weight": torch.randn(b, 3, 4, generator=gen, dtype=torch.float64) * 2, "fc.bias": torch.randn(b, 3, generator=gen, dtype=torch.float64)}


@given(seed=seeds, b=st.integers(0, 12), q=st.floats(0.01, 1.0), n=st.integers(1, 1000), c=st.floats(0.1, 10.0))
def test_sigma_zero_is_clipped_sum_over_expected_batch_size(seed, b, q, n, c):
    """Normalisation uses q·n, never the realised batch size b."""
    gen = torch.Generator().manual_seed(seed)
    grads = _grads(gen, b)
    cfg = DPConfig(FlatClipping(c), noise_multiplier=0.0, sampling_rate=q, num_examples=n)
    tx = dp_aggregate(cfg, Key(seed))
    out, state = tx.update(clip_and_sum(grads, FlatClipping(c)), tx.init({k: v[0] if b else v.new_zeros(v.shape[1:]) for k, v in grads.items()}))
    want = clip_and_sum(grads, FlatClipping(c)).grads
    for k in grads:
        assert torch.equal(out[k], want[k] / (q * n))
    assert int(state.count) == 1


@settings(max_examples=10)  # expensive; fewer examples keep the suite fast
@given(seed=seeds, sigma=st.floats(0.5, 3.0), c=st.floats(0.1, 5.0), q=st.floats(0.01, 1.0))
def test_empty_batch_is_pure_noise(seed, sigma, c, q):
    n = 500
    params = {"w": torch.zeros(60_000, dtype=torch.float64)}
    tx = dp_aggregate(DPConfig(c, sigma, q, n), Key(seed))
    out, _ = tx.update(clip_and_sum({"w": torch.zeros(0, 60_000, dtype=torch.float64)}, FlatClipping(c)), tx.init(params), params)
    assert out["w"].shape == (60_000,) and torch.isfinite(out["w"]).all()
    assert_std(out["w"], sigma * c / (q * n))


def _regression(seed, n=8, d=3):
    gen = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(d, generator=gen, dtype=torch.float64), "b": torch.randn((), generator=gen, dtype=torch.float64)}
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(n, generator=gen, dtype=torch.float64)
    return params, x, y


def _loss(params, buffers, x, y):
    return (x @ params["w"] + params["b"] - y) ** 2


@settings(max_examples=15)  # expensive; fewer examples keep the suite fast
@given(seed=seeds, lr=st.floats(0.001, 0.2), momentum=st.sampled_from([0.0, 0.9]))
def test_dpsgd_without_clipping_or_noise_is_sgd(seed, lr, momentum):
    params, x, y = _regression(seed)
    n = x.shape[0]
    tx = dpsgd(lr, noise_multiplier=0.0, max_grad_norm=math.inf, sampling_rate=1.0, num_examples=n, key=Key(seed), momentum=momentum)
    step = make_step(_loss, tx)
    state = tx.init(params)
    ours = params
    # hand-written mean-gradient step (momentum 0 only) and torch.optim.SGD on the mean loss
    hand = dict(params)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.SGD(list(leaves.values()), lr=lr, momentum=momentum)
    for _ in range(4):
        ours, state, metrics = step(ours, state, (x, y))
        opt.zero_grad()
        (torch.stack([_loss(leaves, {}, x[i], y[i]) for i in range(n)]).mean()).backward()
        opt.step()
        if momentum == 0.0:
            r = x @ hand["w"] + hand["b"] - y
            hand = {"w": hand["w"] - lr * (2 * r[:, None] * x).mean(0), "b": hand["b"] - lr * (2 * r).mean()}
            for k in ours:
                torch.testing.assert_close(ours[k], hand[k], rtol=1e-12, atol=1e-14)
        for k in ours:
            torch.testing.assert_close(ours[k], leaves[k].detach(), rtol=1e-12, atol=1e-14)
        assert metrics.batch_size == n
    assert privacy_ledger(state).total_steps == 4


@given(seed=seeds, lr=st.floats(0.001, 0.2))
def test_dpadam_without_clipping_or_noise_is_adam(seed, lr):
    params, x, y = _regression(seed)
    n = x.shape[0]
    tx = dpadam(lr, noise_multiplier=0.0, max_grad_norm=math.inf, sampling_rate=1.0, num_examples=n, key=Key(seed))
    step = make_step(_loss, tx)
    state = tx.init(params)
    ours = params
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.Adam(list(leaves.values()), lr=lr)
    for _ in range(3):
        ours, state, _ = step(ours, state, (x, y))
        opt.zero_grad()
        torch.stack([_loss(leaves, {}, x[i], y[i]) for i in range(n)]).mean().backward()
        opt.step()
    for k in ours:
        torch.testing.assert_close(ours[k], leaves[k].detach(), rtol=1e-10, atol=1e-12)


def test_ledger_records_every_step():
    params = {"w": torch.zeros(2)}
    tx = dpsgd(0.1, noise_multiplier=1.3, max_grad_norm=1.0, sampling_rate=0.02, num_examples=100, key=Key(0))
    state = tx.init(params)
    assert privacy_ledger(state).total_steps == 0
    for _ in range(5):
        _, state = tx.update(clip_and_sum({"w": torch.ones(3, 2)}, FlatClipping(1.0)), state, params)
    ledger = privacy_ledger(state)
    assert isinstance(ledger, PrivacyLedger) and ledger.total_steps == 5
    assert [(p.noise_multiplier, p.sampling_rate, p.steps) for p in ledger.phases] == [(1.3, 0.02, 5)]
    assert isinstance(find_dp_state(state), DPAggregateState)


def test_privacy_ledger_without_dp_aggregate_raises():
    with pytest.raises(ValueError, match="privacy_ledger: .*dp_aggregate"):
        privacy_ledger(sgd(0.1).init({"w": torch.zeros(1)}))
    assert find_dp_state((1, (2, 3))) is None


def test_dp_aggregate_is_pure_and_deterministic():
    gen = torch.Generator().manual_seed(1)
    grads = _grads(gen, 5)
    params = {k: v[0].clone() for k, v in grads.items()}
    snap = ({k: v.clone() for k, v in grads.items()}, {k: v.clone() for k, v in params.items()})
    tx = dpsgd(0.1, noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=0.1, num_examples=50, key=Key(3), momentum=0.9)
    state = tx.init(params)
    a, sa = tx.update(clip_and_sum(grads, FlatClipping(1.0)), state, params)
    b, sb = tx.update(clip_and_sum(grads, FlatClipping(1.0)), state, params)
    for k in grads:
        assert torch.equal(a[k], b[k])
        assert torch.equal(grads[k], snap[0][k]) and torch.equal(params[k], snap[1][k])
    assert int(find_dp_state(state).count) == 0 and privacy_ledger(state).total_steps == 0  # old state untouched
    assert privacy_ledger(sa) == privacy_ledger(sb)


def test_clipped_sum_input_and_sensitivity_mismatch():
    gen = torch.Generator().manual_seed(2)
    grads = _grads(gen, 4)
    params = {k: v[0] for k, v in grads.items()}
    cfg = DPConfig(FlatClipping(1.0), 1.0, 0.1, 40)
    tx = dp_aggregate(cfg, Key(0))
    # one data path: per-example gradients are refused with a message that shows the fix
    with pytest.raises(TypeError, match=r"dp_aggregate: updates must be a ClippedSum .*clip_and_sum"):
        tx.update(grads, tx.init(params), params)
    from_sum, _ = tx.update(clip_and_sum(grads, FlatClipping(1.0)), tx.init(params), params)
    from dpfunc import noise_key, privatize

    want = privatize(clip_and_sum(grads, FlatClipping(1.0)).grads, noise_key(Key(0), 0), noise_multiplier=1.0, sensitivity=1.0, expected_batch_size=4.0)
    for k in grads:
        assert torch.equal(from_sum[k], want[k])
    with pytest.raises(ValueError, match="dp_aggregate: the ClippedSum was clipped to sensitivity"):
        tx.update(clip_and_sum(grads, FlatClipping(2.0)), tx.init(params), params)
    with pytest.raises(TypeError, match="dp_aggregate: updates"):
        tx.update([1, 2], tx.init(params), params)
    assert isinstance(clip_and_sum(grads, FlatClipping(1.0)), ClippedSum)


def test_per_layer_clipping_through_dp_aggregate():
    gen = torch.Generator().manual_seed(4)
    grads = _grads(gen, 6)
    clipping = PerLayerClipping(2.0)
    tx = dp_aggregate(DPConfig(clipping, 0.0, 0.5, 12), Key(0))
    out, _ = tx.update(clip_and_sum(grads, clipping), tx.init({k: v[0] for k, v in grads.items()}))
    want = clip_and_sum(grads, clipping).grads
    for k in grads:
        assert torch.equal(out[k], want[k] / 6.0)


class _Budget:
    def __init__(self, max_steps):
        self.max_steps = max_steps
        self.seen = []

    def check(self, ledger):
        self.seen.append(ledger.total_steps)
        if ledger.total_steps > self.max_steps:
            raise RuntimeError("budget exceeded")


def test_budget_stops_dp_aggregate_before_noise():
    budget = _Budget(2)
    tx = dpsgd(0.1, noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=0.1, num_examples=10, key=Key(0), budget=budget)
    params = {"w": torch.zeros(2)}
    state = tx.init(params)
    for _ in range(2):
        _, state = tx.update(clip_and_sum({"w": torch.ones(1, 2)}, FlatClipping(1.0)), state, params)
    with pytest.raises(RuntimeError, match="budget exceeded"):
        tx.update(clip_and_sum({"w": torch.ones(1, 2)}, FlatClipping(1.0)), state, params)
    assert budget.seen == [1, 2, 3]  # it checks the ledger as it WOULD be after the step
    assert privacy_ledger(state).total_steps == 2


BASE = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "sampling_rate": 0.1, "num_examples": 100}


@pytest.mark.parametrize("factory", [dpsgd, dpadam], ids=["dpsgd", "dpadam"])
@pytest.mark.parametrize(
    "arg, bad",
    [
        ("max_grad_norm", 0.0),
        ("max_grad_norm", -1.0),
        ("max_grad_norm", math.nan),
        ("max_grad_norm", True),
        ("noise_multiplier", -0.1),
        ("noise_multiplier", math.nan),
        ("noise_multiplier", math.inf),
        ("sampling_rate", 0.0),
        ("sampling_rate", 1.5),
        ("sampling_rate", -0.5),
        ("num_examples", 0),
        ("num_examples", 10.0),
    ],
)
def test_factory_errors_name_function_and_argument(factory, arg, bad):
    with pytest.raises(ValueError, match=rf"^{factory.__name__}: {arg} ") as info:
        factory(0.1, key=Key(0), **(BASE | {arg: bad}))
    msg = str(info.value)
    assert msg.startswith(f"{factory.__name__}: {arg}") and repr(bad) in msg


@pytest.mark.parametrize(
    "args, match",
    [
        ((0.0, 1.0, 0.1, 10), "max_grad_norm"),
        ((True, 1.0, 0.1, 10), "max_grad_norm"),
        ((1.0, -1.0, 0.1, 10), "noise_multiplier"),
        ((1.0, 1.0, 0.0, 10), "sampling_rate"),
        ((1.0, 1.0, 1.01, 10), "sampling_rate"),
        ((1.0, 1.0, 0.1, 0), "num_examples"),
    ],
)
def test_dp_config_errors(args, match):
    with pytest.raises(ValueError, match=match):
        DPConfig(*args)


def test_dp_config_and_dp_aggregate_types():
    cfg = DPConfig(2.0, 1.0, 0.25, 40)
    assert cfg.clipping == FlatClipping(2.0) and cfg.expected_batch_size == 10.0
    with pytest.raises(TypeError, match="DPConfig: clipping"):
        DPConfig("1.0", 1.0, 0.1, 10)
    with pytest.raises(TypeError, match="dp_aggregate: config"):
        dp_aggregate({"noise_multiplier": 1.0}, Key(0))
    with pytest.raises(TypeError, match="dp_aggregate: key"):
        dp_aggregate(cfg, 0)


def test_chain_with_dp_aggregate_first_equals_dpsgd():
    gen = torch.Generator().manual_seed(7)
    grads = _grads(gen, 4)
    params = {k: v[0].clone() for k, v in grads.items()}
    cfg = DPConfig(1.0, 0.8, 0.1, 40)
    a = chain(dp_aggregate(cfg, Key(5)), sgd(0.3, 0.9))
    b = dpsgd(0.3, noise_multiplier=0.8, max_grad_norm=1.0, sampling_rate=0.1, num_examples=40, key=Key(5), momentum=0.9)
    clipped = clip_and_sum(grads, FlatClipping(1.0))
    ua, _ = a.update(clipped, a.init(params), params)
    ub, _ = b.update(clipped, b.init(params), params)
    pa, pb = apply_updates(params, ua), apply_updates(params, ub)
    for k in params:
        assert torch.equal(pa[k], pb[k])
    # a different key gives different noise
    c = dpsgd(0.3, noise_multiplier=0.8, max_grad_norm=1.0, sampling_rate=0.1, num_examples=40, key=Key(6), momentum=0.9)
    uc, _ = c.update(clipped, c.init(params), params)
    assert not torch.equal(ua["fc.weight"], uc["fc.weight"])


def test_adam_chain_is_post_processing_only():
    """dpadam's state starts with the DP state; adam only sees the privatised mean."""
    tx = dpadam(0.1, key=Key(0), **BASE)
    state = tx.init({"w": torch.zeros(2)})
    assert isinstance(state[0], DPAggregateState)
    assert len(state) == 2 and len(state[1]) == len(adam(0.1).init({"w": torch.zeros(2)}))


def test_noise_stream_is_separate_from_the_sampling_stream():
    """The same key given to dp_aggregate and poisson_batches must not give correlated draws."""
    from dpfunc import noise_key

    key = Key(7)
    for t in range(3):
        a = torch.randn(1000, generator=noise_key(key, t).generator(), dtype=torch.float64)
        b = torch.randn(1000, generator=key.fold_in(t).generator(), dtype=torch.float64)
        assert not torch.equal(a, b)
        assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.2  # |r| ~ N(0, 1/1000): 6σ


def test_noise_needs_a_finite_clipping_bound():
    with pytest.raises(ValueError, match="DPConfig: noise_multiplier > 0 needs a finite max_grad_norm"):
        DPConfig(float("inf"), noise_multiplier=1.0, sampling_rate=0.5, num_examples=10)
    DPConfig(float("inf"), noise_multiplier=0.0, sampling_rate=0.5, num_examples=10)  # σ = 0: allowed
