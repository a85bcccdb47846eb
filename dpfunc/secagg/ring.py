"""Fixed-point encoding of real vectors into the ring Z_{2^k}, and the overflow guarantee.

Encoding (:class:`FixedPoint`): a real ``x`` is clipped to ``[−clip, clip]`` and mapped to the integer
``q = round(x / scale)`` with ``scale = clip / (2**(bits−1) − 1)``, so ``|q| ≤ M = 2**(bits−1) − 1`` and the
rounding error is ``≤ scale / 2`` per coordinate per site (exactly 0 for integers when ``scale = 1``, see
:meth:`FixedPoint.integer`). ``q`` is stored in two's complement mod ``2**k`` (:class:`Ring`).

Overflow: the sum of ``n`` encodings lies in ``[−n·M, n·M]``; it decodes exactly iff
``n·M ≤ 2**(k−1) − 1``. :func:`check_sum_fits` checks this for the configured maximum number of sites and
refuses otherwise, so a wrapped sum is impossible rather than unlikely. Decoding the sum of ``n`` sites
then has error ``≤ n·scale/2`` per coordinate (plus any clipping, which the encoder counts).

Example:
    >>> fp = FixedPoint(clip=1.0, bits=16)
    >>> ring = Ring(bits=18)
    >>> check_sum_fits([fp], max_sites=3, ring=ring)
    >>> q, clipped = fp.encode(np.array([0.5, -2.0]))
    >>> clipped, fp.decode(ring.to_signed(ring.from_signed(q))).round(4).tolist()
    (1, [0.5, -1.0])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from dpfunc._validate import check_int_range, check_positive_finite

__all__ = ["FixedPoint", "Ring", "check_sum_fits"]

_PACK_CHUNK = 1 << 18   # entries per packing chunk (a multiple of 8), bounds the bit array to 16 MiB


@dataclass(frozen=True)
class FixedPoint:
    """Clip to ``[−clip, clip]`` and quantise to ``2**bits − 1`` signed levels.

    Args:
        clip: the clipping range (a finite number > 0); values outside are clipped and counted.
        bits: signed precision in bits, in ``[2, 62]``; integers ``|q| ≤ 2**(bits−1) − 1``.
    """

    clip: float
    bits: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "clip", check_positive_finite("FixedPoint", "clip", self.clip))
        check_int_range("FixedPoint", "bits", self.bits, low=2, high=62)

    @classmethod
    def integer(cls, max_value: int) -> "FixedPoint":
        """Exact integers in ``[−max_value, max_value]`` (``scale = 1``), e.g. example counts."""
        m = check_int_range("FixedPoint.integer", "max_value", max_value, low=1, high=(1 << 61) - 1)
        bits = m.bit_length() + 1
        return cls(clip=float((1 << (bits - 1)) - 1), bits=bits)

    @property
    def max_int(self) -> int:
        """``M = 2**(bits−1) − 1``, the largest ``|q|``."""
        return (1 << (self.bits - 1)) - 1

    @property
    def scale(self) -> float:
        """Real value of one integer step."""
        return self.clip / self.max_int

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """``(q, n_clipped)``: int64 integers ``round(clip(x)/scale)`` and how many entries were clipped.

        Raises ``ValueError`` for non-finite entries (a NaN update must never be aggregated).
        """
        x = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(x)):
            raise ValueError("FixedPoint.encode: x must be finite, got NaN or inf entries")
        n_clipped = int(np.count_nonzero(np.abs(x) > self.clip))
        q = np.rint(np.clip(x, -self.clip, self.clip) / self.scale).astype(np.int64)
        np.clip(q, -self.max_int, self.max_int, out=q)
        return q, n_clipped

    def decode(self, q: np.ndarray) -> np.ndarray:
        """float64 values ``q · scale`` (``q`` may be a sum of encodings)."""
        return np.asarray(q, dtype=np.int64).astype(np.float64) * self.scale


@dataclass(frozen=True)
class Ring:
    """The ring Z_{2^k}, stored in the smallest unsigned numpy dtype of at least ``k`` bits.

    Args:
        bits: ``k`` in ``[2, 64]``. Wire size per entry is the container's (1, 2, 4 or 8 bytes).
    """

    bits: int

    def __post_init__(self) -> None:
        check_int_range("Ring", "bits", self.bits, low=2, high=64)

    @property
    def dtype(self) -> np.dtype:
        for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
            if np.dtype(dt).itemsize * 8 >= self.bits:
                return np.dtype(dt)
        raise AssertionError("unreachable")

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    def reduce(self, a: np.ndarray) -> np.ndarray:
        """``a mod 2**k`` in place (a no-op when ``k`` fills the container)."""
        if self.bits < self.dtype.itemsize * 8:
            np.bitwise_and(a, self.dtype.type(self.modulus - 1), out=a)
        return a

    def from_signed(self, q: np.ndarray) -> np.ndarray:
        """int64 → ring elements (two's complement mod ``2**k``)."""
        a = np.asarray(q, dtype=np.int64).astype(np.uint64).astype(self.dtype)
        return self.reduce(a)

    def to_signed(self, a: np.ndarray) -> np.ndarray:
        """Ring elements → int64 in ``[−2**(k−1), 2**(k−1))``."""
        a = np.asarray(a, dtype=self.dtype).astype(np.uint64)
        if self.bits == 64:
            return a.view(np.int64).copy()
        s = a.astype(np.int64)
        half = 1 << (self.bits - 1)
        return np.where(s >= half, s - (1 << self.bits), s)

    def zeros(self, length: int) -> np.ndarray:
        return np.zeros(length, dtype=self.dtype)

    def packed_size(self, length: int) -> int:
        """Bytes of ``length`` ring elements packed at ``k`` bits each: ``ceil(length · k / 8)``."""
        return (length * self.bits + 7) // 8

    def pack(self, a: np.ndarray) -> bytes:
        """The wire format: each element's low ``k`` bits, concatenated little-endian (no container padding)."""
        a = np.ascontiguousarray(a, dtype=self.dtype)
        width = self.dtype.itemsize * 8
        if self.bits == width:
            return a.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
        le = a.astype(self.dtype.newbyteorder("<"), copy=False)
        out = []
        for start in range(0, len(le), _PACK_CHUNK):   # chunks of a multiple of 8 entries: byte-aligned output
            bits = np.unpackbits(le[start:start + _PACK_CHUNK].view(np.uint8), bitorder="little")
            out.append(np.packbits(bits.reshape(-1, width)[:, :self.bits], bitorder="little").tobytes())
        return b"".join(out)

    def unpack(self, data: bytes, length: int) -> np.ndarray:
        """Inverse of :meth:`pack` (``ValueError`` if ``data`` is not ``packed_size(length)`` bytes)."""
        if len(data) != self.packed_size(length):
            raise ValueError(f"Ring.unpack: expected {self.packed_size(length)} bytes for {length} elements of "
                             f"{self.bits} bits, got {len(data)}")
        width = self.dtype.itemsize * 8
        le = self.dtype.newbyteorder("<")
        if self.bits == width:
            return np.frombuffer(data, dtype=le).astype(self.dtype)
        raw = np.frombuffer(data, dtype=np.uint8)
        out = np.empty(length, dtype=self.dtype)
        chunk_bytes = _PACK_CHUNK * self.bits // 8
        for i, start in enumerate(range(0, length, _PACK_CHUNK)):
            n = min(_PACK_CHUNK, length - start)
            bits = np.unpackbits(raw[i * chunk_bytes:i * chunk_bytes + chunk_bytes], bitorder="little", count=n * self.bits)
            full = np.zeros((n, width), dtype=np.uint8)
            full[:, :self.bits] = bits.reshape(n, self.bits)
            out[start:start + n] = np.packbits(full, axis=None, bitorder="little").view(le)
        return out


def check_sum_fits(encodings: Iterable[FixedPoint], *, max_sites: int, ring: Ring) -> None:
    """Refuse a configuration whose sum over ``max_sites`` sites could wrap around ``2**k``.

    Raises:
        ValueError: if ``max_sites · M > 2**(k−1) − 1`` for any encoding, naming the smallest ring
            that would fit.
    """
    n = check_int_range("check_sum_fits", "max_sites", max_sites, low=1)
    limit = (1 << (ring.bits - 1)) - 1
    for enc in encodings:
        if n * enc.max_int > limit:
            need = (n * enc.max_int).bit_length() + 1
            raise ValueError(
                f"check_sum_fits: the sum of {n} sites of {enc} (|q| <= {enc.max_int}) can reach "
                f"{n * enc.max_int}, beyond the ring Z_2^{ring.bits} (signed limit {limit}); use "
                f"ring bits >= {need}, fewer precision bits, or fewer sites")
    return None
