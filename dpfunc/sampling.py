"""Poisson batch selection and fixed-shape padding.

Formal guarantees:
    :func:`poisson_sample` includes each example independently with probability ``sampling_rate``,
    which is the sampling the Poisson-subsampled Gaussian accountants assume (RDP, PLD). Batches
    therefore vary in size, and may be empty. :func:`pad_batch` pads them to a fixed shape with a
    mask; masked rows contribute exactly zero to the clipped sum, so padding changes no result.

References:
    Mironov, Talwar, Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism", 2019.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from dpfunc.keys import Key

__all__ = ["poisson_sample", "poisson_batches", "pad_batch", "padded_batch_size", "check_sampling_rate"]


def check_sampling_rate(fn: str, value: float) -> float:
    """``value`` as a float if it is in (0, 1], else a ValueError naming ``fn``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= 1):
        raise ValueError(f"{fn}: sampling_rate must be in (0, 1], got {value!r}")
    return float(value)


def _check_num_examples(fn: str, n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{fn}: num_examples must be an int >= 1, got {n!r}")
    return n


def poisson_sample(key: Key, num_examples: int, sampling_rate: float, *, device: torch.device | str | None = None) -> torch.Tensor:
    """Indices of a Poisson batch: each of ``range(num_examples)`` in with prob. ``sampling_rate``.

    Returns:
        A sorted int64 tensor of shape ``(b,)`` with ``b ~ Binomial(num_examples, sampling_rate)``
        (``b = 0`` is possible and legal).

    Example:
        >>> idx = poisson_sample(Key(0), 1000, 0.01)
        >>> idx.dtype
        torch.int64
    """
    fn = "poisson_sample"
    n = _check_num_examples(fn, num_examples)
    q = check_sampling_rate(fn, sampling_rate)
    if not isinstance(key, Key):
        raise TypeError(f"{fn}: key must be a dpfunc.Key, got {type(key).__name__}")
    u = torch.rand(n, generator=key.generator(), dtype=torch.float64)
    idx = torch.nonzero(u < q).flatten()
    return idx.to(device) if device is not None else idx


def poisson_batches(key: Key, num_examples: int, sampling_rate: float, num_steps: int) -> Iterator[torch.Tensor]:
    """``num_steps`` independent Poisson batches; batch ``t`` is drawn with ``key.fold_in(t)``."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"poisson_batches: num_steps must be an int >= 0, got {num_steps!r}")
    for t in range(num_steps):
        yield poisson_sample(key.fold_in(t), num_examples, sampling_rate)


def padded_batch_size(num_examples: int, sampling_rate: float, *, overflow_probability: float = 1e-6, multiple: int = 8) -> int:
    """A fixed batch shape that a Poisson batch exceeds with probability ≤ ``overflow_probability``.

    Uses the Chernoff bound for the binomial upper tail, rounded up to a ``multiple``.
    """
    fn = "padded_batch_size"
    n = _check_num_examples(fn, num_examples)
    q = check_sampling_rate(fn, sampling_rate)
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"{fn}: multiple must be an int >= 1, got {multiple!r}")
    if not 0 < overflow_probability < 1:
        raise ValueError(f"{fn}: overflow_probability must be in (0, 1), got {overflow_probability!r}")
    mu = n * q
    # P[X >= mu + t] <= exp(-t^2 / (2 (mu + t/3)))  (Bernstein); solve for t.
    log_p = math.log(1 / overflow_probability)
    t = (log_p / 3) + math.sqrt((log_p / 3) ** 2 + 2 * mu * log_p)
    size = min(n, math.ceil(mu + t))
    return max(multiple, math.ceil(size / multiple) * multiple)


def pad_batch(tensors: Sequence[torch.Tensor], size: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Pad each tensor's leading dimension to ``size`` with zeros, and return a mask.

    Args:
        tensors: tensors sharing the leading batch dimension ``b``.
        size: the fixed batch shape, ``size >= b``.

    Returns:
        ``(padded, mask)``: ``padded[j]`` has shape ``(size, *tensors[j].shape[1:])``; ``mask`` is a
        bool tensor ``(size,)``, True for the ``b`` real rows.

    Raises:
        ValueError: if ``b > size``. Dropping examples would change the sampling distribution, so an
        overflowing batch is refused, never truncated. Pick ``size`` with :func:`padded_batch_size`.
    """
    fn = "pad_batch"
    if not tensors:
        raise ValueError(f"{fn}: tensors is empty")
    sizes = {t.shape[0] for t in tensors}
    if len(sizes) != 1:
        raise ValueError(f"{fn}: tensors disagree on the batch size: {[tuple(t.shape) for t in tensors]}")
    b = sizes.pop()
    if isinstance(size, bool) or not isinstance(size, int) or size < b:
        raise ValueError(f"{fn}: size must be an int >= the batch size {b}, got {size!r}")
    padded = tuple(torch.cat([t, t.new_zeros((size - b, *t.shape[1:]))]) for t in tensors)
    mask = torch.zeros(size, dtype=torch.bool, device=tensors[0].device)
    mask[:b] = True
    return padded, mask
