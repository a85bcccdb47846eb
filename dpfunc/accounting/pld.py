"""Privacy-loss-distribution (PLD) accounting of Poisson-subsampled Gaussian compositions.

The privacy loss of one step is ``L = log(P(x)/Q(x))`` for the dominating pair

* remove: ``P = (1-q)N(0,σ²) + qN(1,σ²)``, ``Q = N(0,σ²)``;
* add:    ``P = N(0,σ²)``,                  ``Q = (1-q)N(0,σ²) + qN(1,σ²)``;

and ``δ(ε) = E_P[(1 - e^{ε-L})_+] + P(L = ∞)``. Under add-or-remove-one adjacency both directions are
composed separately (the direction is fixed for a pair of datasets) and the larger ε is reported.

Discretisation ("connect the dots", Doroshenko et al. 2022): the loss axis is cut at ``g_k = k·h``;
the P-mass ``p`` of each cell ``(g_k, g_k+1]`` is split between the two endpoints so that both its
P-mass and its Q-mass ``r`` are kept (exact, from normal CDFs in log space). Because the hockey-stick
divergence is convex in ``e^ε``, this pair *dominates* the true pair, so every (ε, δ) it gives is a
valid guarantee, and it stays exact at the grid points. Mass below the grid is moved up to the first
point, mass above it to ``+∞`` (both pessimistic). T-fold composition is repeated squaring with numpy
FFT; after each product the tails with mass ≤ ``tail_mass`` are moved in the pessimistic direction
and the FFT round-off bound is added to δ.

Formal guarantees:
    ``upper`` is an upper bound on the ε of the composition at δ (up to floating-point error, whose
    FFT part is bounded and charged to δ). ``lower`` is a lower bound: the connect-the-dots coupling
    moves each step's loss by a conditionally bounded amount (range h, mean in [0, h²/8]), so by
    Hoeffding ``δ_true(ε) ≥ δ_grid(ε + η) - β - (moved tail mass)`` with
    ``η = T·h²/8 + h·sqrt(T·log(1/β)/2)``, ``β = δ/100``. ``upper - lower`` is the discretisation
    error (it is dominated by the Hoeffding term; the upper bound itself is much tighter).

Edge cases: σ = 0 → ε = ∞ (conservative: the true ε is ∞ only for δ < 1 - (1-q)^T); σ = ∞ → no loss;
q = 1 → the plain Gaussian, symmetric, one direction. Never raises on large ε or many steps: the grid
is coarsened so that the composed window stays below ~2^20 points (still a valid upper bound).

References:
    A. Koskela, J. Jälkö, A. Honkela. Computing tight DP guarantees using FFT, AISTATS 2020.
    S. Gopi, Y.T. Lee, L. Wutschitz. Numerical composition of differential privacy, NeurIPS 2021.
    V. Doroshenko, B. Ghazi, P. Kamath, R. Kumar, P. Manurangsi. Connect the dots: tighter discrete
    approximations of privacy loss distributions, PETS 2022.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import numpy as np

from dpfunc.accounting._special import log_interval_masses, log_ndtr_pair
from dpfunc.accounting.events import Neighboring, check_sampling_neighboring

__all__ = ["PldBounds", "pld_epsilon", "pld_delta", "DEFAULT_VALUE_DISCRETIZATION_INTERVAL"]

DEFAULT_VALUE_DISCRETIZATION_INTERVAL = 1e-4
_TAIL_Z = 10.0  # per-step grid covers ±10 standard deviations (tails ~ 1e-23, pessimistically placed)
_TAIL_MASS = 1e-18  # composed tails of at most this mass are moved pessimistically after each product
_MAX_WINDOW = 2**20
_MAX_STEP_POINTS = 2**22
_EPS64 = np.finfo(float).eps


class PldBounds(NamedTuple):
    """``upper``/``lower`` bounds on ε (or δ), the grid step ``h`` and the number of composed steps."""

    upper: float
    lower: float
    value_discretization_interval: float
    steps: int


class _Dist(NamedTuple):
    offset: int  # grid index of masses[0]; the loss of masses[i] is (offset + i)·h
    masses: np.ndarray
    inf_mass: float  # P(L = +∞), charged to δ
    moved: float  # mass outside the coupling (tails moved, out-of-grid mass), for the lower bound
    fft_error: float  # bound on the l1 round-off of the FFT products, charged to δ


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


def _single_step(sigma: float, q: float, direction: str, h: float) -> _Dist:
    """Connect-the-dots PLD of one Poisson-subsampled Gaussian step (sensitivity 1)."""
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
    a = np.clip(p * np.expm1(g[1:] - c) / math.expm1(h), 0.0, p)
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
    return _Dist(int(k_lo), masses, above + tiny_mass, below + above + tiny_mass, 0.0)


# --- composition ---------------------------------------------------------------------------------


def _truncate(d: _Dist, tail_mass: float) -> _Dist:
    m = d.masses
    nz = np.flatnonzero(m)
    if nz.size == 0:
        return _Dist(0, np.zeros(1), d.inf_mass, d.moved, d.fft_error)
    m = m[nz[0] : nz[-1] + 1]
    offset = d.offset + int(nz[0])
    lo = int(np.searchsorted(np.cumsum(m), tail_mass, side="right"))  # m[:lo] has mass <= tail
    hi_cut = int(np.searchsorted(np.cumsum(m[::-1]), tail_mass, side="right"))
    lo = min(lo, len(m) - 1)
    hi = max(len(m) - hi_cut, lo + 1)
    low_mass, high_mass = float(m[:lo].sum()), float(m[hi:].sum())
    kept = m[lo:hi].copy()
    kept[0] += low_mass
    return _Dist(offset + lo, kept, d.inf_mass + high_mass, d.moved + low_mass + high_mass, d.fft_error)


def _convolve(a: _Dist, b: _Dist, tail_mass: float) -> _Dist:
    n = len(a.masses) + len(b.masses) - 1
    if min(len(a.masses), len(b.masses)) <= 32:
        out = np.convolve(a.masses, b.masses)
        err = 0.0
    else:
        nfft = 1 << (n - 1).bit_length()
        out = np.fft.irfft(np.fft.rfft(a.masses, nfft) * np.fft.rfft(b.masses, nfft), nfft)[:n]
        # l1 round-off bound of an FFT product: n · c·log2(nfft)·eps · ||a||_2 ||b||_2
        # Round-off of an FFT product (DFT unitary up to scale, O(eps·log n) relative error per stage):
        # ||err||_2 <= c·eps·log2(nfft)·min(|a|_1 |b|_2, |a|_2 |b|_1), and ||err||_1 <= sqrt(n)·||err||_2.
        # Entries below ||err||_2 (>= ||err||_inf) are noise: zeroed, their total charged to δ too.
        a1, b1 = float(a.masses.sum()), float(b.masses.sum())
        a2, b2 = math.sqrt(float((a.masses * a.masses).sum())), math.sqrt(float((b.masses * b.masses).sum()))
        floor = 4 * math.log2(nfft) * _EPS64 * min(a1 * b2, a2 * b1)
        noise = out < floor
        err = math.sqrt(n) * floor + float(out[noise & (out > 0)].sum())
        out = np.where(noise, 0.0, out)
    inf_mass = 1.0 - (1.0 - a.inf_mass) * (1.0 - b.inf_mass)
    fft_error = a.fft_error + b.fft_error + err
    d = _Dist(a.offset + b.offset, out, inf_mass, a.moved + b.moved, fft_error)
    return _truncate(d, tail_mass)


def _self_compose(d: _Dist, count: int, tail_mass: float) -> Optional[_Dist]:
    result: Optional[_Dist] = None
    power = _truncate(d, tail_mass)
    while count:
        if count & 1:
            result = power if result is None else _convolve(result, power, tail_mass)
        count >>= 1
        if count:
            power = _convolve(power, power, tail_mass)
    return result


# --- grid choice and the composed distributions ---------------------------------------------------


def _effective(atoms: tuple, neighboring: Neighboring) -> tuple:
    """(σ, q, count) triples at sensitivity 1; raises for what PLD does not account."""
    out = []
    for atom in atoms:
        if atom[0] != "poisson":
            raise ValueError(
                "pld: SampledWithoutReplacementEvent is not supported by method='pld'; use method='rdp' "
                "(Wang-Balle-Kasiviswanathan bound) with neighboring=Neighboring.REPLACE_ONE"
            )
        _, sigma, q, count = atom
        check_sampling_neighboring("pld", "poisson", neighboring, q)
        if neighboring is Neighboring.REPLACE_ONE:
            sigma = sigma / 2.0
        if count > 0 and not math.isinf(sigma):
            out.append((sigma, q, count))
    return tuple(out)


def _choose_h(triples: tuple, h: float) -> float:
    var, step_range = 0.0, 0.0
    for sigma, q, count in triples:
        this_range = (1 + 2 * _TAIL_Z * sigma) / (2 * sigma**2) + _TAIL_Z / sigma
        e = math.exp(min(1.0 / sigma**2, 700.0))
        step_var = q * q * (e - 1.0) if q < 1 else 1 / sigma**2  # CLT variance of one step's loss
        var += count * min(step_var, this_range**2)
        step_range = max(step_range, this_range)
    window = 2 * 12 * math.sqrt(var) + 2 * step_range
    return max(h, window / _MAX_WINDOW, step_range / _MAX_STEP_POINTS)


@functools.lru_cache(maxsize=8)
def _composed(triples: tuple, direction: str, h: float, tail_mass: float) -> _Dist:
    total: Optional[_Dist] = None
    for sigma, q, count in triples:
        part = _self_compose(_single_step(sigma, q, direction, h), count, tail_mass)
        total = part if total is None else _convolve(total, part, tail_mass)
    return total


def _delta_at(d: _Dist, h: float, eps: float) -> float:
    g = (d.offset + np.arange(len(d.masses))) * h
    sel = g > eps
    return float((d.masses[sel] * -np.expm1(eps - g[sel])).sum()) + d.inf_mass  # (not np.dot: BLAS threads)


def _epsilon_at(d: _Dist, h: float, delta: float) -> float:
    """Smallest ε ≥ 0 with δ_d(ε) ≤ δ (exact on the discrete distribution; ∞ if unreachable)."""
    if d.inf_mass >= delta:
        return math.inf
    m = d.masses
    n = len(m)
    tail_p = np.concatenate([np.cumsum(m[::-1])[::-1], [0.0]])  # tail_p[j] = Σ_{i ≥ j} m_i

    def delta_grid(j: int) -> float:  # δ at ε = g_j
        return _delta_at(d, h, (d.offset + j) * h)

    if delta_grid(0) <= delta:  # ε at or below the first grid point: all mass counts
        j = 0
    else:
        lo, hi = 0, n - 1  # δ(g_lo) > delta >= δ(g_hi) (δ(g_{n-1}) = inf_mass < delta)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if delta_grid(mid) > delta:
                lo = mid
            else:
                hi = mid
        j = hi  # ε in [g_lo, g_hi): the masses at indices >= hi count
    a = tail_p[j] + d.inf_mass
    w = float((m[j:] * np.exp(-np.arange(n - j) * h)).sum())  # Σ_{i ≥ j} m_i e^{g_j - g_i}
    if w <= 0 or a <= delta:
        return max(0.0, (d.offset + j - 1) * h)
    eps = (d.offset + j) * h + math.log((a - delta) / w)
    return max(0.0, eps)


def _directions(triples: tuple) -> tuple:
    return ("remove",) if all(q == 1.0 for _, q, _ in triples) else ("remove", "add")


def _prepare(atoms: tuple, neighboring: Neighboring, value_discretization_interval: Optional[float]):
    triples = _effective(atoms, neighboring)
    if any(s == 0 for s, _, _ in triples):
        return triples, None, 0
    h0 = DEFAULT_VALUE_DISCRETIZATION_INTERVAL if value_discretization_interval is None else value_discretization_interval
    if not (isinstance(h0, (int, float)) and 0 < h0 <= 1):
        raise ValueError(f"pld: value_discretization_interval must be in (0, 1], got {h0!r}")
    h = _choose_h(triples, float(h0)) if triples else float(h0)
    return triples, h, sum(c for _, _, c in triples)


def pld_epsilon(atoms: tuple, delta: float, *, neighboring: Neighboring = Neighboring.ADD_OR_REMOVE_ONE,
                value_discretization_interval: Optional[float] = None, tail_mass: float = _TAIL_MASS) -> PldBounds:
    """Upper and lower bounds on ε at ``delta`` for the composition ``atoms`` (see module docstring)."""
    triples, h, steps = _prepare(atoms, neighboring, value_discretization_interval)
    if h is None:
        return PldBounds(math.inf, math.inf, math.nan, steps)
    if not triples:
        return PldBounds(0.0, 0.0, h, 0)
    beta = delta / 100.0
    eta = steps * h * h / 8 + h * math.sqrt(steps * math.log(1 / beta) / 2)
    upper, lower = 0.0, 0.0
    for direction in _directions(triples):
        d = _composed(triples, direction, h, tail_mass)
        upper = max(upper, _epsilon_at(d, h, delta - d.fft_error))
        low = _epsilon_at(d, h, delta + beta + d.moved + d.fft_error)
        lower = max(lower, max(0.0, low - eta))
    return PldBounds(upper, min(lower, upper), h, steps)


def pld_delta(atoms: tuple, epsilon: float, *, neighboring: Neighboring = Neighboring.ADD_OR_REMOVE_ONE,
              value_discretization_interval: Optional[float] = None, tail_mass: float = _TAIL_MASS) -> PldBounds:
    """Upper and lower bounds on δ at ``epsilon`` (lower: the Hoeffding coupling of the module
    docstring, ``δ_grid(ε + η) - β - moved mass - round-off`` with ``β = δ_grid(ε)/1000``)."""
    triples, h, steps = _prepare(atoms, neighboring, value_discretization_interval)
    if h is None:
        return PldBounds(1.0, 1.0, math.nan, steps)
    if not triples:
        return PldBounds(0.0, 0.0, h, 0)
    upper, lower = 0.0, 0.0
    for direction in _directions(triples):
        d = _composed(triples, direction, h, tail_mass)
        value = _delta_at(d, h, epsilon)
        upper = max(upper, min(1.0, value + d.fft_error))
        beta = max(value / 1000.0, 1e-300)
        eta = steps * h * h / 8 + h * math.sqrt(steps * math.log(1 / beta) / 2)
        low = _delta_at(d, h, epsilon + eta) - beta - d.moved - d.fft_error
        lower = max(lower, max(0.0, low))
    return PldBounds(upper, min(lower, upper), h, steps)
