"""The pure training step: engine → :class:`~dpfunc.ClippedSum` → noise → optimizer → new parameters.

``make_step(loss_fn, tx)`` returns ``step(params, opt_state, batch, mask=None, buffers=None)``
→ ``(params, opt_state, metrics)``. The optimizer state carries the privacy ledger (see
:func:`dpfunc.privacy_ledger`), so ε is a pure function of the training state.

There is one data path. An *engine* computes the clipped sum of per-example gradients —
:func:`vmap_engine` (the ``vmap(grad)`` oracle, any model) or ``dpfunc.bridge.fast.fast_engine``
(ghost norms / book-keeping for ``nn.Module`` models) — and :func:`~dpfunc.dp_aggregate` adds the
noise. Nothing in a step reads a tensor back to the host (no ``.item()``, ``float()``, ``bool()``):
the metrics are 0-d tensors, converted only when printed, and the non-finite check is the
non-blocking :func:`~dpfunc.clipping.check_finite_norms`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import torch

from dpfunc._tree import Params
from dpfunc.adaptive_clipping import AdaptiveClipping, call_clipping, find_adaptive_state
from dpfunc.clipping import ClippedSum, Clipping, clip_and_sum, zero_rows
from dpfunc.per_example import per_example_grads_and_losses
from dpfunc.private import check_budget, find_dp_state
from dpfunc.transforms import GradientTransformation, apply_updates

__all__ = ["GradEngine", "EngineOutput", "vmap_engine", "make_step", "StepMetrics"]


class EngineOutput(NamedTuple):
    """What an engine returns: the :class:`~dpfunc.ClippedSum` of the batch and the ``(B,)``
    per-example losses (0 for padding rows)."""

    grads: ClippedSum
    losses: torch.Tensor


class GradEngine(Protocol):
    """What :func:`make_step` calls for the clipped gradient sum: ``engine(params, buffers, batch, mask)``.

    ``batch`` is the step's tensors with a leading batch dimension (inputs, targets, …); ``mask`` is None or a
    (B,) 0/1 tensor of the real rows of a padded Poisson batch (padding rows contribute nothing). Returns an
    :class:`EngineOutput`: the :class:`~dpfunc.clipping.ClippedSum` (each example's gradient clipped, then
    summed) and the per-example losses. :func:`vmap_engine` and :func:`dpfunc.bridge.fast_engine` build one.
    """

    def __call__(self, params: Params, buffers: Params, batch: Sequence[torch.Tensor], mask: torch.Tensor | None) -> EngineOutput: ...


class StepMetrics(NamedTuple):
    """Diagnostics of one step (NOT private: they are computed from the raw batch).

    Every field is a 0-d tensor on the batch's device, so that building them never waits for the
    device; convert when printing (``float(m.loss)``, ``int(m.batch_size)``).

    Attributes:
        loss: mean loss over the real examples of the batch (nan for an empty batch).
        batch_size: number of real examples (int64).
        clipped_fraction: fraction of real examples whose gradient was clipped (flat clipping; nan
            for per-layer clipping and for an empty batch).
        mean_grad_norm: mean unclipped per-example gradient norm (nan for an empty batch).
    """

    loss: torch.Tensor
    batch_size: torch.Tensor
    clipped_fraction: torch.Tensor
    mean_grad_norm: torch.Tensor


def vmap_engine(
    loss_fn: Callable[..., torch.Tensor], *, clipping: Clipping | None = None, chunk_size: int | None = None, randomness: str = "error"
) -> GradEngine:
    """The reference engine: ``vmap(grad(loss_fn))`` over the batch, then :func:`~dpfunc.clip_and_sum`.

    Args:
        loss_fn: ``loss_fn(params, buffers, *example) -> 0-d tensor``, the loss of ONE example.
        clipping: :class:`~dpfunc.FlatClipping` or :class:`~dpfunc.PerLayerClipping` (required: every
            engine returns a clipped sum; ``make_step(loss_fn, tx)`` passes the transform's own); or an
            :class:`~dpfunc.AdaptiveClipping`, and then each call passes the current bound as
            ``engine(..., clipping=...)`` (``make_step`` does; a per-call ``clipping=`` overrides a fixed one too).
        chunk_size: vmap chunking, to bound memory.
        randomness: vmap's ``randomness`` (``"different"`` for dropout; see :func:`~dpfunc.per_example_grads`).

    Returns:
        ``engine(params, buffers, batch, mask) -> EngineOutput(ClippedSum, losses)``.

    Example:
        >>> loss_fn = lambda p, b, x: (p["w"] * x).sum()
        >>> engine = vmap_engine(loss_fn, clipping=FlatClipping(1.0))
        >>> out = engine({"w": torch.zeros(2)}, {}, (torch.tensor([[3.0, 4.0], [0.3, 0.4]]),), None)
        >>> out.grads.grads["w"], out.grads.norms
        (tensor([0.9000, 1.2000]), tensor([5.0000, 0.5000]))
    """
    if clipping is None or not (hasattr(clipping, "group_bounds") or isinstance(clipping, AdaptiveClipping)):
        raise TypeError(f"vmap_engine: clipping must be a FlatClipping, PerLayerClipping or AdaptiveClipping (engines return "
                        f"clipped sums), got {clipping!r}")
    own = clipping  # the call's clipping= (adaptive: the current bound) takes precedence

    def engine(params, buffers, batch, mask, *, clipping=None):
        batch = tuple(batch)
        current = call_clipping("vmap_engine", own, clipping)
        grads, losses = per_example_grads_and_losses(
            loss_fn, params, buffers, *batch, in_dims=(None,) + (0,) * len(batch), chunk_size=chunk_size, randomness=randomness
        )
        if mask is not None:
            losses = zero_rows(losses, mask.to(torch.bool))
        return EngineOutput(clip_and_sum(grads, current, mask), losses)

    engine.per_call_clipping = True
    return engine


def step_metrics(out: EngineOutput, mask: torch.Tensor | None) -> StepMetrics:
    """:class:`StepMetrics` of an engine's output, as tensors (no host read)."""
    clipped = out.grads
    losses = out.losses.detach()
    dtype = losses.dtype if losses.is_floating_point() else torch.get_default_dtype()
    norms = clipped.norms.detach()
    norms = norms if norms.dtype == dtype else norms.to(dtype)
    losses = losses if losses.dtype == dtype else losses.to(dtype)
    flat = set(clipped.group_norms) == {""}  # flat clipping: the bound is the sensitivity
    if mask is None:  # every row is real: the same sums without the row selection
        n = torch.full((), losses.shape[0], dtype=torch.int64, device=losses.device)
        nf = n.to(dtype)  # 0 / 0 = nan: the empty batch needs no branch
        mean_norm = norms.sum() / nf
        over = norms > clipped.sensitivity if flat else None
    else:
        real = mask.to(torch.bool)
        n = real.sum()
        nf = n.to(dtype)
        mean_norm = torch.where(real, norms, 0).sum() / nf
        over = real & (norms > clipped.sensitivity) if flat else None
    if over is not None:
        frac = over.sum().to(dtype) / nf
    else:
        frac = torch.full((), float("nan"), dtype=dtype, device=losses.device)
    return StepMetrics(losses.sum() / nf, n, frac, mean_norm)


def _default_engine(loss_fn, chunk_size):
    """``vmap_engine`` built for the clipping a transform expects (cached per clipping)."""
    cache: dict[Clipping, GradEngine] = {}

    def engine_for(clipping: Clipping) -> GradEngine:
        if clipping not in cache:
            cache[clipping] = vmap_engine(loss_fn, clipping=clipping, chunk_size=chunk_size)
        return cache[clipping]

    return engine_for


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
        engine: how to compute the clipped sum; default ``vmap_engine(loss_fn, clipping=<tx's
            clipping>, chunk_size=chunk_size)``.

    Returns:
        ``step(params, opt_state, batch, mask=None, buffers=None) -> (params, opt_state, metrics)``
        where ``batch`` is a tuple of tensors with leading dim ``B`` and ``mask`` an optional ``(B,)``
        bool tensor marking real rows (see :func:`~dpfunc.pad_batch`). Inputs are not modified. The
        update runs under ``torch.no_grad()``: returned params and state never carry an autograd graph.
        The step reads nothing back from the device; ``metrics`` holds 0-d tensors.

    Raises:
        PrivacyBudgetExceededError: before touching the batch, if the state's budget would be exceeded.
        ValueError: a real example with a non-finite gradient (invariant 6). On CPU in this step; on
            CUDA without blocking, i.e. in a later step or at
            :func:`~dpfunc.clipping.flush_nonfinite_checks` (see
            :func:`~dpfunc.clipping.check_finite_norms`).

    Example:
        >>> loss_fn = lambda p, b, x, y: (p["w"] @ x - y) ** 2
        >>> tx = dpsgd(0.1, noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=0.5, num_examples=8, key=Key(0))
        >>> params = {"w": torch.zeros(3)}
        >>> step = make_step(loss_fn, tx)
        >>> params, opt_state, metrics = step(params, tx.init(params), (torch.ones(4, 3), torch.ones(4)))
        >>> int(metrics.batch_size), privacy_ledger(opt_state).total_steps
        (4, 1)
    """
    default = None
    if engine is None:
        if loss_fn is None:
            raise ValueError("make_step: give loss_fn or engine")
        default = _default_engine(loss_fn, chunk_size)

    def step(params, opt_state, batch, mask=None, buffers=None):
        dp_state = find_dp_state(opt_state)
        if dp_state is None:
            raise ValueError("make_step: tx must contain dp_aggregate (use dpsgd/dpadam or chain(dp_aggregate(...), ...))")
        check_budget(dp_state)  # the transform enforces it; asking first means a refused step runs no model
        if not isinstance(batch, (tuple, list)) or not batch:
            raise ValueError(f"make_step: batch must be a non-empty tuple of tensors, got {type(batch).__name__}")
        if mask is not None and tuple(mask.shape) != (batch[0].shape[0],):
            raise ValueError(f"make_step: mask must have shape ({batch[0].shape[0]},), got {tuple(mask.shape)}")
        adaptive = find_adaptive_state(opt_state)
        if adaptive is None:
            run = engine if engine is not None else default(dp_state.clipping)
            out = run(params, buffers if buffers is not None else {}, tuple(batch), mask)
        else:  # the clip norm moves: the engine clips at the state's current bound
            run = engine if engine is not None else default(adaptive.rule)
            if not getattr(run, "per_call_clipping", False):
                raise TypeError("make_step: adaptive clipping needs an engine that takes the current clipping per call "
                                "(vmap_engine or fast_engine); this engine does not")
            out = run(params, buffers if buffers is not None else {}, tuple(batch), mask, clipping=dp_state.clipping)
        with torch.no_grad():  # no autograd graph may link one step's params to the next (it would grow without end)
            updates, opt_state = tx.update(out.grads, opt_state, params)
            new_params = apply_updates(params, updates)
        return new_params, opt_state, step_metrics(out, mask)

    return step
