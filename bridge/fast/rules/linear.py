"""``nn.Linear`` (any leading dims): ghost norm or instantiation by a cost model; clipped sum as one GEMM.

    =============  ====================  ==============================  ======================================
    layer          a                     per-example weight gradient     norm from
    =============  ====================  ==============================  ======================================
    Linear         (B, T, d_in)          Σ_t g_t a_tᵀ   (d_out, d_in)    ghost ``Σ_ts (a_t·a_s)(g_t·g_s)`` or
                                                                         instantiated ``gᵀa`` (cost model)
    bias           —                     Σ_t g_t                         instantiated
    =============  ====================  ==============================  ======================================

The ghost/instantiate choice is a cost model in the spirit of mixed ghost clipping (Bu et al. 2022):
ghost norm iff ``T·(d_in + d_out) < d_in·d_out``; both run over batch chunks with bounded scratch
memory. An instantiated per-example weight gradient is kept for the clipped sum when it is no larger
than the layer's ``a`` and ``g``; otherwise the clipped sum is one GEMM of the scaled ``g``.

References:
    I. Goodfellow, "Efficient Per-Example Gradient Computations", arXiv:1510.01799 (2015).
    X. Li, F. Tramèr, P. Liang, T. Hashimoto, "Large Language Models Can Be Strong Differentially
    Private Learners", ICLR 2022 (ghost clipping for sequences).
    Z. Bu, J. Mao, S. Xu, "Scalable and Efficient Training of Large Convolutional Neural Networks
    with Differential Privacy", NeurIPS 2022 (mixed ghost clipping).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dpfunc.bridge.fast.rules._common import Call, LayerGrads, _cat, _chunks, _scale, _sq, _use_ghost, _weighted, register_rule

__all__ = ["linear", "linear_from_calls"]


@register_rule(nn.Linear)
def linear(module: nn.Linear, calls: Sequence[Call], attrs: frozenset, ghost: bool | None) -> LayerGrads:
    """Per-example norms and clipped sums of a Linear layer from its calls."""
    return linear_from_calls(calls, attrs, ghost)


def linear_from_calls(calls: Sequence[Call], attrs: frozenset, ghost: bool | None) -> LayerGrads:
    """The Linear rule on bare calls (also used for projections inside other layers, e.g. attention)."""
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
    for lo, hi in _chunks(b, 2 * t * t, device=a.device):
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
    for lo, hi in _chunks(b, d_out * d_in, device=a.device):
        sq[lo:hi] = _sq(torch.bmm(gt[lo:hi], a[lo:hi]))
    return (sq,)


