"""Rényi-DP accounting: subsampled Gaussian RDP and the RDP → (ε, δ) conversions.

Formal guarantees:
    ``rdp_poisson_gaussian(σ, q, α)`` is the exact RDP of order α of the Poisson-subsampled Gaussian
    under add-or-remove-one adjacency for integer α (Mironov, Talwar, Zhang 2019, Thm. 5, a finite sum
    evaluated in log space) and its convergent series for fractional α (ibid. §3.3), evaluated to an
    absolute tolerance of e^-30 on ``A_α``. ``rdp_wor_gaussian`` is the upper bound of Wang, Balle,
    Kasiviswanathan 2019 (Thm. 9, with ``ε(∞) = ∞`` for the Gaussian) for sampling without
    replacement under replace-one adjacency; fractional orders use the convexity of
    ``(α-1)·RDP(α)`` (linear interpolation of the integer bounds is an upper bound). RDP adds under
    composition. ``rdp_to_epsilon`` applies Balle et al. 2020, Thm. 21 (default) or the classic
    ``ε = RDP + log(1/δ)/(α-1)`` (Mironov 2017, Prop. 3) at every order and returns the minimum,
    both valid upper bounds on ε.

Edge cases: σ = 0 → RDP = ∞ at every order → ε = ∞; σ = ∞ → RDP = 0; q = 1 → α/(2σ²) exactly.

References:
    I. Mironov, K. Talwar, L. Zhang. Rényi Differential Privacy of the Sampled Gaussian Mechanism, 2019.
    Y.-X. Wang, B. Balle, S. Kasiviswanathan. Subsampled Rényi DP and Analytical Moments Accountant,
    AISTATS 2019.
    B. Balle, G. Barthe, M. Gaboardi, J. Hsu, T. Sato. Hypothesis Testing Interpretations and Rényi
    Differential Privacy, AISTATS 2020.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import numpy as np

from dpfunc.accounting._special import log_ndtr, log_sub
from dpfunc.accounting.events import DiscreteGaussianAtom, Neighboring, PoissonAtom, as_atom, check_sampling_neighboring

__all__ = [
    "DEFAULT_ORDERS",
    "TF_PRIVACY_ORDERS",
    "rdp_poisson_gaussian",
    "rdp_wor_gaussian",
    "rdp_of_atoms",
    "rdp_to_epsilon",
    "rdp_to_delta",
    "RdpConversion",
]


def _default_orders() -> tuple:
    small = [1.05, 1.1, 1.15, 1.2] + [1.25 + 0.25 * i for i in range(36)]  # 1.25 … 10.0
    mid = list(range(11, 65))
    big = sorted({int(round(x)) for x in np.geomspace(72, 1024, 24)})
    return tuple(float(a) for a in small + mid + big)


DEFAULT_ORDERS: tuple = _default_orders()
"""1.05–1.2, 1.25…10 in steps of 0.25, 11…64, then 72…1024 on a geometric grid (92 orders)."""

TF_PRIVACY_ORDERS: tuple = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
"""TF Privacy's historical default grid, for reproducing its published numbers."""


class RdpConversion(NamedTuple):
    epsilon: float
    order: float


