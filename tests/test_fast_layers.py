"""Fast clipping equals the vmap oracle on every supported layer (invariant 8), on hypothesis shapes.

The oracle helpers here are shared with ``test_fast_models.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dpfunc import FlatClipping, PerLayerClipping, vmap_engine
from dpfunc.bridge.fast import RULES, fast_engine
from dpfunc.bridge.fast.rules import conv as fast_layers  # GROUPED_MIN_POSITIONS lives with the conv rule
from dpfunc.bridge.functional import functionalize

RTOL, ATOL = 1e-6, 1e-9


def reinit(module: nn.Module, seed: int, scale: float = 0.7) -> nn.Module:
    """float64 parameters drawn from a local generator (hypothesis never seeds torch)."""
    gen = torch.Generator().manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return module


def regression_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A per-example loss that depends on every output coordinate."""
    return (torch.tanh(out) - y).square().reshape(out.shape[0], -1).sum(1)


def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def oracle_loss(apply_fn, loss_from_output, views=None):
    """One example's loss; with ``views=K`` its input is ``(K, ...)`` and the loss the mean over views."""

    def loss_fn(params, buffers, x, *targets):
        if views is None:
            out = apply_fn(params, buffers, x.unsqueeze(0))
            return loss_from_output(out, *(t.unsqueeze(0) for t in targets))[0]
        out = apply_fn(params, buffers, x)
        return loss_from_output(out, *(t.expand(views, *t.shape) for t in targets)).mean()

    return loss_fn


def assert_matches_oracle(model, batch, clipping, mask=None, loss=regression_loss, **engine_kwargs):
    """fast_engine == vmap_engine: norms, group norms, clipped sums, sensitivity, count, losses."""
    apply_fn, params, buffers = functionalize(model)
    views = engine_kwargs.get("views_per_example")
    ref = vmap_engine(oracle_loss(apply_fn, loss, views), clipping=clipping)(params, buffers, batch, mask)
    out = fast_engine(apply_fn, loss, clipping, **engine_kwargs)(params, buffers, batch, mask)
    r, o = ref.grads, out.grads
    torch.testing.assert_close(o.norms, r.norms, rtol=RTOL, atol=ATOL)
    assert set(o.group_norms) == set(r.group_norms)
    for k in r.group_norms:
        torch.testing.assert_close(o.group_norms[k], r.group_norms[k], rtol=RTOL, atol=ATOL)
    assert list(o.grads) == list(r.grads)
    for k in r.grads:
        assert o.grads[k].shape == params[k].shape and o.grads[k].dtype == params[k].dtype
        torch.testing.assert_close(o.grads[k], r.grads[k], rtol=RTOL, atol=ATOL, msg=lambda m: f"{k}: {m}")
    assert o.sensitivity == r.sensitivity
    assert int(o.num_real_rows) == int(r.num_real_rows)
    torch.testing.assert_close(out.losses, ref.losses, rtol=RTOL, atol=ATOL)
    return out

seeds = st.integers(0, 2**32 - 1)
ghosts = st.sampled_from([None, True, False])


@st.composite
def clippings(draw):
    kind = draw(st.sampled_from(["flat", "layer", "param"]))
    # small bounds clip most examples, large ones none: both branches of the factor
    bound = draw(st.sampled_from([0.05, 1.0, 1e3]))
    if kind == "flat":
        return FlatClipping(bound)
    return PerLayerClipping(bound, per_parameter=kind == "param")


@st.composite
def masks(draw, b):
    if b == 0 or draw(st.booleans()):
        return None
    return torch.tensor(draw(st.lists(st.booleans(), min_size=b, max_size=b)))


