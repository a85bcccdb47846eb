"""Gaussian noise from explicit keys, and the privatised mean.

Formal guarantees:
    :func:`privatize` adds ``N(0, (σ·S)² I)`` to a sum of sensitivity ``S`` (the Gaussian mechanism,
    noise multiplier σ) and divides by the **expected** batch size ``q·n``. Dividing by the realised
    batch size would make the normaliser itself data-dependent; the expected size is public.

Edge cases:

    =========================  ==================================================================
    σ = 0                      no noise (not private); the exact clipped mean
    empty batch                the update is pure noise ``N(0, (σS)²) / (q·n)``
    same key                   the same noise, bit for bit
    different steps / params   independent noise: each step folds the step count into its key,
                               each parameter gets its own slice of the generator's stream
    =========================  ==================================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from dpfunc._tree import Params, foreach_ok
from dpfunc.keys import Key

__all__ = ["gaussian_noise", "privatize", "check_noise_multiplier", "check_expected_batch_size"]


def check_noise_multiplier(fn: str, value: float) -> float:
    """``value`` as a float if it is a finite number ≥ 0, else a ValueError naming ``fn``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{fn}: noise_multiplier must be a finite number >= 0, got {value!r}")
    return float(value)


def check_expected_batch_size(fn: str, value: float) -> float:
    """``value`` as a float if it is a finite number > 0 (q·n), else a ValueError naming ``fn``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{fn}: expected_batch_size must be a finite number > 0 (sampling_rate × dataset size), got {value!r}")
    return float(value)


def gaussian_noise(key: Key, like: Mapping[str, torch.Tensor], std: float) -> Params:
    """Independent ``N(0, std²)`` noise shaped like each tensor of ``like``.

    Draws are made in the order of ``like``'s keys from one generator seeded by ``key``, on the
    tensors' own device and dtype, so the same key reproduces the same noise exactly.
    """
    if not isinstance(key, Key):
        raise TypeError(f"gaussian_noise: key must be a dpfunc.Key, got {type(key).__name__}")
    if not math.isfinite(std) or std < 0:
        raise ValueError(f"gaussian_noise: std must be a finite number >= 0, got {std!r}")
    if std == 0:
        return {name: torch.zeros_like(t) for name, t in like.items()}
    gens: dict[torch.device, torch.Generator] = {}
    draws = []
    for t in like.values():
        if t.device not in gens:
            # One generator per device, each from its own derived key.
            gens[t.device] = key.fold_in(len(gens)).generator(t.device)
        draws.append(torch.randn(t.shape, generator=gens[t.device], device=t.device, dtype=t.dtype))
    # The draws happen in the order of ``like`` (as before); the scaling by ``std`` is one multi-tensor
    # op, element for element the same product as ``randn(...) * std``.
    if not foreach_ok(draws):  # bf16 / fp16 / CUDA: the per-tensor product (see foreach_ok)
        return {name: d * std for name, d in zip(like, draws)}
    torch._foreach_mul_(draws, std)
    return dict(zip(like, draws))


def privatize(
    clipped_sum: Mapping[str, torch.Tensor],
    key: Key,
    *,
    noise_multiplier: float,
    sensitivity: float,
    expected_batch_size: float,
) -> Params:
    """``(clipped_sum + N(0, (noise_multiplier·sensitivity)² I)) / expected_batch_size``.

    Args:
        clipped_sum: ``dict`` name → summed clipped gradients.
        key: the key of THIS step (derive it, e.g. ``key.fold_in(step)``).
        noise_multiplier: σ ≥ 0.
        sensitivity: the l2 sensitivity of ``clipped_sum`` (``ClippedSum.sensitivity``).
        expected_batch_size: ``sampling_rate × num_examples`` (> 0), the public normaliser.
    """
    fn = "privatize"
    sigma = check_noise_multiplier(fn, noise_multiplier)
    denom = check_expected_batch_size(fn, expected_batch_size)
    if not (sensitivity > 0):
        raise ValueError(f"{fn}: sensitivity must be > 0, got {sensitivity!r}")
    if sigma > 0 and not math.isfinite(sensitivity):
        raise ValueError(f"{fn}: noise_multiplier > 0 needs a finite sensitivity (max_grad_norm), got {sensitivity!r}")
    std = sigma * sensitivity if sigma > 0 else 0.0
    noise = gaussian_noise(key, clipped_sum, std)
    names = list(clipped_sum)
    ns, vs = [noise[k] for k in names], [clipped_sum[k] for k in names]
    if not foreach_ok(ns, vs):
        return {k: (v + n) / denom for k, v, n in zip(names, vs, ns)}
    # One multi-tensor op per stage instead of two ops per parameter: the same element-wise
    # arithmetic ((v + noise) / denom, in that order), so the result is bit-identical.
    out = torch._foreach_add(ns, vs)
    torch._foreach_div_(out, denom)
    return dict(zip(names, out))
