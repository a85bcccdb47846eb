"""Calibration: the σ, step count or sampling rate that meets a target ε, by bracketing + bisection.

Formal guarantees:
    Every returned configuration was *evaluated* with the requested method and its ε is ≤ the target
    (so with pld/rdp the configuration is (target_epsilon, δ)-DP). It is also tight:

    * ``noise_multiplier_for``: the returned σ has ε(σ) ≤ target, and ε(σ/1.01) > target or
      ε(σ) ≥ 0.99·target (σ is within 1% of the smallest feasible σ, ε within 1% of the target);
    * ``steps_for``: the largest T with ε(T) ≤ target (exact, ε is monotone in T);
    * ``sampling_rate_for``: q with ε(q) ≤ target and either ε(1.01·q) > target or ε(q) ≥ 0.99·target.

    RDP brackets PLD (RDP's ε is never below PLD's), so PLD searches start from the cheap RDP answer.

    When no configuration has ε in ``[0.99·target, target]`` — ε jumps over that band (e.g. from T to
    T + 1 steps at small T, or from q < 1 to q = 1) — the feasible answer is still returned and a
    :class:`CalibrationWarning` says that the target is not reachable within 1% and gives the ε reached.
    With PLD the ε curve has no ``inf`` wall any more (see :mod:`dpfunc.accounting.pld`), so bisection
    cannot settle on a σ whose ε is far below the target.

Raises:
    ValueError: the target is unreachable (e.g. one step already exceeds it), or bad inputs.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

from dpfunc._validate import check_int_range, check_positive_finite, check_probability
from dpfunc.accounting.api import _check_delta, _check_method, epsilon
from dpfunc.accounting.events import GaussianEvent, Neighboring, PoissonSampledEvent, SelfComposedEvent
from dpfunc.accounting.methods import PLD, RDP

__all__ = ["noise_multiplier_for", "steps_for", "sampling_rate_for", "CalibrationWarning"]


class CalibrationWarning(UserWarning):
    """The target ε is not reachable within 1%: the returned configuration's ε is below 0.99·target."""


def _warn_if_loose(fn: str, target: float, achieved: float, what: str) -> None:
    if achieved < 0.99 * target:
        warnings.warn(
            f"{fn}: target_epsilon={target!r} is not reachable within 1%: {what} gives ε={achieved:.6g} "
            f"({achieved / target:.1%} of the target) and the next configuration exceeds the target",
            CalibrationWarning, stacklevel=3,
        )

_MAX_STEPS = 2**40


def _event(sigma: float, q: float, steps: int):
    return SelfComposedEvent(PoissonSampledEvent(q, GaussianEvent(sigma)), steps)


def _check_common(fn: str, target_epsilon, delta, method, options):
    acc = _check_method(fn, method, options)
    return check_positive_finite(fn, "target_epsilon", target_epsilon), _check_delta(fn, delta), acc


def _bisect_log(eps_of: Callable[[float], float], target: float, lo: float, hi: float, increasing: bool) -> tuple:
    """Feasible endpoint of a bracket [lo, hi] (ε(feasible) ≤ target < ε(infeasible)), refined until the
    ratio is ≤ 1.01 and the feasible ε is ≥ 0.99·target (or the ratio is ≤ 1 + 1e-9)."""
    feasible, infeasible = (lo, hi) if increasing else (hi, lo)
    eps_feasible = eps_of(feasible)
    for _ in range(200):
        ratio = max(feasible, infeasible) / min(feasible, infeasible)
        if (ratio <= 1.01 and eps_feasible >= 0.99 * target) or ratio <= 1 + 1e-9:
            break
        mid = math.sqrt(feasible * infeasible)
        e = eps_of(mid)
        if e <= target:
            feasible, eps_feasible = mid, e
        else:
            infeasible = mid
    return feasible, eps_feasible


def noise_multiplier_for(target_epsilon: float, delta: float, sampling_rate: float, steps: int,
                         method="pld", *, neighboring: Neighboring = Neighboring.ADD_OR_REMOVE_ONE,
                         **options) -> float:
    """Smallest σ (within 1%) such that ``steps`` Poisson-sampled steps at ``sampling_rate`` are
    (target_epsilon, delta)-DP by ``method``; its ε is in ``[0.99·target, target]``.

    Example:
        >>> from dpfunc.accounting import dpsgd_epsilon
        >>> sigma = noise_multiplier_for(0.577, 2.7e-10, sampling_rate=6.3e-4, steps=591)
        >>> 0.99 * 0.577 <= dpsgd_epsilon(sigma, 6.3e-4, 591, 2.7e-10) <= 0.577
        True
    """
    fn = "noise_multiplier_for"
    target, delta, acc = _check_common(fn, target_epsilon, delta, method, options)
    q = check_probability(fn, "sampling_rate", sampling_rate)
    steps = check_int_range(fn, "steps", steps, low=1)

    def eps_of(sigma: float, m=acc) -> float:
        return epsilon(_event(sigma, q, steps), delta, m, neighboring=neighboring)

    hi = 1.0
    if isinstance(acc, PLD):  # RDP is an upper bound on PLD's ε: its σ (when RDP reaches the target) is feasible
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationWarning)
            try:
                hi = noise_multiplier_for(target, delta, q, steps, RDP(), neighboring=neighboring)
            except ValueError:  # RDP's conversion has a floor (finite orders) that PLD does not: search from σ = 1
                hi = 1.0
    while eps_of(hi) > target:  # make sure the upper end of the bracket is feasible
        hi *= 2
        if hi > 1e8:
            floor = (f"; the {acc.method.value.upper()} accountant gives ε={eps_of(hi):.3g} there (its own floor, not "
                     "the mechanism's: RDP's conversion over finite orders cannot go below it; method=PLD() can)"
                     if not isinstance(acc, PLD) else "")
            raise ValueError(f"{fn}: target_epsilon={target!r} unreachable at delta={delta!r} even with σ=1e8{floor}")
    lo = hi
    while True:
        lo = lo / 1.25
        if eps_of(lo) > target:
            break
        hi = lo
        if lo < 1e-6:
            return hi
    sigma, eps = _bisect_log(eps_of, target, lo, hi, increasing=False)
    _warn_if_loose(fn, target, eps, f"σ={sigma:.6g}")
    return sigma


