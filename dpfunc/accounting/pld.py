"""Privacy-loss-distribution (PLD) accounting of Poisson-subsampled Gaussian compositions.

The privacy loss of one step is ``L = log(P(x)/Q(x))`` for the dominating pair

* remove: ``P = (1-q)N(0,σ²) + qN(1,σ²)``, ``Q = N(0,σ²)``;
* add:    ``P = N(0,σ²)``,                  ``Q = (1-q)N(0,σ²) + qN(1,σ²)``;

and ``δ(ε) = E_P[(1 - e^{ε-L})_+] + P(L = ∞)``. Under add-or-remove-one adjacency both directions are
composed separately (the direction is fixed for a pair of datasets) and the larger ε is reported. A
phase with q = 1 is the plain Gaussian, whose loss has the same law in both directions.

Discretisation ("connect the dots", Doroshenko et al. 2022): the loss axis is cut at ``g_k = k·h``;
the P-mass ``p`` of each cell ``(g_k, g_k+1]`` is split between the two endpoints so that both its
P-mass and its Q-mass ``r`` are kept (exact, from normal CDFs in log space). Because the hockey-stick
divergence is convex in ``e^ε``, this pair *dominates* the true pair, so every (ε, δ) it gives is a
valid guarantee, and it stays exact at the grid points. Mass below the per-step grid is moved up to
its first point, mass above it to ``+∞`` (both pessimistic). T-fold composition is repeated squaring
with numpy FFT convolutions.

Round-off: exponential tilting and a weighted error norm.
    A plain float64 FFT convolution has an *absolute* error of about ``eps·log n`` per entry, the same
    at every loss value. The δ that matters at small δ lives in the far upper tail (masses ~1e-12 and
    below), so an absolute error bound charged to δ at every squaring swamps δ after enough steps
    (the old accountant's ε became ``inf`` at δ ≤ 1e-8 and T ≥ 1e4). Instead every distribution is
    stored *tilted*: ``m_i = ã_i·exp(s - λ·g_i)`` with a fixed ``λ > 0`` for the whole composition, a
    log-scale ``s`` and ``max ã = 1``. Tilting commutes with convolution because the grid is additive:
    ``(a·e^{λg}) ⊛ (b·e^{λg}) = (a ⊛ b)·e^{λg}``. So the FFT runs on ``ã``, whose upper tail is of the
    same order as its bulk, and the round-off is small *relative to the tilted mass*.

    Let ``‖v‖_λ = Σ_i |v_i|·e^{λ g_i}`` (a weighted ℓ1 norm). It is submultiplicative under
    convolution on the grid: ``‖a ⊛ b‖_λ ≤ ‖a‖_λ‖b‖_λ`` (because ``g_{i+j} = g_i + g_j``). Write each
    computed distribution as ``x̂ = x + e`` where ``x`` is what exact arithmetic would give from the same
    (pessimistic) operations. We carry a bound ``E ≥ ‖e‖_λ`` (stored as ``err = E·e^{-s}``) through:

    * convolution: ``x̂⊛ŷ − x⊛y = e_x⊛ŷ + x̂⊛e_y − e_x⊛e_y``, so
      ``E_{xy} ≤ E_x‖ŷ‖_λ + ‖x̂‖_λ E_y + E_x E_y + R`` where ``R`` bounds the fresh round-off (below);
    * clipping a negative computed entry to 0 (the exact entry is ≥ 0) does not increase ``|e_i|``;
      dropping an entry ``i`` of the tilted vector (tails of relative tilted mass ≤ ``tail_mass``,
      tails whose tilted ℓ2 norm is ≤ 0.1× the convolution's fresh ℓ2 round-off bound — the FFT's noise
      floor, which would otherwise double the window at every squaring —, entries below 1e-250) adds at
      most ``|x̂_i|·e^{λ g_i}`` to ``E``: it is charged, not hidden;
    * moving the upper tail beyond ``g_c`` to ``+∞`` (where that tail's real mass is ≤ 1e-21) adds the
      computed mass plus ``E·e^{-λ g_c}`` (a bound on the exact mass minus the computed one) to
      ``P(L = ∞)``; this is pessimistic (mass moved up) and keeps the window small.

    A second bound ``E₂ ≥ ‖ẽ‖_2`` on the ℓ2 norm of the *tilted* error is carried the same way (Young:
    ``‖e ⊛ ŷ‖_2 ≤ ‖e‖_2‖ŷ‖_1``; the fresh FFT round-off is bounded in ℓ2 first, below, so it saves the
    ``√n`` of the ℓ2→ℓ1 conversion).

    The δ of a computed distribution at ε is linear with weights ``w(g) = (1 - e^{ε-g})_+ ≤ 1`` that
    vanish for ``g ≤ ε``, so ``|δ̂(ε) − δ(ε)| ≤ Σ_{g_i>ε} |e_i|·w(g_i)``. With ``e_i = ẽ_i e^{s-λ g_i}``
    the weight of ``ẽ_i`` is ``e^{s-λε}·f(g_i-ε)``, ``f(u) = e^{-λu}(1-e^{-u})``, whose maximum is
    ``≈ 1/(e(λ+1))``; so the sum is at most ``e^{-λε}·E·max f`` (ℓ1), or by Cauchy–Schwarz
    ``e^{s-λε}·E₂·(Σ_k f(u_k)²)^½`` (ℓ2). This *charge* ``C(ε)``, the smaller of the two, is added to the
    upper bound and subtracted in the lower bound. (Before, the weight was bounded by 1 and only the ℓ1
    form was used: ~300× larger, and at σ 1, q 1.5e-4, T 10182, δ 5.6e-9 the charge was 84 % of δ,
    an ε 9 % above dp_accounting's.) The relative error ``E/‖x‖_λ`` of a T-fold product grows about
    linearly in T (relative errors of factors add: squaring doubles them; measured ~1e-12·T), but it
    multiplies ``e^{-λε}‖x‖_λ = e^{-λε}·E[e^{λL}]``, the Chernoff bound on δ(ε). So the charge is
    at most ~1e-12·T *times a bound on δ*, where the old absolute charge was ~1e-12·T in absolute terms and
    reached δ = 1e-8 near T = 1e4. ``λ`` starts at the minimiser of that Chernoff bound for the discretised
    distribution at the query (ε for δ queries; the ε-optimal tilt at δ for ε queries), capped at 12/sd of
    the composition (a bounded loss, as in the "add" direction, has its Chernoff optimum at λ → ∞); the
    chooser's log-MGF is computed on one step's exact masses (pooled into 2^13 blocks only beyond that,
    each block with its mean and variance). While the charge exceeds 1 % of δ, λ is then *searched* on the
    bound itself (:func:`_search_tilt`): the Chernoff tilt centres the tilted distribution where δ is decided
    only when the MGF is dominated by that region, and at a small q and a tiny δ it is dominated by one
    step's far tail instead (σ 1, q e^-9, T 1097, δ e^-26: λ 30 where ~52 is best; the charge was 19 % of δ
    and ε 3 % above dp_accounting's). Any λ > 0 gives a valid bound; only the tightness depends on it.

    Fresh round-off of one FFT convolution of ``a, b`` (lengths summing to ``n + 1``, transform length
    ``N``): for a radix-2 FFT with accurately computed twiddles, ``‖fl(Fx) − Fx‖_2 ≤ κ‖Fx‖_2`` with
    ``κ ≈ log2 N·(μ + γ_4(√2 + μ))`` (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed.,
    Thm. 24.2; ``μ`` twiddle error, ``γ_4 = 4u/(1-4u)``, ``u = eps/2``), i.e. ``κ ≈ 3.9·eps·log2 N``. We
    use ``κ = 8·eps·(log2 N + 2)`` (2× margin; the +2 covers the real-FFT pre/post-processing pass).
    Following the error through forward transforms (``‖Fa‖_2 = √N‖a‖_2``, ``‖Fb‖_∞ ≤ ‖b‖_1``), the
    pointwise product (relative error ≤ 2·eps) and the scaled inverse gives
    ``‖ĉ − c‖_2 ≤ 1.01·(2κ + 3·eps)·(‖a‖_2‖b‖_1 + ‖a‖_1‖b‖_2)`` and ``R ≤ √n`` times that (ℓ1 over n
    entries, in tilted units). Short convolutions use direct summation:
    ``R ≤ m·eps·‖a‖_1‖b‖_1`` with ``m`` the shorter length. ``tests/test_accounting_pld_numerics.py``
    checks that measured errors stay far below these bounds.

Formal guarantees:
    ``upper`` is an upper bound on the ε (or δ) of the composition, including the FFT round-off (by the
    bound above). Not charged: the per-step CDF evaluations and their tilt (relative error ~1e-13 per
    mass, i.e. ~1e-13·T relative on δ) — a relative, not an absolute, error.
    ``lower`` is a lower bound: the connect-the-dots coupling moves each step's loss by a conditionally
    bounded amount (range h, mean in [0, h²/8]), so by Hoeffding
    ``δ_true(ε) ≥ δ_grid(ε + η) - β - (moved tail mass)`` with
    ``η = T·h²/8 + h·sqrt(T·log(1/β)/2)``, ``β = δ/100``; ``δ_grid`` is taken minus the charge.

Edge cases: σ = 0 → ε = ∞ (conservative: the true ε is ∞ only for δ < 1 - (1-q)^T); σ = ∞ → no loss;
q = 1 → the plain Gaussian, symmetric, one direction (also inside a ledger that mixes q = 1 and q < 1
phases). Never raises on large ε or many steps: the grid is coarsened so that the composed window stays
below ~2^20 points (~2^18 for the default grid's automatic refinements, see ``_choose_h``; still a valid
upper bound).

References:
    A. Koskela, J. Jälkö, A. Honkela. Computing tight DP guarantees using FFT, AISTATS 2020.
    S. Gopi, Y.T. Lee, L. Wutschitz. Numerical composition of differential privacy, NeurIPS 2021.
    V. Doroshenko, B. Ghazi, P. Kamath, R. Kumar, P. Manurangsi. Connect the dots: tighter discrete
    approximations of privacy loss distributions, PETS 2022.
    N. J. Higham. Accuracy and Stability of Numerical Algorithms, 2nd ed., SIAM 2002, §24 (FFT error).
"""

