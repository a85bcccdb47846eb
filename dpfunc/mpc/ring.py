"""The ring Z_2^64 on int64 tensors: fixed-point encoding, additive 2-out-of-2 sharing, local ops.

Every value lives in ``Z_2^64``, stored as a signed ``torch.int64``; addition and multiplication wrap
around natively (two's complement), so ring arithmetic is ordinary torch arithmetic. A real number
``v`` is encoded as ``round(v · 2^f)`` (``f`` fractional bits, 16 by default, as in CrypTen and
PriMIA); the encodable range is ``|v| < 2^(63 - f)``, but products need ``2f`` fractional bits, so
values that are multiplied should stay well below ``2^(63 - 2f) = 2^31`` (for ``f = 16``).

A secret ``x`` is held as two shares ``x0 + x1 = x (mod 2^64)``; ``x1`` is uniform on the ring, drawn
from an explicit key, so each share alone is uniform and independent of ``x``.

All functions here are pure and local (no communication).

Example:
    >>> fp = FixedPoint()
    >>> x = encode(torch.tensor([1.5, -2.25]), fp)
    >>> s0, s1 = share(x, Key(0))
    >>> decode(reconstruct(s0, s1), fp)
    tensor([ 1.5000, -2.2500], dtype=torch.float64)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dpfunc._validate import check_int_range
from dpfunc.keys import Key

__all__ = [
    "FixedPoint",
    "encode",
    "decode",
    "uniform_ring",
    "uniform_bits",
    "share",
    "reconstruct",
    "share_xor",
    "reconstruct_xor",
    "div_public_local",
]


@dataclass(frozen=True)
class FixedPoint:
    """Fixed-point encoding ``v ↦ round(v · 2^fractional_bits)`` in Z_2^64.

    Args:
        fractional_bits: ``f`` in ``[1, 30]`` (16 by default: resolution ``2^-16 ≈ 1.5e-5``).
    """

    fractional_bits: int = 16

    def __post_init__(self) -> None:
        check_int_range("FixedPoint", "fractional_bits", self.fractional_bits, low=1, high=30)

    @property
    def scale(self) -> int:
        """``2^f``."""
        return 1 << self.fractional_bits

    @property
    def max_abs(self) -> float:
        """Largest magnitude that encodes without wrapping (``2^(62 - f)``, one bit of headroom)."""
        return float(2 ** (62 - self.fractional_bits))


def encode(values: torch.Tensor, fp: FixedPoint = FixedPoint()) -> torch.Tensor:
    """Real tensor → int64 ring tensor ``round(v · 2^f)`` (rounding half to even).

    Raises:
        ValueError: non-finite values, or values outside ``±fp.max_abs``.
    """
    v = torch.as_tensor(values, dtype=torch.float64)
    if v.numel() and not bool(torch.isfinite(v).all()):
        raise ValueError("encode: values must be finite, got NaN or inf")
    if v.numel() and float(v.abs().max()) >= fp.max_abs:
        raise ValueError(
            f"encode: values must satisfy |v| < {fp.max_abs:g} for {fp.fractional_bits} fractional "
            f"bits, got max |v| = {float(v.abs().max()):g}"
        )
    return torch.round(v * fp.scale).to(torch.int64)


def decode(ring: torch.Tensor, fp: FixedPoint = FixedPoint()) -> torch.Tensor:
    """int64 ring tensor → float64 ``x / 2^f`` (signed interpretation)."""
    if ring.dtype != torch.int64:
        raise TypeError(f"decode: ring must be an int64 tensor, got {ring.dtype}")
    # split into high and low parts so that float64 keeps every bit that matters
    high = torch.div(ring, fp.scale, rounding_mode="floor")
    low = ring - high * fp.scale
    return high.to(torch.float64) + low.to(torch.float64) / fp.scale


def uniform_ring(shape: tuple[int, ...] | torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Uniform elements of Z_2^64: ``random_`` over the full int64 range ``[−2^63, 2^63)`` (torch draws
    64 random bits per element for this range; the byte-level uniformity is tested)."""
    return torch.empty(tuple(shape), dtype=torch.int64).random_(-(2**63), None, generator=generator)


def uniform_bits(shape: tuple[int, ...] | torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Uniform bits in {0, 1} as int64."""
    return torch.randint(0, 2, tuple(shape), dtype=torch.int64, generator=generator)


def share(x: torch.Tensor, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive 2-out-of-2 sharing ``(x − r, r)`` with ``r`` uniform from ``key``.

    Guarantee: each share alone is uniform on Z_2^64 (``r`` is; ``x − r`` is a bijection of ``r``),
    hence independent of ``x``.
    """
    if x.dtype != torch.int64:
        raise TypeError(f"share: x must be an int64 ring tensor (see encode), got {x.dtype}")
    r = uniform_ring(x.shape, key.generator())
    return x - r, r


def reconstruct(s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
    """``s0 + s1 (mod 2^64)``."""
    return s0 + s1


def share_xor(x: torch.Tensor, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (XOR) sharing of 64-bit words: ``(x ^ r, r)``."""
    r = uniform_ring(x.shape, key.generator())
    return x ^ r, r


def reconstruct_xor(s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
    """``s0 ^ s1``."""
    return s0 ^ s1


def div_public_local(share_: torch.Tensor, divisor: int, rank: int) -> torch.Tensor:
    """One party's step of the local division of a shared value by a public integer.

    The variant of SecureML (Mohassel & Zhang 2017, §4.1) for truncation, applied to any positive
    divisor ``d``: party 0 computes ``⌊x0 / d⌋``, party 1 ``−⌊−x1 / d⌋ = ⌈x1 / d⌉``.

    Guarantee: if one share is uniform and the secret ``x`` (as a signed ring integer) satisfies
    ``|x| < 2^ℓ``, then with probability at least ``1 − |x| / 2^64 ≥ 1 − 2^(ℓ − 64)`` the two results
    add up to ``x / d`` with an error in ``(−1, 1)`` (one unit of the last place). With the remaining
    probability (the two shares wrap around 2^64) the result is off by about ``2^64 / d`` — a
    failure; no share conversion protocol is run to rule it out.
    """
    if rank not in (0, 1):
        raise ValueError(f"div_public_local: rank must be 0 or 1, got {rank!r}")
    if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1:
        raise ValueError(f"div_public_local: divisor must be an int >= 1, got {divisor!r}")
    if divisor == 1:
        return share_
    if divisor & (divisor - 1) == 0:  # a power of two: floor division is an arithmetic shift
        k = divisor.bit_length() - 1
        # party 1: ⌈x1 / 2^k⌉ = (x1 + 2^k − 1) >> k (the same as −⌊−x1 / 2^k⌋ except when the
        # addition wraps, for the 2^k − 1 largest shares: probability 2^(k−64), another failure of
        # the same kind as the one above)
        if rank == 0:
            return share_ >> k
        if share_.dtype == torch.int64 and share_.device.type == "cpu" and not share_.requires_grad:
            # numpy's int64 add is 2–4× faster than torch's here; the shift stays in torch (fast)
            return torch.from_numpy(np.add(share_.numpy(), divisor - 1)) >> k
        return (share_ + (divisor - 1)) >> k
    if rank == 0:
        return torch.div(share_, divisor, rounding_mode="floor")
    return -torch.div(-share_, divisor, rounding_mode="floor")
