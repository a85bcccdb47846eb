"""Thin wrappers over the ``cryptography`` package: nothing here implements a primitive.

- X25519 key agreement (RFC 7748) for the pairwise mask seeds and the share-encryption keys;
- HKDF-SHA256 (RFC 5869) to turn a shared secret or seed into single-purpose 32-byte keys, with the
  round, the purpose and the two site ids in the ``info`` string (domain separation);
- AES-256-GCM (authenticated encryption) for the Shamir shares sent through the server; each key is
  derived for one (round, sender, receiver) and encrypts exactly one message, so a fixed nonce is safe;
- AES-256-CTR keystream as the PRG that expands a 32-byte seed into a mask vector.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.exceptions import InvalidTag

__all__ = ["hkdf", "x25519_public", "x25519_agree", "aead_encrypt", "aead_decrypt", "keystream",
           "prg_ring", "InvalidTag"]

_ZERO_NONCE12 = bytes(12)
_ZERO_NONCE16 = bytes(16)


def hkdf(material: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 of ``material`` with ``info`` (no salt: the inputs are uniform keys or DH outputs)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(material)


def x25519_public(private: bytes) -> bytes:
    """The 32-byte X25519 public key of a 32-byte private key (any 32 bytes are a valid key)."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def x25519_agree(private: bytes, peer_public: bytes) -> bytes:
    """The X25519 shared secret (raises ``ValueError`` for a low-order peer key)."""
    return X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(peer_public))


def aead_encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM with a zero nonce: ``key`` must encrypt this one message only."""
    return AESGCM(key).encrypt(_ZERO_NONCE12, plaintext, aad)


def aead_decrypt(key: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    """Inverse of :func:`aead_encrypt`; raises ``InvalidTag`` if the ciphertext or ``aad`` was altered."""
    return AESGCM(key).decrypt(_ZERO_NONCE12, ciphertext, aad)


def keystream(key: bytes, nbytes: int) -> bytes:
    """``nbytes`` of AES-256-CTR keystream under ``key`` (32 bytes), counter starting at 0."""
    enc = Cipher(algorithms.AES(key), modes.CTR(_ZERO_NONCE16)).encryptor()
    return enc.update(bytes(nbytes)) + enc.finalize()


def prg_ring(key: bytes, length: int, dtype: np.dtype) -> np.ndarray:
    """``length`` uniform words of the unsigned ``dtype`` from the PRG seeded by ``key``.

    Uniform mod ``2**(8·itemsize)`` and therefore mod every ``2**k`` below it.
    """
    dtype = np.dtype(dtype)
    return np.frombuffer(keystream(key, length * dtype.itemsize), dtype=dtype)
