"""Per-example gradients as a pure function: ``vmap(grad(loss))``.

This is the oracle path of dpfunc: obviously correct, memory ``B × |θ|``. The fast path (ghost
norms, book-keeping; ``dpfunc.bridge.fast_engine``) is tested against it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.func import grad_and_value, vmap

from dpfunc._tree import Params

__all__ = ["per_example_grads", "per_example_grads_and_losses"]


def _batch_size(fn: str, args: Sequence[Any], in_dims: Sequence[int | None]) -> int:
    sizes = {a.shape[d] for a, d in zip(args, in_dims) if d is not None and isinstance(a, torch.Tensor)}
    if not sizes:
        raise ValueError(f"{fn}: at least one batched tensor argument is required (in_dims all None)")
    if len(sizes) > 1:
        shapes = [tuple(a.shape) for a, d in zip(args, in_dims) if d is not None and isinstance(a, torch.Tensor)]
        raise ValueError(f"{fn}: batched arguments disagree on the batch size: shapes {shapes}")
    return sizes.pop()


def _resolve_in_dims(fn: str, batch: tuple, in_dims: Sequence[int | None] | None) -> tuple:
    if in_dims is None:
        return (0,) * len(batch)
    in_dims = tuple(in_dims)
    if len(in_dims) != len(batch):
        raise ValueError(f"{fn}: in_dims has {len(in_dims)} entries but {len(batch)} batch arguments were given")
    if any(d not in (0, None) for d in in_dims):
        raise ValueError(f"{fn}: in_dims entries must be 0 (batched) or None (shared), got {in_dims}")
    return in_dims


def per_example_grads_and_losses(
    loss_fn: Callable[..., torch.Tensor],
    params: Params,
    *batch: Any,
    in_dims: Sequence[int | None] | None = None,
    chunk_size: int | None = None,
    randomness: str = "error",
) -> tuple[Params, torch.Tensor]:
    """Per-example gradients and losses.

    Args:
        loss_fn: ``loss_fn(params, *example) -> scalar``, the loss of ONE example (no batch dim).
        params: ``dict[str, Tensor]`` to differentiate with respect to.
        *batch: arguments of ``loss_fn`` after ``params``. Those with ``in_dims`` 0 carry a leading
            batch dimension ``B``; those with ``None`` (buffers, constants) are shared by all examples.
        in_dims: per argument, 0 (batched, the default) or None (shared).
        chunk_size: process the batch in chunks of this many examples (bounds peak memory).
        randomness: ``torch.func.vmap``'s ``randomness``: ``"error"`` (default: a random op such as
            dropout raises), ``"different"`` (independent draws per example, from the global RNG; seed
            it from a key, e.g. ``dpfunc.bridge.keyed_global_rng``) or ``"same"``.

    Returns:
        ``(grads, losses)``: ``grads[name]`` has shape ``(B, *params[name].shape)``; ``losses`` is ``(B,)``.
        ``B = 0`` is legal and gives empty tensors.
    """
    fn = "per_example_grads"
    in_dims = _resolve_in_dims(fn, batch, in_dims)
    b = _batch_size(fn, batch, in_dims)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{fn}: chunk_size must be a positive int or None, got {chunk_size!r}")
    if randomness not in ("error", "different", "same"):
        raise ValueError(f"{fn}: randomness must be 'error', 'different' or 'same', got {randomness!r}")
    if b == 0:
        ref = next(iter(params.values()), None)
        dtype = ref.dtype if ref is not None else torch.get_default_dtype()
        device = ref.device if ref is not None else None
        return {k: v.new_zeros((0, *v.shape)) for k, v in params.items()}, torch.zeros(0, dtype=dtype, device=device)
    g = vmap(grad_and_value(loss_fn), in_dims=(None, *in_dims), chunk_size=chunk_size, randomness=randomness)
    return g(params, *batch)


def per_example_grads(
    loss_fn: Callable[..., torch.Tensor],
    params: Params,
    *batch: Any,
    in_dims: Sequence[int | None] | None = None,
    chunk_size: int | None = None,
    randomness: str = "error",
) -> Params:
    """Per-example gradients: ``grads[name][i] = ∇_θ loss_fn(params, *batch[i])``.

    Built on ``torch.func.vmap(torch.func.grad(loss_fn))``; pure (``params`` is not modified).

    Args:
        loss_fn: the loss of ONE example, ``loss_fn(params, *example) -> 0-d tensor``.
        params: ``dict[str, Tensor]``.
        *batch: batched arguments (leading dim ``B``), or shared ones marked ``None`` in ``in_dims``.
        in_dims: per argument 0 or None (default: all batched).
        chunk_size: optional vmap chunking to bound memory.
        randomness: vmap's ``randomness`` (see :func:`per_example_grads_and_losses`).

    Returns:
        ``dict`` name → tensor of shape ``(B, *param.shape)``.

    Example:
        >>> w = {"w": torch.ones(3)}
        >>> loss = lambda p, x, y: (p["w"] @ x - y) ** 2
        >>> g = per_example_grads(loss, w, torch.randn(5, 3), torch.randn(5))
        >>> g["w"].shape
        torch.Size([5, 3])
    """
    return per_example_grads_and_losses(loss_fn, params, *batch, in_dims=in_dims, chunk_size=chunk_size, randomness=randomness)[0]


