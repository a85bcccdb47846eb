"""Hausdorff-95: the fast paths (scipy EDT, chunked torch.cdist) against a brute-force oracle; empty masks."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dpfunc.segmentation._metrics as metrics_module
from dpfunc.segmentation import hausdorff95, surface_voxels
from dpfunc.segmentation._train import summarize_hd95


def _brute_surface(mask: np.ndarray) -> list[tuple[int, ...]]:
    """Voxels of the mask with a face neighbour outside the mask or outside the array (explicit loops)."""
    out = []
    for idx in itertools.product(*(range(n) for n in mask.shape)):
        if not mask[idx]:
            continue
        for axis in range(mask.ndim):
            for step in (-1, 1):
                nb = list(idx)
                nb[axis] += step
                if not 0 <= nb[axis] < mask.shape[axis] or not mask[tuple(nb)]:
                    out.append(idx)
                    break
            else:
                continue
            break
    return out


def _percentile95(values: list[float]) -> float:
    """The 95th percentile with linear interpolation between order statistics, written out."""
    v = sorted(values)
    pos = 0.95 * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def _brute_hd95(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> float:
    if not pred.any() and not truth.any():
        return 0.0
    if pred.any() != truth.any():
        return math.inf
    sp, st_ = _brute_surface(pred), _brute_surface(truth)

    def dist(a, b):
        return math.sqrt(sum(((x - y) * s) ** 2 for x, y, s in zip(a, b, spacing)))

    d_pt = [min(dist(a, b) for b in st_) for a in sp]
    d_tp = [min(dist(b, a) for a in sp) for b in st_]
    return max(_percentile95(d_pt), _percentile95(d_tp))


masks = st.tuples(st.integers(0, 2**32 - 1), st.sampled_from([(7,), (6, 7), (3, 5, 6), (4, 6, 5)]),
                  st.floats(0.05, 0.9), st.floats(0.05, 0.9))


def _draw(seed: int, shape, dp: float, dt: float):
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(shape, generator=g) < dp).long(), (torch.rand(shape, generator=g) < dt).long())


def test_surface_voxels_equal_the_loop_oracle():
    g = torch.Generator().manual_seed(0)
    for shape in [(9,), (6, 7), (4, 5, 6)]:
        for _ in range(5):
            m = torch.rand(shape, generator=g) < 0.6
            fast = {tuple(int(i) for i in ix) for ix in surface_voxels(m).nonzero()}
            assert fast == set(_brute_surface(m.numpy()))


@settings(max_examples=12)
@given(data=masks, spacing_seed=st.integers(0, 2**32 - 1))
def test_hd95_equals_the_brute_force_oracle_with_scipy_and_without(data, spacing_seed, monkeypatch_module):
    seed, shape, dp, dt = data
    pred, truth = _draw(seed, shape, dp, dt)
    g = torch.Generator().manual_seed(spacing_seed)
    spacing = tuple(float(s) for s in 0.5 + 2 * torch.rand(len(shape), generator=g))
    expected = _brute_hd95(pred.numpy().astype(bool), truth.numpy().astype(bool), spacing)
    got_default = hausdorff95(pred, truth, spacing=spacing)
    with monkeypatch_module.context() as m:
        m.setattr(metrics_module, "_scipy_edt", lambda: None)  # force the torch.cdist path
        got_cdist = hausdorff95(pred, truth, spacing=spacing)
    for got in (got_default, got_cdist):
        if math.isinf(expected):
            assert math.isinf(got)
        else:
            assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as m:
        yield m


def test_hd95_known_values_and_empty_cases():
    a = torch.zeros(10, 10, dtype=torch.int64)
    a[2:6, 2:6] = 1
    assert hausdorff95(a, a) == 0.0
    assert hausdorff95(a, torch.roll(a, 3, dims=0)) == 3.0           # a rigid shift by 3 pixels
    assert hausdorff95(a, torch.roll(a, 3, dims=0), spacing=(2.0, 1.0)) == 6.0  # in units of the spacing
    empty = torch.zeros_like(a)
    assert hausdorff95(empty, empty) == 0.0                          # nothing to find, nothing found
    assert hausdorff95(a, empty) == math.inf and hausdorff95(empty, a) == math.inf
    # one far outlier voxel barely moves HD95 when the surfaces are large, unlike the plain Hausdorff distance
    big = torch.zeros(40, 40, dtype=torch.int64)
    big[5:30, 5:30] = 1
    noisy = big.clone()
    noisy[38, 38] = 1
    assert hausdorff95(big, noisy) == 0.0
    assert _brute_hd95(big.numpy().astype(bool), noisy.numpy().astype(bool), (1.0, 1.0)) == 0.0


def test_hd95_refuses_bad_input():
    a = torch.ones(3, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="hausdorff95: prediction and truth must have the same shape"):
        hausdorff95(a, torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="hausdorff95: prediction must be a binary mask"):
        hausdorff95(a.float(), a)
    with pytest.raises(ValueError, match="hausdorff95: spacing must give one size per axis"):
        hausdorff95(a, a, spacing=(1.0,))
    with pytest.raises(ValueError, match="spacing"):
        hausdorff95(a, a, spacing=(1.0, -2.0))
    with pytest.raises(ValueError, match="spacing"):
        hausdorff95(a, a, spacing=(1.0, math.inf))


def test_summarize_hd95_replaces_one_empty_by_the_grid_diagonal():
    values, replaced = summarize_hd95([1.5, math.inf, 0.0], [(4, 8, 8), (5, 9, 13), (2, 2, 2)])
    assert replaced == 1
    assert values == [1.5, math.sqrt(4**2 + 8**2 + 12**2), 0.0]
    assert all(math.isfinite(v) for v in values)
