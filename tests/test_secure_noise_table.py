"""The slot-table discrete Gaussian sampler (issue 18, throughput): rigorous exponential bounds, the
table's invariants, the exact law on every path (fast pass, ρ band, δ factor on int64 and on Python
ints, the tail) against the exact pmf and the scalar oracle, integer-only sampling, fresh entropy.

False alarms: every statistical check fails a correct sampler with probability ≤ 1e-6 (exact χ² /
binomial tail quantiles); the bits are fresh OS entropy (not derandomised), about 15 checks here.
"""

from __future__ import annotations

import math
from decimal import Decimal, getcontext

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import stats

from _pmf_chi2 import pmf_pvalue
import dpfunc.secure_noise_table as snt
from dpfunc.secure_noise import (
    DiscreteGaussianParams,
    DiscreteGaussianSampler,
    SecureRandom,
    discrete_gaussian_oracle,
    discrete_gaussian_params,
    sample_discrete_gaussian,
)
from dpfunc.secure_noise_table import (
    BODY,
    NUM_SLOTS,
    TAIL,
    build_slot_table,
    exp_neg_bounds,
    sample_discrete_gaussian_table,
    slot_table,
    uniform_below_coef_exp,
)

FALSE_ALARM = 1e-6


def _cells_pvalue(samples: np.ndarray, variance: int, cells: int = 60) -> float:
    """χ² of ``samples`` against N_Z(0, v) on ``cells`` equal-width integer cells spanning ±4σ plus the
    two tails. Cell probabilities: the pmf summed over every integer of ±(12σ + 12) for σ < 200; above,
    the normal CDF at the cells' half-integer edges (Euler–Maclaurin: relative error ≲ 1/(24σ²) ≤ 1e-6,
    and the normaliser equals σ√(2π) to within e^{−2π²σ²}), far below what 4e5 samples can resolve."""
    sd = math.sqrt(variance)
    edges = np.unique(np.round(np.linspace(-4 * sd, 4 * sd, cells + 1)).astype(np.int64))
    if sd < 200:
        r = int(12 * sd) + 12
        ys = np.arange(-r, r + 1)
        pmf = np.exp(-(ys.astype(float) ** 2) / (2 * variance))
        probs = np.bincount(np.searchsorted(edges, ys, side="right"), weights=pmf / pmf.sum(), minlength=len(edges) + 1)
    else:  # cell i holds the integers in [edges[i-1], edges[i]): its mass ≈ Φ((edges[i] − ½)/σ) − Φ((edges[i-1] − ½)/σ)
        cdf = stats.norm.cdf((edges - 0.5) / sd)
        probs = np.diff(np.concatenate([[0.0], cdf, [1.0]]))
    counts = np.bincount(np.searchsorted(edges, samples, side="right"), minlength=len(edges) + 1)
    keep = probs * samples.size >= 5
    expected = probs[keep] / probs[keep].sum() * counts[keep].sum()
    chi2 = ((counts[keep] - expected) ** 2 / expected).sum()
    assert counts[~keep].sum() <= 10 + 10 * probs[~keep].sum() * samples.size  # the tiny cells are not hoarding samples
    return float(stats.chi2.sf(chi2, keep.sum() - 1))


# ------------------------------------------------------------------------------------ rigorous exponentials

@settings(max_examples=150, deadline=None)
@given(p=st.integers(0, 10**15), q=st.integers(1, 10**14), bits=st.sampled_from([8, 40, 64, 100]))
def test_exp_neg_bounds_bracket_the_exact_value_tightly(p, q, bits):
    getcontext().prec = 90
    lo, hi = exp_neg_bounds(p, q, bits)
    exact = (Decimal(-p) / Decimal(q)).exp() * (Decimal(2) ** bits)
    assert Decimal(lo) <= exact <= Decimal(hi)
    if p <= 60 * q:  # the range the sampler uses: a few units of 2^-bits
        assert hi - lo <= 8


