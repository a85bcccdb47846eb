"""``nn.Conv1d`` / ``nn.Conv2d`` (stride, padding incl. modes and 'same', dilation, groups).

The input is unfolded to ``(B, d_in·K, T)`` and each group treated as a Linear layer on ``T`` output
positions (ghost norm or instantiation by the same cost model). Instantiated per-example gradients use
the grouped-convolution trick (batch folded into groups) on large outputs, unfold + bmm on small ones.
The clipped sum is the conv weight-gradient kernel on the scaled ``g`` (same cost as non-private).

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

from dpfunc.bridge.fast.rules._common import Call, LayerGrads, _cat, _chunks, _scale, _sq, _use_ghost, _weighted, register_rule

__all__ = ["conv", "GROUPED_MIN_POSITIONS"]

# Instantiated conv gradients use the grouped-convolution trick from this many output positions on
# (and d_in·K >= 32; measured on CPU: faster than unfold + bmm on large feature maps with several
# input channels, slower on small maps and on single-channel inputs).
GROUPED_MIN_POSITIONS = 128


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