from __future__ import annotations

import collections
import functools
import math
import threading
from collections.abc import Callable
from typing import NamedTuple, Optional

import numpy as np

from dpfunc.accounting._special import log_interval_masses, log_ndtr_pair
from dpfunc.accounting.events import DiscreteGaussianAtom, Neighboring, PoissonAtom, as_atom, check_sampling_neighboring

__all__ = ["PldBounds", "pld_epsilon", "pld_delta", "DEFAULT_VALUE_DISCRETIZATION_INTERVAL"]

DEFAULT_VALUE_DISCRETIZATION_INTERVAL = 1e-4
_TAIL_Z = 10.0  # per-step grid covers ±10 standard deviations (tails ~ 1e-23, pessimistically placed)
_TAIL_MASS = 1e-15  # relative *tilted* mass cut from each side after every product (charged, see above)
_MAX_WINDOW = 2**20
_MAX_REFINED_WINDOW = 2**18  # the default grid's automatic refinements stop near here (see _choose_h)
_MIN_WINDOW = 2**14
_MAX_STEP_POINTS = 2**22
_EPS64 = float(np.finfo(float).eps)
_ABS_TAIL = 1e-21  # upper tails of at most this real mass are moved to +∞ after every product
_TINY = 1e-250  # tilted entries below this (relative to the max, 1) are dropped and charged
_FLOOR_DROP = 0.1  # after a convolution, tails of tilted ℓ2 norm ≤ this × its fresh ℓ2 round-off bound are dropped


class PldBounds(NamedTuple):
    """``upper``/``lower`` bounds on ε (or δ), the grid step ``h`` and the number of composed steps."""

    upper: float
    lower: float
    value_discretization_interval: float
    steps: int


class _Dist(NamedTuple):
    """A discrete PLD in tilted form: the mass at loss ``g_i = (offset + i)·h`` is
    ``tilted[i]·exp(log_scale - lam·g_i)``."""

    offset: int
    tilted: np.ndarray  # ≥ 0, max 1 (or all zero)
    log_scale: float
    inf_mass: float  # P(L = +∞) (an upper bound on the exact pipeline's), charged to δ
    moved: float  # mass outside the coupling (tails moved to ∞, out-of-grid mass), for the lower bound
    err: float  # bound on the weighted ℓ1 round-off ‖e‖_λ, in units of exp(log_scale)
    err2: float  # bound on the ℓ2 norm of the tilted round-off ‖ẽ‖_2, in the same units


# --- one step ------------------------------------------------------------------------------------


