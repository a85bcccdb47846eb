"""Fast clipping on whole models: the case-study CNN and ResNet-18-GN, mixed models (supported and
unsupported layers), edge cases (B = 0, padding, non-finite norms), purity, and the memory invariant."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dpfunc import FlatClipping, Key, PerLayerClipping, dpsgd, make_step, vmap_engine
from dpfunc.bridge.fast import fast_engine
from dpfunc.bridge.functional import functionalize
from dpfunc.models import SmallCNN, resnet18_gn

from test_fast_layers import assert_matches_oracle, cross_entropy, oracle_loss, regression_loss, reinit, views_of

seeds = st.integers(0, 2**32 - 1)
clippings = st.sampled_from([FlatClipping(0.1), FlatClipping(1e3), PerLayerClipping(0.5), PerLayerClipping(0.5, per_parameter=True)])


def _images(b, seed, size=28, channels=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((b, channels, size, size), generator=gen, dtype=torch.float64), torch.randint(0, 2, (b,), generator=gen)


# ------------------------------------------------------------------------------- case-study models


@settings(max_examples=6)
@given(seeds, clippings, st.integers(1, 4), st.booleans())
def test_small_cnn(device, seed, clipping, b, masked):  # @given fills the rightmost arguments
    model = reinit(SmallCNN(key=Key(seed % 1000)), seed, scale=0.3).to(device)
    x, y = (t.to(device) for t in _images(b, seed))
    mask = (torch.arange(b, device=device) % 2 == 0) if masked else None
    assert_matches_oracle(model, (x, y), clipping, mask, loss=cross_entropy)


@pytest.mark.slow
def test_resnet18_gn():
    """The full ResNet-18-GN (11M parameters) at 28×28: every layer kind of the case study."""
    model = resnet18_gn(key=Key(0)).double()
    x, y = _images(2, 0)
    assert_matches_oracle(model, (x, y), PerLayerClipping(2.0), loss=cross_entropy)


@settings(max_examples=4)
@given(seeds, clippings, st.sampled_from([None, True, False]))
def test_narrow_resnet_ghost_and_instantiated(seed, clipping, ghost):
    """A narrow ResNet-GN at 64×64 (stem max-pool, strided 1×1 shortcuts), every conv forced either way."""
    model = reinit(resnet18_gn(key=Key(0), width=4, groups=2, input_size=64), seed, scale=0.3)
    x, y = _images(2, seed, size=64)
    assert_matches_oracle(model, (x, y), clipping, torch.tensor([True, False]) if seed % 3 == 0 else None,
                          loss=cross_entropy, ghost_norm=ghost)


class TinyEncoder(nn.Module):
    """Embedding + one self-attention block written with Linear/LayerNorm (all supported layers)."""

    def __init__(self, vocab=11, dim=8, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(6, dim))  # a bare parameter: the vmap path
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, idx):
        h = self.emb(idx) + self.pos[: idx.shape[1]]
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        h = h + self.proj(att @ v)
        h = h + self.ff(self.ln2(h))
        return self.head(h.mean(1))


@settings(max_examples=6)
@given(seeds, clippings, st.sampled_from([None, True, False]))
def test_transformer_encoder(seed, clipping, ghost):
    model = reinit(TinyEncoder(), seed, scale=0.5)
    gen = torch.Generator().manual_seed(seed)
    idx, y = torch.randint(0, 11, (4, 6), generator=gen), torch.randint(0, 3, (4,), generator=gen)
    assert_matches_oracle(model, (idx, y), clipping, loss=cross_entropy, ghost_norm=ghost)


# ----------------------------------------------------------------------------------- mixed models


class Scale(nn.Module):
    """A custom layer with its own parameter used directly in forward (no rule: vmap path)."""

    def __init__(self, c):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(c))

    def forward(self, x):
        return x * self.gain.view(1, -1, *([1] * (x.dim() - 2)))


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.scale = Scale(4)
        self.norm = nn.GroupNorm(2, 4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)  # fused in_proj_weight: vmap path
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.norm(self.scale(self.conv(x))).flatten(2).transpose(1, 2)  # (B, T, 4)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.fc(torch.tanh(h)).mean(1)


@settings(max_examples=10)
@given(seeds, clippings, st.integers(0, 4))
def test_mixed_model(seed, clipping, b):
    model = reinit(Mixed(), seed, scale=0.5)
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(b, 2, 4, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (b,), generator=gen)
    mask = torch.rand(b, generator=gen) < 0.7 if b else None
    assert_matches_oracle(model, (x, y), clipping, mask, loss=cross_entropy)


class Tied(nn.Module):
    """Embedding tied to the output head (vmap path), reused layer, in-place op on a layer output."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 5)
        self.mid = nn.Linear(5, 5)
        self.out = nn.Linear(5, 7, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx):
        h = F.relu(self.mid(self.emb(idx)), inplace=True)
        h = self.mid(h)  # the same Linear twice: cross terms between the calls
        return self.out(h).mean(1)


