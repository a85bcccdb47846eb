"""``nn.Embedding`` (with ``padding_idx``; ``max_norm`` / ``scale_grad_by_freq`` take the vmap path)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dpfunc.bridge.fast.rules._common import Call, LayerGrads, _cat, _chunks, _scale, _sq, register_rule

__all__ = ["embedding"]


def _embedding_ok(m: nn.Embedding) -> bool:
    # max_norm renormalises the weight in place; scale_grad_by_freq couples positions; both → vmap
    return m.max_norm is None and not m.scale_grad_by_freq


@register_rule(nn.Embedding, supports=_embedding_ok)
def embedding(module: nn.Embedding, calls: Sequence[Call], attrs: frozenset, ghost: bool | None) -> LayerGrads:
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
        for lo, hi in _chunks(b, 2 * t * t, device=g.device):
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


