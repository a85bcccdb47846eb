"""Per-example clipping: bound each example's contribution, then sum.

Formal guarantees:
    With :class:`FlatClipping` every clipped per-example gradient has l2 norm ≤ ``max_grad_norm``
    (over all parameters together), so adding or removing one example moves the clipped sum by at
    most ``max_grad_norm``: the sensitivity under add/remove-one adjacency. With
    :class:`PerLayerClipping` group ``g`` is clipped to ``C_g`` separately, and the sensitivity is
    ``sqrt(Σ_g C_g²)``, reported as :attr:`ClippedSum.sensitivity`.

Edge cases:

    =========================  ==================================================================
    gradient norm ≤ C          left unchanged (factor exactly 1)
    gradient norm 0            unchanged (zero); no division by zero
    ``max_grad_norm = inf``    no clipping; sensitivity inf (only meaningful with noise 0)
    ``max_grad_norm ≤ 0``      ValueError (a zero bound would discard all data)
    non-finite gradient        ValueError naming the example indices (never a silent NaN model)
    masked (padding) rows      contribute exactly zero and are excluded from the checks
    =========================  ==================================================================

References:
    Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (flat clipping);
    McMahan et al., "A General Approach to Adding Differential Privacy to Iterative Training
    Procedures", 2018 (per-layer clipping).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple, Union

import torch

from dpfunc._tree import Params

__all__ = [
    "FlatClipping",
    "PerLayerClipping",
    "Clipping",
    "ClippedSum",
    "clip_and_sum",
    "clip_factors",
    "layer_of",
    "zero_rows",
    "group_norms",
    "check_finite_norms",
    "flush_nonfinite_checks",
]


def _check_bound(fn: str, arg: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value <= 0:
        raise ValueError(f"{fn}: {arg} must be a number > 0 (inf disables clipping), got {value!r}")
    return float(value)


def layer_of(name: str) -> str:
    """The default parameter group of a parameter: its module path (``"fc.weight" -> "fc"``)."""
    head, _, _ = name.rpartition(".")
    return head or name


@dataclass(frozen=True)
class FlatClipping:
    """Clip the gradient of all parameters together to l2 norm ``max_grad_norm``."""

    max_grad_norm: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_grad_norm", _check_bound("FlatClipping", "max_grad_norm", self.max_grad_norm))

    def group_bounds(self, names) -> dict[str, float]:
        return {"": self.max_grad_norm}

    def group_of(self, name: str) -> str:
        return ""

    def sensitivity(self, names) -> float:
        return self.max_grad_norm


@dataclass(frozen=True)
class PerLayerClipping:
    """Clip each parameter group (by default: each layer, weight and bias together) separately.

    Args:
        max_grad_norm: either one number, the overall sensitivity ``C``, split equally so that each of
            the ``G`` groups gets ``C / sqrt(G)`` (then the sensitivity is exactly ``C``); or a mapping
            group → bound, in which case the sensitivity is ``sqrt(Σ_g C_g²)``.
        per_parameter: group by parameter tensor instead of by layer.
    """

    max_grad_norm: Union[float, Mapping[str, float]]
    per_parameter: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_grad_norm, Mapping):
            bounds = {str(k): _check_bound("PerLayerClipping", f"max_grad_norm[{k!r}]", v) for k, v in self.max_grad_norm.items()}
            if not bounds:
                raise ValueError("PerLayerClipping: max_grad_norm mapping is empty")
            object.__setattr__(self, "max_grad_norm", tuple(sorted(bounds.items())))
        else:
            object.__setattr__(self, "max_grad_norm", _check_bound("PerLayerClipping", "max_grad_norm", self.max_grad_norm))

    def group_of(self, name: str) -> str:
        return name if self.per_parameter else layer_of(name)

    def group_bounds(self, names) -> dict[str, float]:
        groups = sorted({self.group_of(n) for n in names})
        if isinstance(self.max_grad_norm, tuple):
            bounds = dict(self.max_grad_norm)
            missing = [g for g in groups if g not in bounds]
            if missing:
                raise ValueError(f"PerLayerClipping: no max_grad_norm for parameter groups {missing}; given {sorted(bounds)}")
            return {g: bounds[g] for g in groups}
        c = self.max_grad_norm / math.sqrt(max(len(groups), 1))
        return {g: c for g in groups}

    def sensitivity(self, names) -> float:
        return math.sqrt(sum(c * c for c in self.group_bounds(names).values()))


Clipping = Union[FlatClipping, PerLayerClipping]


class ClippedSum(NamedTuple):
    """The result of clipping a batch.

    Attributes:
        grads: ``dict`` name → ``Σ_i clip(g_i)`` (shape of the parameter).
        norms: ``(B,)`` unclipped per-example gradient norms over all parameters (0 for masked rows).
        group_norms: ``dict`` group → ``(B,)`` per-group norms (one group ``""`` for flat clipping).
        sensitivity: the l2 sensitivity of ``grads`` under add/remove-one adjacency.
        num_real_rows: how many real (unmasked) rows of the batch contributed (a 0-d int64 tensor) —
            not the data set size ``n``, which is :attr:`DPConfig.num_examples <dpfunc.DPConfig>`.

    Renamed from ``num_examples`` (the field clashed with ``DPConfig.num_examples``, the data set size):
    reading ``.num_examples`` still works and warns (``DeprecationWarning``); checkpoints written with
    the old field name load (``_renamed_fields``); pickles are positional and unaffected.
    """

    grads: Params
    norms: torch.Tensor
    group_norms: dict[str, torch.Tensor]
    sensitivity: float
    num_real_rows: torch.Tensor

    # old field name → new one, read by bridge.checkpoint.from_plain so that older files still load
    _renamed_fields = {"num_examples": "num_real_rows"}

    @property
    def num_examples(self) -> torch.Tensor:
        """Deprecated alias of :attr:`num_real_rows` (the old name clashed with ``DPConfig.num_examples``)."""
        warnings.warn("ClippedSum.num_examples is deprecated: use ClippedSum.num_real_rows (the real rows of the batch; "
                      "DPConfig.num_examples is the data set size)", DeprecationWarning, stacklevel=2)
        return self.num_real_rows


def clip_factors(group_norms: Mapping[str, torch.Tensor], bounds: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Per example and group, the factor ``min(1, C_g / ‖g_i‖)``; exactly 1 where ``‖g_i‖ ≤ C_g``."""
    out = {}
    for g, n in group_norms.items():
        c = bounds[g]
        out[g] = torch.where(n <= c, torch.ones_like(n), c / n.clamp_min(torch.finfo(n.dtype).tiny))
    return out