@settings(max_examples=8)
@given(seeds, clippings)
def test_tied_reused_and_inplace(seed, clipping):
    model = reinit(Tied(), seed, scale=0.5)
    gen = torch.Generator().manual_seed(seed)
    idx, y = torch.randint(0, 7, (3, 4), generator=gen), torch.randint(0, 7, (3,), generator=gen)
    assert_matches_oracle(model, (idx, y), clipping, loss=cross_entropy)


@settings(max_examples=6)
@given(seeds, clippings, st.integers(0, 3), st.integers(1, 3))
def test_augmentation_multiplicity(seed, clipping, b, views):
    """K views per example, clipped as one (De et al. 2022): fast equals vmap over the K-view mean loss
    on the CNN (GroupNorm statistics, conv kernels), the mixed model (its vmap fallback sees the
    views too) and the tied/reused model (several calls per layer times several views)."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, generator=gen) < 0.7 if b else None
    cnn = reinit(SmallCNN(key=Key(seed % 1000)), seed, scale=0.3)
    x, y = _images(b, seed)
    assert_matches_oracle(cnn, (views_of(x, views), y), clipping, mask, loss=cross_entropy, views_per_example=views)
    mixed = reinit(Mixed(), seed, scale=0.5)
    x2 = torch.randn(b, views, 2, 4, 4, generator=gen, dtype=torch.float64)
    assert_matches_oracle(mixed, (x2, torch.randint(0, 3, (b,), generator=gen)), clipping, mask, loss=cross_entropy, views_per_example=views)
    tied = reinit(Tied(), seed, scale=0.5)
    idx = torch.randint(0, 7, (b, views, 4), generator=gen)
    assert_matches_oracle(tied, (idx, torch.randint(0, 7, (b,), generator=gen)), clipping, loss=cross_entropy, views_per_example=views)


def test_views_per_example_is_validated():
    model = nn.Linear(3, 2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"fast_engine: views_per_example must be None or an int >= 1"):
            fast_engine(model, cross_entropy, FlatClipping(1.0), views_per_example=bad)
    engine = fast_engine(model, cross_entropy, FlatClipping(1.0), views_per_example=2)
    with pytest.raises(ValueError, match=r"input must have shape \(B, 2, \.\.\.\), got \(4, 3\)"):
        engine(dict(model.named_parameters()), {}, (torch.randn(4, 3), torch.zeros(4, dtype=torch.long)), None)


def test_subset_of_parameters_and_unused_layer():
    """Only the parameters in ``params`` are differentiated; an unused layer gets zero gradients."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.unused = nn.Linear(3, 3), nn.Linear(3, 2), nn.Linear(3, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    model = reinit(Net(), 3)
    apply_fn, params, buffers = functionalize(model)
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    sub = {k: v for k, v in params.items() if not k.startswith("a.")}
    clip = PerLayerClipping(1.0)
    ref = vmap_engine(oracle_loss(apply_fn, regression_loss), clipping=clip)(sub, buffers, (x, y), None)
    out = fast_engine(apply_fn, regression_loss, clip)(sub, buffers, (x, y), None)
    for k in sub:
        torch.testing.assert_close(out.grads.grads[k], ref.grads.grads[k], rtol=1e-6, atol=1e-9)
    assert torch.count_nonzero(out.grads.grads["unused.weight"]) == 0
    torch.testing.assert_close(out.grads.norms, ref.grads.norms, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------- edge cases


def test_empty_batch_and_all_masked():
    model = reinit(SmallCNN(key=Key(0)), 0, 0.3)
    apply_fn, params, buffers = functionalize(model)
    engine = fast_engine(model, cross_entropy, PerLayerClipping(1.0))
    for x, y, mask in [(*_images(0, 0), None), (*_images(3, 0), torch.zeros(3, dtype=torch.bool))]:
        out = engine(params, buffers, (x, y), mask)
        assert out.grads.norms.shape == (x.shape[0],) and out.losses.shape == (x.shape[0],)
        assert torch.count_nonzero(out.grads.norms) == 0 and int(out.grads.num_real_rows) == 0
        assert all(torch.count_nonzero(g) == 0 and g.shape == params[k].shape for k, g in out.grads.grads.items())
        ref = vmap_engine(oracle_loss(apply_fn, cross_entropy), clipping=PerLayerClipping(1.0))(params, buffers, (x, y), mask)
        assert set(out.grads.group_norms) == set(ref.grads.group_norms)


def test_non_finite_norm_raises_like_core_and_padding_is_ignored():
    model = reinit(SmallCNN(key=Key(0)), 0, 0.3)
    apply_fn, params, buffers = functionalize(model)
    x, y = _images(4, 1)
    x[2] = float("nan")
    engine = fast_engine(apply_fn, cross_entropy, FlatClipping(1.0))
    with pytest.raises(ValueError, match=r"fast_engine: non-finite per-example gradients for examples \[2\]"):
        engine(params, buffers, (x, y), None)
    mask = torch.tensor([True, True, False, True])  # the bad row is padding: never computed
    out = engine(params, buffers, (x, y), mask)
    assert torch.isfinite(out.grads.norms).all() and out.grads.norms[2] == 0 and out.losses[2] == 0
    assert all(torch.isfinite(g).all() for g in out.grads.grads.values())


def test_module_untouched_and_hooks_removed_even_on_error():
    model = reinit(Mixed(), 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_fn, params, buffers = functionalize(model)
    x, y = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (3,))
    fast_engine(model, cross_entropy, FlatClipping(1.0))(params, buffers, (x, y), None)
    with pytest.raises(ValueError, match="shape"):  # a mean loss instead of per-example losses
        fast_engine(model, lambda out, t: F.cross_entropy(out, t), FlatClipping(1.0))(params, buffers, (x, y), None)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_argument_validation():
    model = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="fast_engine: model"):
        fast_engine(lambda p, b, x: x, regression_loss, FlatClipping(1.0))
    with pytest.raises(TypeError, match="fast_engine: clipping"):
        fast_engine(model, regression_loss, 1.0)
    with pytest.raises(ValueError, match="fast_engine: ghost_norm"):
        fast_engine(model, regression_loss, FlatClipping(1.0), ghost_norm="yes")
    engine = fast_engine(model, regression_loss, FlatClipping(1.0))
    params = dict(model.named_parameters())
    with pytest.raises(ValueError, match=r"fast_engine: mask must have shape \(3,\)"):
        engine(params, {}, (torch.randn(3, 2), torch.randn(3, 2)), torch.ones(2, dtype=torch.bool))


