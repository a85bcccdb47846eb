"""The dealer's pseudo-random generator: an AES-256-CTR keystream written straight into int64 tensors.

The dealer's material is nothing but uniform words (masks, triples' ``a`` and ``b``, party 0's
shares), so its cost is the generator's. ``torch.Generator`` (Mersenne Twister) makes about
0.7 GB/s on this machine's cores and is predictable from 624 outputs; OpenSSL's AES-256 in counter
mode (through ``cryptography``; AES-NI) writes its keystream into a tensor's memory at about 6–8 GB/s
with no copy (ChaCha20, the generator until 2026-11-28: 3.8 GB/s on the same cores, 2–3 % more CPU per
SmallCNN 64² image over the three processes) and is a cryptographic PRG — AES as a PRF in counter
mode, indistinguishable from uniform bytes up to the birthday bound of about 2^64 blocks per key, far
beyond what a session draws — the standard way a trusted dealer expands a short seed (CrypTen's
trusted third party does the same with its own PRG; NIST SP 800-90A's CTR_DRBG is AES-CTR).

Keys. A deployed party keys its generator with a :class:`StreamKey`: 256 bits of OS entropy
(:meth:`StreamKey.generate`, ``secrets.token_bytes(32)``) used *directly* as the AES-256 key, with
child keys for each request or batch derived by a keyed BLAKE2b (a PRF): :meth:`StreamKey.fold_in`.
That is the cryptographic security level the dealer's correlated randomness and the owners' shares
need (a 64-bit seed can be searched). :meth:`StreamKey.from_seed` turns an integer into a key only to
reproduce a run: such a key is NOT secret (anyone who knows the seed has it). A :class:`~dpfunc.keys.Key`
(64-bit state, tests and reproducible examples) also keys a stream, through SHA-256 of its state.

Guarantee: for a fixed key the stream is deterministic (the dealer's material is a function of its
key and the public program only); distinct keys give independent streams.

Example:
    >>> ks = Keystream(Key(0))
    >>> ks.ring((2, 3)).dtype, ks.words((5,), torch.uint8).shape
    (torch.int64, torch.Size([5]))
    >>> torch.equal(Keystream(Key(0)).ring((4,)), Keystream(Key(0)).ring((4,)))
    True
    >>> k = StreamKey.generate()                    # 256 bits from os.urandom, in this process
    >>> len(k.raw), k != StreamKey.generate(), k.fold_in(3) == k.fold_in(3)
    (32, True, True)
    >>> torch.equal(Keystream(StreamKey.from_seed(5)).ring((4,)), Keystream(StreamKey.from_seed(5)).ring((4,)))
    True
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Union

import numpy as np
import torch

from dpfunc.keys import Key

__all__ = ["Keystream", "StreamKey", "AnyKey"]

_BLOCK = 1 << 20  # keystream bytes per OpenSSL call (a reusable zero input buffer of this size)
_ZEROS = bytes(_BLOCK)
_DOMAIN = b"dpfunc.mpc.dealer.keystream"  # SHA-256 domain of Key-made keys (named after no cipher: it outlived ChaCha20)


_FOLD = b"dpfunc.mpc.fold"  # BLAKE2b personalisation (at most 16 bytes) of child keys
_SEED = b"dpfunc.mpc.seed"  # ... of keys made from an integer seed (reproduction only)


class StreamKey:
    """A 256-bit key of a party's AES-256-CTR generator (immutable; the bytes are not shown by ``repr``).

    Args:
        raw: exactly 32 bytes. Use :meth:`generate` for a secret key, :meth:`from_seed` to reproduce
            a run (not secret).

    Guarantees: :meth:`fold_in` is a keyed BLAKE2b of the data (a pseudo-random function of the key),
    so child keys for distinct data are independent 256-bit keys and reveal nothing about the parent;
    the key bytes are never part of a keystream's output (AES-CTR is a PRG in its key).
    """

    __slots__ = ("raw",)

    def __init__(self, raw: bytes):
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != 32:
            got = f"{len(raw)} bytes" if isinstance(raw, (bytes, bytearray)) else type(raw).__name__
            raise ValueError(f"StreamKey: raw must be exactly 32 bytes (a 256-bit key), got {got}")
        object.__setattr__(self, "raw", bytes(raw))

    def __setattr__(self, name, value):
        raise AttributeError("StreamKey is immutable")

    @classmethod
    def generate(cls) -> "StreamKey":
        """A fresh secret key: 32 bytes from the operating system's CSPRNG (``secrets.token_bytes``)."""
        return cls(secrets.token_bytes(32))

    @classmethod
    def from_seed(cls, seed: int) -> "StreamKey":
        """A key made from an integer, only to reproduce a run: NOT secret (whoever knows ``seed`` has it)."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"StreamKey.from_seed: seed must be an int, got {seed!r}")
        data = seed.to_bytes(max(16, (seed.bit_length() + 8) // 8 + 1), "little", signed=True)
        return cls(hashlib.blake2b(data, digest_size=32, person=_SEED).digest())

    def fold_in(self, data: int) -> "StreamKey":
        """A child key for ``data`` (a request index, a batch number, …): ``BLAKE2b_key(data)``."""
        if isinstance(data, bool) or not isinstance(data, int):
            raise TypeError(f"StreamKey.fold_in: data must be an int, got {type(data).__name__} {data!r}")
        msg = data.to_bytes(max(16, (data.bit_length() + 8) // 8 + 1), "little", signed=True)
        return StreamKey(hashlib.blake2b(msg, key=self.raw, digest_size=32, person=_FOLD).digest())

    def __eq__(self, other) -> bool:
        return isinstance(other, StreamKey) and secrets.compare_digest(self.raw, other.raw)

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return "StreamKey(<256 bits, not shown>)"

    def __reduce__(self):
        raise TypeError("StreamKey: a party's key is not pickled (it never leaves its process)")


AnyKey = Union[Key, StreamKey]
"""What keys a :class:`Keystream`: a 256-bit :class:`StreamKey` (deployment) or a 64-bit :class:`Key`."""


class Keystream:
    """Uniform words from an AES-256-CTR keystream (one stream per key; initial counter block 0).

    Args:
        key: a :class:`StreamKey` (its 32 bytes are the AES-256 key) or a :class:`~dpfunc.keys.Key`
            (AES-256 keyed by SHA-256 of a domain label and its 64-bit state: a 64-bit key space, for
            tests and reproducible examples). The dealer derives one per request with ``fold_in``.
    """

    __slots__ = ("_enc",)

    def __init__(self, key: AnyKey):
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        if isinstance(key, StreamKey):
            raw = key.raw
        elif isinstance(key, Key):
            raw = hashlib.sha256(_DOMAIN + key.state.to_bytes(8, "little")).digest()
        else:
            raise TypeError(f"Keystream: key must be a StreamKey or a dpfunc.keys.Key, got {type(key).__name__}")
        self._enc = Cipher(algorithms.AES(raw), modes.CTR(bytes(16))).encryptor()

    def fill_(self, out: torch.Tensor) -> torch.Tensor:
        """Overwrite a contiguous CPU tensor with the next keystream bytes (in place); returns it."""
        if not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError("Keystream.fill_: out must be a contiguous CPU tensor")
        raw = out.view(-1).view(torch.uint8).numpy()
        n = raw.shape[0]
        for i in range(0, n, _BLOCK):
            j = min(i + _BLOCK, n)
            self._enc.update_into(memoryview(_ZEROS)[: j - i], memoryview(raw[i:j]))
        return out

    def array(self, nbytes: int) -> "np.ndarray":
        """The next ``nbytes`` keystream bytes as a new numpy uint8 array (no torch tensor ops:
        callers slice it into many small tensors, and numpy views cost ~0.3 µs against torch's ~2 µs)."""
        raw = np.empty(nbytes, dtype=np.uint8)
        for i in range(0, nbytes, _BLOCK):
            j = min(i + _BLOCK, nbytes)
            self._enc.update_into(memoryview(_ZEROS)[: j - i], memoryview(raw[i:j]))
        return raw

    def ring(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """Uniform elements of Z_2^64 (int64, all 64 bits uniform)."""
        return self.fill_(torch.empty(tuple(shape), dtype=torch.int64))

    def words(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """Uniform words of an integer ``dtype`` (every bit uniform)."""
        return self.fill_(torch.empty(tuple(shape), dtype=dtype))

    def bits(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """Uniform bits in {0, 1} (uint8)."""
        return self.words(shape, torch.uint8) & 1
