"""Per-layer rules: per-example squared gradient norms and clipped sums from ``(input, grad_output)``.

A rule sees, for one layer, the input ``a`` of each call and the gradient ``g`` of the summed loss
with respect to that call's output (one backward of ``Σ_i loss_i``; ``g[i]`` depends on example ``i``
only). It returns a :class:`LayerGrads`: per parameter the ``(B,)`` squared per-example gradient
norms, and a closure that, given per-example clip factors ``c``, forms ``Σ_i c_i ∇θ loss_i``
directly from what it kept (book-keeping, Bu et al. 2023) — no second backward.

Shapes (``T`` = positions: sequence length, or spatial positions of a conv output):

    =============  ====================  ==============================  ======================================
    layer          a                     per-example weight gradient     norm from
    =============  ====================  ==============================  ======================================
    Linear         (B, T, d_in)          Σ_t g_t a_tᵀ   (d_out, d_in)    ghost ``Σ_ts (a_t·a_s)(g_t·g_s)`` or
                                                                         instantiated ``gᵀa`` (cost model)
    Conv1d/2d      unfold (B, d_in·K, T)  as Linear, per group           as Linear; clipped sum by the conv
                                                                         weight-gradient kernel on ``c·g``
    Embedding      (B, T) indices        scatter of g_t into rows       exact: rows of equal index summed
    LayerNorm /    x̂ = normalised input  Σ_t x̂_t ∘ g_t                  instantiated (size of the weight)
    GroupNorm /
    RMSNorm
    biases         —                     Σ_t g_t                         instantiated
    =============  ====================  ==============================  ======================================

The ghost/instantiate choice is a cost model in the spirit of mixed ghost clipping (Bu et al. 2022):
ghost norm iff ``T·(d_in + d_out) < d_in·d_out`` (per conv group; multiply-adds per example), and
both run over batch chunks with bounded scratch memory, so neither allocates ``B × |θ|``.
An instantiated per-example weight gradient is kept for the clipped sum when it is no larger than
the layer's ``a`` and ``g``; otherwise it is dropped and the clipped sum is one GEMM / conv
weight-gradient of the scaled ``g`` — the same cost as the non-private weight gradient.

References:
    I. Goodfellow, "Efficient Per-Example Gradient Computations", arXiv:1510.01799 (2015).
    X. Li, F. Tramèr, P. Liang, T. Hashimoto, "Large Language Models Can Be Strong Differentially
    Private Learners", ICLR 2022 (ghost clipping for sequences).
    Z. Bu, J. Mao, S. Xu, "Scalable and Efficient Training of Large Convolutional Neural Networks
    with Differential Privacy", NeurIPS 2022 (mixed ghost clipping).
    Z. Bu, Y.-X. Wang, S. Zha, G. Karypis, "Differentially Private Optimization on Large Model at
    Small Cost", ICML 2023 (book-keeping).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerGrads", "Call", "Rule", "RULES", "rule_for"]

# Per-example work (unfold, Gram matrices, instantiated gradients) is done in batch chunks whose
# largest temporary holds at most this many elements, so transient memory does not grow with B.
_CHUNK_ELEMENTS = 1 << 23
# Instantiated conv gradients use the grouped-convolution trick from this many output positions on
# (and d_in·K >= 32; measured on CPU: faster than unfold + bmm on large feature maps with several
# input channels, slower on small maps and on single-channel inputs).
GROUPED_MIN_POSITIONS = 128


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
    return torch.linalg.vector_norm(pe.reshape(pe.shape[0], -1), dim=1).square()


def _cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _weighted(c: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """``Σ_i c_i pe_i`` for kept per-example tensors ``pe`` of shape ``(B, *shape)``."""
    return torch.tensordot(c.to(pe.dtype), pe, dims=([0], [0]))


def _chunks(b: int, per_example: int) -> list[tuple[int, int]]:
    step = max(1, _CHUNK_ELEMENTS // max(1, per_example))
    return [(i, min(b, i + step)) for i in range(0, b, step)]


def _use_ghost(ghost: bool | None, t: int, d_out: int, d_in: int) -> bool:
    """Per example, ghost norm costs ``T²·(d_in + d_out)`` multiply-adds, instantiation ``T·d_in·d_out``;
    both run in batch chunks, so neither needs more than ``_CHUNK_ELEMENTS`` of scratch memory."""
    if ghost is not None:
        return ghost
    return t * (d_in + d_out) < d_in * d_out


def _scale(c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return t * c.to(t.dtype).view(-1, *([1] * (t.dim() - 1)))


# ----------------------------------------------------------------------------------------- Linear


def _linear(module: nn.Linear, calls: Sequence[Call], attrs: frozenset, ghost: bool | None) -> LayerGrads:
    b = calls[0].x.shape[0]
    a = _cat([c.x.reshape(b, -1, c.x.shape[-1]) for c in calls], 1)  # (B, T, d_in)
    g = _cat([c.g.reshape(b, -1, c.g.shape[-1]) for c in calls], 1)  # (B, T, d_out)
    t, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
    sq: dict[str, torch.Tensor] = {}
    kept: dict[str, torch.Tensor] = {}
    if "bias" in attrs:
        kept["bias"] = g.sum(1)
        sq["bias"] = _sq(kept["bias"])
    if "weight" in attrs:
        if t == 1:
            sq["weight"] = _sq(a) * _sq(g)
        elif _use_ghost(ghost, t, d_out, d_in):
            sq["weight"] = _ghost_sq(a, g)
        else:
            pe = _instantiate(g.transpose(1, 2), a)  # (B, d_out, d_in), or (norms,) when not kept
            if isinstance(pe, tuple):
                sq["weight"] = pe[0]
            else:
                sq["weight"], kept["weight"] = _sq(pe), pe

    def clipped(factors):
        out = {k: _weighted(factors[k], v) for k, v in kept.items()}
        if "weight" in attrs and "weight" not in kept:
            c = factors["weight"]
            if d_out <= d_in:
                out["weight"] = _scale(c, g).reshape(-1, d_out).T @ a.reshape(-1, d_in)
            else:
                out["weight"] = g.reshape(-1, d_out).T @ _scale(c, a).reshape(-1, d_in)
        return out

    return LayerGrads(sq, clipped)


def _ghost_sq(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``‖Σ_t g_t a_tᵀ‖²_F = Σ_{t,s} (a_t·a_s)(g_t·g_s)`` for ``a (B, T, d_in)``, ``g (B, T, d_out)``."""
    b, t = a.shape[:2]
    out = a.new_empty(b)
    for lo, hi in _chunks(b, 2 * t * t):
        ga = torch.bmm(a[lo:hi], a[lo:hi].transpose(1, 2))
        gg = torch.bmm(g[lo:hi], g[lo:hi].transpose(1, 2))
        out[lo:hi] = (ga * gg).sum((1, 2))
    return out