def test_drives_make_step_with_dpsgd():
    """The engine plugs into the pure step; with noise 0 and no clipping it is plain SGD."""
    model = reinit(SmallCNN(key=Key(0)), 0, 0.3)
    apply_fn, params, buffers = functionalize(model)
    x, y = _images(4, 2)
    tx = dpsgd(0.1, noise_multiplier=0.0, max_grad_norm=1e9, sampling_rate=1.0, num_examples=4, key=Key(0))
    step = make_step(None, tx, engine=fast_engine(apply_fn, cross_entropy, FlatClipping(1e9)))
    new, _, metrics = step(params, tx.init(params), (x, y))
    loss = lambda p: cross_entropy(apply_fn(p, buffers, x), y).mean()  # noqa: E731
    expected = torch.func.grad(loss)(params)
    for k in params:
        torch.testing.assert_close(new[k], params[k] - 0.1 * expected[k], rtol=1e-6, atol=1e-9)
    assert metrics.batch_size == 4 and metrics.clipped_fraction == 0.0


def test_outputs_carry_no_graph_and_steps_hold_no_memory():
    """Regression: kept layer inputs used to carry their graph into the clipped sums, so each step's
    params chained to every earlier step's activations (about 9 MB/step on the case-study CNN)."""
    import gc
    import warnings

    model = reinit(SmallCNN(key=Key(0)), 0, 0.3)
    apply_fn, params, buffers = functionalize(model)
    x, y = _images(8, 1)
    engine = fast_engine(apply_fn, cross_entropy, FlatClipping(1.0))
    out = engine(params, buffers, (x, y), None)
    for k, v in [*out.grads.grads.items(), ("norms", out.grads.norms), ("losses", out.losses)]:
        assert v.grad_fn is None and not v.requires_grad, k

    tx = dpsgd(0.1, noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=0.5, num_examples=16, key=Key(1))
    step, state = make_step(None, tx, engine=engine), tx.init(params)

    def live_tensors():
        gc.collect()
        with warnings.catch_warnings():  # isinstance on torch.distributed.reduce_op warns it is deprecated
            warnings.simplefilter("ignore", FutureWarning)
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    counts = []
    for _ in range(6):
        params, state, _ = step(params, state, (x, y), buffers=buffers)
        counts.append(live_tensors())
    assert counts[-1] == counts[2], counts
    assert all(v.grad_fn is None for v in params.values())


# -------------------------------------------------------------------------- the memory invariant