def test_exp_neg_bounds_edges_and_bad_input():
    assert exp_neg_bounds(0, 5, 10) == (1024, 1024)
    lo, hi = exp_neg_bounds(10**6, 1, 64)  # e^-1e6: far below 2^-64
    assert lo == 0 and 0 <= hi <= 1
    with pytest.raises(ValueError, match="exp_neg_bounds: need p >= 0"):
        exp_neg_bounds(-1, 1, 8)


class _Bits:
    """A stand-in rng for uniform_below_coef_exp: fixed further bits, counting the draws."""

    def __init__(self, value: int):
        self.value, self.draws = value, 0

    def below_scalar(self, m: int) -> int:
        self.draws += 1
        return self.value % m


def test_uniform_below_coef_exp_decides_exactly_and_lazily():
    # U's 8-bit prefix 0 and value e^-1·1 ≈ 0.3679: U < 1/256 < e^-1, decided with no further bits.
    rng = _Bits(0)
    assert uniform_below_coef_exp(0, 8, 1, 1, 1, 1, rng) and rng.draws == 0
    # prefix 255/256 > e^-1: decided "no" at once.
    assert not uniform_below_coef_exp(255, 8, 1, 1, 1, 1, rng) and rng.draws == 0
    # prefix = ⌊e^-1·2^8⌋ = 94: U ∈ [94/256, 95/256) straddles e^-1; it needs more bits, and the answer
    # is the exact comparison of the completed U with e^-1 (all further bits 1s, then all 0s).
    target = Decimal(-1).exp()
    for fill in (0, (1 << 32) - 1):
        rng = _Bits(fill)
        got = uniform_below_coef_exp(94, 8, 1, 1, 1, 1, rng)
        assert rng.draws >= 1
        u = (Decimal(94) + Decimal(fill) / Decimal(2**32)) / 256  # the first 40 bits (enough here)
        assert got == (u < target)


def test_uniform_below_coef_exp_is_a_bernoulli_of_the_stated_probability():
    """Fresh uniforms: the frequency of U < (3/4)·e^{-1/2} matches it (binomial, two-sided 1e-6)."""
    rng = SecureRandom()
    p = 0.75 * math.exp(-0.5)
    n = 20_000
    hits = sum(uniform_below_coef_exp(int(w) >> 47, 16, 3, 4, 1, 2, rng) for w in rng.words(n))
    assert stats.binomtest(hits, n, p).pvalue > FALSE_ALARM


# ------------------------------------------------------------------------------------ the table