def _targets(out_shape, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randn(out_shape, generator=gen, dtype=torch.float64)


def views_of(x: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, K, ...)``: K distinct views of each example (indices: rolled along positions where there are any)."""
    if x.is_floating_point():
        return torch.stack([x * (1 + 0.3 * i) + 0.1 * i for i in range(k)], 1)
    return torch.stack([x.roll(i, dims=-1) if x.dim() > 1 else x for i in range(k)], 1)


def _check_against_oracle(data, layer, x, seed, **kw):
    layer = reinit(layer, seed)
    with torch.no_grad():
        y = _targets(layer(x).shape, seed)
    b = x.shape[0]
    views = data.draw(st.sampled_from([None, None, 1, 2, 3]), label="views_per_example")  # augmentation multiplicity
    if views is not None:
        x, kw = views_of(x, views), {**kw, "views_per_example": views}
    assert_matches_oracle(layer, (x, y), data.draw(clippings()), data.draw(masks(b)), ghost_norm=data.draw(ghosts), **kw)


@given(st.data(), seeds)
def test_linear(data, seed):
    b = data.draw(st.integers(0, 5))
    lead = data.draw(st.sampled_from([(), (1,), (4,), (2, 3)]))  # 2-D input, sequences, 4-D input
    d_in, d_out = data.draw(st.integers(1, 7)), data.draw(st.integers(1, 7))
    layer = nn.Linear(d_in, d_out, bias=data.draw(st.booleans()))
    x = torch.randn((b, *lead, d_in), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    _check_against_oracle(data, layer, x, seed)


@st.composite
def conv_geometry(draw, nd):
    groups = draw(st.integers(1, 3))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 3))
    k = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "circular", "replicate"]))
    padding_kind = draw(st.sampled_from(["int", "int", "same", "valid"]))
    stride = (1,) * nd if padding_kind == "same" else tuple(draw(st.integers(1, 3)) for _ in range(nd))
    padding = {"int": tuple(draw(st.integers(0, 2)) for _ in range(nd)), "same": "same", "valid": "valid"}[padding_kind]
    # spatial size: large enough for the receptive field and for reflect padding (pad < size)
    size = tuple(d * (kk - 1) + 1 + draw(st.integers(2, 5)) for kk, d in zip(k, dilation))
    return dict(in_channels=c_in, out_channels=c_out, kernel_size=k, stride=stride, padding=padding,
                dilation=dilation, groups=groups, padding_mode=mode), size


def _check_conv_against_oracle(data, layer, x, seed):
    # instantiated per-example conv gradients have two kernels (grouped conv / unfold + bmm), picked by
    # the number of output positions, and the unfold two layouts (channels first / last), picked by
    # run length: force each
    # and the ghost norm two forms (unfolded / pixel Gram), picked by a cost model: force each too; and
    # batch chunks of one example (several chunks: kept gradients gathered into one buffer) or the default
    from dpfunc.bridge.fast.rules import _common

    before = fast_layers.GROUPED_MIN_POSITIONS, fast_layers.CHANNELS_LAST_UNFOLD, fast_layers.PIXEL_GRAM, _common._CHUNK_ELEMENTS
    fast_layers.GROUPED_MIN_POSITIONS = data.draw(st.sampled_from([0, 10**9]), label="grouped_min_positions")
    fast_layers.CHANNELS_LAST_UNFOLD = data.draw(st.sampled_from([None, True, False]), label="channels_last_unfold")
    fast_layers.PIXEL_GRAM = data.draw(st.sampled_from([None, True, False]), label="pixel_gram")
    _common._CHUNK_ELEMENTS = data.draw(st.sampled_from([_common._CHUNK_ELEMENTS, 1]), label="chunk_elements")
    try:
        _check_against_oracle(data, layer, x, seed)
    finally:
        fast_layers.GROUPED_MIN_POSITIONS, fast_layers.CHANNELS_LAST_UNFOLD, fast_layers.PIXEL_GRAM, _common._CHUNK_ELEMENTS = before


@pytest.mark.parametrize("nd", [1, 2])
@given(data=st.data(), seed=seeds)
def test_channels_last_unfold_is_unfold_with_reordered_columns(nd, data, seed):
    """Oracle: torch's own F.unfold (2-D; 1-D as a height-1 image), columns (C_g, K) -> (K, C_g) per group."""
    kw, size = data.draw(conv_geometry(nd))
    b = data.draw(st.integers(1, 3))
    x = torch.randn((b, kw["in_channels"], *size), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    pad = tuple(kw["padding"]) if isinstance(kw["padding"], tuple) else (0,) * nd  # plain zero padding of the unfold
    k, st_, dil, groups = kw["kernel_size"], kw["stride"], kw["dilation"], kw["groups"]
    got = fast_layers._unfold_channels_last(x, k, st_, pad, dil, groups)  # (b, G, T, K·C_g)
    if nd == 1:
        x2, k2, st2, pad2, dil2 = x.unsqueeze(2), (1, *k), (1, *st_), (0, *pad), (1, *dil)
    else:
        x2, k2, st2, pad2, dil2 = x, k, st_, pad, dil
    ref = F.unfold(x2, k2, dilation=dil2, padding=pad2, stride=st2)  # (b, C·K, T), columns (C, K)
    cg, kk = kw["in_channels"] // groups, math.prod(k)
    ref = ref.view(b, groups, cg, kk, -1).permute(0, 1, 4, 3, 2).reshape(b, groups, -1, kk * cg)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv2d])
