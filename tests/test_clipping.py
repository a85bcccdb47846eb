"""Invariants 2, 3, 6: clipped norms ≤ C, small gradients unchanged, sensitivity ≤ C, masks, non-finite."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dpfunc import FlatClipping, PerLayerClipping, clip_and_sum
from dpfunc.clipping import clip_factors, layer_of

seeds = st.integers(0, 2**32 - 1)
bounds = st.floats(0.01, 100.0)
# Float rounding: the clipped vector is (C/‖g‖)·g, whose recomputed norm may exceed C by a few ulps.
REL = 1e-12

SHAPES = {"fc1.weight": (3, 4), "fc1.bias": (3,), "fc2.weight": (2, 3), "fc2.bias": (2,)}


def _grads(seed, b, scale):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(b, *s, generator=gen, dtype=torch.float64) * scale for k, s in SHAPES.items()}


def _clip_each(grads, clipping):
    """Oracle: clip every example separately with the textbook formula."""
    b = next(iter(grads.values())).shape[0]
    out = {k: [] for k in grads}
    bounds_ = clipping.group_bounds(list(grads))
    for i in range(b):
        groups = {}
        for k, g in grads.items():
            groups.setdefault(clipping.group_of(k), []).append(k)
        for grp, names in groups.items():
            n = math.sqrt(sum(float(grads[k][i].pow(2).sum()) for k in names))
            f = min(1.0, bounds_[grp] / n) if n > 0 else 1.0
            for k in names:
                out[k].append(grads[k][i] * f)
    return {k: torch.stack(v) for k, v in out.items()}


clippings = st.one_of(
    bounds.map(FlatClipping),
    bounds.map(PerLayerClipping),
    bounds.map(lambda c: PerLayerClipping(c, per_parameter=True)),
    st.tuples(bounds, bounds).map(lambda cs: PerLayerClipping({"fc1": cs[0], "fc2": cs[1]})),
)


@given(seed=seeds, b=st.integers(1, 8), scale=st.sampled_from([1e-3, 0.1, 1.0, 10.0, 1e3]), clipping=clippings)
def test_clipped_sum_matches_per_example_oracle_and_norm_bounds(seed, b, scale, clipping):
    grads = _grads(seed, b, scale)
    out = clip_and_sum(grads, clipping)
    clipped = _clip_each(grads, clipping)
    for k in grads:
        torch.testing.assert_close(out.grads[k], clipped[k].sum(0), rtol=1e-10, atol=1e-12)
    group_bounds = clipping.group_bounds(list(grads))
    for i in range(b):
        total = 0.0
        for grp, c in group_bounds.items():
            n = math.sqrt(sum(float(clipped[k][i].pow(2).sum()) for k in grads if clipping.group_of(k) == grp))
            assert n <= c * (1 + REL)
            total += n * n
        assert math.sqrt(total) <= out.sensitivity * (1 + REL)
    # reported norms are the unclipped ones
    want = torch.sqrt(sum(g.reshape(b, -1).pow(2).sum(1) for g in grads.values()))
    torch.testing.assert_close(out.norms, want)
    assert int(out.num_real_rows) == b


@given(seed=seeds, b=st.integers(1, 6), clipping=clippings)
def test_gradients_within_bound_are_unchanged_exactly(seed, b, clipping):
    grads = _grads(seed, b, 1.0)
    gb = clipping.group_bounds(list(grads))
    # shrink every group of every example to at most half its bound
    small = {}
    for grp, c in gb.items():
        names = [k for k in grads if clipping.group_of(k) == grp]
        n = torch.sqrt(sum(grads[k].reshape(b, -1).pow(2).sum(1) for k in names))
        f = (0.5 * c / n).clamp(max=1.0)
        for k in names:
            small[k] = grads[k] * f.view(-1, *([1] * (grads[k].dim() - 1)))
    out = clip_and_sum(small, clipping)
    factors = clip_factors(out.group_norms, gb)
    for f in factors.values():
        assert torch.equal(f, torch.ones_like(f))
    for k in small:
        assert torch.equal(out.grads[k], torch.tensordot(torch.ones(b, dtype=torch.float64), small[k], dims=([0], [0])))
    # one example: the "sum" is the example itself, bit for bit
    one = {k: v[:1] for k, v in small.items()}
    out1 = clip_and_sum(one, clipping)
    for k in one:
        assert torch.equal(out1.grads[k], one[k][0])


def test_zero_gradient_is_fine():
    out = clip_and_sum({"w": torch.zeros(3, 4)}, FlatClipping(1.0))
    assert torch.equal(out.grads["w"], torch.zeros(4))
    assert torch.equal(out.norms, torch.zeros(3))


def test_inf_bound_disables_clipping():
    g = {"w": torch.tensor([[300.0, 400.0], [1.0, 0.0]], dtype=torch.float64)}
    out = clip_and_sum(g, FlatClipping(math.inf))
    assert torch.equal(out.grads["w"], g["w"].sum(0))
    assert out.sensitivity == math.inf


def test_docstring_example():
    out = clip_and_sum({"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}, FlatClipping(1.0))
    torch.testing.assert_close(out.grads["w"], torch.tensor([0.9, 1.2]))
    torch.testing.assert_close(out.norms, torch.tensor([5.0, 0.5]))


@given(seed=seeds, b=st.integers(1, 8), scale=st.sampled_from([0.1, 1.0, 100.0]), clipping=clippings, data=st.data())
def test_add_remove_one_sensitivity(seed, b, scale, clipping, data):
    """Neighbouring batches (one example removed) give clipped sums at distance ≤ the sensitivity."""
    grads = _grads(seed, b, scale)
    i = data.draw(st.integers(0, b - 1), label="removed")
    keep = [j for j in range(b) if j != i]
    full = clip_and_sum(grads, clipping)
    assert full.sensitivity <= math.sqrt(sum(c * c for c in clipping.group_bounds(list(grads)).values())) * (1 + REL)
    diff_sq = 0.0
    if keep:
        rest = clip_and_sum({k: v[keep] for k, v in grads.items()}, clipping)
        diff_sq = sum(float((full.grads[k] - rest.grads[k]).pow(2).sum()) for k in grads)
    else:
        diff_sq = sum(float(full.grads[k].pow(2).sum()) for k in grads)
    assert math.sqrt(diff_sq) <= full.sensitivity * (1 + 1e-9)
    # flat and evenly split per-layer clipping have sensitivity exactly C
    if isinstance(clipping, FlatClipping) or not isinstance(clipping.max_grad_norm, tuple):
        c = clipping.max_grad_norm
        assert math.isclose(full.sensitivity, c, rel_tol=1e-12)


@given(seed=seeds, b=st.integers(1, 8), clipping=clippings, data=st.data())
def test_masked_rows_contribute_exactly_zero(seed, b, clipping, data):
    grads = _grads(seed, b, 3.0)
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=b, max_size=b), label="mask"))
    out = clip_and_sum(grads, clipping, mask)
    real = clip_and_sum({k: v[mask] for k, v in grads.items()}, clipping) if mask.any() else None
    for k in grads:
        want = real.grads[k] if real is not None else torch.zeros(SHAPES[k], dtype=torch.float64)
        torch.testing.assert_close(out.grads[k], want, rtol=1e-12, atol=1e-14)
    assert torch.equal(out.norms[~mask], torch.zeros(int((~mask).sum()), dtype=torch.float64))
    assert int(out.num_real_rows) == int(mask.sum())
    # float 0/1 masks mean the same
    out_f = clip_and_sum(grads, clipping, mask.to(torch.float64))
    for k in grads:
        assert torch.equal(out_f.grads[k], out.grads[k])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_gradient_raises_naming_examples(bad):
    g = torch.ones(4, 3)
    g[1, 0] = bad
    g[3, 2] = bad
    with pytest.raises(ValueError, match=r"clip_and_sum: non-finite.*\[1, 3\]"):
        clip_and_sum({"w": g}, FlatClipping(1.0))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_in_masked_row_is_ignored(bad):
    g = torch.ones(3, 2)
    g[2] = bad
    mask = torch.tensor([True, True, False])
    out = clip_and_sum({"w": g}, FlatClipping(10.0), mask)
    assert torch.equal(out.grads["w"], torch.full((2,), 2.0))
    assert torch.isfinite(out.norms).all() and float(out.norms[2]) == 0.0
    assert all(torch.isfinite(v).all() for v in out.group_norms.values())


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, math.nan, True, False, "1", None])
@pytest.mark.parametrize("cls", [FlatClipping, PerLayerClipping])
def test_bad_max_grad_norm_raises(cls, bad):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: max_grad_norm"):
        cls(bad)


@pytest.mark.parametrize("bad", [0.0, -2.0, math.nan, True])
def test_bad_bound_in_mapping_names_the_group(bad):
    with pytest.raises(ValueError, match=r"PerLayerClipping: max_grad_norm\['fc2'\]"):
        PerLayerClipping({"fc1": 1.0, "fc2": bad})


def test_empty_mapping_raises():
    with pytest.raises(ValueError, match="PerLayerClipping"):
        PerLayerClipping({})


def test_mapping_missing_a_group_raises():
    clipping = PerLayerClipping({"fc1": 1.0})
    with pytest.raises(ValueError, match=r"PerLayerClipping: no max_grad_norm.*fc2"):
        clip_and_sum(_grads(0, 2, 1.0), clipping)


def test_per_layer_groups_and_sensitivity():
    names = list(SHAPES)
    assert layer_of("fc1.weight") == "fc1" and layer_of("w") == "w"
    even = PerLayerClipping(2.0)
    assert even.group_bounds(names) == {"fc1": pytest.approx(2.0 / math.sqrt(2)), "fc2": pytest.approx(2.0 / math.sqrt(2))}
    per_param = PerLayerClipping(2.0, per_parameter=True)
    assert set(per_param.group_bounds(names)) == set(names)
    assert per_param.sensitivity(names) == pytest.approx(2.0)
    mapped = PerLayerClipping({"fc1": 3.0, "fc2": 4.0})
    assert mapped.sensitivity(names) == pytest.approx(5.0)
    out = clip_and_sum(_grads(1, 3, 10.0), mapped)
    assert set(out.group_norms) == {"fc1", "fc2"}
    assert out.sensitivity == pytest.approx(5.0)


def test_shape_errors():
    with pytest.raises(ValueError, match="clip_and_sum: .*empty"):
        clip_and_sum({}, FlatClipping(1.0))
    with pytest.raises(ValueError, match="clip_and_sum: .*batch size"):
        clip_and_sum({"a": torch.ones(2, 3), "b": torch.ones(3, 3)}, FlatClipping(1.0))
    with pytest.raises(ValueError, match="clip_and_sum: mask"):
        clip_and_sum({"a": torch.ones(2, 3)}, FlatClipping(1.0), torch.ones(3, dtype=torch.bool))


def test_empty_batch():
    out = clip_and_sum({"w": torch.zeros(0, 3)}, FlatClipping(1.0))
    assert torch.equal(out.grads["w"], torch.zeros(3)) and out.norms.shape == (0,)
    assert int(out.num_real_rows) == 0


@given(seed=seeds, clipping=clippings)
def test_clip_and_sum_is_pure(seed, clipping):
    grads = _grads(seed, 4, 5.0)
    before = {k: v.clone() for k, v in grads.items()}
    mask = torch.tensor([True, False, True, True])
    a = clip_and_sum(grads, clipping, mask)
    b = clip_and_sum(grads, clipping, mask)
    for k in grads:
        assert torch.equal(grads[k], before[k])
        assert torch.equal(a.grads[k], b.grads[k])


def test_num_real_rows_renamed_old_name_still_reads_and_loads():
    """``ClippedSum.num_examples`` became ``num_real_rows``: the old read warns, old checkpoints and pickles load."""
    import pickle

    from bridge.checkpoint import from_plain, to_plain

    out = clip_and_sum({"w": torch.ones(3, 2)}, FlatClipping(1.0), torch.tensor([True, False, True]))
    assert int(out.num_real_rows) == 2
    with pytest.warns(DeprecationWarning, match="num_real_rows"):
        assert int(out.num_examples) == 2
    # a checkpoint written before the rename stores the field as "num_examples"
    plain = to_plain(out)
    plain["fields"]["num_examples"] = plain["fields"].pop("num_real_rows")
    old = from_plain(plain)
    assert type(old) is type(out) and torch.equal(old.num_real_rows, out.num_real_rows)
    assert torch.equal(old.grads["w"], out.grads["w"]) and old.sensitivity == out.sensitivity
    back = pickle.loads(pickle.dumps(out))  # NamedTuple pickles are positional
    assert torch.equal(back.num_real_rows, out.num_real_rows)
