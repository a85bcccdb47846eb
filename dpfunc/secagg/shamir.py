"""Shamir t-of-n secret sharing over the prime field GF(p), p = 2**521 − 1 (a Mersenne prime).

A secret ``s`` (an integer in ``[0, p)``; secure aggregation shares 32-byte keys, ``s < 2**256``) is the
constant term of a random polynomial ``f(x) = s + a_1 x + … + a_{t−1} x^{t−1}`` over GF(p); party ``i``
holds the share ``(x_i, f(x_i))`` at a distinct non-zero point ``x_i``. Any ``t`` shares give ``s`` by
Lagrange interpolation at 0; any ``t − 1`` shares are jointly uniform and independent of ``s``
(Shamir, "How to Share a Secret", CACM 1979).

The coefficients ``a_j`` come from a caller-supplied 32-byte ``seed`` (expanded by AES-256-CTR, 80 bytes
per coefficient reduced mod p, statistical distance from uniform < 2**-118), so sharing is a pure
function of its inputs and can be replayed; the seed must be secret and used for one sharing only.

Example:
    >>> shares = split(1234, threshold=2, points=[1, 2, 3], seed=bytes(32))
    >>> reconstruct({1: shares[1], 3: shares[3]}, threshold=2)
    1234
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

from dpfunc._validate import check_int_range
from dpfunc.secagg._primitives import keystream

__all__ = ["PRIME", "SHARE_BYTES", "split", "reconstruct", "share_to_bytes", "share_from_bytes"]

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8): the width of one share value on the wire
_COEFF_BYTES = 80


def _check_points(fn: str, points: Sequence[int]) -> list[int]:
    pts = [check_int_range(fn, "points", x, low=1, high=PRIME - 1) for x in points]
    if len(set(pts)) != len(pts):
        raise ValueError(f"{fn}: points must be distinct, got {sorted(pts)!r}")
    return pts


def split(secret: int, *, threshold: int, points: Sequence[int], seed: bytes) -> dict[int, int]:
    """Share ``secret`` so that any ``threshold`` of the returned shares recover it.

    Args:
        secret: an int in ``[0, PRIME)``.
        threshold: ``t`` in ``[1, len(points)]``.
        points: distinct evaluation points in ``[1, PRIME)``, one per share holder.
        seed: 32 secret bytes from which the random coefficients are drawn (one sharing per seed).

    Returns:
        ``{x: f(x)}`` for every point.
    """
    fn = "shamir.split"
    check_int_range(fn, "secret", secret, low=0, high=PRIME - 1)
    pts = _check_points(fn, points)
    t = check_int_range(fn, "threshold", threshold, low=1, high=max(1, len(pts)))
    if not pts:
        raise ValueError(f"{fn}: points must not be empty, got {list(points)!r}")
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != 32:
        raise ValueError(f"{fn}: seed must be 32 bytes, got {type(seed).__name__} of length "
                         f"{len(seed) if hasattr(seed, '__len__') else '?'}")
    stream = keystream(bytes(seed), (t - 1) * _COEFF_BYTES)
    coeffs = [secret] + [int.from_bytes(stream[j * _COEFF_BYTES:(j + 1) * _COEFF_BYTES], "big") % PRIME
                         for j in range(t - 1)]
    out = {}
    for x in pts:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out[x] = y
    return out


def reconstruct(shares: Mapping[int, int], *, threshold: int) -> int:
    """The secret from at least ``threshold`` shares ``{x: y}`` (Lagrange interpolation at 0).

    With more than ``threshold`` shares, the first ``threshold`` (by point) interpolate and every other
    share is checked to lie on the same polynomial; a mismatch (a corrupted share) raises ``ValueError``.
    Fewer than ``threshold`` shares raise ``ValueError``: the secret is information-theoretically hidden.
    """
    fn = "shamir.reconstruct"
    t = check_int_range(fn, "threshold", threshold, low=1)
    pts = _check_points(fn, list(shares))
    if len(pts) < t:
        raise ValueError(f"{fn}: need at least threshold={t} shares, got {len(pts)}")
    for x in pts:
        check_int_range(fn, f"shares[{x}]", shares[x], low=0, high=PRIME - 1)
    pts.sort()
    base, extra = tuple(pts[:t]), pts[t:]

    def interpolate(at: int) -> int:
        coeffs = _lagrange_coefficients(base, at)
        return sum(shares[xi] * c for xi, c in zip(base, coeffs)) % PRIME

    for x in extra:
        if interpolate(x) != shares[x] % PRIME:
            raise ValueError(f"{fn}: the shares are inconsistent (share at point {x} is not on the "
                             f"polynomial through the first {t}): a share was corrupted")
    return interpolate(0)


@functools.lru_cache(maxsize=4096)
def _lagrange_coefficients(base: tuple, at: int) -> tuple:
    """``λ_i = Π_{j≠i} (at − x_j) / (x_i − x_j)`` mod p; cached, since every secret of a round is
    reconstructed from the same set of share holders."""
    out = []
    for i, xi in enumerate(base):
        num, den = 1, 1
        for j, xj in enumerate(base):
            if i != j:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def share_to_bytes(y: int) -> bytes:
    """A share value as :data:`SHARE_BYTES` big-endian bytes."""
    return int(y).to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    """Inverse of :func:`share_to_bytes` (refuses values ≥ PRIME)."""
    if len(data) != SHARE_BYTES:
        raise ValueError(f"shamir.share_from_bytes: data must be {SHARE_BYTES} bytes, got {len(data)}")
    y = int.from_bytes(data, "big")
    if y >= PRIME:
        raise ValueError("shamir.share_from_bytes: value is not a field element (>= PRIME)")
    return y