@given(data=st.data(), seed=seeds)
def test_conv(conv, data, seed):
    nd = 1 if conv is nn.Conv1d else 2
    kw, size = data.draw(conv_geometry(nd))
    layer = conv(bias=data.draw(st.booleans()), **kw)
    b = data.draw(st.integers(0, 4))
    x = torch.randn((b, kw["in_channels"], *size), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    _check_conv_against_oracle(data, layer, x, seed)


@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv2d])
@given(data=st.data(), seed=seeds)
def test_conv_pixel_gram_ghost_norm(conv, data, seed):
    """The pixel-Gram ghost norm (no unfold) equals the vmap oracle on every conv geometry, forced on."""
    nd = 1 if conv is nn.Conv1d else 2
    kw, size = data.draw(conv_geometry(nd))
    layer = reinit(conv(bias=data.draw(st.booleans()), **kw), seed)
    b = data.draw(st.integers(0, 4))
    x = torch.randn((b, kw["in_channels"], *size), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        y = _targets(layer(x).shape, seed)
    before = fast_layers.PIXEL_GRAM
    fast_layers.PIXEL_GRAM = True
    try:
        assert_matches_oracle(layer, (x, y), data.draw(clippings()), data.draw(masks(b)), ghost_norm=True)
    finally:
        fast_layers.PIXEL_GRAM = before


@pytest.mark.parametrize("path", ["grouped", "unfold_channels_last", "unfold_channels_first", "pixel_gram", "unfolded_ghost"])
@pytest.mark.parametrize("channels", [(4, 7), (7, 4)])  # the clipped-sum GEMM scales x (C_in < C_out) or g
@settings(max_examples=3)
@given(seed=seeds, chunked=st.booleans())
def test_conv_every_kernel_path_with_bias_in_one_or_several_chunks(path, channels, seed, chunked):
    """Each way the conv rule computes norms and clipped sums equals the vmap oracle with a bias, in one batch
    chunk or one example per chunk: the grouped kernel (its per-example bias gradients come from the same call,
    gathered chunk by chunk), unfold + bmm (kept gradients written chunk by chunk into one buffer), the
    pixel-Gram and unfolded ghost norms (clipped sum as a weight-gradient GEMM on the smaller scaled operand)."""
    from dpfunc.bridge.fast.rules import _common

    c_in, c_out = channels  # d_in·K = 36 or 63 >= 32: the grouped kernel is allowed
    layer = reinit(nn.Conv2d(c_in, c_out, 3, padding=1, bias=True), seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((5, c_in, 6, 6), generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = _targets(layer(x).shape, seed)
    knobs = (fast_layers.GROUPED_MIN_POSITIONS, fast_layers.PIXEL_GRAM, fast_layers.CHANNELS_LAST_UNFOLD,
             fast_layers.WORKING_SET_ELEMENTS, _common._CHUNK_ELEMENTS)
    fast_layers.GROUPED_MIN_POSITIONS = 0 if path == "grouped" else 10**9
    fast_layers.CHANNELS_LAST_UNFOLD = {"unfold_channels_last": True, "unfold_channels_first": False}.get(path)
    fast_layers.PIXEL_GRAM = {"pixel_gram": True, "unfolded_ghost": False}.get(path)
    if chunked:
        fast_layers.WORKING_SET_ELEMENTS = _common._CHUNK_ELEMENTS = 1
    try:
        ghost = path in ("pixel_gram", "unfolded_ghost")
        assert_matches_oracle(layer, (x, y), FlatClipping(0.05), ghost_norm=ghost)
    finally:
        (fast_layers.GROUPED_MIN_POSITIONS, fast_layers.PIXEL_GRAM, fast_layers.CHANNELS_LAST_UNFOLD,
         fast_layers.WORKING_SET_ELEMENTS, _common._CHUNK_ELEMENTS) = knobs


@pytest.mark.parametrize("kernel, stride, dilation, padding", [
    ((3, 3), (1, 1), (1, 1), (1, 1)),  # one kernel offset reads real pixels at every output: the sum starts from it
    ((3, 2), (1, 1), (1, 1), (0, 0)),  # no padding: every offset at every output
    ((1, 1), (1, 1), (1, 1), (2, 1)),  # border outputs read only padding: a zero-filled start
    ((2, 3), (2, 3), (2, 1), (5, 3)),  # strided, dilated, outputs past the input on both sides
])
@pytest.mark.parametrize("groups", [1, 2])
def test_pixel_gram_norm_equals_unfolded_gram_without_materialised_padding(kernel, stride, dilation, padding, groups):
    """``_pixel_gram_sq`` (zero padding not materialised: per kernel offset, only output pairs that read real
    pixels) equals ``Σ_ts (u_t·u_s)(g_t·g_s)`` from torch's own ``F.unfold`` of the padded input, per group."""
    gen = torch.Generator().manual_seed(11)
    n, c_in, c_out = 3, 2 * groups, 3 * groups
    x = torch.randn((n, c_in, 6, 7), generator=gen, dtype=torch.float64)
    u = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (n, C·K, T), groups' rows in blocks
    t = u.shape[2]
    g = torch.randn((n, c_out, t), generator=gen, dtype=torch.float64)
    uu = u.view(n, groups, -1, t).transpose(2, 3) @ u.view(n, groups, -1, t)
    gg = g.view(n, groups, -1, t).transpose(2, 3) @ g.view(n, groups, -1, t)
    ref = (uu * gg).sum((1, 2, 3))
    got = fast_layers._pixel_gram_sq(x, padding, g, kernel, stride, dilation, groups)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_conv_norm_plan_is_shape_only_and_picks_pixel_gram_on_small_maps():
    """The cost model sees shapes only; on the CNN's layers it picks instantiation for the 28×28 and 14×14
    layers and the pixel-Gram ghost norm for the 7×7, 32 → 64 layer (3×3 kernels, padding 1)."""
    def plan(c_in, c_out, size, ghost=None):
        t = size * size
        return fast_layers._norm_plan(ghost, t, 9 * c_in, c_out, c_in, (3, 3), (size + 2, size + 2), (size, size))

    assert plan(1, 16, 28) == (False, False)
    assert plan(16, 32, 14) == (False, False)
    assert plan(32, 64, 7) == (True, True)
    assert plan(32, 64, 7, ghost=False) == (False, False)
    assert plan(1, 16, 28, ghost=True) == (True, False)  # forced ghost: the unfolded form is cheaper here
    assert fast_layers._norm_plan(True, 49, 288, 64, 32, (3, 3), None, (7, 7)) == (True, False)  # several calls: unfolded


@given(st.data(), seeds)
def test_embedding(data, seed):
    num, dim = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 5))
    padding_idx = data.draw(st.one_of(st.none(), st.integers(0, num - 1)))
    layer = nn.Embedding(num, dim, padding_idx=padding_idx)
    b = data.draw(st.integers(0, 5))
    lead = data.draw(st.sampled_from([(), (1,), (6,), (2, 3)]))
    # few distinct indices, so repeated rows (the cross terms of the norm) are common
    idx = torch.randint(0, num, (b, *lead), generator=torch.Generator().manual_seed(seed))
    _check_against_oracle(data, layer, idx, seed)


@given(st.data(), seeds)
def test_layer_norm(data, seed):
    shape = data.draw(st.sampled_from([(3,), (1,), (2, 3)]))
    kw = dict(elementwise_affine=data.draw(st.booleans()))
    if kw["elementwise_affine"]:
        kw["bias"] = data.draw(st.booleans())
    layer = nn.LayerNorm(shape, **kw)
    if not list(layer.parameters()):
        layer = nn.Sequential(nn.Linear(shape[-1], shape[-1]), layer)  # something to differentiate
    b = data.draw(st.integers(0, 5))
    lead = data.draw(st.sampled_from([(), (4,)]))
    x = torch.randn((b, *lead, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    _check_against_oracle(data, layer, x, seed)


@given(st.data(), seeds)
def test_group_norm(data, seed):
    groups = data.draw(st.integers(1, 3))
    channels = groups * data.draw(st.integers(1, 3))
    layer = nn.GroupNorm(groups, channels, affine=True)
    b = data.draw(st.integers(0, 5))
    spatial = data.draw(st.sampled_from([(), (5,), (3, 4)]))
    if not spatial and channels == groups:
        spatial = (2,)  # a group of one element normalises to 0
    x = torch.randn((b, channels, *spatial), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    _check_against_oracle(data, layer, x, seed)


@given(st.data(), seeds)
def test_group_norm_fused_from_saved_statistics(data, seed):
    """GroupNorm after a layer (its input needs a gradient, so the forward saves μ and rstd): the per-example
    gradients from GroupNorm's backward kernel on the batch folded into channels — inside the model's
    backward (fused tap) or in the rule after it — equal the oracle."""
    from dpfunc.bridge.fast.rules import RULES as rules

    groups = data.draw(st.integers(1, 3))
    channels = groups * data.draw(st.integers(1, 3))
    spatial = data.draw(st.sampled_from([(), (5,), (3, 4)]))
    if not spatial and channels == groups:
        spatial = (2,)  # a group of one element normalises to 0
    first = {0: nn.Linear(channels, channels), 1: nn.Conv1d(channels, channels, 1), 2: nn.Conv2d(channels, channels, 1)}[len(spatial)]
    layer = nn.Sequential(first, nn.GroupNorm(groups, channels, affine=True))
    b = data.draw(st.integers(0, 5))
    x = torch.randn((b, channels, *spatial), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    fused = data.draw(st.booleans(), label="fused_tap")
    rule, seen = rules[nn.GroupNorm], []

    def grads(module, calls, attrs, ghost):
        seen.extend(None if c.saved is None else len(c.saved) for c in calls)
        return rule.grads(module, calls, attrs, ghost)

    layer = reinit(layer, seed)
    with torch.no_grad():
        y = _targets(layer(x).shape, seed)
    mask, kw = data.draw(masks(b)), {}
    views = data.draw(st.sampled_from([None, 1, 2]), label="views_per_example")
    if views is not None:
        x, kw = views_of(x, views), {"views_per_example": views}
    rules[nn.GroupNorm] = rule._replace(grads=grads, tap=rule.tap if fused else None)
    try:
        assert_matches_oracle(layer, (x, y), data.draw(clippings()), mask, **kw)
    finally:
        rules[nn.GroupNorm] = rule
    # statistics saved (2), plus the per-example gradients when the fused tap computed them (4)
    real = b if mask is None else int(mask.sum())
    assert real == 0 or (seen and all(n == (4 if fused else 2) for n in seen)), seen


@given(st.data(), seeds)
def test_rms_norm(data, seed):
    if not hasattr(nn, "RMSNorm"):
        return
    shape = data.draw(st.sampled_from([(3,), (2, 3)]))
    layer = nn.RMSNorm(shape, eps=data.draw(st.sampled_from([None, 1e-3])))
    b = data.draw(st.integers(0, 4))
    x = torch.randn((b, 4, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    _check_against_oracle(data, layer, x, seed)


class _Attention(nn.Module):
    """Self- or cross-attention (batch-first or not) with an optional key padding mask, as models use it."""

    def __init__(self, mha: nn.MultiheadAttention, cross: bool, need_weights: bool, pad: int):
        super().__init__()
        self.mha, self.cross, self.need_weights, self.pad = mha, cross, need_weights, pad

    def forward(self, x):  # x: (B, T, E)
        seq = x if self.mha.batch_first else x.transpose(0, 1)
        kv = torch.tanh(seq) if self.cross else seq
        mask = None
        if self.pad:  # the last `pad` positions of every example are padding (a per-example mask)
            mask = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool, device=x.device)
            mask[:, x.shape[1] - self.pad:] = True
        out, w = self.mha(seq, kv, kv, key_padding_mask=mask, need_weights=self.need_weights)
        out = out if self.mha.batch_first else out.transpose(0, 1)
        return out if w is None else out + w.sum(-1, keepdim=True)


@settings(max_examples=8)  # the vmap oracle of attention is slow (no batching rule for CPU SDPA)
@given(st.data(), seeds)
def test_multihead_attention(data, seed):
    """The attention rule (tapped projections) equals the vmap oracle, self- and cross-attention."""
    heads = data.draw(st.sampled_from([1, 2]))
    e = heads * data.draw(st.integers(1, 3))
    mha = nn.MultiheadAttention(e, heads, bias=data.draw(st.booleans()), batch_first=data.draw(st.booleans()))
    t = data.draw(st.integers(1, 4))
    layer = _Attention(mha, data.draw(st.booleans()), data.draw(st.booleans()), data.draw(st.integers(0, t - 1)))
    b = data.draw(st.integers(1, 4))  # torch's own MultiheadAttention refuses an empty batch
    x = torch.randn((b, t, e), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    _check_against_oracle(data, layer, x, seed)


def test_every_rule_is_tested():
    """A rule added to the registry needs a test above."""
    tested = {nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None),
              nn.MultiheadAttention}
    assert set(RULES) <= tested


def test_batch_chunks_cover_the_batch_and_are_large_on_cuda():
    """Chunks tile ``[0, B)`` in order; on a CPU they respect the element bound (and a smaller cache
    limit), on a CUDA device they are bounded only by ``_CUDA_CHUNK_ELEMENTS`` — CPU-sized chunks made a
    ResNet-18-GN step on an H200 issue 4725 kernel launches (160 ms of host time) instead of 1492."""
    from dpfunc.bridge.fast.rules._common import _CHUNK_ELEMENTS, _CUDA_CHUNK_ELEMENTS, _chunks

    def tiles(chunks, b):
        return chunks[0][0] == 0 and chunks[-1][1] == b and all(a[1] == c[0] for a, c in zip(chunks, chunks[1:]))

    b, per = 256, 50_000
    cpu = _chunks(b, per, 1 << 20)
    assert tiles(cpu, b) and len(cpu) == math.ceil(b / ((1 << 20) // per))
    assert len(_chunks(b, per)) == math.ceil(b / (_CHUNK_ELEMENTS // per))
    cuda = _chunks(b, per, 1 << 20, torch.device("cuda"))
    assert cuda == [(0, b)]
    huge = _chunks(b, _CUDA_CHUNK_ELEMENTS // 4, None, torch.device("cuda"))
    assert tiles(huge, b) and len(huge) == b // 4
    assert _chunks(3, 10**12) == [(0, 1), (1, 2), (2, 3)]  # one example per chunk at least