def _instantiate(gt: torch.Tensor, a: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor]:
    """Per-example ``gt @ a`` for ``gt (B, d_out, T)``, ``a (B, T, d_in)``. Returns the ``(B, d_out, d_in)``
    gradients when they are no larger than ``a`` and ``g`` together (kept for the clipped sum), else
    only their squared norms as a 1-tuple (computed in chunks and dropped)."""
    b, d_out, t = gt.shape
    d_in = a.shape[2]
    if d_out * d_in <= t * (d_in + d_out):
        return torch.bmm(gt, a)
    sq = a.new_empty(b)
    for lo, hi in _chunks(b, d_out * d_in):
        sq[lo:hi] = _sq(torch.bmm(gt[lo:hi], a[lo:hi]))
    return (sq,)


# ------------------------------------------------------------------------------------------- Conv


class _ConvInput(NamedTuple):
    x: torch.Tensor  # the input as the kernel sees it: explicitly padded where padding is not plain zeros
    padding: tuple  # the padding still to apply (zeros)


def _conv_input(module: nn.Module, x: torch.Tensor) -> _ConvInput:
    nd = x.dim() - 2
    pad = module.padding
    if module.padding_mode != "zeros":
        return _ConvInput(F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), (0,) * nd)
    if isinstance(pad, str):
        if pad == "valid":
            return _ConvInput(x, (0,) * nd)
        widths = []  # 'same' (stride 1): total d·(k-1), the odd one on the right, as torch does
        for k, d in reversed(list(zip(module.kernel_size, module.dilation))):
            widths += [d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2]
        return _ConvInput(F.pad(x, widths), (0,) * nd)
    return _ConvInput(x, tuple(pad))


