"""Distributed DP over secure aggregation: the noise shares add up to central DP-SGD's noise under the
stated assumptions; the accounting is central DP-SGD's; the noisy sum is exact up to the encoding bound."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy import stats

from dpfunc import Key
from dpfunc.accounting import dpsgd_epsilon
from dpfunc.secagg import RoundFailedError, Stage
from dpfunc.secagg.distributed_dp import DistributedGaussian, distributed_noisy_sum


def _var_interval(n: int, alpha: float) -> tuple[float, float]:
    """Two-sided (1 − alpha) chi-square interval for sample variance / true variance, n samples (mean 0 known)."""
    return stats.chi2.ppf(alpha / 2, n) / n, stats.chi2.ppf(1 - alpha / 2, n) / n


def test_honest_shares_add_up_to_the_central_noise():
    """t = 4, c = 1: the h = 3 honest shares of N(0, σ²C²/3) sum to variance σ²C²; all 4 to 4/3·σ²C².
    20,000 coordinates, two-sided chi-square interval with false-alarm rate 1e-3 per check (2 checks);
    keys fixed, so deterministic in CI."""
    dn = DistributedGaussian(noise_multiplier=1.3, max_grad_norm=0.7, threshold=4, colluding_sites=1)
    zero = {"w": torch.zeros(20_000, dtype=torch.float64)}
    shares = [dn.add_share(zero, Key(11).fold_in(s))["w"] for s in range(4)]
    target = (1.3 * 0.7) ** 2
    lo, hi = _var_interval(20_000, 1e-3)
    honest = shares[0] + shares[1] + shares[2]
    assert lo <= float((honest ** 2).mean()) / target <= hi
    assert lo <= float((sum(shares) ** 2).mean()) / (target * 4 / 3) <= hi
    assert abs(float(torch.corrcoef(torch.stack([shares[0], shares[1]]))[0, 1])) < 4 / math.sqrt(20_000)


@settings(max_examples=15)
@given(t=st.integers(2, 10), data=st.data())
def test_noise_left_in_any_accepted_sum_is_at_least_central(t, data):
    c = data.draw(st.integers(0, t - 1))
    n = data.draw(st.integers(t, 12))
    sigma = data.draw(st.floats(0.1, 5.0))
    dn = DistributedGaussian(noise_multiplier=sigma, max_grad_norm=1.0, threshold=t, colluding_sites=c)
    assert dn.share_std == pytest.approx(sigma / math.sqrt(t - c))
    # any sum the server accepts has ≥ t sites; at most c of them subtract their shares
    assert dn.noise_multiplier_in_sum(n) >= sigma * (1 - 1e-12)
    assert dn.noise_multiplier_in_sum(t) == pytest.approx(sigma)
    # more colluders than assumed: less noise than claimed (the assumption matters)
    if c + 1 <= t:
        assert dn.noise_multiplier_in_sum(t, colluding=c + 1) < sigma


def test_accounting_is_central_dpsgd_at_sigma():
    dn = DistributedGaussian(noise_multiplier=1.1, max_grad_norm=1.0, threshold=3, colluding_sites=1)
    assert dn.epsilon(0.01, 500, 1e-5, "rdp") == pytest.approx(dpsgd_epsilon(1.1, 0.01, 500, 1e-5, "rdp"))


def _clipped_sums(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {s: {"a": torch.randn(3, 4, generator=g, dtype=torch.float64), "b": torch.randn(5, generator=g, dtype=torch.float64)}
            for s in range(n)}


def test_noiseless_distributed_sum_equals_the_plain_sum():
    sums = _clipped_sums(4, 0)
    dn = DistributedGaussian(noise_multiplier=0.0, max_grad_norm=1.0, threshold=3)
    out = distributed_noisy_sum(sums, dn, {s: Key(s) for s in sums}, value_clip=16.0,
                                dropouts={Stage.MASKED_INPUT: {2}})
    assert out.included == (0, 1, 3) and out.sites_clipped == 0
    for k in ("a", "b"):
        plain = sums[0][k] + sums[1][k] + sums[3][k]
        assert float((out.total[k] - plain).abs().max()) <= out.error_bound


def test_noisy_sum_carries_the_noise_of_the_included_shares():
    """4 sites, t = 3, c = 0: the sum minus the plain sum has variance 4/3 σ²C² (chi-square, alpha 1e-3)."""
    n, size = 4, 6000
    sums = {s: {"w": torch.zeros(size, dtype=torch.float64)} for s in range(n)}
    dn = DistributedGaussian(noise_multiplier=0.8, max_grad_norm=1.0, threshold=3)
    out = distributed_noisy_sum(sums, dn, {s: Key(100 + s) for s in range(n)}, value_clip=16.0)
    lo, hi = _var_interval(size, 1e-3)
    assert lo <= float((out.total["w"] ** 2).mean()) / (0.64 * 4 / 3) <= hi
    assert out.noise_multiplier_in_sum == pytest.approx(0.8 * math.sqrt(4 / 3))


def test_bad_input_and_too_few_sites():
    with pytest.raises(ValueError, match="DistributedGaussian: colluding_sites must be an int in \\[0, 2\\], got 3"):
        DistributedGaussian(1.0, 1.0, threshold=3, colluding_sites=3)
    with pytest.raises(ValueError, match="DistributedGaussian: max_grad_norm must be a finite number"):
        DistributedGaussian(1.0, 0.0, threshold=3)
    dn = DistributedGaussian(1.0, 1.0, threshold=3)
    sums = _clipped_sums(2, 1)
    with pytest.raises(RoundFailedError):
        distributed_noisy_sum(sums, dn, {s: Key(s) for s in sums}, value_clip=8.0)
    with pytest.raises(ValueError, match="keys must name exactly the sites"):
        distributed_noisy_sum(_clipped_sums(3, 1), dn, {0: Key(0)}, value_clip=8.0)