@pytest.mark.parametrize("variance", [1, 2, 12, 1001, 90_300, 336_400_580_000, (1 << 60) + 3])
def test_table_invariants(variance):
    """Slots add up, ρ ≤ 1 and δ ≤ 1/2 are certified, the tail bound holds, the squeezes are ordered."""
    tab = slot_table(variance)
    counts = np.bincount(tab.bin_of[tab.bin_of >= 0], minlength=len(tab.count))
    assert tuple(counts) == tab.count and sum(tab.count) + tab.tail_slots <= NUM_SLOTS
    assert (tab.kind == TAIL).sum() == 1 and tab.tail_u == 1
    body = tab.kind == BODY
    assert (tab.rho_lo16[body].astype(np.int64) <= tab.rho_hi16[body]).all()
    assert (tab.rho_hi16[body] <= NUM_SLOTS).all()
    assert all(lo <= hi <= 1 << 64 for lo, hi in tab.rho64)
    assert (tab.delta_hi16 <= NUM_SLOTS // 2).all()
    assert tab.half_range >= 7 * math.sqrt(variance) and tab.tail_block * tab.half_range >= variance
    kn, kd = tab.kappa  # κ·B·2^18·f(L) ≤ 1, with f(L) from a certified upper bound
    assert kn * tab.tail_block * exp_neg_bounds(tab.half_range**2, 2 * variance, 100)[1] << 18 <= kd << 100
    # Each body slot's bin covers [start, start + w) inside [−L, L), and bins tile it in order.
    w = 1 << tab.width_bits
    starts = tab.start[body]
    assert starts.min() == -tab.half_range and starts.max() == tab.half_range - w
    assert ((starts + tab.half_range) % w == 0).all() and (np.diff(starts) >= 0).all()
    if tab.packed is not None:
        p = tab.packed
        assert (p & 0xFFFF == tab.rho_lo16).all() and ((p >> np.uint64(16)) & np.uint64(0xFFFF) == tab.delta_hi16).all()
        assert (p.view(np.int32)[1::2] == tab.start).all()
    assert 0.95 < tab.acceptance <= 1.0
    # The squeeze thresholds against a 60-digit computation of ρ_b = κ·w·e^{−near²/(2v)}/c_b and δ_max.
    getcontext().prec = 60
    kappa = Decimal(kn) / Decimal(kd)
    for b in sorted({0, len(tab.count) // 2, len(tab.count) // 3, len(tab.count) - 1}):
        near = int(tab.near[b])
        rho = kappa * w * (Decimal(-near * near) / Decimal(2 * variance)).exp() / tab.count[b]
        lo64, hi64 = tab.rho64[b]
        assert Decimal(lo64) <= rho * 2**64 <= Decimal(hi64) and rho <= 1
        s = int(np.flatnonzero(tab.bin_of == b)[0])
        assert int(tab.rho_lo16[s]) <= rho * 2**16 <= int(tab.rho_hi16[s])
        far = near + (w - 1 if near >= 0 else -(w - 1))
        assert int(tab.delta_hi16[s]) >= Decimal(far * far - near * near) / Decimal(2 * variance) * 2**16


def test_build_refuses_bad_arguments():
    with pytest.raises(ValueError, match="build_slot_table: variance must be an int"):
        build_slot_table(0)
    with pytest.raises(ValueError, match="build_slot_table: bad tail_slots"):
        build_slot_table(10, tail_slots=0)
    with pytest.raises(ValueError, match="is for variance"):
        sample_discrete_gaussian_table(3, DiscreteGaussianParams(1, 2), SecureRandom(), table=slot_table(3))
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        sample_discrete_gaussian_table(-1, DiscreteGaussianParams(1, 2), SecureRandom())
    assert sample_discrete_gaussian_table(0, DiscreteGaussianParams(1, 2), SecureRandom()).shape == (0,)


# ------------------------------------------------------------------------------------ the law, every path

@settings(max_examples=5, deadline=None)
@given(sigma=st.floats(0.3, 60.0))
def test_table_sampler_matches_the_exact_pmf_small_sigma(sigma):
    params = discrete_gaussian_params(sigma)
    y = sample_discrete_gaussian_table(60_000, params, SecureRandom())
    assert y.dtype == np.int64 and y.shape == (60_000,)
    assert pmf_pvalue(y, params.variance) > FALSE_ALARM


@pytest.mark.parametrize("sigma", [700.0, 2.5e4, 6.0e5, 2.0**30])
def test_table_sampler_matches_the_exact_pmf_large_sigma(sigma):
    """Bins wider than 1 (the δ factor is live); 6e5 is ResNet-18's σ in grid units (k = 19); 2^30: starts
    beyond int32 (no packed table), offsets wider than 16 bits, the δ factor on Python ints."""
    params = discrete_gaussian_params(sigma)
    tab = slot_table(params.variance)
    assert tab.width_bits >= 1 or sigma < 1000
    assert (tab.packed is None and tab.width_bits > 16 and tab.half_range >= snt._INT64_DELTA_RANGE) == (sigma > 1e9)
    y = sample_discrete_gaussian_table(400_000, params, SecureRandom())
    assert _cells_pvalue(y, params.variance) > FALSE_ALARM
    v = params.variance  # and the variance, 5.3 standard errors (kurtosis 3)
    assert abs(y.astype(float).var() / v - 1) <= 5.3 * math.sqrt(2 / y.size)


@pytest.mark.parametrize("t,m", [(2, 1), (4, 3), (12, 11)])
def test_table_and_oracle_agree_two_sample(t, m):
    params = DiscreteGaussianParams(t, m)
    fast = sample_discrete_gaussian_table(6000, params, SecureRandom())
    slow = np.array([discrete_gaussian_oracle(params) for _ in range(6000)])
    r = int(4 * math.sqrt(t * m)) + 1
    edges = np.arange(-r, r + 2) - 0.5
    table = np.array([np.histogram(np.clip(a, -r, r), edges)[0] for a in (fast, slow)])
    table = table[:, table.sum(0) > 0]
    assert stats.chi2_contingency(table)[1] > FALSE_ALARM


def _slow_path_table(variance: int):
    """The production table with the fast pass switched off: no slot is accepted without _resolve, every
    ρ test lands in the 64-bit band and then in the lazy exact comparison, every δ factor is drawn."""
    tab = slot_table(variance)
    body = tab.kind == BODY
    dhi = np.where(body, NUM_SLOTS // 2, 0).astype(np.uint16)  # a larger threshold only defers to _delta_factor
    return tab._replace(rho_lo16=np.zeros_like(tab.rho_lo16), rho_hi16=np.where(body, NUM_SLOTS, 0).astype(np.int32),
                        delta_hi16=dhi, packed=None, rho64=tuple((0, 1 << 64) for _ in tab.rho64))


@pytest.mark.parametrize("variance", [12, 1001, 90_300])
def test_exact_resolution_paths_alone_give_the_same_law(variance):
    y = sample_discrete_gaussian_table(4000, DiscreteGaussianParams(1, variance), SecureRandom(), table=_slow_path_table(variance))
    assert _cells_pvalue(y, variance, cells=20) > FALSE_ALARM


def test_wide_bins_the_delta_factor_carries_the_shape():
    """Bins of w = 128 = σ/7.8 over ±3σ (the tail proposal beyond): inside a bin at 1σ the target falls
    by 13 %, at 2σ by 23 %, so the uniform-in-bin proposal is visibly wrong and fine cells (width 20)
    test that the δ factor (CKS Algorithm 1 on e^{−δ}) corrects it exactly."""
    variance = 1_000_000
    tab = build_slot_table(variance, tail_sigmas=3.0, tail_slots=512, tail_u=1 << 16, target_bins=16)
    assert tab.width_bits == 7 and int(tab.delta_hi16.max()) > 0.3 * NUM_SLOTS
    y = sample_discrete_gaussian_table(200_000, DiscreteGaussianParams(1, variance), SecureRandom(), table=tab)
    assert _cells_pvalue(y, variance, cells=400) > FALSE_ALARM
    assert abs(y.astype(float).var() / variance - 1) <= 5.3 * math.sqrt(2 / y.size)


def test_delta_factor_python_int_path_gives_the_same_law(monkeypatch):
    monkeypatch.setattr(snt, "_INT64_DELTA_RANGE", 0)  # every δ factor through the Python-int branch
    variance = 90_300
    tab = slot_table(variance)
    dhi = np.where(tab.kind == BODY, NUM_SLOTS // 2, 0).astype(np.uint16)
    tab = tab._replace(delta_hi16=dhi, packed=None)
    y = sample_discrete_gaussian_table(30_000, DiscreteGaussianParams(1, variance), SecureRandom(), table=tab)
    assert _cells_pvalue(y, variance, cells=30) > FALSE_ALARM


@pytest.mark.parametrize("variance", [30, 400])
def test_tail_path_gives_the_same_law(variance):
    """A table whose tail starts at 2σ and is proposed a quarter of the time: the tail sampler and its
    exact acceptance carry ≈ 5 % of the mass, and the law is still exact (including beyond 4σ)."""
    tab = build_slot_table(variance, tail_sigmas=2.0, tail_slots=1 << 14, tail_u=1 << 16)
    assert tab.half_range <= 3 * math.sqrt(variance) + (1 << tab.width_bits) + 1
    y = sample_discrete_gaussian_table(20_000, DiscreteGaussianParams(1, variance), SecureRandom(), table=tab)
    ys = np.arange(-60 * variance, 60 * variance + 1)
    pmf = np.exp(-(ys.astype(float) ** 2) / (2 * variance))
    beyond = pmf[(ys >= tab.half_range) | (ys < -tab.half_range)].sum() / pmf.sum()
    assert beyond * y.size > 150 and ((y >= tab.half_range) | (y < -tab.half_range)).sum() >= 0.5 * beyond * y.size
    assert pmf_pvalue(y, variance) > FALSE_ALARM if variance < 10 else _cells_pvalue(y, variance, cells=30) > FALSE_ALARM


def test_sampling_uses_no_floating_point_exponential(monkeypatch):
    """Integer arithmetic only: with math.exp / np.exp / np.log made to fail, the table (built before)
    still samples, and every Bernoulli(exp(−num/den)) it asks the CKS loop for has integer arguments."""
    import dpfunc.secure_noise as sn

    variance = 1_001_000
    tab = slot_table(variance)
    seen = []
    real = sn._bern_exp_unit

    def spy(rng, num, den, start=1):
        seen.append((np.asarray(num).dtype, type(den)))
        return real(rng, num, den, start)

    def boom(*a, **k):
        raise AssertionError("floating-point exponential used while sampling")

    monkeypatch.setattr(snt, "_bern_exp_unit", spy)
    monkeypatch.setattr(math, "exp", boom)
    monkeypatch.setattr(np, "exp", boom)
    monkeypatch.setattr(np, "log", boom)
    y = sample_discrete_gaussian_table(200_000, DiscreteGaussianParams(1, variance), SecureRandom(), table=tab)
    assert y.dtype == np.int64
    assert seen and all(a.kind == "i" and b is int for a, b in seen)


def test_fresh_entropy_every_call_and_auto_dispatch():
    p = discrete_gaussian_params(1e4)
    a = sample_discrete_gaussian(5000, p, SecureRandom())
    b = sample_discrete_gaussian(5000, p, SecureRandom())
    assert not np.array_equal(a, b)
    r = SecureRandom()
    assert not np.array_equal(sample_discrete_gaussian_table(5000, p, r), sample_discrete_gaussian_table(5000, p, r))
    with pytest.raises(TypeError, match="sampler must be a DiscreteGaussianSampler"):
        sample_discrete_gaussian(10, p, r, sampler="table")
    # AUTO: the table from 4096 samples on (it leaves the CKS loop alone), CKS below.
    assert sample_discrete_gaussian(10, p, r, sampler=DiscreteGaussianSampler.TABLE).shape == (10,)


def test_threaded_parts_fill_every_position_with_the_same_law(monkeypatch):
    """Large n is split over torch.get_num_threads() worker threads, each on its own spawned ChaCha20
    stream: every position is filled, the parts differ, and the law is the same."""
    monkeypatch.setattr(snt, "PARALLEL_MIN_PER_THREAD", 1 << 14)
    monkeypatch.setattr(snt, "PARALLEL_MIN_THREADS", 3)
    monkeypatch.setattr(snt.torch, "get_num_threads", lambda: 3)
    variance = 1_001_000
    y = sample_discrete_gaussian_table(200_003, DiscreteGaussianParams(1, variance), SecureRandom())
    assert y.shape == (200_003,) and np.abs(y).max() < 12 * math.sqrt(variance)
    assert not np.array_equal(y[:1000], y[131_072:132_072])
    assert _cells_pvalue(y, variance) > FALSE_ALARM


def test_spawned_streams_are_keyed_from_the_parent(monkeypatch):
    import dpfunc.secure_noise as sn

    monkeypatch.setattr(sn.os, "urandom", lambda n: bytes(n))
    a, b = SecureRandom(), SecureRandom()
    ca, cb = a.spawn(), b.spawn()
    assert np.array_equal(ca.words(4), cb.words(4))  # a function of the parent's stream only
    assert not np.array_equal(a.spawn().words(4), SecureRandom().words(4))  # a different key from the parent's
