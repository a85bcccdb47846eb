"""Accounting for DP-SGD with the discrete Gaussian (secure mode, :mod:`dpfunc.secure_noise`).

The bound, step by step (every step an upper bound; nothing assumes the discrete Gaussian equals the
continuous one):

1. **One step, no subsampling** (Canonne, Kamath & Steinke 2020, Theorem 14): adding i.i.d.
   ``N_Z(0, σ²Δ²)`` (grid units) to an integer-valued query of l2 sensitivity Δ is ``1/(2σ²)``-zCDP,
   i.e. Rényi-DP ``ε(α) = α/(2σ²)`` at every order α > 1.
2. **Poisson subsampling at rate q** (Zhu & Wang, "Poisson subsampled Rényi differential privacy",
   ICML 2019, Theorem 6, the bound for ANY mechanism), at integer orders α ≥ 2::

       ε'(α) ≤ 1/(α−1) · log[ (1−q)^(α−1) (αq − q + 1) + C(α,2) q² (1−q)^(α−2) e^{ε(2)}
                              + 3 Σ_{l=3..α} C(α,l) q^l (1−q)^(α−l) e^{(l−1) ε(l)} ]

   (for q = 1 there is no subsampling and ``ε'(α) = ε(α)``).
3. **T steps**: RDP adds up; ``T·ε'(α)``.
4. **(ε, δ)**: the conversion of :func:`dpfunc.accounting.rdp_to_epsilon` (Balle et al. 2020), minimised
   over the integer orders 2 … 256.

Against the continuous Gaussian: step 2 is looser than the exact subsampled-Gaussian RDP of Mironov et
al. 2019 (the factor 3 and the generic ``e^{(l−1)ε(l)}`` terms), so :func:`discrete_gaussian_epsilon` ≥
the continuous RDP ε at the same σ, q, T, δ. :func:`continuous_ratio` reports the factor; the README
lists it at the σ used by ``dpfunc train --secure-noise``.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from dpfunc.accounting.rdp import rdp_poisson_gaussian, rdp_to_epsilon

__all__ = ["DG_ORDERS", "rdp_discrete_gaussian", "rdp_poisson_discrete_gaussian", "rdp_poisson_discrete_gaussian_at",
           "discrete_gaussian_epsilon",
           "discrete_gaussian_noise_multiplier_for", "continuous_ratio", "ledger_epsilon"]

DG_ORDERS: tuple = tuple(range(2, 257))
"""Integer orders 2 … 256 (Zhu & Wang's bound is stated at integer α)."""


def _check(fn: str, sigma: float, q: float) -> None:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"{fn}: noise_multiplier must be a finite number > 0, got {sigma!r}")
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q <= 1:
        raise ValueError(f"{fn}: sampling_rate must be in (0, 1], got {q!r}")


def rdp_discrete_gaussian(noise_multiplier: float, order: float) -> float:
    """``α/(2σ²)``: the RDP of the (unsubsampled) multivariate discrete Gaussian, CKS 2020 Thm. 14."""
    return order / (2.0 * noise_multiplier**2)


def rdp_poisson_discrete_gaussian(noise_multiplier: float, sampling_rate: float, order: int) -> float:
    """Zhu & Wang 2019 Thm. 6 applied to ``rdp_discrete_gaussian``, at an integer order ≥ 2 (log-space).

    Transcription check (tested): with the factor 3 replaced by 1 and ``ε(l) = l/(2σ²)``, the sum is
    ``Σ_l C(α,l) q^l (1−q)^(α−l) e^{l(l−1)/(2σ²)}``, the exact subsampled-Gaussian RDP of Mironov et al.
    2019 at integer α (its l = 0 and l = 1 terms are the first term here); so the bound differs from the
    continuous Gaussian's exact value only by the generic factor 3 on the l ≥ 3 terms.
    """
    fn = "rdp_poisson_discrete_gaussian"
    _check(fn, noise_multiplier, sampling_rate)
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 2:
        raise ValueError(f"{fn}: order must be an int >= 2, got {order!r}")
    return _zhu_wang(float(noise_multiplier), float(sampling_rate), int(order))


def rdp_poisson_discrete_gaussian_at(noise_multiplier: float, sampling_rate: float, order: float) -> float:
    """An upper bound on the subsampled discrete Gaussian's RDP at ANY order α > 1 (for the RDP accountant).

    ``q = 1``: exactly ``α/(2σ²)``. ``q < 1``: Zhu & Wang's bound at the integer order ``max(2, ⌈α⌉)``,
    valid because Rényi divergence is non-decreasing in its order (van Erven & Harremoës 2014, Thm. 3).
    σ = 0 gives ∞ (no privacy), σ = ∞ gives 0 (nothing released).
    """
    sigma, q, a = float(noise_multiplier), float(sampling_rate), float(order)
    if not a > 1:
        raise ValueError(f"rdp_poisson_discrete_gaussian_at: order must be > 1, got {order!r}")
    if sigma == 0:
        return math.inf
    if math.isinf(sigma):
        return 0.0
    if q == 1.0:
        return rdp_discrete_gaussian(sigma, a)
    return _zhu_wang(sigma, q, max(2, math.ceil(a)))