class _MaxAllocation(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("ghost", [True, None])
def test_ghost_path_allocates_nothing_of_size_batch_times_parameters(ghost):
    """Wide layers on short sequences: every tensor stays far below ``B × d_in × d_out``."""
    b, t, d = 16, 4, 64

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(d, d), nn.Linear(d, d)
            self.conv = nn.Conv1d(d, d, 3, padding=1)

        def forward(self, x):
            h = self.l2(torch.tanh(self.l1(x)))  # (B, T, d)
            return self.conv(h.transpose(1, 2)).mean(2)

    model = reinit(Net(), 0, 0.2)
    apply_fn, params, buffers = functionalize(model)
    x, y = torch.randn(b, t, d, dtype=torch.float64), torch.randn(b, d, dtype=torch.float64)
    engine = fast_engine(apply_fn, regression_loss, FlatClipping(1.0), ghost_norm=ghost)
    with _MaxAllocation() as mode:
        engine(params, buffers, (x, y), None)
    assert mode.largest < b * d * d / 4, mode.largest  # the largest is an activation, B·T·3d
    with _MaxAllocation() as vmap_mode:  # the check can fail: the oracle does allocate B × |θ|
        vmap_engine(oracle_loss(apply_fn, regression_loss), clipping=FlatClipping(1.0))(params, buffers, (x, y), None)
    assert vmap_mode.largest >= b * d * d


class _TiedHead(nn.Module):
    """A linear layer used twice and an explicitly shared weight (``b.weight is a.weight``)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@settings(max_examples=5)  # a SmallCNN forward per example; 5 keep it quick
@given(seeds)
def test_apply_fn_without_tie_search_is_bit_identical(seed):
    """functionalize / fast_engine read ties once and skip functional_call's per-call alias search when
    there are none: the same output bit for bit as ``tie_weights=True``."""
    from torch.func import functional_call

    from dpfunc.bridge.functional import has_tied_tensors

    torch.manual_seed(seed % 2**31)
    model = SmallCNN(key=Key(seed % 1000))
    apply_fn, params, buffers = functionalize(model)
    assert not has_tied_tensors(model)
    params = {k: v + 0.01 * torch.randn_like(v) for k, v in params.items()}
    x = torch.randn(3, 1, 28, 28)
    ref = functional_call(model, (params, buffers), (x,), tie_weights=True, strict=False)
    assert torch.equal(apply_fn(params, buffers, x), ref)


def test_apply_fn_of_a_tied_module_reaches_every_alias():
    """A tied module keeps functional_call's alias search: its one ``params`` entry is used at both names."""
    from torch.func import functional_call

    from dpfunc.bridge.functional import has_tied_tensors

    torch.manual_seed(0)
    tied = _TiedHead()
    assert has_tied_tensors(tied)
    apply_fn, params, buffers = functionalize(tied)
    assert "b.weight" not in params and "a.weight" in params
    w = torch.randn(4, 4)
    params = {**params, "a.weight": w}
    x = torch.randn(2, 4)
    with torch.no_grad():
        expected = F.linear(torch.tanh(F.linear(x, w, params["a.bias"])), w, params["b.bias"])
    assert torch.equal(apply_fn(params, buffers, x), expected)
    clip = FlatClipping(1.0)
    out = fast_engine(tied, lambda o, t: (o - t).square().sum(1), clip)(params, buffers, (x, torch.zeros(2, 4)), None)
    ref_out = vmap_engine(lambda p, b, xi, ti: (functional_call(tied, (p, b), (xi[None],)) - ti).square().sum(),
                          clipping=clip)(params, buffers, (x, torch.zeros(2, 4)), None)
    torch.testing.assert_close(out.grads.norms, ref_out.grads.norms)


def test_weighted_sum_is_bit_identical_to_tensordot():
    """The rules' ``Σ_i c_i pe_i`` calls ``mm`` directly; it must equal ``torch.tensordot`` (what it
    replaced) bit for bit on every shape family the rules keep, contiguous or not, including one element
    per example (where tensordot takes a dot product), a batch of one and an empty batch."""
    from dpfunc.bridge.fast.rules._common import _weighted

    g = torch.Generator().manual_seed(0)
    shapes = [(0, 3), (5,), (0,), (1, 4), (1, 1), (64, 1), (3, 1, 1), (7, 3), (64, 32, 1, 3, 3), (64, 64, 32, 7, 7),
              (2, 10, 4), (256, 2, 64), (33, 5, 1)]
    for dtype in (torch.float32, torch.float64):
        for shape in shapes:
            pe = torch.randn(shape, generator=g, dtype=dtype)
            for p in (pe, pe.transpose(-1, -2)) if pe.dim() > 2 else (pe,):
                c = torch.rand(shape[0], generator=g, dtype=torch.float32)
                ref = torch.tensordot(c.to(p.dtype), p, dims=([0], [0]))
                out = _weighted(c, p)
                assert out.shape == ref.shape and out.dtype == ref.dtype and torch.equal(out, ref), (dtype, shape, p.stride())
