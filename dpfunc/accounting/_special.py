"""Numerically stable special functions in ``math`` + numpy (no scipy): the normal CDF in log space.

``log_ndtr(z) = log Φ(z)`` to full double precision on the whole real line: ``erfc`` where it does not
underflow, the asymptotic (Mills-ratio) series below ``z = -30`` (truncation error < 1e-15).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["log_ndtr", "log_ndtr_pair", "log_interval_masses", "log_ndtr_scalar", "log_sf", "log_diff_ndtr", "ndtr", "log_add", "log_sub"]

_SQRT2 = math.sqrt(2.0)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_erfc = np.frompyfunc(math.erfc, 1, 1)


def _erfc_array(x: np.ndarray) -> np.ndarray:
    return _erfc(x).astype(float) if x.size else np.zeros(0)


def log_ndtr(z) -> np.ndarray:
    """``log Φ(z)`` elementwise, stable for ``z → ±∞`` (returns a float ndarray)."""
    z = np.asarray(z, dtype=float)
    out = np.empty_like(z)
    flat_z, flat_out = z.reshape(-1), out.reshape(-1)
    pos = flat_z > 0
    mid = (flat_z <= 0) & (flat_z > -30)
    neg = flat_z <= -30
    if pos.any():  # Φ(z) = 1 - Q(z), Q small: log1p keeps precision
        flat_out[pos] = np.log1p(-0.5 * _erfc_array(flat_z[pos] / _SQRT2))
    if mid.any():
        flat_out[mid] = np.log(0.5 * _erfc_array(-flat_z[mid] / _SQRT2))
    if neg.any():
        x = flat_z[neg]
        with np.errstate(over="ignore", invalid="ignore"):
            r = 1.0 / (x * x)
            series = 1 + r * (-1 + r * (3 + r * (-15 + r * (105 + r * (-945 + r * 10395)))))
            val = -0.5 * x * x - np.log(-x) - _HALF_LOG_2PI + np.log(series)
        flat_out[neg] = np.where(np.isinf(x), -np.inf, val)
    return out


def log_ndtr_pair(z) -> tuple:
    """``(log Φ(z), log Φ(-z))`` elementwise with one ``erfc`` per element (the smaller tail is exact,
    the larger one is ``log1p`` of minus it)."""
    z = np.asarray(z, dtype=float)
    small = log_ndtr(-np.abs(z))  # log of the smaller of Φ(z), Φ(-z)
    with np.errstate(divide="ignore"):
        big = np.log1p(-np.exp(small))
    neg = z < 0
    return np.where(neg, small, big), np.where(neg, big, small)


def log_interval_masses(log_cdf: np.ndarray, log_sf: np.ndarray, z: np.ndarray) -> np.ndarray:
    """``log(Φ(z[i+1]) - Φ(z[i]))`` for ascending edges ``z`` given ``log Φ(z)`` and ``log Φ(-z)``."""
    upper = (z[:-1] + z[1:]) > 0
    hi = np.where(upper, log_sf[:-1], log_cdf[1:])
    lo = np.where(upper, log_sf[1:], log_cdf[:-1])
    with np.errstate(divide="ignore", invalid="ignore"):
        out = hi + np.log(-np.expm1(np.minimum(lo - hi, 0.0)))
    return np.where(np.isneginf(hi) | (z[:-1] >= z[1:]), -np.inf, out)


def log_ndtr_scalar(z: float) -> float:
    """``log Φ(z)`` for one float (fast path for series evaluated in Python loops)."""
    if z > 0:
        return math.log1p(-0.5 * math.erfc(z / _SQRT2))
    if z > -30:
        return math.log(0.5 * math.erfc(-z / _SQRT2))
    if math.isinf(z):
        return -math.inf
    r = 1.0 / (z * z)
    series = 1 + r * (-1 + r * (3 + r * (-15 + r * (105 + r * (-945 + r * 10395)))))
    return -0.5 * z * z - math.log(-z) - _HALF_LOG_2PI + math.log(series)


def log_sf(z) -> np.ndarray:
    """``log(1 - Φ(z))`` elementwise."""
    return log_ndtr(-np.asarray(z, dtype=float))


def ndtr(z) -> np.ndarray:
    """``Φ(z)`` elementwise."""
    return np.exp(log_ndtr(z))


def log_diff_ndtr(a, b) -> np.ndarray:
    """``log(Φ(b) - Φ(a))`` for ``a <= b`` elementwise, without cancellation in either tail.

    Uses survival functions when the interval lies mostly above 0 and CDFs otherwise.
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    a, b = np.broadcast_arrays(a, b)
    upper = (a + b) > 0
    # upper side: Q(a) - Q(b) = Q(a) (1 - Q(b)/Q(a))
    hi = np.where(upper, log_sf(a), log_ndtr(b))
    lo = np.where(upper, log_sf(b), log_ndtr(a))
    with np.errstate(divide="ignore", invalid="ignore"):
        d = lo - hi
        out = hi + np.log(-np.expm1(np.minimum(d, 0.0)))
    out = np.where(np.isneginf(hi) | (a >= b), -np.inf, out)
    return out


def log_add(a: float, b: float) -> float:
    """``log(e^a + e^b)`` for floats (``-inf`` allowed)."""
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log1p(math.exp(-abs(a - b)))


def log_sub(a: float, b: float) -> float:
    """``log(e^a - e^b)`` for ``a >= b``; ``-inf`` when they are equal."""
    if b == -math.inf:
        return a
    if b >= a:
        return -math.inf
    return a + math.log(-math.expm1(b - a))
