"""The pure training step: gradients → private aggregation → optimizer → new parameters.

``make_step(loss_fn, tx)`` returns ``step(params, opt_state, batch, mask=None, buffers=None)``
→ ``(params, opt_state, metrics)``. The optimizer state carries the privacy ledger (see
:func:`dpfunc.privacy_ledger`), so ε is a pure function of the training state.

How gradients are computed is an *engine*: :func:`vmap_engine` (the ``vmap(grad)`` oracle, any model)
or ``dpfunc.bridge.fast_engine`` (ghost norms / book-keeping for ``nn.Module`` models).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol, Union

import torch

from dpfunc._tree import Params
from dpfunc.clipping import ClippedSum, Clipping, clip_and_sum
from dpfunc.per_example import per_example_grads_and_losses
from dpfunc.private import check_budget, find_dp_state
from dpfunc.transforms import GradientTransformation, apply_updates

__all__ = ["GradEngine", "EngineOutput", "vmap_engine", "make_step", "StepMetrics"]


class EngineOutput(NamedTuple):
    """What an engine returns: per-example gradients (``dict`` of ``(B, *shape)``, padding rows
    zero) or an already clipped :class:`~dpfunc.ClippedSum`; and the ``(B,)`` per-example losses."""

    grads: Union[Params, ClippedSum]
    losses: torch.Tensor


class GradEngine(Protocol):
    def __call__(self, params: Params, buffers: Params, batch: Sequence[torch.Tensor], mask: torch.Tensor | None) -> EngineOutput: ...


class StepMetrics(NamedTuple):
    """Diagnostics of one step (NOT private: they are computed from the raw batch).

    Attributes:
        loss: mean loss over the real examples of the batch (nan for an empty batch).
        batch_size: number of real examples.
        clipped_fraction: fraction of real examples whose gradient was clipped (nan when unknown).
        mean_grad_norm: mean unclipped per-example gradient norm (nan when unknown).
    """

    loss: float
    batch_size: int
    clipped_fraction: float
    mean_grad_norm: float


def vmap_engine(
    loss_fn: Callable[..., torch.Tensor], *, clipping: Clipping | None = None, chunk_size: int | None = None, randomness: str = "error"
) -> GradEngine:
    """The reference engine: ``vmap(grad(loss_fn))`` over the batch.

    Args:
        loss_fn: ``loss_fn(params, buffers, *example) -> 0-d tensor``, the loss of ONE example.
        clipping: if given, clip here and return a :class:`~dpfunc.ClippedSum` (adds norm metrics);
            otherwise return the per-example gradients for the DP transform to clip.
        chunk_size: vmap chunking, to bound memory.
        randomness: vmap's ``randomness`` (``"different"`` for dropout; see :func:`~dpfunc.per_example_grads`).
    """

    def engine(params, buffers, batch, mask):
        batch = tuple(batch)
        grads, losses = per_example_grads_and_losses(
            loss_fn, params, buffers, *batch, in_dims=(None,) + (0,) * len(batch), chunk_size=chunk_size, randomness=randomness
        )
        if mask is not None:
            keep = mask.to(torch.bool)
            grads = {k: torch.where(keep.view(-1, *([1] * (g.dim() - 1))), g, torch.zeros((), dtype=g.dtype, device=g.device)) for k, g in grads.items()}
            losses = torch.where(keep, losses, torch.zeros((), dtype=losses.dtype, device=losses.device))
        if clipping is not None:
            return EngineOutput(clip_and_sum(grads, clipping, mask), losses)
        return EngineOutput(grads, losses)

    return engine


def _metrics(out: EngineOutput, mask: torch.Tensor | None) -> StepMetrics:
    losses = out.losses.detach()
    n = int(mask.sum()) if mask is not None else int(losses.shape[0])
    loss = float(losses.sum()) / n if n else float("nan")
    frac = norm = float("nan")
    if isinstance(out.grads, ClippedSum) and n:
        norms = out.grads.norms.detach()
        real = mask.to(torch.bool) if mask is not None else torch.ones_like(norms, dtype=torch.bool)
        norm = float(norms[real].mean())
        if set(out.grads.group_norms) == {""}:  # flat clipping: the bound is the sensitivity
            frac = float((norms[real] > out.grads.sensitivity).to(torch.float64).mean())
    return StepMetrics(loss, n, frac, norm)


def make_step(
    loss_fn: Callable[..., torch.Tensor] | None,
    tx: GradientTransformation,
    *,
    engine: GradEngine | None = None,
    chunk_size: int | None = None,
) -> Callable[..., tuple[Params, Any, StepMetrics]]:
    """Build a pure DP training step.

    Args:
        loss_fn: ``loss_fn(params, buffers, *example)``, the loss of ONE example (unused if ``engine``).
        tx: a transform that begins with :func:`~dpfunc.dp_aggregate` (e.g. :func:`~dpfunc.dpsgd`).
        engine: how to compute gradients; default ``vmap_engine(loss_fn, chunk_size=chunk_size)``.

    Returns:
        ``step(params, opt_state, batch, mask=None, buffers=None) -> (params, opt_state, metrics)``
        where ``batch`` is a tuple of tensors with leading dim ``B`` and ``mask`` an optional ``(B,)``
        bool tensor marking real rows (see :func:`~dpfunc.pad_batch`). Inputs are not modified. The
        update runs under ``torch.no_grad()``: returned params and state never carry an autograd graph.

    Raises:
        PrivacyBudgetExceededError: before touching the batch, if the state's budget would be exceeded.

    Example:
        >>> tx = dpsgd(0.1, noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=0.01, num_examples=1000, key=Key(0))
        >>> step = make_step(loss_fn, tx)
        >>> params, opt_state, metrics = step(params, tx.init(params), (x, y))
    """
    if engine is None:
        if loss_fn is None:
            raise ValueError("make_step: give loss_fn or engine")
        engine = vmap_engine(loss_fn, chunk_size=chunk_size)

    def step(params, opt_state, batch, mask=None, buffers=None):
        dp_state = find_dp_state(opt_state)
        if dp_state is None:
            raise ValueError("make_step: tx must contain dp_aggregate (use dpsgd/dpadam or chain(dp_aggregate(...), ...))")
        check_budget(dp_state)  # before the batch is touched
        if not isinstance(batch, (tuple, list)) or not batch:
            raise ValueError(f"make_step: batch must be a non-empty tuple of tensors, got {type(batch).__name__}")
        if mask is not None and tuple(mask.shape) != (batch[0].shape[0],):
            raise ValueError(f"make_step: mask must have shape ({batch[0].shape[0]},), got {tuple(mask.shape)}")
        out = engine(params, buffers if buffers is not None else {}, tuple(batch), mask)
        with torch.no_grad():  # no autograd graph may link one step's params to the next (it would grow without end)
            updates, opt_state = tx.update(out.grads, opt_state, params)
            new_params = apply_updates(params, updates)
        return new_params, opt_state, _metrics(out, mask)

    return step
