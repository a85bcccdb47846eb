"""``nn.MultiheadAttention``: its forward decomposed into tapped projections.

``nn.MultiheadAttention`` reads its fused input projection (``in_proj_weight``, ``in_proj_bias``)
and ``out_proj``'s parameters inside ``F.multi_head_attention_forward``; no per-layer hook sees
them. During the engine's forward a ``TorchFunctionMode`` (active only inside an attention module's
forward) replaces that call by the same computation written out::

    q, k, v = x_q W_qᵀ + b_q,  x_k W_kᵀ + b_k,  x_v W_vᵀ + b_v        (tapped: the input projection)
    o       = softmax(q kᵀ / √d_h + mask) v                          (per head; dropout on the weights)
    y       = o W_oᵀ + b_o                                           (tapped: the output projection)

The two projections are Linear layers on sequences, so the Linear rule
(:func:`~dpfunc.bridge.fast.rules.linear.linear_from_calls`) gives their per-example norms and
clipped sums. The three blocks of the fused input projection are three calls of one ``(3E, E)``
Linear whose output gradient is zero outside the call's block (self-attention, where query, key and
value are one tensor, is one call). Supported: ``kdim = vdim = embed_dim``, no ``bias_k``/``bias_v``,
no ``add_zero_attn``; other configurations take the vmap path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from dpfunc.bridge.fast.rules._common import Call, LayerGrads, register_rule
from dpfunc.bridge.fast.rules.linear import linear_from_calls

__all__ = ["multihead_attention", "AttentionTaps"]

_IN, _OUT = "in_proj", "out_proj"
_ATTRS = {_IN: ("in_proj_weight", "in_proj_bias"), _OUT: ("out_proj.weight", "out_proj.bias")}


def _supported(m: nn.MultiheadAttention) -> bool:
    return m._qkv_same_embed_dim and m.bias_k is None and m.bias_v is None and not m.add_zero_attn


def _owns(m: nn.MultiheadAttention) -> dict:
    return {"in_proj_weight": m.in_proj_weight, "in_proj_bias": m.in_proj_bias,
            "out_proj.weight": m.out_proj.weight, "out_proj.bias": m.out_proj.bias}


@register_rule(nn.MultiheadAttention, supports=_supported, owns=_owns)
def multihead_attention(module: nn.MultiheadAttention, calls: Sequence[Call], attrs: frozenset, ghost: bool | None) -> LayerGrads:
    """Norms and clipped sums of the two projections; ``Call.saved`` names the projection."""
    sq: dict[str, torch.Tensor] = {}
    parts = []
    for site, (w_attr, b_attr) in _ATTRS.items():
        site_calls = [c for c in calls if c.saved == site]
        local = frozenset(a for a, full in (("weight", w_attr), ("bias", b_attr)) if full in attrs)
        if not site_calls or not local:
            continue
        res = linear_from_calls(site_calls, local, ghost)
        rename = {"weight": w_attr, "bias": b_attr}
        sq.update({rename[a]: v for a, v in res.sq.items()})
        parts.append((res, rename))

    def clipped(factors):
        out = {}
        for res, rename in parts:
            back = {a: factors[full] for a, full in rename.items() if full in factors}
            out.update({rename[a]: v for a, v in res.clipped(back).items()})
        return out

    return LayerGrads(sq, clipped)


def _float_mask(mask, dtype):
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


class AttentionTaps:
    """Context of one engine forward: decomposes the calls of the routing's attention layers.

    ``handles(layer)`` says whether a routed layer is an attention layer (it then gets no ordinary
    hook). Entering installs, on each such module, a pre-hook that activates a ``TorchFunctionMode``
    for the duration of that module's forward only, so the rest of the model runs without it.
    """

    def __init__(self, fast_pass, layers):
        self.fast_pass = fast_pass
        self.layers = {id(layer.module): layer for layer in layers if isinstance(layer.module, nn.MultiheadAttention)}
        self.handles_ = []
        self.modes: list[_Decompose] = []

    def handles(self, layer) -> bool:
        return id(layer.module) in self.layers

    def __enter__(self):
        for key, layer in self.layers.items():
            self.handles_.append(layer.module.register_forward_pre_hook(lambda m, a, layer=layer: self._start(layer)))
            self.handles_.append(layer.module.register_forward_hook(lambda m, a, o: self._stop(), always_call=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles_:
            h.remove()
        self.handles_ = []
        return False

    def _start(self, layer):
        mode = _Decompose(self.fast_pass, layer)
        mode.__enter__()
        self.modes.append(mode)

    def _stop(self):
        mode = self.modes.pop()
        mode.__exit__(None, None, None)
        if not mode.hit:
            raise RuntimeError("fast_engine: MultiheadAttention ran without F.multi_head_attention_forward; "
                               "its parameters would get no gradient")


class _Decompose(TorchFunctionMode):
    def __init__(self, fast_pass, layer):
        super().__init__()
        self.fast_pass, self.layer, self.hit = fast_pass, layer, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward and not self.hit:
            self.hit = True
            return self._forward(*args, **kwargs)
        return func(*args, **kwargs)

    def _project(self, site, x, weight, bias, block=None, blocks=1):
        """``x W_blockᵀ + b_block`` for seq-first ``x (L, N, E)``, tapped as a call of the site's Linear."""
        layer, fp = self.layer, self.fast_pass
        e_out = weight.shape[0] // blocks
        w = weight if block is None else weight[block * e_out:(block + 1) * e_out]
        b = None if bias is None else (bias if block is None else bias[block * e_out:(block + 1) * e_out])
        y = F.linear(x, w, b)

        def to_batch_first(g):  # (L, N, d) -> (N, L, d), padded to the fused width for one block
            g = g.transpose(0, 1)
            if block is not None:
                g = F.pad(g, (block * e_out, (blocks - 1 - block) * e_out))
            return g

        tapped = fp.tap(layer, x.transpose(0, 1), y, None, capture=False)
        record = fp.records[layer][-1]
        record.saved = site
        record.transform = to_batch_first
        return tapped

    def _forward(self, query, key, value, embed_dim, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v,
                 add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training=True, key_padding_mask=None,
                 need_weights=True, attn_mask=None, use_separate_proj_weight=False, q_proj_weight=None,
                 k_proj_weight=None, v_proj_weight=None, static_k=None, static_v=None, average_attn_weights=True,
                 is_causal=False):
        if query.dim() != 3 or use_separate_proj_weight or bias_k is not None or add_zero_attn or static_k is not None or static_v is not None:
            raise RuntimeError("fast_engine: this MultiheadAttention call is not supported by the attention rule "
                               "(unbatched input, separate projection weights, bias_k/bias_v, add_zero_attn or static keys)")
        length, n, e = query.shape
        s = key.shape[0]
        if query is key and key is value:
            q, k, v = self._project(_IN, query, in_proj_weight, in_proj_bias).chunk(3, dim=-1)
        else:
            q = self._project(_IN, query, in_proj_weight, in_proj_bias, 0, 3)
            k = self._project(_IN, key, in_proj_weight, in_proj_bias, 1, 3)
            v = self._project(_IN, value, in_proj_weight, in_proj_bias, 2, 3)
        h, d = num_heads, e // num_heads
        q = q.reshape(length, n, h, d).permute(1, 2, 0, 3)  # (N, H, L, d)
        k = k.reshape(s, n, h, d).permute(1, 2, 0, 3)
        v = v.reshape(s, n, h, d).permute(1, 2, 0, 3)
        mask = _float_mask(attn_mask, q.dtype)
        if mask is not None:
            mask = mask.view(n, h, length, s) if mask.dim() == 3 else mask
        elif is_causal:
            mask = torch.full((length, s), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
        if key_padding_mask is not None:
            kpm = _float_mask(key_padding_mask, q.dtype).view(n, 1, 1, s)
            mask = kpm if mask is None else mask + kpm
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)
        if mask is not None:
            scores = scores + mask
        weights = scores.softmax(-1)
        if training and dropout_p > 0:
            weights = F.dropout(weights, p=dropout_p)
        o = (weights @ v).permute(2, 0, 1, 3).reshape(length, n, e)  # (L, N, E)
        out = self._project(_OUT, o, out_proj_weight, out_proj_bias)
        if not need_weights:
            return out, None
        return out, (weights.mean(1) if average_attn_weights else weights)