def _log_shifted(t: np.ndarray, q: float) -> np.ndarray:
    """``log(e^t - (1 - q))`` (``-inf`` where ``e^t <= 1 - q``), stable for all t."""
    t = np.asarray(t, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        small = np.log(np.maximum(np.expm1(np.minimum(t, 0.5)) + q, 0.0))
        large = t + np.log1p(-(1 - q) * np.exp(-np.maximum(t, 0.5)))
    return np.where(t < 0.5, small, large)


def _component_masses(sigma: float, x: np.ndarray, mean: float) -> np.ndarray:
    """log mass of N(mean, σ²) on consecutive intervals of the ascending edges ``x``."""
    z = (x - mean) / sigma
    log_cdf, log_sf_ = log_ndtr_pair(z)
    return log_interval_masses(log_cdf, log_sf_, z)


def _mix(w: float, comp0: np.ndarray, comp1: np.ndarray) -> np.ndarray:
    """log mass of ``(1-w)N(0) + wN(1)`` from the log masses of its two components."""
    if w == 0:
        return comp0
    if w == 1:
        return comp1
    return np.logaddexp(math.log1p(-w) + comp0, math.log(w) + comp1)


def _single_step_masses(sigma: float, q: float, direction: str, h: float) -> tuple:
    """Connect-the-dots PLD of one Poisson-subsampled Gaussian step (sensitivity 1), untilted:
    ``(k_lo, masses, inf_mass, moved)``; the mass ``masses[i]`` sits at loss ``(k_lo + i)·h``."""
    if q == 1.0:
        direction = "remove"  # the plain Gaussian's loss has the same law in both directions
    log_q = math.log(q)
    s_of = lambda x: (2 * x - 1) / (2 * sigma**2)  # noqa: E731
    if q < 1:
        mix_loss = lambda x: float(np.logaddexp(math.log1p(-q), log_q + s_of(x)))  # noqa: E731
    else:
        mix_loss = s_of
    if direction == "remove":  # L increasing in x, x ~ P = (1-q)N(0) + qN(1)
        k_lo = math.floor(math.log1p(-q) / h) if q < 1 else math.floor(mix_loss(1 - _TAIL_Z * sigma) / h)
        k_hi = math.ceil(mix_loss(1 + _TAIL_Z * sigma) / h)
        k = np.arange(k_lo, k_hi + 1)
        x = sigma**2 * (_log_shifted(k * h, q) - log_q) + 0.5
        w_p, w_q = q, 0.0
    else:  # add: L = -mix_loss(x) decreasing in x, x ~ P = N(0)
        k_hi = math.ceil(-math.log1p(-q) / h)
        k_lo = math.floor(-mix_loss(_TAIL_Z * sigma) / h)
        k = np.arange(k_lo, k_hi + 1)
        x = sigma**2 * (_log_shifted(-k * h, q) - log_q) + 0.5
        w_p, w_q = 0.0, q
    g = k * h
    # edges in ascending x, with the two outer intervals (-∞, x_0] and [x_n, ∞) appended
    x_asc = x if direction == "remove" else x[::-1]
    edges = np.concatenate([[-np.inf], x_asc, [np.inf]])
    comp0 = _component_masses(sigma, edges, 0.0)
    comp1 = _component_masses(sigma, edges, 1.0)
    log_p_all, log_r_all = _mix(w_p, comp0, comp1), _mix(w_q, comp0, comp1)
    outer_lo, outer_hi = float(np.exp(log_p_all[0])), float(np.exp(log_p_all[-1]))
    log_p, log_r = log_p_all[1:-1], log_r_all[1:-1]
    if direction == "add":  # back to ascending loss
        log_p, log_r = log_p[::-1], log_r[::-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.clip(np.where(np.isneginf(log_r), np.inf, log_p - log_r), g[:-1], g[1:])
    p = np.exp(log_p)
    # expm1(x)/expm1(h) for x = g_{i+1} - c ∈ [0, h], written so that a coarse grid (h > 709, e.g. σ ≈ 1e-4,
    # where the window of one step's losses spans ~1e8) cannot overflow: e^{x-h}·(1-e^{-x})/(1-e^{-h}).
    x_up = g[1:] - c
    a = np.clip(p * np.exp(x_up - h) * -np.expm1(-x_up) / -math.expm1(-h), 0.0, p)
    a = np.where(p > 0, a, 0.0)
    masses = np.zeros(len(k))
    masses[:-1] += a
    masses[1:] += p - a
    # mass outside the grid: below → first point, above → +∞ (both pessimistic)
    if direction == "remove":
        below, above = outer_lo, outer_hi
    else:  # large x is low loss
        below, above = outer_hi, outer_lo
    masses[0] += below
    # Negligible masses (< 1e-200) would make every later product subnormal (very slow): they are
    # moved to +∞ (pessimistic).
    tiny = masses < 1e-200
    tiny_mass = float(masses[tiny].sum())
    masses[tiny] = 0.0
    return int(k_lo), masses, above + tiny_mass, below + above + tiny_mass


def _tilt(offset: int, masses: np.ndarray, lam: float, h: float, inf_mass: float, moved: float) -> _Dist:
    """Tilt an exact (untilted) distribution: ``tilted ∝ masses·e^{λ g}``, max 1, no round-off charged."""
    g = (offset + np.arange(len(masses))) * h
    with np.errstate(divide="ignore"):
        t = np.where(masses > 0, np.log(np.where(masses > 0, masses, 1.0)) + lam * g, -np.inf)
    top = float(t.max()) if masses.size and np.isfinite(t).any() else 0.0
    tilted = np.exp(t - top)
    tilted[tilted < _TINY] = 0.0  # (their real mass is < 1e-250·e^{top - λg}: charged as error)
    err = float(np.exp(t - top)[np.exp(t - top) < _TINY].sum()) if masses.size else 0.0
    return _trim(_Dist(offset, tilted, top, inf_mass, moved, err, err))


def _union(a: float, b: float) -> float:
    """``1 - (1-a)(1-b)`` without losing masses below 1e-16 (``a + b - ab``), capped at 1."""
    return min(1.0, a + b - a * b)


def _trim(d: _Dist) -> _Dist:
    """Drop exact zeros at both ends (no charge)."""
    nz = np.flatnonzero(d.tilted)
    if nz.size == 0:
        return d._replace(tilted=np.zeros(1))
    return d._replace(offset=d.offset + int(nz[0]), tilted=d.tilted[nz[0] : nz[-1] + 1])


def _normalise(d: _Dist) -> _Dist:
    """Rescale so that ``max(tilted) = 1`` (exact up to one rounding per entry, charged)."""
    top = float(d.tilted.max())
    if top <= 0:
        return d
    shift = math.log(top)
    tilted = d.tilted / top
    return d._replace(tilted=tilted, log_scale=d.log_scale + shift, err=d.err / top + _EPS64 * float(tilted.sum()),
                      err2=d.err2 / top + _EPS64 * math.sqrt(float((tilted * tilted).sum())))


def _truncate(d: _Dist, lam: float, h: float, tail_mass: float, budget2: float = 0.0) -> _Dist:
    """Cut both tails. Entries whose tilted mass is ≤ ``tail_mass`` of the total (from either end), or
    whose tilted ℓ2 norm is ≤ ``budget2`` (from either end: the round-off floor an FFT leaves everywhere,
    which would otherwise double the window at every squaring), are dropped and charged (ℓ1 to ``err``,
    ℓ2 to ``err2``); in addition the upper tail is moved to ``+∞`` from the first point where its real
    mass, plus the round-off it may hide, is ≤ ``_ABS_TAIL``."""
    d = _trim(d)
    m = d.tilted
    total = float(m.sum())
    if total <= 0 or len(m) < 3:
        return d
    budget = tail_mass * total
    lo = int(np.searchsorted(np.cumsum(m), budget, side="right"))  # m[:lo] has tilted mass <= budget
    hi = len(m) - int(np.searchsorted(np.cumsum(m[::-1]), budget, side="right"))
    if budget2 > 0:
        sq = m * m
        lo = max(lo, int(np.searchsorted(np.cumsum(sq), budget2 * budget2, side="right")))
        hi = min(hi, len(m) - int(np.searchsorted(np.cumsum(sq[::-1]), budget2 * budget2, side="right")))
    lo = min(lo, len(m) - 1)
    hi = max(hi, lo + 1)
    dropped = (float(m[:lo].sum()) + float(m[hi:].sum())) * (1 + _EPS64 * len(m))
    dropped2 = math.sqrt(float((m[:lo] * m[:lo]).sum()) + float((m[hi:] * m[hi:]).sum())) * (1 + _EPS64 * len(m))
    err, err2 = d.err + dropped, d.err2 + dropped2
    inf_mass, moved = d.inf_mass, d.moved
    # real-mass cut of the upper tail (moved to +∞, pessimistic)
    g = (d.offset + np.arange(lo, hi)) * h
    with np.errstate(divide="ignore"):
        log_real = np.log(m[lo:hi]) + d.log_scale - lam * g
    real_tail = np.cumsum(np.exp(np.minimum(log_real, 0.0))[::-1])[::-1]  # mass of [i, hi)
    # round-off hidden beyond g (grid points ≥ g): ≤ e^{s-λg}·min(‖ẽ‖_1, ‖ẽ‖_2/(1 - e^{-2λh})^½) (Cauchy–Schwarz)
    hidden = min(d.err, d.err2 / math.sqrt(-math.expm1(-2 * lam * h)))
    log_hidden = math.log(max(hidden, 1e-320)) + d.log_scale - lam * g
    total_tail = real_tail * (1 + _EPS64 * len(g)) + np.exp(np.minimum(log_hidden, 0.0))
    ok = np.flatnonzero(total_tail > _ABS_TAIL)
    cut = int(ok[-1]) + 1 if ok.size else 0  # first index (relative to lo) whose tail is ≤ _ABS_TAIL
    if lo + cut < hi and cut > 0:
        high = float(total_tail[cut])
        inf_mass = _union(inf_mass, min(1.0, high))
        moved += high
        hi = lo + cut
    return _Dist(d.offset + lo, m[lo:hi].copy(), d.log_scale, inf_mass, moved, err, err2)


def _fft_roundoff(a: np.ndarray, b: np.ndarray, n: int, nfft: int, norm: int = 1) -> float:
    """ℓ1 (``norm=1``) or ℓ2 (``norm=2``) bound on the fresh round-off of ``irfft(rfft(a)·rfft(b))[:n]``
    (module docstring)."""
    a1, b1 = float(a.sum()), float(b.sum())
    a2, b2 = math.sqrt(float((a * a).sum())), math.sqrt(float((b * b).sum()))  # (not np.dot: BLAS threads)
    kappa = 8 * _EPS64 * (math.log2(nfft) + 2)
    l2 = 1.01 * (2 * kappa + 3 * _EPS64) * (a2 * b1 + a1 * b2)
    return l2 if norm == 2 else math.sqrt(n) * l2


def _convolve(a: _Dist, b: _Dist, lam: float, h: float, tail_mass: float) -> _Dist:
    x, y = a.tilted, b.tilted
    n = len(x) + len(y) - 1
    m = min(len(x), len(y))
    x1, y1 = float(x.sum()), float(y.sum())
    if m <= 32:
        out = np.convolve(x, y)
        fresh = 1.01 * m * _EPS64 * x1 * y1
        # entrywise |fl(c) - c| ≤ γ_m·(|x| ⊛ |y|), whose ℓ2 norm is ≤ γ_m·‖x‖_2‖y‖_1 (Young)
        fresh2 = 1.01 * m * _EPS64 * min(math.sqrt(float((x * x).sum())) * y1, x1 * math.sqrt(float((y * y).sum())))
    else:
        nfft = 1 << (n - 1).bit_length()
        out = np.fft.irfft(np.fft.rfft(x, nfft) * np.fft.rfft(y, nfft), nfft)[:n]
        fresh = _fft_roundoff(x, y, n, nfft)
        fresh2 = _fft_roundoff(x, y, n, nfft, norm=2)
    out = np.maximum(out, 0.0)  # the exact entries are ≥ 0: clipping never increases |error|
    top = float(out.max()) if out.size else 0.0
    budget2 = _FLOOR_DROP * fresh2 / top if top > 0 else 0.0  # in the units after _normalise
    err = a.err * y1 + x1 * b.err + a.err * b.err + fresh
    # ℓ2: ‖e_x ⊛ ŷ‖_2 ≤ ‖e_x‖_2‖ŷ‖_1, ‖e_x ⊛ e_y‖_2 ≤ ‖e_x‖_2‖e_y‖_1 (Young's inequality)
    err2 = a.err2 * y1 + x1 * b.err2 + a.err2 * b.err + fresh2
    inf_mass = _union(a.inf_mass, b.inf_mass)
    d = _Dist(a.offset + b.offset, out, a.log_scale + b.log_scale, inf_mass, a.moved + b.moved, err, err2)
    d = _normalise(d)
    small = (d.tilted < _TINY) & (d.tilted > 0)
    if small.any():
        dropped = float(d.tilted[small].sum())
        d = d._replace(tilted=np.where(small, 0.0, d.tilted), err=d.err + dropped, err2=d.err2 + dropped)
    return _truncate(d, lam, h, tail_mass, budget2)


class _TooWide(Exception):
    """A tilt-search candidate's composition outgrew its window limit or lost its relative accuracy (ℓ1
    round-off bound above 1 % of the tilted mass): the search abandons it (its bound would be useless)."""


def _check_width(d: _Dist, max_len: Optional[int]) -> _Dist:
    if max_len is not None and (len(d.tilted) > max_len or d.err > 1e-2 * float(d.tilted.sum())):
        raise _TooWide
    return d


def _self_compose(d: _Dist, count: int, lam: float, h: float, tail_mass: float,
                  max_len: Optional[int] = None) -> Optional[_Dist]:
    result: Optional[_Dist] = None
    power = _truncate(d, lam, h, tail_mass)
    while count:
        if count & 1:
            result = power if result is None else _check_width(_convolve(result, power, lam, h, tail_mass), max_len)
        count >>= 1
        if count:
            power = _check_width(_convolve(power, power, lam, h, tail_mass), max_len)
    return result


# --- grid choice, tilt choice and the composed distributions ----------------------------------------


def _effective(atoms: tuple, neighboring: Neighboring) -> tuple:
    """(σ, q, count) triples at sensitivity 1; raises for what PLD does not account."""
    out = []
    for atom in map(as_atom, atoms):
        if isinstance(atom, DiscreteGaussianAtom):
            raise ValueError("pld: the discrete Gaussian (secure mode) has no PLD here; account it with method='rdp' "
                             "(dpfunc.accounting.discrete_gaussian)")
        if not isinstance(atom, PoissonAtom):
            raise ValueError(
                "pld: SampledWithoutReplacementEvent is not supported by method='pld'; use method='rdp' "
                "(Wang-Balle-Kasiviswanathan bound) with neighboring=Neighboring.REPLACE_ONE"
            )
        sigma, q, count = atom.noise_multiplier, atom.sampling_rate, atom.count
        check_sampling_neighboring("pld", "poisson", neighboring, q)
        if neighboring is Neighboring.REPLACE_ONE:
            sigma = sigma / 2.0
        if count > 0 and not math.isinf(sigma):
            out.append((sigma, q, count))
    return tuple(out)


def _step_range(sigma: float, q: float) -> float:
    """Width of one step's loss grid (the larger of the two directions), as :func:`_single_step_masses`
    lays it out: ``[log(1-q), L(1+zσ)]`` (remove) and ``[-L(zσ), -log(1-q)]`` (add), with
    ``L(x) = log(1 - q + q·e^{(2x-1)/(2σ²)})``; ``z = 10``; for q = 1, ``[s(1-zσ), s(1+zσ)] = 2z/σ``.
    (The q = 1 width was used for every q before: at q = e^-9, σ = 1 it is 20.5 where one step's losses
    span 1.7, so the window cap coarsened an explicit 1e-5 grid to 3.9e-5.)"""
    if q == 1.0:
        return 2 * _TAIL_Z / sigma
    mix = lambda x: float(np.logaddexp(math.log1p(-q), math.log(q) + (2 * x - 1) / (2 * sigma**2)))  # noqa: E731
    return mix(1 + _TAIL_Z * sigma) - math.log1p(-q)  # (the add range, mix(zσ) - log(1-q), is smaller)


def _choose_h(triples: tuple, h: float, refine: bool = False, refined: bool = False) -> float:
    """The grid step: ``h``, coarsened so the composed window stays ≤ 2^20 points, or (``refine``, the
    default grid only) refined up to 100× when the window would have fewer than 2^14 points. The window is
    estimated as ±12 CLT standard deviations plus two steps' loss ranges (:func:`_step_range`).

    ``refined`` (the default grid's automatic refinements, :func:`_refining`): coarsened to 2^18 points of
    that window, or to the step the earlier estimate allowed (2^20 points of the window with the q = 1 range
    for every step, never smaller than the real one), whichever is finer — so a refinement is never coarser
    than before the real ranges were used, and costs at most what it cost then or a 2^18-point window."""
    var, step_range, q1_range = 0.0, 0.0, 0.0
    for sigma, q, count in triples:
        this_range = _step_range(sigma, q)
        e = math.exp(min(1.0 / sigma**2, 700.0))
        step_var = q * q * (e - 1.0) if q < 1 else 1 / sigma**2  # CLT variance of one step's loss
        var += count * min(step_var, this_range**2)
        step_range = max(step_range, this_range)
        q1_range = max(q1_range, (1 + 2 * _TAIL_Z * sigma) / (2 * sigma**2) + _TAIL_Z / sigma)
    window = 2 * 12 * math.sqrt(var) + 2 * step_range
    if refine and window / h < _MIN_WINDOW:  # tiny per-step losses: a finer grid is cheap and much tighter
        h = max(h / 100, window / _MIN_WINDOW)
    floor = window / _MAX_WINDOW
    if refined:
        floor = max(floor, min(window / _MAX_REFINED_WINDOW, (2 * 12 * math.sqrt(var) + 2 * q1_range) / _MAX_WINDOW))
    return max(h, floor, step_range / _MAX_STEP_POINTS)


_LAMBDAS = np.geomspace(2.0**-10, 2.0**20, 164)  # candidate tilts (ratio ~1.14 between neighbours)


_STEP_CACHE_BYTES = 2**28  # one step's grids kept at most (least recently used dropped first)
_step_cache: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_step_cache_bytes = 0
_step_cache_lock = threading.Lock()


def _single_step_cached(sigma: float, q: float, direction: str, h: float) -> tuple:
    """:func:`_single_step_masses`, memoised by bytes rather than by count.

    The tilt chooser, the moments and the composition each walk every phase in order; with a
    count-bounded LRU smaller than the number of distinct (σ, q, direction) phases that cyclic walk
    evicted every entry before its reuse (a 300-phase ledger recomputed each step's grid 3 times:
    44 s, most of it in erfc). A pure cache: the results are bit for bit the same."""
    global _step_cache_bytes
    key = (sigma, q, direction, h)
    with _step_cache_lock:
        out = _step_cache.get(key)
        if out is not None:
            _step_cache.move_to_end(key)
            return out
    out = _single_step_masses(sigma, q, direction, h)
    out[1].setflags(write=False)
    with _step_cache_lock:
        if key not in _step_cache:
            _step_cache[key] = out
            _step_cache_bytes += out[1].nbytes
        while _step_cache_bytes > _STEP_CACHE_BYTES and len(_step_cache) > 1:
            _, old = _step_cache.popitem(last=False)
            _step_cache_bytes -= old[1].nbytes
    return out


_MGF_BLOCKS = 2**13  # the tilt chooser pools one step's masses into at most this many blocks


@functools.lru_cache(maxsize=32)
def _log_mgf(triples: tuple, direction: str, h: float) -> np.ndarray:
    """``log E[e^{λL}]`` of the discretised composition (finite part) at every λ in ``_LAMBDAS``: the sum
    over phases of ``count·log Σ_i m_i e^{λ g_i}``. Exact for one step's grid of ≤ 2^13 points; a longer
    grid is pooled into 2^13 blocks, each kept as its mass, mass-weighted mean and variance
    (``M·e^{λμ + λ²v/2}``). It only *chooses* the tilt, so this approximation affects tightness, never
    validity. (An earlier version put each of ≤ 2048 blocks at its centre: an error of up to half a
    block in the per-step mean, times T — at σ 0.8, q 1e-3, T 1e6 it made the mean loss 760 instead of
    1.9, and the δ query's tilt collapsed to the smallest candidate, a 70 % looser δ.)"""
    total = np.zeros(len(_LAMBDAS))
    for sigma, q, count in triples:
        k_lo, masses, _, _ = _single_step_cached(sigma, q, direction, h)
        g = (k_lo + np.arange(len(masses))) * h
        block = max(1, -(-len(masses) // _MGF_BLOCKS))
        pad = (-len(masses)) % block
        m_b = np.concatenate([masses, np.zeros(pad)]).reshape(-1, block)
        g_b = np.concatenate([g, np.full(pad, g[-1])]).reshape(-1, block)
        pooled = m_b.sum(axis=1)
        keep = pooled > 0
        pooled, m_b, g_b = pooled[keep], m_b[keep], g_b[keep]
        mu = (m_b * g_b).sum(axis=1) / pooled
        var = (m_b * (g_b - mu[:, None]) ** 2).sum(axis=1) / pooled if block > 1 else np.zeros(len(mu))
        log_p = np.log(pooled)
        step = np.empty(len(_LAMBDAS))
        for i in range(0, len(_LAMBDAS), 8):  # chunks of λ: bounded memory (8 × 2^13 floats)
            lam = _LAMBDAS[i:i + 8, None]
            t = log_p[None, :] + lam * mu[None, :] + 0.5 * lam * lam * var[None, :]
            top = t.max(axis=1)
            step[i:i + 8] = top + np.log(np.exp(t - top[:, None]).sum(axis=1))
        total += count * step
    total.setflags(write=False)
    return total


@functools.lru_cache(maxsize=32)
def _moments(triples: tuple, direction: str, h: float) -> tuple:
    """(mean, variance) of the discretised composition's finite part."""
    mean, var = 0.0, 0.0
    for sigma, q, count in triples:
        k_lo, masses, _, _ = _single_step_cached(sigma, q, direction, h)
        total = float(masses.sum())
        if total <= 0:
            continue
        g = (k_lo + np.arange(len(masses))) * h
        step_mean = float((masses * g).sum()) / total
        mean += count * step_mean
        var += count * float((masses * (g - step_mean) ** 2).sum()) / total
    return mean, var


def _lambda_cap(triples: tuple, direction: str, h: float) -> float:
    """``12 / sd`` of the discretised composition's finite part: a larger tilt would move the tilted
    centre more than ~12 standard deviations (e.g. the Chernoff optimum is λ → ∞ when the loss is bounded
    above, as in the "add" direction), dropping the mass where δ is decided."""
    var = _moments(triples, direction, h)[1]
    return 12.0 / math.sqrt(var) if var > 0 else float(_LAMBDAS[-1])


def _tilt_for_epsilon(triples: tuple, direction: str, h: float, epsilon: float) -> float:
    """The λ minimising the Chernoff bound ``e^{-λε}E[e^{λL}] ≥ δ(ε)`` of the discretised composition
    (capped by :func:`_lambda_cap`): the tilt that centres the tilted distribution where δ(ε) is decided."""
    lam = float(_LAMBDAS[int(np.argmin(_log_mgf(triples, direction, h) - _LAMBDAS * epsilon))])
    return min(lam, _lambda_cap(triples, direction, h))


def _tilt_for_delta(triples: tuple, direction: str, h: float, delta: float) -> float:
    """The λ minimising the Chernoff ε bound ``(log E[e^{λL}] + log(1/δ))/λ`` at ``delta`` (capped)."""
    lam = float(_LAMBDAS[int(np.argmin((_log_mgf(triples, direction, h) + math.log(1 / delta)) / _LAMBDAS))])
    return min(lam, _lambda_cap(triples, direction, h))


@functools.lru_cache(maxsize=8)
def _composed(triples: tuple, direction: str, h: float, tail_mass: float, lam: float,
              max_len: Optional[int] = None) -> _Dist:
    """The composition of ``triples`` in one direction, tilted by ``lam``; raises :class:`_TooWide` when
    ``max_len`` is given and an intermediate window exceeds it (used for tilt-search candidates only)."""
    total: Optional[_Dist] = None
    for sigma, q, count in triples:
        k_lo, masses, inf_mass, moved = _single_step_cached(sigma, q, direction, h)
        one = _tilt(k_lo, masses, lam, h, inf_mass, moved)
        part = _self_compose(one, count, lam, h, tail_mass, max_len)
        total = part if total is None else _check_width(_convolve(total, part, lam, h, tail_mass), max_len)
    return total


# --- δ(ε) and ε(δ) of a composed distribution -----------------------------------------------------
# Round-off charge at ε: the error of δ̂(ε) is Σ_{g_i>ε} e_i·w(g_i), w(g) = 1 - e^{ε-g}, over error entries
# e_i on grid points (inside the stored window or not: dropped tails are errors too). In tilted units
# e_i = ẽ_i·e^{s-λ g_i}, so with u = g - ε > 0 the weight of ẽ_i is e^{s-λε}·f(u), f(u) = e^{-λu}(1 - e^{-u}):
#   ℓ1: Σ ≤ e^{s-λε}‖ẽ‖_1·max f,  max f = (λ/(λ+1))^λ/(λ+1)  (≈ 1/(e(λ+1)); at u = log(1 + 1/λ));
#   ℓ2 (Cauchy–Schwarz): Σ ≤ e^{s-λε}‖ẽ‖_2·(Σ_k f(u_k)²)^½, and for the unimodal f² on a grid of step h,
#       Σ_k f(u_k)² ≤ ∫_0^∞ f²/h + max f² = 1/(λ(2λ+1)(2λ+2)h) + (max f)².
# The charge C(ε) is the smaller of the two, times 1.01 (round-off in evaluating the bounds themselves).
# It is K·e^{-λε}: continuous and decreasing, so δ̂(ε) + C(ε) is decreasing in ε. (The ℓ2 form wins by
# ~√(n·λh): it avoids the √n of the ℓ2→ℓ1 conversion of every FFT's round-off.)


class _View(NamedTuple):
    g: np.ndarray  # grid losses of the stored entries
    m: np.ndarray  # their real masses (capped at 1)
    inf_mass: float
    log_e: float  # log K, the charge at ε = 0 (−inf when no round-off): C(ε) = min(1, K·e^{-λε})
    lam: float


def _log_charge_weights(lam: float, h: float) -> tuple:
    """(log max f, log (Σ f²)^½ bound) of the charge comment above, for tilt ``lam`` and grid step ``h``."""
    log_w1 = min(0.0, -lam * math.log1p(1.0 / lam) - math.log1p(lam))
    log_w2 = 0.5 * float(np.logaddexp(-math.log(lam) - math.log1p(2 * lam) - math.log(2 * lam + 2) - math.log(h),
                                      2 * log_w1))
    return log_w1, log_w2


def _view(d: _Dist, lam: float, h: float) -> _View:
    g = (d.offset + np.arange(len(d.tilted))) * h
    with np.errstate(divide="ignore", over="ignore"):
        m = np.exp(np.minimum(np.log(d.tilted) + d.log_scale - lam * g, 0.0))
    # capping a computed mass at 1 never increases its error: exact masses are ≤ 1
    log_w1, log_w2 = _log_charge_weights(lam, h)
    log_k = min(math.log(d.err) + log_w1 if d.err > 0 else -math.inf,
                math.log(d.err2) + log_w2 if d.err2 > 0 else -math.inf)
    log_k = log_k + d.log_scale + math.log(1.01) if log_k > -math.inf else -math.inf
    return _View(g, m, d.inf_mass, log_k, lam)


def _charge(v: _View, eps: float) -> float:
    return math.exp(min(0.0, v.log_e - v.lam * eps)) if v.log_e > -math.inf else 0.0


def _grid_delta(v: _View, eps: float) -> float:
    """Σ_{g_i > ε} m_i (1 - e^{ε - g_i}) (not np.dot: BLAS threads)."""
    j = int(np.searchsorted(v.g, eps, side="right"))
    return float((v.m[j:] * -np.expm1(eps - v.g[j:])).sum())


def _delta_at(d: _Dist, lam: float, h: float, eps: float, sign: int = 1) -> float:
    """δ̂(ε) + inf mass, plus (sign=+1) or minus (sign=-1) the round-off charge C(ε)."""
    v = _view(d, lam, h)
    return _grid_delta(v, eps) + v.inf_mass + sign * _charge(v, eps)


def _epsilon_at(d: _Dist, lam: float, h: float, delta: float) -> float:
    """Smallest ε ≥ 0 (to within 1e-9·h, rounded up) with δ̂(ε) + inf + C(ε) ≤ δ; ∞ if none."""
    v = _view(d, lam, h)
    if v.inf_mass >= delta:
        return math.inf

    def up(eps: float) -> float:
        return _grid_delta(v, eps) + v.inf_mass + _charge(v, eps)

    if up(0.0) <= delta:
        return 0.0
    hi = max(float(v.g[-1]), 0.0)
    if v.log_e > -math.inf:  # beyond the window only inf mass and the charge remain
        hi = max(hi, (v.log_e - math.log(delta - v.inf_mass)) / lam)
    hi += h
    lo = 0.0
    # bisection on grid points first (δ̂ is piecewise smooth between them), then within the cell
    klo, khi = 0, max(1, math.ceil(hi / h))
    while up(khi * h) > delta:  # (cannot loop long: up → inf_mass < δ)
        klo, khi = khi, 2 * khi
    while khi - klo > 1:
        mid = (klo + khi) // 2
        if up(mid * h) > delta:
            klo = mid
        else:
            khi = mid
    lo, hi = klo * h, khi * h
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if up(mid) > delta:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-9 * h:
            break
    return hi


def _epsilon_lower(d: _Dist, lam: float, h: float, target: float, hint: float = math.inf) -> float:
    """An ε with δ̂(ε) + inf − C(ε) > target (so the exact pipeline's δ(ε) > target), the largest
    found by bisection on grid points; 0 if none. Any such ε is valid, so the search need not be exact."""
    v = _view(d, lam, h)

    def low(eps: float) -> float:
        return _grid_delta(v, eps) + v.inf_mass - _charge(v, eps)

    if not low(0.0) > target:
        # low(ε) need not be monotone (the charge falls with ε): probe below the upper bound ``hint``
        if not math.isfinite(hint):
            return 0.0
        for k in range(48):
            x = hint - h * 2.0**k
            if x <= 0:
                break
            if low(x) > target:
                return x
        return 0.0
    if v.inf_mass > target:
        return math.inf
    klo, khi = 0, max(1, math.ceil(max(float(v.g[-1]), 0.0) / h) + 1)
    while khi - klo > 1:
        mid = (klo + khi) // 2
        if low(mid * h) > target:
            klo = mid
        else:
            khi = mid
    return klo * h


def _directions(triples: tuple) -> tuple:
    return ("remove",) if all(q == 1.0 for _, q, _ in triples) else ("remove", "add")


def _prepare(atoms: tuple, neighboring: Neighboring, value_discretization_interval: Optional[float],
             refined: bool = False):
    triples = _effective(atoms, neighboring)
    if any(s == 0 for s, _, _ in triples):
        return triples, None, 0
    h0 = DEFAULT_VALUE_DISCRETIZATION_INTERVAL if value_discretization_interval is None else value_discretization_interval
    if isinstance(h0, bool) or not (isinstance(h0, (int, float)) and 0 < h0 <= 1):
        raise ValueError(f"pld: value_discretization_interval must be a number in (0, 1], got {h0!r}")
    h = _choose_h(triples, float(h0), value_discretization_interval is None, refined) if triples else float(h0)
    return triples, h, sum(c for _, _, c in triples)


# Tilt search. The Chernoff-optimal λ centres the tilted distribution where δ is decided only when the
# MGF is dominated by that region. With a small q and a tiny δ it is not: the MGF is dominated by one step's
# far tail (σ 1, q e^-9: losses up to 1.7 with real mass ~1e-27), which the composition moves to +∞ anyway
# (_ABS_TAIL), so the Chernoff λ is too small (30 where ~50 is best), the δ region sits ~1e-8 below the
# tilted maximum, and the certified round-off charge, relative to that maximum, was 19 % of δ (ε 3 % above
# dp_accounting). So while the charge exceeds _RETILT of δ, λ is searched: a pattern search in log λ
# (steps ×/÷ 2, √2, 2^¼, ...) on the bound itself. Every λ > 0 gives a valid bound; the smallest is kept.
# Too large a λ lets the far tail dominate the tilted mass: the bulk is then cut as negligible and charged
# (the bound collapses) and the window grows 10-100× (seconds per candidate); so a candidate whose window
# exceeds _SEARCH_WIDTH × the first one's is abandoned. On a refined grid the search starts from the best λ
# of the coarser grid (the best λ hardly depends on h) with small steps and fewer compositions.
_RETILT = 1e-2
_TILT_EVALS = 8  # compositions at most per direction and grid (each a full FFT composition)
_TILT_EVALS_HINTED = 4  # the same on a refined grid (the starts, the coarser grid's best λ, then small steps)
_SEARCH_WIDTH = 3
_CONSISTENT = 1e-3  # delta() also tries epsilon()'s first tilt where the charge exceeds this fraction of δ


def _search_tilt(triples: tuple, direction: str, h: float, tail_mass: float, starts: Callable,
                 evaluate: Callable, hint: Optional[float] = None, second: float = _RETILT) -> tuple:
    """Minimise ``evaluate(λ, d) -> (bound, charge / δ)`` over λ (``d`` the composition tilted by λ).

    ``starts(best) -> [λ, ...]`` gives the first candidates (called with ``None``, then once more with the best
    ``(bound, λ, d)`` so far, e.g. for the Chernoff tilt at the ε found — only where the charge exceeds
    ``second`` of δ); ``hint`` (the best λ on a coarser grid) is tried after the first starts (it alone is
    not enough: the coarser grid's δ at ε can be far from this grid's, and so can its best λ — σ 0.922,
    q 1.34e-5, T 15095, δ 5.8e-10: delta() kept λ 64.5 from h 1e-4 where epsilon() used 118 on 6.4e-6, and
    δ(ε(δ)) was 1.14·δ). Stops when the charge is at most ``_RETILT`` of δ, after ``_TILT_EVALS``
    compositions, or when the step ratio falls below 1.02. Returns ``(bound, λ, d)`` of the smallest bound
    found; the starts and the hint are always computed in full, so a bound is always returned."""
    tried: dict = {}
    best = None
    width = [None]

    def run(lam: float, guarded: bool = False) -> None:
        """Evaluate λ; a ``guarded`` (pattern-search) candidate is abandoned when its window exceeds
        ``_SEARCH_WIDTH`` × the widest start's (or its round-off blows up, :class:`_TooWide`)."""
        nonlocal best
        lam = float(min(max(lam, _LAMBDAS[0]), _LAMBDAS[-1]))
        key = round(math.log(lam), 6)
        if key in tried:
            return
        tried[key] = None
        max_len = _SEARCH_WIDTH * width[0] if guarded and width[0] is not None else None
        try:
            d = _composed(triples, direction, h, tail_mass, lam, max_len)
        except _TooWide:
            return
        if not guarded:
            width[0] = max(len(d.tilted), _MIN_WINDOW, width[0] or 0)
        value, frac = evaluate(lam, d)
        if best is None or value < best[0]:
            best = (value, lam, d, frac)

    for lam in starts(None):
        run(lam)
    if hint is not None:
        run(hint)
    if best[3] > second:
        for lam in starts(best[:3]):
            run(lam)
    if hint is not None:  # a refined grid: from the best of these (often the coarser grid's λ), small steps
        ratio, evals, order = 2.0 ** 0.25, _TILT_EVALS_HINTED, (-1, 1)
    else:
        ratio, evals, order = 2.0, _TILT_EVALS, (1, -1)
    while best[3] > _RETILT and len(tried) < evals and ratio > 1.02:
        before = best
        for lam in (best[1] * ratio ** order[0], best[1] * ratio ** order[1]):
            if len(tried) >= evals:
                break
            run(lam, guarded=True)
            if best is not before:
                break
        if best is before:
            ratio = math.sqrt(ratio)
    return best[:3]


def _upper_epsilon(triples: tuple, h: float, tail_mass: float, delta: float, hints: Optional[dict] = None) -> tuple:
    """(ε upper bound, [(direction, λ, composed distribution)]): per direction, tilt for δ (Chernoff), then
    the Chernoff tilt at the ε found and the tilt search while the round-off charge exceeds 1 % of δ; the
    largest ε over the directions is the bound. ``hints``: direction → best λ on a coarser grid."""
    best, used = 0.0, []
    for direction in _directions(triples):
        def evaluate(lam: float, d: _Dist) -> tuple:
            e = _epsilon_at(d, lam, h, delta)
            return e, (_charge(_view(d, lam, h), e) / delta if math.isfinite(e) else math.inf)

        def starts(found: Optional[tuple]) -> list:
            if found is None:
                return [_tilt_for_delta(triples, direction, h, delta)]
            return [_tilt_for_epsilon(triples, direction, h, found[0])] if math.isfinite(found[0]) else []

        e, lam, d = _search_tilt(triples, direction, h, tail_mass, starts, evaluate, (hints or {}).get(direction))
        best = max(best, e)
        used.append((direction, lam, d))
    return best, used


# Default grid only: refine h by 10× (at most twice) while the certified gap upper − lower exceeds this
# fraction of the upper bound. Each result is a valid bound, so the tightest of them is kept.
_REFINE_GAP = 0.05
# delta() refines by ε's criterion with a margin: its ε gap is measured at the δ it finds with its own tilt, which
# differ slightly from epsilon()'s, and a case on the 5 % edge (σ 4.13, q 5.8e-5, T 11, δ 6.3e-12: ε's gap 5.003 %
# on h 1e-6, refined to 1e-7; delta()'s just below 5 %, kept 1e-6) gave δ(ε(δ)) = 1.0049·δ. Refining more can
# only lower delta()'s bound (the smallest over the grids is kept).
_DELTA_REFINE_GAP = 0.8 * _REFINE_GAP
_REFINE_STEPS = 2


def _refining(bounds_at: Callable[[Optional[float], Optional[dict]], tuple],
              value_discretization_interval: Optional[float], refined_grid: Callable[[float], Optional[float]]) -> tuple:
    """``bounds_at(h, hints) -> (PldBounds, loose, hints)`` on the given grid (``hints``: direction → the
    best tilt found, passed on to the next grid); on the default grid (``None``), retried on
    10× and 100× finer grids while ``loose`` (the certified ε gap exceeds 5 %). Why: with many steps of
    tiny per-step loss (e.g. q = 1e-4, T = 1e6) the default h = 1e-4 over-states ε by ~30 %, while a finer
    grid there is cheap. The upper bounds of all grids are valid, so the smallest is returned, with the
    largest lower bound; and whether the last grid tried was still loose. ``refined_grid(h)``: the step a
    refinement to ``h`` would get (coarsened by the window cap); a grid that is not finer is not computed."""
    b, loose, hints = bounds_at(value_discretization_interval, None)
    if value_discretization_interval is not None:
        return b, loose
    upper, lower, h = b.upper, b.lower, b.value_discretization_interval
    for _ in range(_REFINE_STEPS):
        if not (math.isfinite(upper) and loose):
            break
        if not h <= DEFAULT_VALUE_DISCRETIZATION_INTERVAL:  # coarsened by the window cap (or σ = 0)
            break
        target = refined_grid(h / 10)
        if target is None or target >= h:  # coarsened back: the window cap is reached
            break
        finer, finer_loose, hints = bounds_at(target, hints)
        h, loose = finer.value_discretization_interval, finer_loose
        if finer.upper < upper:
            upper, b = finer.upper, finer
        lower = max(lower, finer.lower)
    return PldBounds(upper, min(lower, upper), b.value_discretization_interval, b.steps), loose


def _refined_grid(atoms: tuple, neighboring: Neighboring) -> Callable[[float], Optional[float]]:
    return lambda h: _prepare(atoms, neighboring, h, refined=True)[1]


def _eps_loose(b: PldBounds) -> bool:
    return math.isfinite(b.upper) and b.upper - b.lower > _REFINE_GAP * b.upper


def pld_epsilon(atoms: tuple, delta: float, *, neighboring: Neighboring = Neighboring.ADD_OR_REMOVE_ONE,
                value_discretization_interval: Optional[float] = None, tail_mass: float = _TAIL_MASS) -> PldBounds:
    """Upper and lower bounds on ε at ``delta`` for the composition ``atoms`` (see module docstring).

    On the default grid the bound is refined while its certified gap exceeds 5 % (see :func:`_refining`)."""
    def bounds_at(h, hints):
        b, hints = _pld_epsilon(atoms, delta, neighboring, h, tail_mass, hints)
        return b, _eps_loose(b), hints

    return _refining(bounds_at, value_discretization_interval, _refined_grid(atoms, neighboring))[0]


def _pld_epsilon(atoms: tuple, delta: float, neighboring: Neighboring,
                 value_discretization_interval: Optional[float], tail_mass: float,
                 hints: Optional[dict] = None) -> tuple:
    """(PldBounds on grid ``h``, direction → the tilt used). ``hints`` (direction → the best tilt on the coarser
    grid) marks an automatic refinement of the default grid (window ≤ 2^18 points, hinted tilt search)."""
    triples, h, steps = _prepare(atoms, neighboring, value_discretization_interval, refined=hints is not None)
    if h is None:
        return PldBounds(math.inf, math.inf, math.nan, steps), None
    if not triples:
        return PldBounds(0.0, 0.0, h, 0), None
    upper, used = _upper_epsilon(triples, h, tail_mass, delta, hints)
    beta = delta / 100.0
    eta = steps * h * h / 8 + h * math.sqrt(steps * math.log(1 / beta) / 2)
    lower = 0.0
    for _, lam, d in used:
        x = _epsilon_lower(d, lam, h, delta + beta + d.moved, hint=upper)
        lower = max(lower, max(0.0, x - eta))
    return PldBounds(upper, min(lower, upper), h, steps), {direction: lam for direction, lam, _ in used}


def pld_delta(atoms: tuple, epsilon: float, *, neighboring: Neighboring = Neighboring.ADD_OR_REMOVE_ONE,
              value_discretization_interval: Optional[float] = None, tail_mass: float = _TAIL_MASS) -> PldBounds:
    """Upper and lower bounds on δ at ``epsilon`` (lower: the Hoeffding coupling of the module
    docstring, ``δ_grid(ε + η) - charge - β - moved mass`` with ``β = δ_grid(ε)/1000``).

    Treated like :func:`pld_epsilon`, so that ``pld_delta(pld_epsilon(δ).upper) ≤ δ·(1 + ~1e-3)``: per
    direction the same tilt candidates and search (:func:`_upper_delta`), and on the default grid the grid is
    refined by ε's criterion — while the certified ε gap at the computed δ (``ε`` minus the ε lower bound at
    that δ) exceeds 4 % of ε (ε's 5 %, with a margin: ``_DELTA_REFINE_GAP``). (Not δ's own gap: the δ lower
    bound is 0 for most long compositions, its coupling term η growing with √T, so that criterion would
    refine nearly always.)"""
    return _pld_delta_refined(atoms, epsilon, neighboring, value_discretization_interval, tail_mass)[0]


def _pld_delta_refined(atoms: tuple, epsilon: float, neighboring: Neighboring,
                       value_discretization_interval: Optional[float], tail_mass: float = _TAIL_MASS) -> tuple:
    """(:func:`pld_delta`'s bounds, whether the last grid was still loose by ε's criterion)."""
    return _refining(lambda h, hints: _pld_delta(atoms, epsilon, neighboring, h, tail_mass, hints),
                     value_discretization_interval, _refined_grid(atoms, neighboring))


def _upper_delta(triples: tuple, direction: str, h: float, tail_mass: float, epsilon: float,
                 hint: Optional[float] = None) -> tuple:
    """(δ upper bound, λ, composed distribution) of one direction: tilt for ε (Chernoff); where the round-off
    charge exceeds 1e-3 of the δ found, also the tilt :func:`_upper_epsilon` starts from at that δ (often
    the same λ: no cost); and, while the charge exceeds 1 % of δ, the same tilt search. Why: the tilts
    differ mainly in their charge, so with the charge ≤ 1e-3·δ, or ε's own first tilt among the candidates,
    ``δ(ε(δ)) ≤ δ·(1 + ~1e-3)``; a charge of up to 1 % of δ with a different tilt was not enough (σ 0.921,
    q 1.37e-4, T 892, δ 1.1e-9: δ(ε(δ)) = 1.003·δ)."""
    def evaluate(lam: float, d: _Dist) -> tuple:
        value = _delta_at(d, lam, h, epsilon)
        return value, (_charge(_view(d, lam, h), epsilon) / value if value > 0 else 0.0)

    def starts(found: Optional[tuple]) -> list:
        if found is None:
            return [_tilt_for_epsilon(triples, direction, h, epsilon)]
        return [_tilt_for_delta(triples, direction, h, found[0])] if 0 < found[0] < 1 else []

    value, lam, d = _search_tilt(triples, direction, h, tail_mass, starts, evaluate, hint, second=_CONSISTENT)
    return min(1.0, value), lam, d


def _pld_delta(atoms: tuple, epsilon: float, neighboring: Neighboring,
               value_discretization_interval: Optional[float], tail_mass: float, hints: Optional[dict] = None) -> tuple:
    """(PldBounds on grid ``h``, loose by ε's criterion, direction → the tilt used); ``hints`` as in
    :func:`_pld_epsilon`."""
    triples, h, steps = _prepare(atoms, neighboring, value_discretization_interval, refined=hints is not None)
    if h is None:
        return PldBounds(1.0, 1.0, math.nan, steps), False, None
    if not triples:
        return PldBounds(0.0, 0.0, h, 0), False, None
    upper, lower, used, tilts = 0.0, 0.0, [], {}
    for direction in _directions(triples):
        value, lam, d = _upper_delta(triples, direction, h, tail_mass, epsilon, (hints or {}).get(direction))
        tilts[direction] = lam
        upper = max(upper, value)
        used.append((lam, d))
        beta = max(value / 1000.0, 1e-300)
        eta = steps * h * h / 8 + h * math.sqrt(steps * math.log(1 / beta) / 2)
        low = _delta_at(d, lam, h, epsilon + eta, sign=-1) - beta - d.moved
        lower = max(lower, max(0.0, low))
    # ε's refinement criterion at the δ found: the ε lower bound there, as _pld_epsilon computes it
    loose = False
    if 0.0 < upper < 1.0 and epsilon > 0:
        beta = upper / 100.0
        eta = steps * h * h / 8 + h * math.sqrt(steps * math.log(1 / beta) / 2)
        eps_lower = max(max(0.0, _epsilon_lower(d, lam, h, upper + beta + d.moved, hint=epsilon) - eta)
                        for lam, d in used)
        loose = epsilon - eps_lower > _DELTA_REFINE_GAP * epsilon
    return PldBounds(upper, min(lower, upper), h, steps), loose, tilts
