"""The dealer's pseudo-random generator: a ChaCha20 keystream written straight into int64 tensors.

The dealer's material is nothing but uniform words (masks, triples' ``a`` and ``b``, party 0's
shares), so its cost is the generator's. ``torch.Generator`` (Mersenne Twister) makes about
0.7 GB/s on this machine's cores and is predictable from 624 outputs; OpenSSL's ChaCha20 (through
``cryptography``) writes its keystream into a tensor's memory at about 2–4 GB/s with no copy and is a
cryptographic PRG — the standard way a trusted dealer expands a short seed (CrypTen's trusted third
party does the same with its own PRG).

Guarantee: for a fixed :class:`~dpfunc.keys.Key` the stream is deterministic (the dealer's material
is a function of its key and the public program only); distinct keys give independent streams
(256-bit ChaCha20 keys derived from the key's 64-bit state with SHA-256 and a domain label). The
key space is the :class:`Key`'s 64 bits — a deployment seeds the dealer from OS entropy.

Example:
    >>> ks = Keystream(Key(0))
    >>> ks.ring((2, 3)).dtype, ks.words((5,), torch.uint8).shape
    (torch.int64, torch.Size([5]))
    >>> torch.equal(Keystream(Key(0)).ring((4,)), Keystream(Key(0)).ring((4,)))
    True
"""

from __future__ import annotations

import hashlib

import torch

from dpfunc.keys import Key

__all__ = ["Keystream"]

_BLOCK = 1 << 20  # keystream bytes per OpenSSL call (a reusable zero input buffer of this size)
_ZEROS = bytes(_BLOCK)
_DOMAIN = b"dpfunc.mpc.dealer.chacha20"


class Keystream:
    """Uniform words from a ChaCha20 keystream keyed by a :class:`Key` (one stream per key).

    Args:
        key: the stream's key (the dealer derives one per request with ``Key.fold_in``).
    """

    __slots__ = ("_enc",)

    def __init__(self, key: Key):
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        if not isinstance(key, Key):
            raise TypeError(f"Keystream: key must be a dpfunc.keys.Key, got {type(key).__name__}")
        digest = hashlib.sha256(_DOMAIN + key.state.to_bytes(8, "little")).digest()
        self._enc = Cipher(algorithms.ChaCha20(digest, bytes(16)), mode=None).encryptor()

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

    def ring(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """Uniform elements of Z_2^64 (int64, all 64 bits uniform)."""
        return self.fill_(torch.empty(tuple(shape), dtype=torch.int64))

    def words(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """Uniform words of an integer ``dtype`` (every bit uniform)."""
        return self.fill_(torch.empty(tuple(shape), dtype=dtype))

    def bits(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """Uniform bits in {0, 1} (uint8)."""
        return self.words(shape, torch.uint8) & 1