def zero_rows(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``t`` with the rows where ``keep`` (``(B,)`` bool) is False set to exactly 0.

    A ``where``, not a product: ``0 · nan = nan``, so a non-finite value in a dropped row can never
    leak into norms or sums. Used wherever padding rows are removed (one helper for all engines).
    """
    return torch.where(keep.view(-1, *([1] * (t.dim() - 1))), t, torch.zeros((), dtype=t.dtype, device=t.device))


def group_norms(sq: Mapping[str, torch.Tensor], clipping: Clipping, names, like: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-example norms over all parameters and per clipping group, from per-parameter squared norms.

    Args:
        sq: name → ``(B,)`` squared per-example gradient norms; a name of ``names`` missing here
            counts as zero (a parameter that the batch does not reach).
        clipping: decides the group of each name.
        names: all parameter names (the groups are those of ``names``).
        like: a ``(B,)`` tensor giving the dtype and device of missing entries.

    Returns:
        ``(norms, group_norms)``: ``(B,)`` and group → ``(B,)``.
    """
    group_sq: dict[str, torch.Tensor] = {}
    for name in names:
        s = sq.get(name)
        if s is None:
            s = torch.zeros_like(like)
        grp = clipping.group_of(name)
        group_sq[grp] = group_sq[grp] + s if grp in group_sq else s
    groups = {g: s.sqrt() for g, s in group_sq.items()}
    if len(groups) == 1:  # one group (flat clipping): its norm is the total norm
        return next(iter(groups.values())), groups
    norms = sum(group_sq.values()).sqrt() if group_sq else torch.zeros_like(like)
    return norms, groups


def _nonfinite_error(fn: str, idx: list[int]) -> ValueError:
    return ValueError(
        f"{fn}: non-finite per-example gradients for examples {idx[:10]}{' …' if len(idx) > 10 else ''}; "
        "check the loss for NaN/inf (log of 0, overflow) or lower the learning rate"
    )


class _PendingChecks:
    """Non-finite checks of accelerator tensors, read back without blocking the host.

    A check copies its ``(B,)`` flag tensor to pinned host memory asynchronously and records an
    event; it is read once the event has completed — at the next check, or at
    :func:`flush_nonfinite_checks` (which waits). The host therefore never waits for the device in a
    step; an error surfaces at the latest at the next step or at the next flush.
    """

    def __init__(self) -> None:
        self.queue: list[tuple[str, torch.Tensor, object]] = []

    def submit(self, fn: str, bad: torch.Tensor) -> None:
        self.poll(block=False)
        host = torch.empty(bad.shape, dtype=torch.bool, pin_memory=True)
        host.copy_(bad, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.queue.append((fn, host, event))

    def poll(self, *, block: bool) -> None:
        while self.queue:
            fn, host, event = self.queue[0]
            if block:
                event.synchronize()
            elif not event.query():
                return
            self.queue.pop(0)
            flags = host.numpy()
            if flags.any():
                self.queue.clear()
                raise _nonfinite_error(fn, flags.nonzero()[0].tolist())


_PENDING = _PendingChecks()


def flush_nonfinite_checks() -> None:
    """Wait for the non-finite checks still in flight on an accelerator and raise the first failure.

    Checks of CPU tensors are immediate and never pending. Call this before saving or releasing a
    model trained on a GPU (``save_checkpoint`` and the bridge's ``state_dict`` do).
    """
    _PENDING.poll(block=True)


def check_finite_norms(fn: str, norms: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Raise if any real example has a non-finite gradient norm (invariant 6), without a host sync.

    The flags are computed on the device. On CPU they are read straight from memory (``numpy()``:
    no dispatched operation, and there is no device to wait for), so the ValueError is raised here,
    in the step. On CUDA they are copied back asynchronously and read once the copy has completed:
    the ValueError is raised by a later check (the next step) or by :func:`flush_nonfinite_checks`
    — never later than that, and in the meantime only the steps in flight can have used the bad
    gradient. Other accelerators are checked synchronously.
    """
    bad = ~torch.isfinite(norms)
    if mask is not None:
        bad = bad & mask.to(torch.bool)
    if bad.device.type == "cpu":
        _PENDING.poll(block=False)
        flags = bad.numpy()
        if flags.any():
            raise _nonfinite_error(fn, flags.nonzero()[0].tolist())
    elif bad.device.type == "cuda":
        _PENDING.submit(fn, bad)
    elif bool(bad.any()):
        raise _nonfinite_error(fn, torch.nonzero(bad).flatten().tolist())


def _check_mask(fn: str, mask: torch.Tensor | None, b: int) -> None:
    if mask is not None and tuple(mask.shape) != (b,):
        raise ValueError(f"{fn}: mask must have shape ({b},) to match the batch, got {tuple(mask.shape)}")


def clip_and_sum(per_example_grads: Mapping[str, torch.Tensor], clipping: Clipping, mask: torch.Tensor | None = None) -> ClippedSum:
    """Clip each example's gradient and sum over the batch.

    Args:
        per_example_grads: ``dict`` name → ``(B, *param.shape)``.
        clipping: :class:`FlatClipping` or :class:`PerLayerClipping`.
        mask: optional ``(B,)`` of 0/1 (or bool); rows with 0 are padding and contribute exactly zero.

    Returns:
        :class:`ClippedSum`.

    Example:
        >>> g = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}
        >>> out = clip_and_sum(g, FlatClipping(1.0))
        >>> out.grads["w"], out.norms
        (tensor([0.9000, 1.2000]), tensor([5.0000, 0.5000]))
    """
    fn = "clip_and_sum"
    if not per_example_grads:
        raise ValueError(f"{fn}: per_example_grads is empty")
    sizes = {v.shape[0] for v in per_example_grads.values()}
    if len(sizes) != 1:
        raise ValueError(f"{fn}: per-example gradients disagree on the batch size: {sorted(sizes)}")
    b = sizes.pop()
    _check_mask(fn, mask, b)
    names = list(per_example_grads)
    bounds = clipping.group_bounds(names)
    if mask is not None:  # padding rows first, so that they can neither raise nor leak (see zero_rows)
        keep = mask.to(torch.bool)
        per_example_grads = {k: zero_rows(g, keep) for k, g in per_example_grads.items()}
    sq = {name: g.reshape(b, math.prod(g.shape[1:])).pow(2).sum(dim=1) for name, g in per_example_grads.items()}  # not reshape(b, -1): fails for b = 0
    norms, groups = group_norms(sq, clipping, names, next(iter(sq.values())))
    check_finite_norms(fn, norms, mask)
    factors = clip_factors(groups, bounds)
    if mask is not None:
        factors = {k: f * mask.to(f.dtype) for k, f in factors.items()}
    grads = {}
    for name, g in per_example_grads.items():
        f = factors[clipping.group_of(name)].to(g.dtype)
        grads[name] = torch.tensordot(f, g, dims=([0], [0]))
    count = mask.to(torch.int64).sum() if mask is not None else torch.tensor(b)
    return ClippedSum(grads, norms, groups, clipping.sensitivity(names), count)