@functools.lru_cache(maxsize=4096)
def _log_factorials(n: int) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=float)))])


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    """log A_α = log Σ_k C(α,k) q^k (1-q)^(α-k) exp((k²-k)/(2σ²)) (Mironov et al. 2019, Thm. 5)."""
    lf = _log_factorials(alpha)
    k = np.arange(alpha + 1, dtype=float)
    log_binom = lf[alpha] - lf[: alpha + 1] - lf[alpha::-1]
    terms = log_binom + k * math.log(q) + (alpha - k) * math.log1p(-q) + (k * k - k) / (2 * sigma**2)
    m = terms.max()
    return float(m + math.log(np.exp(terms - m).sum()))


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    """log A_α for fractional α: the two convergent series of Mironov et al. 2019, §3.3.

    Term i of each series is ``C(α,i)·q^i(1-q)^(α-i)·exp((i²-i)/(2σ²))·Φ-tail`` (resp. with i and
    α-i swapped); terms are summed (vectorised, signs kept) up to the first i where both are < e^-30.
    """
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    n = 64
    while True:
        i = np.arange(n, dtype=float)
        ratio = (alpha - i[:-1]) / (i[:-1] + 1)  # C(α,i+1) = C(α,i)·(α-i)/(i+1)
        log_coef = np.concatenate([[0.0], np.cumsum(np.log(np.abs(ratio)))])
        sign = np.concatenate([[1.0], np.cumprod(np.sign(ratio))])
        j = alpha - i
        log_t0 = log_coef + i * math.log(q) + j * math.log1p(-q)
        log_t1 = log_coef + j * math.log(q) + i * math.log1p(-q)
        log_e0 = log_ndtr(-(i - z0) / sigma)  # log(½·erfc((i - z0)/(√2σ)))
        log_e1 = log_ndtr(-(z0 - j) / sigma)
        log_s0 = log_t0 + (i * i - i) / (2 * sigma**2) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * sigma**2) + log_e1
        small = np.flatnonzero(np.maximum(log_s0, log_s1) < -30)
        if small.size or n >= 1 << 17:
            stop = int(small[0]) + 1 if small.size else n
            break
        n *= 4
    terms = np.concatenate([log_s0[:stop], log_s1[:stop]])
    signs = np.concatenate([sign[:stop], sign[:stop]])
    pos, neg = terms[signs > 0], terms[signs < 0]
    log_pos = float(np.logaddexp.reduce(pos)) if pos.size else -math.inf
    log_neg = float(np.logaddexp.reduce(neg)) if neg.size else -math.inf
    return log_sub(log_pos, log_neg)


@functools.lru_cache(maxsize=65536)
def rdp_poisson_gaussian(noise_multiplier: float, sampling_rate: float, order: float) -> float:
    """RDP of order ``order`` of one Poisson-subsampled Gaussian step (add-or-remove-one).

    Args:
        noise_multiplier: σ ≥ 0 (0 → ∞; ∞ → 0).
        sampling_rate: q in (0, 1]; q = 1 is the plain Gaussian, α/(2σ²).
        order: α > 1.

    Returns:
        The RDP ε(α) (a float, possibly ``math.inf``).
    """
    sigma, q, alpha = float(noise_multiplier), float(sampling_rate), float(order)
    if not alpha > 1:
        raise ValueError(f"rdp_poisson_gaussian: order must be > 1, got {order!r}")
    if sigma == 0:
        return math.inf
    if math.isinf(sigma):
        return 0.0
    if q == 1.0:
        return alpha / (2 * sigma**2)
    if float(alpha).is_integer():
        log_a = _log_a_int(q, sigma, int(alpha))
    else:
        log_a = _log_a_frac(q, sigma, alpha)
    return max(0.0, log_a / (alpha - 1))


@functools.lru_cache(maxsize=65536)
def _wor_int(sigma: float, gamma: float, alpha: int) -> float:
    """(α-1)·RDP bound of Wang, Balle, Kasiviswanathan 2019, Thm. 9, at integer α ≥ 2."""
    eps = lambda j: j / (2 * sigma**2)  # noqa: E731  (Gaussian RDP; ε(∞) = ∞ so min{2, ·} = 2)
    lf = _log_factorials(alpha)
    log_binom = lambda j: lf[alpha] - lf[j] - lf[alpha - j]  # noqa: E731
    log_gamma = math.log(gamma)
    # j = 2 term: γ² C(α,2) min{4(e^{ε(2)} - 1), 2 e^{ε(2)}}
    e2 = eps(2)
    log_min2 = min(math.log(4) + math.log(math.expm1(e2)), math.log(2) + e2)
    terms = [0.0, 2 * log_gamma + log_binom(2) + log_min2]
    terms += [j * log_gamma + log_binom(j) + (j - 1) * eps(j) + math.log(2) for j in range(3, alpha + 1)]
    t = np.array(terms)
    m = t.max()
    return float(m + math.log(np.exp(t - m).sum()))


