"""What every per-layer rule shares: the call record, the result type, the registry, chunking helpers.

A rule sees, for one layer, the input ``a`` of each call and the gradient ``g`` of the summed loss
with respect to that call's output (one backward of ``Σ_i loss_i``; ``g[i]`` depends on example ``i``
only). It returns a :class:`LayerGrads`: per parameter the ``(B,)`` squared per-example gradient
norms, and a closure that, given per-example clip factors ``c``, forms ``Σ_i c_i ∇θ loss_i``
directly from what it kept (book-keeping, Bu et al. 2023) — no second backward.

Rules are registered by module type with :func:`register_rule` (the shape of Opacus'
``register_grad_sampler``; nothing is ever stored on parameters or modules)::

    @register_rule(nn.Linear)
    def linear(module, calls, attrs, ghost) -> LayerGrads: ...
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

__all__ = ["Call", "LayerGrads", "Rule", "RULES", "register_rule", "rule_for"]

# Per-example work (unfold, Gram matrices, instantiated gradients) is done in batch chunks whose
# largest temporary holds at most this many elements, so transient memory does not grow with B.
_CHUNK_ELEMENTS = 1 << 23
# On a CUDA device the chunks are this large (1 GiB of float32 per temporary): a chunk costs a few kernel
# launches per layer, and a step on a GPU is bound by the host issuing them (ResNet-18-GN at B = 256 on an
# H200: 4725 launches and 160 ms of host time against 14 ms of non-private kernels with CPU-sized chunks).
_CUDA_CHUNK_ELEMENTS = 1 << 28


class Call(NamedTuple):
    """One forward call of a layer: its input, the gradient at its output, the weight it used, and
    what the rule's ``capture`` took from the forward (e.g. normalisation statistics)."""

    x: torch.Tensor
    g: torch.Tensor
    weight: torch.Tensor | None
    saved: object = None


class LayerGrads(NamedTuple):
    """A rule's result. ``sq[attr]`` is ``(B,)``; ``clipped({attr: c})`` → ``{attr: Σ_i c_i ∇_attr loss_i}``."""

    sq: dict[str, torch.Tensor]
    clipped: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def _sq(pe: torch.Tensor) -> torch.Tensor:
    """``(B, *shape) -> (B,)`` squared norms, one fused reduction (no squared temporary)."""
    return torch.linalg.vector_norm(pe if pe.dim() == 2 else pe.reshape(pe.shape[0], -1), dim=1).square()


def _cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _weighted(c: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """``Σ_i c_i pe_i`` for kept per-example tensors ``pe`` of shape ``(B, *shape)``.

    The ``(1, B) @ (B, D)`` product that ``torch.tensordot(c, pe, dims=([0], [0]))`` reduces to, called
    directly (bit-identical: ``matmul`` of a vector and a matrix is the same ``mm`` on the same operands),
    without tensordot's Python wrapper and permutes (≈ 10 µs per parameter and step)."""
    d = math.prod(pe.shape[1:])
    c = c if c.dtype == pe.dtype else c.to(pe.dtype)
    if d == 1:  # one element per example: tensordot takes a dot product here, not this mm
        return torch.tensordot(c, pe, dims=([0], [0]))
    out = torch.matmul(c, pe if pe.dim() == 2 else pe.reshape(pe.shape[0], d))
    return out if pe.dim() == 2 else out.view(pe.shape[1:])


def _chunks(b: int, per_example: int, limit: int | None = None, device: torch.device | None = None) -> list[tuple[int, int]]:
    """Batch ranges whose temporaries (``per_example`` elements each) hold at most ``_CHUNK_ELEMENTS``, or
    ``limit`` when smaller (a CPU cache bound); on a CUDA ``device`` at most ``_CUDA_CHUNK_ELEMENTS``
    (``limit`` ignored: fewer, larger kernels)."""
    cap = _CUDA_CHUNK_ELEMENTS if device is not None and device.type == "cuda" else min(_CHUNK_ELEMENTS, limit or _CHUNK_ELEMENTS)
    step = max(1, cap // max(1, per_example))
    return [(i, min(b, i + step)) for i in range(0, b, step)]


def _use_ghost(ghost: bool | None, t: int, d_out: int, d_in: int) -> bool:
    """Per example, ghost norm costs ``T²·(d_in + d_out)`` multiply-adds, instantiation ``T·d_in·d_out``;
    both run in batch chunks, so neither needs more than ``_CHUNK_ELEMENTS`` of scratch memory."""
    if ghost is not None:
        return ghost
    return t * (d_in + d_out) < d_in * d_out


def _scale(c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return t * c.to(t.dtype).view(-1, *([1] * (t.dim() - 1)))


class Rule(NamedTuple):
    """How a layer type is handled: ``grads(module, calls, attrs, ghost) -> LayerGrads``; ``supports(module)``
    (else its parameters take the vmap path); ``capture(module, output)`` → ``Call.saved``; optionally
    ``tap(module, x, output, record, clone, anchor) -> tensor | None``, a tap of the rule's own that replaces the
    layer's backward (None: the engine's plain tap)."""

    grads: Callable[..., LayerGrads]
    supports: Callable[[nn.Module], bool] = lambda m: True
    capture: Callable[[nn.Module, torch.Tensor], object] = lambda m, out: None
    owns: Callable[[nn.Module], dict] = lambda m: dict(m._parameters)  # attr -> parameter the rule handles
    tap: Callable[..., torch.Tensor | None] | None = None


RULES: dict[type, Rule] = {}


def register_rule(*module_types: type, supports: Callable[[nn.Module], bool] | None = None,
                  capture: Callable[[nn.Module, torch.Tensor], object] | None = None,
                  owns: Callable[[nn.Module], dict] | None = None, tap: Callable[..., torch.Tensor | None] | None = None):
    """Decorator: register ``grads(module, calls, attrs, ghost) -> LayerGrads`` for ``module_types``.

    Args:
        module_types: the ``nn.Module`` classes the rule handles (exactly: a subclass that overrides
            ``forward`` is not trusted and takes the vmap path).
        supports: optional predicate; modules it refuses take the vmap path.
        capture: optional ``capture(module, output)``, run in the forward hook; its result reaches the
            rule as ``Call.saved`` (e.g. normalisation statistics).
        owns: optional ``owns(module) -> {attr: parameter}``, the parameters the rule handles (default:
            the module's own; a rule may claim a submodule's, as attention claims ``out_proj.weight``).
        tap: optional ``tap(module, x, output, record, clone, anchor)``: the output to hand on, wrapped in an
            autograd node of the rule's own (an input of which is ``anchor``, the backward's leaf) whose backward
            computes the layer's input gradient and calls ``record.receive(g)``; or None to take the engine's plain tap (e.g. GroupNorm's fused backward).
    """
    if not module_types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in module_types):
        raise TypeError(f"register_rule: give nn.Module classes, got {module_types!r}")

    def register(grads: Callable[..., LayerGrads]) -> Callable[..., LayerGrads]:
        rule = Rule(grads, supports or (lambda m: True), capture or (lambda m, out: None), owns or (lambda m: dict(m._parameters)), tap)
        for t in module_types:
            RULES[t] = rule
        return grads

    return register


def rule_for(module: nn.Module) -> Rule | None:
    """The rule of a module whose forward is exactly a supported layer's (subclasses that override
    ``forward`` are not trusted), or None."""
    for cls in type(module).__mro__:
        if cls in RULES:
            rule = RULES[cls]
            return rule if type(module).forward is cls.forward and rule.supports(module) else None
    return None
