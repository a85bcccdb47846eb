"""``nn.Conv1d`` / ``nn.Conv2d`` (stride, padding incl. modes and 'same', dilation, groups).

The input is unfolded to ``(B, T, d_in·K)`` per group and each group treated as a Linear layer on ``T``
output positions (ghost norm or instantiation), or — on small maps with many channels — the ghost norm
is taken from the Gram matrix of the input's pixels without unfolding (:func:`_pixel_gram_sq`); a
shape-only cost model (:func:`_norm_plan`) picks among the three. Instantiated per-example
gradients use the grouped-convolution trick (batch folded into groups) on large outputs, unfold + bmm
on small ones. The unfold copies the input once, from whichever layout gives the longer contiguous
runs: the input's own (channels first: runs of one output row) or a channels-last copy (runs of
``k_w·C_in`` values); on CPU the channels-last one is 3-7× faster for late layers (many channels,
small maps) and several times slower for a first layer with one input channel. The clipped sum is the
conv weight-gradient kernel with the per-example clip factors applied to the smaller of ``x`` and ``g``
(same cost as non-private); kept per-example gradients make it a ``(1×B)·(B×D)`` product instead.

References:
    Z. Bu, J. Mao, S. Xu, "Scalable and Efficient Training of Large Convolutional Neural Networks
    with Differential Privacy", NeurIPS 2022 (mixed ghost clipping for convolutions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dpfunc.bridge.fast.rules._common import Call, LayerGrads, _cat, _chunks, _scale, _sq, _weighted, register_rule

__all__ = ["conv", "GROUPED_MIN_POSITIONS"]

# Instantiated conv gradients use the grouped-convolution trick from this many output positions on
# (and d_in·K >= 32; measured on CPU: faster than unfold + bmm on large feature maps with several
# input channels, slower on small maps and on single-channel inputs).
GROUPED_MIN_POSITIONS = 128

# Unfold layout: None picks by contiguous run length (see _channels_last); True / False force one (tests).
CHANNELS_LAST_UNFOLD: bool | None = None

# Batch chunks of the pixel-Gram norm and of unfold + bmm hold temporaries of at most this many elements
# (4 MiB in float32; _CHUNK_ELEMENTS, the engine-wide memory bound, when smaller): the 7×7 layer of the CNN
# at B = 256 had 23 MiB of batch-sized pixel-Gram temporaries per step, now 4 MiB reused chunk to chunk
# (step time unchanged within noise for chunks of 2^18 to 2^23 elements, measured in one process).
WORKING_SET_ELEMENTS = 1 << 20

# Ghost norm form: None picks the cheaper by shapes (see _norm_plan); True / False force the pixel-Gram
# form / the unfolded form whenever the ghost norm is used (tests).
PIXEL_GRAM: bool | None = None


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


def _out_sizes(x: torch.Tensor, kernel, stride, padding, dilation) -> list[int]:
    return [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(x.dim() - 2)]


def _unfold(x: torch.Tensor, kernel, stride, padding, dilation, t: int, ones_groups: int = 0) -> torch.Tensor:
    """``F.unfold`` for 1-D and 2-D convs, ``(n, C, *S) -> (n, C·K, T)``, as a strided view copied once
    (several times faster than ``im2col`` on CPU). With ``ones_groups`` = G > 0: ``(n, G·(C_g·K + 1), T)``,
    each group's ``C_g·K`` rows followed by a row of ones."""
    if any(padding):
        x = F.pad(x, [p for p in reversed(padding) for _ in (0, 1)])
    n, c = x.shape[:2]
    sp = x.stride()[2:]
    out_sizes = _out_sizes(x, kernel, stride, (0,) * len(kernel), dilation)
    view = x.as_strided(
        (n, c, *kernel, *out_sizes),
        (x.stride(0), x.stride(1), *(d * s for d, s in zip(dilation, sp)), *(st * s for st, s in zip(stride, sp))),
        x.storage_offset(),
    )
    if not ones_groups:
        return view.reshape(n, c * math.prod(kernel), t)
    rows = c // ones_groups * math.prod(kernel)
    out = x.new_empty((n, ones_groups, rows + 1, t))
    out[:, :, :rows].view(n, ones_groups, c // ones_groups, *kernel, *out_sizes).copy_(view.view(n, ones_groups, c // ones_groups, *kernel, *out_sizes))
    out[:, :, rows].fill_(1)
    return out.view(n, ones_groups * (rows + 1), t)


def _unfold_channels_last(x: torch.Tensor, kernel, stride, padding, dilation, groups: int) -> torch.Tensor:
    """``(n, C, *S) -> (n, G, T, K·C_g)``: per group, one row per output position holding its receptive
    field in ``(*K, C_g)`` order (channels fastest), copied once from a channels-last (padded) copy of
    ``x``. Equal to ``_unfold`` up to the order of the columns: ``[..., k·C_g + c] = _unfold[..., c·K + k]``."""
    n, c = x.shape[:2]
    nd, cg = x.dim() - 2, c // groups
    out_sizes = _out_sizes(x, kernel, stride, padding, dilation)
    last = x.movedim(1, -1)  # (n, *S, C): a view; contiguous already when x is channels-last
    if any(padding):
        xp = x.new_zeros((n, *(s + 2 * p for s, p in zip(x.shape[2:], padding)), c))
        xp[(slice(None), *(slice(p, p + s) for p, s in zip(padding, x.shape[2:])))] = last
    else:
        xp = last.contiguous()
    st = xp.stride()
    sp = st[1 : 1 + nd]
    view = xp.as_strided(
        (n, groups, *out_sizes, *kernel, cg),
        (st[0], cg, *(s * v for s, v in zip(stride, sp)), *(d * v for d, v in zip(dilation, sp)), 1),
        xp.storage_offset(),
    )
    return view.reshape(n, groups, math.prod(out_sizes), math.prod(kernel) * cg)


def _pixel_gram_sq(x: torch.Tensor, padding, g: torch.Tensor, kernel, stride, dilation, groups: int) -> torch.Tensor:
    """Per-example ``‖∇W‖²_F = Σ_{t,s} (u_t·u_s)(g_t·g_s)`` without unfolding ``x``: ``(n,)``.

    ``u_t·u_s`` (receptive fields of output positions ``t`` and ``s``) is a sum over the kernel offsets
    ``k`` of ``P[p(t, k), p(s, k)]``, where ``P = Σ_c x_c x_cᵀ`` is the Gram matrix of the input's pixels,
    per group. So one ``(M×C_g)·(C_g×M)`` product per example and group (``M`` pixels) and windowed sums
    of ``P`` along its diagonals (one spatial dim at a time) replace the ``T×(K·C_g)`` unfold and its
    ``T×T`` Gram — cheaper on small maps with many channels (the 7×7, 32 → 64 layer of the CNN: 3.0 →
    1.1 ms at B = 64 on one CPU thread). The zero padding is never materialised: a padded pixel's row and
    column of ``P`` are zero, so each kernel offset adds only the block of output pairs that read real
    pixels (``_diagonal_window_sum``); against a Gram of the padded input this skips the padding copy and
    the zero rows in the product (the CNN's 7×7 layer: 49 instead of 81 pixels, 1.25 → 0.92 ms).

    Args:
        x: ``(n, C, *S)`` input (1-D or 2-D spatial), already padded where padding is not zeros.
        padding: the zero padding of the convolution (not applied to ``x``), per spatial dim.
        g: ``(n, C_out, T)`` output gradients.
    """
    n, c = x.shape[:2]
    sizes = tuple(x.shape[2:])
    m = math.prod(sizes)
    out_sizes = _out_sizes(x, kernel, stride, padding, dilation)
    t = math.prod(out_sizes)
    xs = x.reshape(n, groups, c // groups, m)
    uu = (xs.transpose(2, 3) @ xs).view(n, groups, *sizes, *sizes)  # P, per pixel pair (p, q)
    for d, (k, st, dl, pd, o) in enumerate(zip(kernel, stride, dilation, padding, out_sizes)):
        uu = _diagonal_window_sum(uu, d, len(sizes), k, st, dl, pd, o)
    gg = g.reshape(n, groups, -1, t)
    return torch.linalg.vecdot(uu.reshape(n, -1), (gg.transpose(2, 3) @ gg).reshape(n, -1))  # Σ_{t,s} (u_t·u_s)(g_t·g_s)


def _diagonal_window_sum(uu: torch.Tensor, d: int, nd: int, k: int, stride: int, dilation: int, pad: int, out: int) -> torch.Tensor:
    """``Σ_j uu[..., p_d = t·stride + j·dilation - pad, ..., q_d = s·stride + j·dilation - pad, ...]`` over ``j < k``
    for ``uu (n, G, *P_dims, *Q_dims)``, terms whose ``p_d`` or ``q_d`` falls in the zero padding (outside
    ``[0, size)``) left out: spatial dim ``d`` of both pixel indices goes from the input's size to ``out``.

    Per offset ``j`` the output positions that read a real pixel are one range ``[lo, hi)``, the same for ``t``
    and ``s``: that block gets the strided slice of ``uu`` added. An offset whose range is every output
    position starts the sum (no zero fill); plain sliced adds, as one strided view with an overlapping kernel
    dim reduces about 10× slower on CPU."""
    size = uu.shape[2 + d]
    full, part = [], []
    for j in range(k):
        off = j * dilation - pad  # output t reads pixel t·stride + off
        lo = max(0, -(off // stride))  # the first t with t·stride + off >= 0
        hi = min(out, (size - 1 - off) // stride + 1) if size - 1 - off >= 0 else 0  # past the last one < size
        if hi <= lo:
            continue
        src, dst = [slice(None)] * uu.dim(), [slice(None)] * uu.dim()
        src[2 + d] = src[2 + nd + d] = slice(lo * stride + off, (hi - 1) * stride + off + 1, stride)
        dst[2 + d] = dst[2 + nd + d] = slice(lo, hi)
        (full if (lo, hi) == (0, out) else part).append((tuple(dst), uu[tuple(src)]))
    if len(full) >= 2:  # one new tensor, the other offsets added into it in place
        total = torch.add(full[0][1], full[1][1])
        rest = full[2:] + part
    elif full:
        total = full[0][1].clone(memory_format=torch.contiguous_format)
        rest = part
    else:
        shape = list(uu.shape)
        shape[2 + d] = shape[2 + nd + d] = out
        total = uu.new_zeros(shape)
        rest = part
    for dst, src in rest:
        total[dst].add_(src)
    return total


# An element-wise add or copy of one value costs about this many GEMM multiply-adds (CPU, measured on the
# CNN's layers: ~0.4 ns per strided add against ~0.02 ns per multiply-add): weighs unfold copies and the
# pixel-Gram form's diagonal sums against GEMM work in the cost model below.
ELEMENT_OP_COST = 16


def _padded_sizes(x: torch.Tensor, padding) -> tuple[int, ...]:
    return tuple(s + 2 * p for s, p in zip(x.shape[2:], padding))


def _diagonal_adds(sizes, kernel, out_sizes) -> int:
    """Element adds of ``_pixel_gram_sq``'s diagonal window sums, per example and group."""
    dims, adds = list(sizes) * 2, 0
    for d, (k, o) in enumerate(zip(kernel, out_sizes)):
        dims[d] = dims[len(sizes) + d] = o
        adds += (k - 1) * math.prod(dims)
    return adds


def _norm_plan(ghost: bool | None, t: int, d_g: int, p_g: int, c_g: int, kernel, padded, out_sizes) -> tuple[bool, bool]:
    """``(ghost norm?, pixel-Gram form?)`` for a conv's per-example weight norms, from shapes alone (so the
    functional and bridge paths choose alike), in multiply-adds per example and group:

    * instantiation ``T·d_g·p_g`` and the unfolded ghost norm ``T²·(d_g + p_g)`` (mixed ghost clipping,
      Bu et al. 2022), each after an unfold copy of ``T·d_g`` values;
    * the pixel-Gram ghost norm ``M²·C_g + T²·p_g`` plus its diagonal sums, and no unfold (``padded``
      None: not available, i.e. a layer called several times).

    The pixel-Gram estimate is taken on the padded sizes ``padded``: an upper bound since the padding is no
    longer materialised (the decisions on the CNN and ResNet layers were tuned on it and are kept).

    ``ghost`` True / False forces the ghost norm / instantiation; the ghost form is then the cheaper
    one, or the one :data:`PIXEL_GRAM` forces."""
    copy = ELEMENT_OP_COST * t * d_g
    inst, unfolded = t * d_g * p_g + copy, t * t * (d_g + p_g) + copy
    pixel = None
    if padded is not None and PIXEL_GRAM is not False:
        m = math.prod(padded)
        pixel = m * m * c_g + t * t * p_g + ELEMENT_OP_COST * _diagonal_adds(padded, kernel, out_sizes)
    use_ghost = ghost if ghost is not None else min(unfolded, pixel if pixel is not None else unfolded) < inst
    if not use_ghost or pixel is None:
        return use_ghost, False
    return True, PIXEL_GRAM is True or pixel < unfolded


def _channels_last(c_g: int, kernel, out_sizes, stride) -> bool:
    """Whether the channels-last unfold copies longer contiguous runs: ``k_w·C_g`` values (``C_g`` when the
    kernel is 1 wide) against one output row (``W_out``, contiguous only at stride 1)."""
    if CHANNELS_LAST_UNFOLD is not None:
        return CHANNELS_LAST_UNFOLD
    return c_g * kernel[-1] > (out_sizes[-1] if stride[-1] == 1 else 1)


@register_rule(nn.Conv1d, nn.Conv2d)
def conv(module: nn.Module, calls: Sequence[Call], attrs: frozenset, ghost: bool | None) -> LayerGrads:
    """Per-example norms and clipped sums of a Conv1d/Conv2d layer from its calls."""
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
    pe_b = None  # per-example bias gradients from the pass over g that gives the weight's (grouped kernel, bmm)
    to_weight = None  # kept per-example weight gradients in another layout: their weighted sum -> the weight's
    if "weight" in attrs:
        # ghost norm (unfolded, or from the pixel Gram on one call) or instantiation: the fewest
        # multiply-adds by shapes alone, so every path (functional, bridge) makes the same choice
        padded = _padded_sizes(inputs[0].x, inputs[0].padding) if len(calls) == 1 else None
        out0 = _out_sizes(inputs[0].x, kernel, stride, inputs[0].padding, dilation)
        use_ghost, pixel = _norm_plan(ghost, t_total, d_g, p_g, weight.shape[1], kernel, padded, out0)
        keep = not use_ghost and weight.numel() <= sum(c.x[0].numel() + c.g[0].numel() for c in calls)
        # per-example gradients by the grouped-convolution trick (batch folded into groups) on large
        # spatial outputs, by unfold + bmm on small ones: the faster of the two on CPU
        grouped = not use_ghost and len(calls) == 1 and t_total >= GROUPED_MIN_POSITIONS and d_g >= 32
        sq_w = weight.new_empty(b)
        unfold_el = groups * t_total * (d_g + p_g)
        if pixel:  # the pixel Gram, its diagonal sums (one per spatial dim) and the T×T output-gradient Gram
            m_in = math.prod(inputs[0].x.shape[2:])  # pixels of the input (its zero padding is not materialised)
            per_ex = groups * (m_in * m_in + len(out0) * max(m_in, t_total) ** 2 + t_total * t_total)
        elif grouped:  # the kernel's layout copies of x and g, the weight-shaped placeholder and the result
            per_ex = 2 * weight.numel() + calls[0].x[0].numel() + calls[0].g[0].numel()
        else:
            # the unfold copy (and, for the ghost norm, the output gradients gathered over calls and two T×T
            # Grams; for instantiation the per-example gradient)
            per_ex = unfold_el + 2 * groups * t_total * t_total if use_ghost else groups * t_total * d_g + weight.numel()
        channels_last = _channels_last(d_g // math.prod(kernel), kernel, out0, stride)  # one layout for all calls
        # unfold + bmm on the channels-first layout: a row of ones under each group's unfolded input makes the
        # bmm's last row the per-example bias gradient Σ_t g_t (one GEMM row instead of a separate g.sum pass)
        ones = int("bias" in attrs and not use_ghost and not grouped and not channels_last)
        if ones:
            per_ex += groups * (t_total + p_g)
        # the pixel Gram and the unfold run in batch chunks of WORKING_SET_ELEMENTS: their temporaries are reused
        # from chunk to chunk instead of being memory the size of the batch
        chunks = _chunks(b, per_ex, None if grouped else WORKING_SET_ELEMENTS, weight.device)
        # kept per-example gradients: written chunk by chunk into one (B, ...) buffer (one chunk: its own result)
        pe_w = None
        if not use_ghost and not grouped:  # per example (G, p_g, d_g), columns (*K, C_g); or (G, d_g, p_g), channels first
            shape = (groups, p_g, d_g) if channels_last else (groups, d_g + ones, p_g)
            # channels first: the weighted sum's bias row (ones) is dropped
            to_weight = (lambda s: _kc_to_ck(s, kernel)) if channels_last else (lambda s: s[..., :d_g, :].transpose(-1, -2))
            if keep and len(chunks) > 1:
                pe_w = weight.new_empty((b, *shape))
        elif grouped and keep and len(chunks) > 1:
            pe_w = weight.new_empty((b, *weight.shape))
        for lo, hi in chunks:
            n = hi - lo
            if pixel:
                (xin, pad), g = inputs[0], gs[0]
                sq_w[lo:hi] = _pixel_gram_sq(xin[lo:hi], pad, g[lo:hi], kernel, stride, dilation, groups)
                continue
            if grouped:
                (xin, pad), g = inputs[0], calls[0].g[lo:hi]
                # the weight argument only gives the kernel its shape (a weight gradient does not read it)
                # and, with the bias, its gradient per example and channel from the same pass over g
                _, pe, pb = torch.ops.aten.convolution_backward(
                    g.reshape(1, n * c_out, *g.shape[2:]), xin[lo:hi].reshape(1, -1, *xin.shape[2:]),
                    weight.new_empty((n * c_out, *weight.shape[1:])), [n * c_out] if "bias" in attrs else None, stride, pad,
                    dilation, False, (0,) * len(pad), n * groups, [False, True, "bias" in attrs],
                )
                pe = pe.view(n, *weight.shape)
                if "bias" in attrs:
                    if pe_b is None:
                        pe_b = pb.view(n, c_out) if len(chunks) == 1 else weight.new_empty((b, c_out))
                    if len(chunks) > 1:
                        pe_b[lo:hi] = pb.view(n, c_out)
                sq_w[lo:hi] = _sq(pe)
                if keep and pe_w is None:
                    pe_w = pe
                elif keep:
                    pe_w[lo:hi] = pe
                continue
            rows, gcols = [], []  # per call: (n·G, T, d_g) receptive fields, (n·G, p_g, T) output gradients
            for (xin, pad), g in zip(inputs, gs):
                if channels_last:  # columns in (*K, C_g) order
                    rows.append(_unfold_channels_last(xin[lo:hi], kernel, stride, pad, dilation, groups).flatten(0, 1))
                elif ones:  # columns in the weight's (C_g, *K) order, then the ones
                    rows.append(_unfold(xin[lo:hi], kernel, stride, pad, dilation, g.shape[2], groups).view(n * groups, d_g + 1, -1).transpose(1, 2))
                else:  # columns in the weight's (C_g, *K) order
                    rows.append(_unfold(xin[lo:hi], kernel, stride, pad, dilation, g.shape[2]).view(n * groups, d_g, -1).transpose(1, 2))
                gcols.append(g[lo:hi].reshape(n * groups, p_g, -1))
            if use_ghost:  # Σ_ts (u_t·u_s)(g_t·g_s): the column order of u does not matter
                u, gg = _cat(rows, 1), _cat(gcols, 2)
                sq_w[lo:hi] = ((u @ u.transpose(1, 2)) * (gg.transpose(1, 2) @ gg)).view(n, -1).sum(1)
                continue
            # g·u on the channels-last unfold, uᵀgᵀ on the contiguous channels-first one (a plain GEMM there;
            # measured 1.5-1.8× faster than g·u on its transposed view); summed over calls in place
            out = pe_w[lo:hi].view(n * groups, *shape[1:]) if pe_w is not None else None
            for i, (u, gg) in enumerate(zip(rows, gcols)):
                a_, b_ = (gg, u) if channels_last else (u.transpose(1, 2), gg.transpose(1, 2))
                if i == 0:
                    out = torch.bmm(a_, b_, out=out) if out is not None else torch.bmm(a_, b_)
                else:
                    out.baddbmm_(a_, b_)
            if ones:  # (n, G, d_g + 1, p_g): the weight's rows, then the bias gradient's
                rows4 = out.view(n, groups, d_g + 1, p_g)
                sq_w[lo:hi] = torch.linalg.vector_norm(rows4[:, :, :d_g], dim=(1, 2, 3)).square()
                pb = rows4[:, :, d_g].reshape(n, c_out)
                if len(chunks) == 1:
                    pe_b = pb
                else:
                    if pe_b is None:
                        pe_b = weight.new_empty((b, c_out))
                    pe_b[lo:hi] = pb
            else:
                sq_w[lo:hi] = _sq(out.view(n, -1))
            if keep and pe_w is None:
                pe_w = out.view(n, *shape)
        sq["weight"] = sq_w
        if keep:
            kept["weight"] = pe_w
        else:
            to_weight = None

    if "bias" in attrs:
        kept["bias"] = pe_b if pe_b is not None else _total([g.sum(2) for g in gs])
        sq["bias"] = _sq(kept["bias"])

    def clipped(factors):
        out = {k: _weighted(factors[k], v) for k, v in kept.items()}
        if "weight" in out and to_weight is not None:  # the kept gradients' layout -> the weight's
            out["weight"] = to_weight(out["weight"]).reshape(weight.shape)
        if "weight" in attrs and "weight" not in kept:
            c = factors["weight"]
            total = None
            for call, (xin, pad) in zip(calls, inputs):
                # Σ_i c_i g_i ⊗ x_i: the per-example factor scales the smaller of the two
                gc, xc = (_scale(c, call.g), xin) if call.g[0].numel() <= xin[0].numel() else (call.g, _scale(c, xin))
                gw = torch.ops.aten.convolution_backward(
                    gc, xc, call.weight, None, stride, pad, dilation,
                    False, (0,) * len(pad), groups, [False, True, False],
                )[1]
                total = gw if total is None else total + gw
            out["weight"] = total
        return out

    return LayerGrads(sq, clipped)


def _total(parts: list[torch.Tensor]) -> torch.Tensor:
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def _kc_to_ck(pe: torch.Tensor, kernel) -> torch.Tensor:
    """``(..., d_g)`` gradients, columns from ``(*K, C_g)`` to the weight's ``(C_g, *K)`` order."""
    return pe.unflatten(-1, (math.prod(kernel), -1)).transpose(-1, -2).flatten(-2)