def _unfold(x: torch.Tensor, kernel, stride, padding, dilation, t: int) -> torch.Tensor:
    """``F.unfold`` for 1-D and 2-D convs, ``(n, C, *S) -> (n, C·K, T)``, as a strided view copied once
    (several times faster than ``im2col`` on CPU)."""
    if any(padding):
        x = F.pad(x, [p for p in reversed(padding) for _ in (0, 1)])
    n, c = x.shape[:2]
    nd = x.dim() - 2
    sp = x.stride()[2:]
    out_sizes = [(x.shape[2 + i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(nd)]
    view = x.as_strided(
        (n, c, *kernel, *out_sizes),
        (x.stride(0), x.stride(1), *(d * s for d, s in zip(dilation, sp)), *(st * s for st, s in zip(stride, sp))),
        x.storage_offset(),
    )
    return view.reshape(n, c * math.prod(kernel), t)


def _conv(module: nn.Module, calls: Sequence[Call], attrs: frozenset, ghost: bool | None) -> LayerGrads:
    weight = calls[0].weight
    b = calls[0].x.shape[0]
    c_out, groups = weight.shape[0], module.groups
    p_g, d_g = c_out // groups, weight.shape[1] * math.prod(weight.shape[2:])  # per group: d_out, d_in·K
    kernel, stride, dilation = tuple(weight.shape[2:]), tuple(module.stride), tuple(module.dilation)
    inputs = [_conv_input(module, c.x) for c in calls]
    gs = [c.g.reshape(b, c_out, -1) for c in calls]  # (B, C_out, T)
    t_total = sum(g.shape[2] for g in gs)
    sq: dict[str, torch.Tensor] = {}
    kept: dict[str, torch.Tensor] = {}
    if "bias" in attrs:
        kept["bias"] = sum(g.sum(2) for g in gs)
        sq["bias"] = _sq(kept["bias"])
    if "weight" in attrs:
        use_ghost = _use_ghost(ghost, t_total, p_g, d_g)
        keep = not use_ghost and weight.numel() <= sum(c.x[0].numel() + c.g[0].numel() for c in calls)
        # per-example gradients by the grouped-convolution trick (batch folded into groups) on large
        # spatial outputs, by unfold + bmm on small ones: the faster of the two on CPU
        grouped = not use_ghost and len(calls) == 1 and t_total >= GROUPED_MIN_POSITIONS and d_g >= 32
        sq_w = weight.new_empty(b)
        pe_w = weight.new_empty((b, *weight.shape)) if keep else None
        unfold_el = groups * t_total * (d_g + p_g)
        if grouped:  # the kernel's layout copies of x and g, the repeated weight and the result
            per_ex = 2 * weight.numel() + calls[0].x[0].numel() + calls[0].g[0].numel()
        else:
            per_ex = unfold_el + (2 * groups * t_total * t_total if use_ghost else weight.numel())
        for lo, hi in _chunks(b, per_ex):
            n = hi - lo
            if grouped:
                (xin, pad), g = inputs[0], calls[0].g[lo:hi]
                pe = torch.ops.aten.convolution_backward(
                    g.reshape(1, n * c_out, *g.shape[2:]), xin[lo:hi].reshape(1, -1, *xin.shape[2:]),
                    weight.repeat(n, *([1] * (weight.dim() - 1))), None, stride, pad, dilation, False,
                    (0,) * len(pad), n * groups, [False, True, False],
                )[1].view(n, *weight.shape)
                sq_w[lo:hi] = _sq(pe)
                if keep:
                    pe_w[lo:hi] = pe
                continue
            cols, gcols = [], []
            for (xin, pad), g in zip(inputs, gs):
                u = _unfold(xin[lo:hi], kernel, stride, pad, dilation, g.shape[2])  # (n, C_in·K, T)
                cols.append(u.view(n, groups, d_g, -1))
                gcols.append(g[lo:hi].view(n, groups, p_g, -1))
            if use_ghost:
                u, gg = _cat(cols, 3), _cat(gcols, 3)  # (n, G, ·, T)
                sq_w[lo:hi] = ((u.transpose(2, 3) @ u) * (gg.transpose(2, 3) @ gg)).sum((1, 2, 3))
            else:
                pe = sum(gg @ u.transpose(2, 3) for u, gg in zip(cols, gcols))  # (n, G, p_g, d_g)
                sq_w[lo:hi] = _sq(pe)
                if keep:
                    pe_w[lo:hi] = pe.reshape(n, *weight.shape)
        sq["weight"] = sq_w
        if keep:
            kept["weight"] = pe_w

    def clipped(factors):
        out = {k: _weighted(factors[k], v) for k, v in kept.items()}
        if "weight" in attrs and "weight" not in kept:
            c = factors["weight"]
            total = None
            for call, (xin, pad) in zip(calls, inputs):
                gw = torch.ops.aten.convolution_backward(
                    _scale(c, call.g), xin, call.weight, None, stride, pad, dilation,
                    False, (0,) * len(pad), groups, [False, True, False],
                )[1]
                total = gw if total is None else total + gw
            out["weight"] = total
        return out

    return LayerGrads(sq, clipped)


# -------------------------------------------------------------------------------------- Embedding


def _embedding(module: nn.Embedding, calls: Sequence[Call], attrs: frozenset, ghost: bool | None) -> LayerGrads:
    """Example ``i``'s gradient puts ``Σ_{t: idx_t = v} g_t`` in row ``v``; its squared norm is
    ``Σ_{t,s} [idx_t = idx_s] g_t·g_s`` — a masked Gram matrix (ghost; short sequences) or, exactly
    and in ``O(T·d)``, the norms of the rows summed per distinct ``(example, index)`` pair."""
    b = calls[0].x.shape[0]
    num, dim = calls[0].weight.shape
    idx = _cat([c.x.reshape(b, -1) for c in calls], 1)  # (B, T)
    g = _cat([c.g.reshape(b, -1, dim) for c in calls], 1)  # (B, T, d)
    t = idx.shape[1]
    if module.padding_idx is not None:  # the padding row gets no gradient
        g = g * (idx != module.padding_idx).unsqueeze(-1).to(g.dtype)
    if t == 1:
        sq = _sq(g)
    elif ghost or (ghost is None and t <= 256):
        sq = g.new_empty(b)
        for lo, hi in _chunks(b, 2 * t * t):
            gram = torch.bmm(g[lo:hi], g[lo:hi].transpose(1, 2))
            same = idx[lo:hi].unsqueeze(2) == idx[lo:hi].unsqueeze(1)
            sq[lo:hi] = torch.where(same, gram, 0).sum((1, 2))
    else:
        rows = (torch.arange(b, device=idx.device).unsqueeze(1) * num + idx).reshape(-1)
        uniq, inverse = torch.unique(rows, return_inverse=True)  # (example, row) pairs
        summed = g.new_zeros(uniq.shape[0], dim).index_add_(0, inverse, g.reshape(-1, dim))
        sq = g.new_zeros(b).index_add_(0, torch.div(uniq, num, rounding_mode="floor"), _sq(summed))

    def clipped(factors):
        # the embedding's own backward kernel (sort-based) on the scaled output gradients
        grad = torch.ops.aten.embedding_dense_backward(_scale(factors["weight"], g), idx, num, -1, False)
        return {"weight": grad}

    return LayerGrads({"weight": sq}, clipped)


# ---------------------------------------------------------------------------------- normalisation
#
# y = x̂ ∘ w + b: per-example grads Σ_pos x̂ ∘ g and Σ_pos g, weight-sized, kept. x̂ is rebuilt in one
# pass from the mean and 1/std that the forward saved for its own backward (when it has one).


def _saved_stats(output: torch.Tensor, node: str):
    fn = output.grad_fn
    if fn is not None and type(fn).__name__ == node:
        return fn._saved_result1, fn._saved_result2  # mean, rstd
    return None


def _normalised(x, stats, view):
    mean, rstd = (s.to(x.dtype) for s in stats)
    mean, rstd = view(mean), view(rstd)
    return torch.addcmul(-mean * rstd, x, rstd)


def _accumulate(kept: dict, attr: str, pe: torch.Tensor) -> None:
    kept[attr] = kept[attr] + pe if attr in kept else pe


def _kept_grads(kept: dict) -> LayerGrads:
    return LayerGrads({k: _sq(v) for k, v in kept.items()}, lambda factors: {k: _weighted(factors[k], v) for k, v in kept.items()})


def _group_norm_rule(module, calls, attrs, ghost):
    """Per example and channel ``Σ_s x̂ g = rstd·(Σ_s x g − μ·Σ_s g)`` with the forward's own μ, rstd:
    one batched dot product over ``x`` and ``g``, no ``x̂`` temporary. (The subtraction costs about
    ``log10(|μ|/σ)`` digits, as computing ``x − μ`` in the forward does.)"""
    kept: dict[str, torch.Tensor] = {}
    groups = module.num_groups
    for c in calls:
        b, ch = c.x.shape[:2]
        g = c.g.reshape(b, ch, -1)
        gsum = g.sum(2)
        if "weight" in attrs:
            if c.saved is not None:
                mean, rstd = (s.to(g.dtype).reshape(b, groups, 1).expand(b, groups, ch // groups).reshape(b, ch) for s in c.saved)
                xg = torch.einsum("ncs,ncs->nc", c.x.reshape(b, ch, -1), g)
                pe = (xg - mean * gsum) * rstd
            else:
                xhat = F.group_norm(c.x, groups, None, None, module.eps)
                pe = torch.einsum("ncs,ncs->nc", xhat.reshape(b, ch, -1), g)
            _accumulate(kept, "weight", pe)
        if "bias" in attrs:
            _accumulate(kept, "bias", gsum)
    return _kept_grads(kept)


def _last_dims_rule(normalise):
    def rule(module, calls, attrs, ghost):
        kept: dict[str, torch.Tensor] = {}
        ns = tuple(module.normalized_shape)
        for c in calls:
            b = c.x.shape[0]
            g = c.g.reshape(b, -1, *ns)
            if "weight" in attrs:
                _accumulate(kept, "weight", (normalise(module, c) .reshape(b, -1, *ns) * g).sum(1))
            if "bias" in attrs:
                _accumulate(kept, "bias", g.sum(1))
        return _kept_grads(kept)

    return rule


def _layer_norm_xhat(module, c):
    if c.saved is not None:
        return _normalised(c.x, c.saved, lambda s: s)
    return F.layer_norm(c.x, tuple(module.normalized_shape), None, None, module.eps)


def _rms_norm_xhat(module, c):
    return F.rms_norm(c.x, tuple(module.normalized_shape), None, module.eps)


# ---------------------------------------------------------------------------------------- registry


class Rule(NamedTuple):
    """How a layer type is handled: ``grads(module, calls, attrs, ghost) -> LayerGrads``; ``supports(module)``
    (else its parameters take the vmap path); ``capture(module, output)`` → ``Call.saved``."""

    grads: Callable[..., LayerGrads]
    supports: Callable[[nn.Module], bool] = lambda m: True
    capture: Callable[[nn.Module, torch.Tensor], object] = lambda m, out: None


def _embedding_ok(m: nn.Embedding) -> bool:
    # max_norm renormalises the weight in place; scale_grad_by_freq couples positions; both → vmap
    return m.max_norm is None and not m.scale_grad_by_freq


RULES: dict[type, Rule] = {
    nn.Linear: Rule(_linear),
    nn.Conv1d: Rule(_conv),
    nn.Conv2d: Rule(_conv),
    nn.Embedding: Rule(_embedding, _embedding_ok),
    nn.LayerNorm: Rule(_last_dims_rule(_layer_norm_xhat), capture=lambda m, out: _saved_stats(out, "NativeLayerNormBackward0")),
    nn.GroupNorm: Rule(_group_norm_rule, capture=lambda m, out: _saved_stats(out, "NativeGroupNormBackward0")),
}
if hasattr(nn, "RMSNorm"):
    RULES[nn.RMSNorm] = Rule(_last_dims_rule(_rms_norm_xhat))


def rule_for(module: nn.Module) -> Rule | None:
    """The rule of a module whose forward is exactly a supported layer's (subclasses that override
    ``forward`` are not trusted), or None."""
    for cls in type(module).__mro__:
        if cls in RULES:
            rule = RULES[cls]
            return rule if type(module).forward is cls.forward and rule.supports(module) else None
    return None