def steps_for(target_epsilon: float, delta: float, noise_multiplier: float, sampling_rate: float,
              method="pld", *, neighboring: Neighboring = Neighboring.ADD_OR_REMOVE_ONE, **options) -> int:
    """The largest number of steps whose ε is ≤ ``target_epsilon`` (exact integer search)."""
    fn = "steps_for"
    target, delta, acc = _check_common(fn, target_epsilon, delta, method, options)
    sigma = check_positive_finite(fn, "noise_multiplier", noise_multiplier)
    q = check_probability(fn, "sampling_rate", sampling_rate)

    def eps_of(t: int, m=acc) -> float:
        return epsilon(_event(sigma, q, t), delta, m, neighboring=neighboring)

    t = _max_steps(fn, eps_of, target, start=1 if not isinstance(acc, PLD) else None,
                   rdp_guess=lambda: _quiet(steps_for, target, delta, sigma, q, RDP(), neighboring=neighboring))
    if t < _MAX_STEPS:
        _warn_if_loose(fn, target, eps_of(t), f"T={t}")
    return t


def _max_steps(fn: str, eps_of: Callable[[int], float], target: float, start, rdp_guess) -> int:
    if eps_of(1) > target:
        raise ValueError(f"{fn}: target_epsilon={target!r} is unreachable: a single step already costs ε={eps_of(1)!r}")
    guess = None if start is not None else rdp_guess()  # None: RDP cannot reach the target (its floor)
    lo = 1 if guess is None else max(1, guess)  # feasible (RDP's ε is above PLD's)
    hi = max(2, lo * 2 if guess is None else int(lo * 1.25) + 1)
    if eps_of(lo) > target:  # defensive: never trust the guess
        lo, hi = 1, lo
    return largest_feasible(eps_of, target, lo, hi)


def largest_feasible(eps_of: Callable[[int], float], target: float, lo: int, hi: int) -> int:
    """The largest integer ``t ≥ lo`` with ``eps_of(t) ≤ target``, for ``eps_of`` non-decreasing and
    ``eps_of(lo) ≤ target``: double ``hi`` until infeasible, then bisect (capped at ``_MAX_STEPS``)."""
    while eps_of(hi) <= target:
        lo, hi = hi, hi * 2
        if hi > _MAX_STEPS:
            return _MAX_STEPS
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if eps_of(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


def sampling_rate_for(target_epsilon: float, delta: float, noise_multiplier: float, steps: int,
                      method="pld", *, neighboring: Neighboring = Neighboring.ADD_OR_REMOVE_ONE,
                      **options) -> float:
    """The largest sampling rate (within 1%) whose ε is ≤ ``target_epsilon``; 1.0 if q = 1 fits."""
    fn = "sampling_rate_for"
    target, delta, acc = _check_common(fn, target_epsilon, delta, method, options)
    sigma = check_positive_finite(fn, "noise_multiplier", noise_multiplier)
    steps = check_int_range(fn, "steps", steps, low=1)

    def eps_of(q: float) -> float:
        return epsilon(_event(sigma, min(1.0, q), steps), delta, acc, neighboring=neighboring)

    if eps_of(1.0) <= target:
        return 1.0
    hi, lo = 1.0, 0.5
    if isinstance(acc, PLD):  # the RDP answer is feasible for PLD (RDP's ε is above PLD's): bracket upwards
        q_rdp = _quiet(sampling_rate_for, target, delta, sigma, steps, RDP(), neighboring=neighboring)
        if q_rdp is not None and eps_of(q_rdp) <= target:
            lo, hi = q_rdp, min(1.0, q_rdp * 1.25)
            while hi < 1.0 and eps_of(hi) <= target:
                lo, hi = hi, min(1.0, hi * 1.25)
    while eps_of(lo) > target:
        hi, lo = lo, lo / 2
        if lo < 1e-12:
            raise ValueError(
                f"{fn}: target_epsilon={target!r} unreachable at delta={delta!r} with σ={sigma!r}, steps={steps!r}"
            )
    q, eps = _bisect_log(eps_of, target, lo, hi, increasing=True)
    _warn_if_loose(fn, target, eps, f"q={q:.6g}")
    return q


def _quiet(fn, *args, **kwargs):
    """Call a calibration function for an internal (RDP) bracket, without its CalibrationWarning; None when
    it raises: RDP's conversion over finite orders has an ε floor (≈ 0.0035 at δ = 1e-5) that PLD does not,
    so an RDP "unreachable" says nothing about PLD."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        try:
            return fn(*args, **kwargs)
        except ValueError:
            return None