@functools.lru_cache(maxsize=65536)
def rdp_wor_gaussian(noise_multiplier: float, sample_size: int, population_size: int, order: float) -> float:
    """Upper bound on the RDP of one Gaussian step on a sample without replacement (replace-one).

    ``noise_multiplier`` is σ/C; the replace-one sensitivity of a clipped sum is 2C, so the Gaussian
    RDP used inside the bound is ``α·4/(2σ²)`` (pass ``2·σ`` to match TF Privacy's convention).
    """
    sigma, alpha = float(noise_multiplier) / 2.0, float(order)
    if not alpha > 1:
        raise ValueError(f"rdp_wor_gaussian: order must be > 1, got {order!r}")
    if sigma == 0:
        return math.inf
    if math.isinf(sigma):
        return 0.0
    gamma = sample_size / population_size
    if gamma == 1.0:
        return alpha / (2 * sigma**2)
    lo, hi = math.floor(alpha), math.ceil(alpha)
    f = lambda a: 0.0 if a == 1 else _wor_int(sigma, gamma, int(a))  # noqa: E731
    if lo == hi:
        return f(lo) / (alpha - 1)
    w = alpha - lo
    return ((1 - w) * f(lo) + w * f(hi)) / (alpha - 1)


def rdp_of_atoms(atoms: tuple, orders: Sequence[float], neighboring: Neighboring) -> np.ndarray:
    """RDP curve (one value per order) of a composition given as canonical atoms (see ``events``)."""
    total = np.zeros(len(orders))
    for atom in map(as_atom, atoms):
        count = atom.count
        if count == 0:
            continue
        if isinstance(atom, (PoissonAtom, DiscreteGaussianAtom)):
            sigma, q = atom.noise_multiplier, atom.sampling_rate
            check_sampling_neighboring("rdp", "poisson", neighboring, q)
            if neighboring is Neighboring.REPLACE_ONE:
                sigma = sigma / 2.0  # replace-one sensitivity 2C
            if isinstance(atom, DiscreteGaussianAtom):
                from dpfunc.accounting.discrete_gaussian import rdp_poisson_discrete_gaussian_at

                curve = [rdp_poisson_discrete_gaussian_at(sigma, q, a) for a in orders]
            else:
                curve = [rdp_poisson_gaussian(sigma, q, a) for a in orders]
        else:
            check_sampling_neighboring("rdp", "wor", neighboring)
            curve = [rdp_wor_gaussian(atom.noise_multiplier, atom.sample_size, atom.population_size, a) for a in orders]
        with np.errstate(invalid="ignore"):
            total = total + count * np.asarray(curve)
    return total


def rdp_to_epsilon(rdp: Sequence[float], orders: Sequence[float], delta: float, conversion: str = "balle2020") -> RdpConversion:
    """Smallest ε over ``orders`` such that the RDP curve implies (ε, δ)-DP.

    ``conversion="balle2020"``: ε = rdp + log((α-1)/α) - (log δ + log α)/(α-1) (Balle et al. 2020,
    Thm. 21; what Opacus uses). ``conversion="classic"``: ε = rdp + log(1/δ)/(α-1) (Mironov 2017;
    what TF Privacy's tutorials used). Returns ``RdpConversion(epsilon, order)``; ε is clipped at 0.
    """
    rdp = np.asarray(rdp, dtype=float)
    a = np.asarray(orders, dtype=float)
    if conversion == "balle2020":
        eps = rdp + np.log1p(-1.0 / a) - (math.log(delta) + np.log(a)) / (a - 1)
    elif conversion == "classic":
        eps = rdp - math.log(delta) / (a - 1)
    else:
        raise ValueError(f"rdp_to_epsilon: conversion must be 'balle2020' or 'classic', got {conversion!r}")
    eps = np.where(np.isnan(eps), math.inf, eps)
    i = int(np.argmin(eps))
    return RdpConversion(max(0.0, float(eps[i])), float(a[i]))


def rdp_to_delta(rdp: Sequence[float], orders: Sequence[float], epsilon: float, conversion: str = "balle2020") -> RdpConversion:
    """Smallest δ over ``orders`` implied by the RDP curve at ``epsilon`` (inverse of the above)."""
    rdp = np.asarray(rdp, dtype=float)
    a = np.asarray(orders, dtype=float)
    with np.errstate(invalid="ignore", over="ignore"):
        if conversion == "balle2020":
            log_d = (a - 1) * (rdp - epsilon + np.log1p(-1.0 / a)) - np.log(a)
        elif conversion == "classic":
            log_d = (a - 1) * (rdp - epsilon)
        else:
            raise ValueError(f"rdp_to_delta: conversion must be 'balle2020' or 'classic', got {conversion!r}")
    log_d = np.where(np.isnan(log_d), math.inf, log_d)
    i = int(np.argmin(log_d))
    return RdpConversion(float(min(1.0, math.exp(min(log_d[i], 0.0)))), float(a[i]))