@functools.lru_cache(maxsize=65536)
def _zhu_wang(noise_multiplier: float, sampling_rate: float, a: int, factor: float = 3.0) -> float:
    """The bound at integer order ``a``; ``factor`` is Thm. 6's 3 (other values only for the transcription test)."""
    q = sampling_rate
    if q == 1.0:
        return rdp_discrete_gaussian(noise_multiplier, a)
    lq, l1q = math.log(q), math.log1p(-q)
    terms = [(a - 1) * l1q + math.log1p((a - 1) * q)]  # (1−q)^(α−1) (αq − q + 1)
    ls = np.arange(2, a + 1)
    log_binom = np.array([math.lgamma(a + 1) - math.lgamma(l + 1) - math.lgamma(a - l + 1) for l in range(2, a + 1)])
    body = log_binom + ls * lq + (a - ls) * l1q + (ls - 1) * rdp_discrete_gaussian(noise_multiplier, ls.astype(float))
    body[1:] += math.log(factor)  # the factor 3 on the l ≥ 3 terms
    terms.extend(body.tolist())
    terms = np.asarray(terms)
    top = terms.max()
    return float(top + math.log(np.exp(terms - top).sum())) / (a - 1)


def discrete_gaussian_epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float) -> float:
    """ε of ``steps`` Poisson-subsampled discrete-Gaussian steps at δ (the module's bound; an upper bound).

    Example:
        >>> round(discrete_gaussian_epsilon(1.1, 0.01, 1000, 1e-5), 3)   # continuous RDP: 1.725
        2.015
    """
    fn = "discrete_gaussian_epsilon"
    _check(fn, noise_multiplier, sampling_rate)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{fn}: steps must be an int >= 0, got {steps!r}")
    if not 0 < delta < 1:
        raise ValueError(f"{fn}: delta must be in (0, 1), got {delta!r}")
    if steps == 0:
        return 0.0
    rdp = [steps * rdp_poisson_discrete_gaussian(noise_multiplier, sampling_rate, a) for a in DG_ORDERS]
    return rdp_to_epsilon(rdp, DG_ORDERS, delta).epsilon


def ledger_epsilon(ledger, delta: float) -> float:
    """ε of a :class:`~dpfunc.PrivacyLedger` read as if EVERY phase used the discrete Gaussian.

    Ledgers now record each phase's mechanism and ``dpfunc.epsilon(ledger, δ)`` accounts for it; this
    function is for ledgers of secure runs written before that (whose phases say "Gaussian"). It equals
    ``epsilon(ledger.with_mechanism(Mechanism.DISCRETE_GAUSSIAN), δ, RDP(orders=DG_ORDERS))``.
    """
    from dpfunc.accounting.api import epsilon
    from dpfunc.accounting.events import Mechanism
    from dpfunc.accounting.methods import RDP

    if not 0 < delta < 1:
        raise ValueError(f"ledger_epsilon: delta must be in (0, 1), got {delta!r}")
    return epsilon(ledger.with_mechanism(Mechanism.DISCRETE_GAUSSIAN), delta, RDP(orders=DG_ORDERS))


def continuous_ratio(noise_multiplier: float, sampling_rate: float, steps: int, delta: float) -> float:
    """``discrete_gaussian_epsilon / ε_RDP(continuous Gaussian)`` at the same σ, q, T, δ and orders (≥ 1)."""
    cont = [steps * rdp_poisson_gaussian(noise_multiplier, sampling_rate, float(a)) for a in DG_ORDERS]
    return discrete_gaussian_epsilon(noise_multiplier, sampling_rate, steps, delta) / rdp_to_epsilon(cont, DG_ORDERS, delta).epsilon


def discrete_gaussian_noise_multiplier_for(target_epsilon: float, delta: float, sampling_rate: float, steps: int) -> float:
    """The smallest σ (to 0.1 %, by bisection) with ``discrete_gaussian_epsilon(σ, q, T, δ) ≤ target``."""
    fn = "discrete_gaussian_noise_multiplier_for"
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"{fn}: target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    f = lambda s: discrete_gaussian_epsilon(s, sampling_rate, steps, delta)  # noqa: E731
    lo, hi = 0.05, 1.0
    while f(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"{fn}: no σ ≤ 1e4 reaches ε = {target_epsilon} (q={sampling_rate}, T={steps}, δ={delta})")
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if f(mid) <= target_epsilon else (mid, hi)
    return hi
