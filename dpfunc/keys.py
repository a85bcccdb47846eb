"""Explicit random keys: ``seed + path of derivations -> torch.Generator``.

Library code never calls ``torch.manual_seed`` and never reads global RNG state. All randomness
enters through a :class:`Key`, in the spirit of ``jax.random``: a key is an immutable value, new keys
are *derived* from it (``split``, ``fold_in``), and the same key always gives the same random numbers.

A key is a 64-bit state. Derivation mixes the parent state with the derivation data through
SplitMix64 (Steele, Lea, Flood 2014), whose output function is a bijection with good avalanche, so
distinct derivation paths give unrelated streams. Every integer seed is valid, 0 included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = ["Key", "RunKeys", "run_keys"]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(z: int) -> int:
    """SplitMix64 finaliser: a bijection on 64-bit integers with full avalanche."""
    z = (z + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@dataclass(frozen=True)
class Key:
    """An immutable random key.

    Args:
        seed: any Python integer (negative and very large ones are reduced mod 2**64; 0 is valid).

    Example:
        >>> key = Key(0)
        >>> noise_key, data_key = key.split()
        >>> g = noise_key.fold_in(3).generator()        # the generator of step 3
        >>> torch.randn(2, generator=g).shape
        torch.Size([2])
    """

    seed: int

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"Key: seed must be an int, got {type(self.seed).__name__} {self.seed!r}")
        # Normalise to the 64-bit state; mixing once decorrelates small consecutive seeds.
        object.__setattr__(self, "seed", self.seed & _MASK64)

    @property
    def state(self) -> int:
        """The 64-bit state of this key (what seeds its generator)."""
        return _mix64(self.seed)

    def fold_in(self, data: int) -> Key:
        """Derive a new key from this one and an integer (a step counter, a parameter index …)."""
        if isinstance(data, bool) or not isinstance(data, int):
            raise TypeError(f"Key.fold_in: data must be an int, got {type(data).__name__} {data!r}")
        return Key(_mix64(self.state ^ _mix64(data & _MASK64)))

    def split(self, num: int = 2) -> tuple[Key, ...]:
        """Derive ``num`` independent keys from this one."""
        if not isinstance(num, int) or num < 1:
            raise ValueError(f"Key.split: num must be an int >= 1, got {num!r}")
        return tuple(self.fold_in(_GOLDEN + i) for i in range(num))

    def generator(self, device: torch.device | str | None = None) -> torch.Generator:
        """A fresh ``torch.Generator`` on ``device`` seeded from this key.

        Each call returns a new generator, so the same key reproduces the same numbers.
        """
        g = torch.Generator(device=device if device is not None else "cpu")
        # manual_seed on a *local* generator: global RNG state is never touched.
        g.manual_seed(self.state)  # all 64 bits: keys differing only in the top bit differ
        return g

    def __repr__(self) -> str:
        return f"Key(seed={self.seed})"


class RunKeys(NamedTuple):
    """The independent keys of one training run, by purpose (made by :func:`run_keys` only).

    Attributes:
        noise: the DP noise (:func:`~dpfunc.dp_aggregate` derives step ``t``'s noise from it).
        sampling: the Poisson batch selection (batch ``t`` from ``sampling.fold_in(t)``).
        dropout: dropout masks of the bridge's forwards (forward ``k`` from ``dropout.fold_in(k)``).
        init: the model's initialisation.
        augment: data augmentation.
    """

    noise: Key
    sampling: Key
    dropout: Key
    init: Key
    augment: Key


# The position of each purpose in ``key.split``: fixed forever (changing it changes every run).
_RUN_KEY_INDEX = {"init": 0, "sampling": 1, "noise": 2, "augment": 3, "dropout": 4}


def run_keys(key: Key) -> RunKeys:
    """The run's keys by purpose, derived from its root key — the one place that fixes the order.

    Every part of dpfunc that needs a run key (the training driver, the CLI, the bridge's
    ``make_private``) asks this function by name, so no code depends on a position in ``split``.
    Keys for different purposes are independent streams (distinct ``split`` branches).

    Example:
        >>> keys = run_keys(Key(0))
        >>> keys.noise != keys.sampling and keys == run_keys(Key(0))
        True
    """
    if not isinstance(key, Key):
        raise TypeError(f"run_keys: key must be a dpfunc.Key, got {type(key).__name__}")
    branches = key.split(len(_RUN_KEY_INDEX))
    return RunKeys(**{name: branches[i] for name, i in _RUN_KEY_INDEX.items()})
