"""Configuration, stages, messages and errors of the secure-aggregation protocol.

Messages are immutable values holding only bytes, ints and numpy arrays, so any transport (a function
call, a Flower ``RecordDict``) can carry them; :func:`wire_bytes` gives the payload size of each (ids as
8 bytes, keys 32, share values 66, ciphertexts as they are, masked vectors packed at ``k`` bits per entry;
transport framing not counted).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Optional

import numpy as np

from dpfunc._validate import check_int_range
from dpfunc.secagg.ring import Ring

__all__ = [
    "Stage", "SecAggConfig", "SecAggError", "RoundFailedError", "ProtocolError",
    "AdvertiseKeys", "KeyDirectory", "ShareKeys", "MaskedInput", "UnmaskRequest", "UnmaskShares",
    "wire_bytes", "ID_BYTES", "KEY_BYTES", "MAX_SITE_ID",
]

ID_BYTES = 8
KEY_BYTES = 32
MAX_SITE_ID = (1 << 63) - 2  # Shamir points are site_id + 1, all ids fit a signed 64-bit int


class Stage(enum.IntEnum):
    """The four stages of Bonawitz et al. (2017), in order; ``DONE`` after unmasking."""

    ADVERTISE_KEYS = 0
    SHARE_KEYS = 1
    MASKED_INPUT = 2
    UNMASK = 3
    DONE = 4


@dataclass(frozen=True)
class SecAggConfig:
    """What every party of a round agrees on before it starts.

    Args:
        threshold: ``t``, the number of shares that reconstruct a site's secrets; a round needs at least
            ``t`` sites at every stage. Must be ≥ 2 and a strict majority of every neighbourhood
            (checked when the roster is known), so that a server that lies about who dropped cannot
            collect ``t`` shares of both secrets of one site.
        vector_length: entries of each site's input vector (≥ 1).
        ring_bits: ``k``: inputs, masks and the sum live in Z_{2^k} (2..64).
        neighbours: SecAgg+ (Bell et al. 2020): each site masks with and shares its secrets among
            ``neighbours`` others (even, ≥ 2) on a random Harary graph; ``None`` = the complete graph of
            Bonawitz et al. (every pair masks).
    """

    threshold: int
    vector_length: int
    ring_bits: int = 32
    neighbours: Optional[int] = None

    def __post_init__(self) -> None:
        fn = "SecAggConfig"
        check_int_range(fn, "threshold", self.threshold, low=2)
        check_int_range(fn, "vector_length", self.vector_length, low=1)
        check_int_range(fn, "ring_bits", self.ring_bits, low=2, high=64)
        if self.neighbours is not None:
            d = check_int_range(fn, "neighbours", self.neighbours, low=2)
            if d % 2:
                raise ValueError(f"{fn}: neighbours must be even (a Harary graph), got {d}")

    @property
    def ring(self) -> Ring:
        return Ring(self.ring_bits)


class SecAggError(Exception):
    """Base of the errors of this package."""


class RoundFailedError(SecAggError):
    """The round cannot complete: fewer than ``threshold`` sites or shares at some stage.

    Attributes:
        stage: the :class:`Stage` at which it failed; ``available`` and ``needed`` counts.
    The aggregate must not be applied; the caller decides to retry or stop.
    """

    def __init__(self, message: str, *, stage: Stage, available: int, needed: int):
        super().__init__(message)
        self.stage, self.available, self.needed = stage, available, needed


class ProtocolError(SecAggError):
    """A message out of order, malformed, forged, or inconsistent with what this party saw before."""


class AdvertiseKeys(NamedTuple):
    """Stage 0, site → server: two X25519 public keys (share encryption, pairwise masks)."""

    site_id: int
    cipher_public: bytes
    mask_public: bytes


class KeyDirectory(NamedTuple):
    """Stage 0, server → sites: every advertised key (the roster ``U1``) and the graph seed."""

    round_id: int
    keys: Mapping[int, tuple[bytes, bytes]]
    graph_seed: bytes


class ShareKeys(NamedTuple):
    """Stage 1, site → server: ``{recipient: AES-GCM ciphertext of this site's two shares for it}``."""

    site_id: int
    ciphertexts: Mapping[int, bytes]


class MaskedInput(NamedTuple):
    """Stage 2, site → server: ``y = x + PRG(b) + Σ ±PRG(s_uv) mod 2^k``."""

    site_id: int
    vector: np.ndarray


class UnmaskRequest(NamedTuple):
    """Stage 3, server → sites: who sent masked input (``U3``); everyone else in ``U2`` dropped."""

    round_id: int
    survivors: tuple[int, ...]


class UnmaskShares(NamedTuple):
    """Stage 3, site → server: shares of the self-mask seed of survivors and of the mask key of
    dropped sites (never both for one site)."""

    site_id: int
    seed_shares: Mapping[int, int]
    key_shares: Mapping[int, int]


def wire_bytes(message: object, *, ring_bits: Optional[int] = None) -> int:
    """Payload bytes of a message (or of an inbox ``{sender: ciphertext}``). A masked vector counts
    ``ceil(length · ring_bits / 8)`` bytes (:meth:`Ring.pack`, what :mod:`.codec` sends) when
    ``ring_bits`` is given, else its container width."""
    from dpfunc.secagg.shamir import SHARE_BYTES

    if isinstance(message, AdvertiseKeys):
        return ID_BYTES + 2 * KEY_BYTES
    if isinstance(message, KeyDirectory):
        return ID_BYTES + len(message.graph_seed) + len(message.keys) * (ID_BYTES + 2 * KEY_BYTES)
    if isinstance(message, ShareKeys):
        return ID_BYTES + sum(ID_BYTES + len(c) for c in message.ciphertexts.values())
    if isinstance(message, MaskedInput):
        if ring_bits is not None:
            return ID_BYTES + Ring(ring_bits).packed_size(len(message.vector))
        return ID_BYTES + message.vector.nbytes
    if isinstance(message, UnmaskRequest):
        return ID_BYTES + ID_BYTES * len(message.survivors)
    if isinstance(message, UnmaskShares):
        n = len(message.seed_shares) + len(message.key_shares)
        return ID_BYTES + n * (ID_BYTES + SHARE_BYTES)
    if isinstance(message, Mapping):
        return sum(ID_BYTES + len(c) for c in message.values())
    raise TypeError(f"wire_bytes: not a secure-aggregation message: {type(message).__name__}")


def _check_site_id(fn: str, name: str, value: object) -> int:
    return check_int_range(fn, name, value, low=0, high=MAX_SITE_ID)
