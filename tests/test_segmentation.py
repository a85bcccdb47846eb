"""Segmentation: U-Net, patient-level clipping (fast engine vs oracles, sensitivity), Dice/IoU, NIfTI loader, phantoms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dpfunc.bridge import functionalize
from dpfunc.clipping import FlatClipping
from dpfunc.keys import Key
from dpfunc.models import UNetGN, build_model, unet_gn
from dpfunc.segmentation import (
    PackedSegmenter,
    dice_score,
    iou_score,
    mean_ci,
    packed_losses,
    patient_batch,
    segmentation_engine,
    slice_losses,
)

from _segmentation_helpers import assert_fast_engine_equals_vmap, flat, random_patients

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


# ------------------------------------------------------------------------------------------ U-Net


def test_unet_shapes_parameters_and_keyed_init():
    net = unet_gn(key=Key(0))
    assert net(torch.zeros(2, 1, 64, 64)).shape == (2, 2, 64, 64)
    assert sum(p.numel() for p in net.parameters()) == 134_946
    same, other = unet_gn(key=Key(0)), unet_gn(key=Key(1))
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), same.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(net.parameters(), other.parameters()))
    # only layers the fast engine has rules for carry parameters; no BatchNorm, no buffers
    for m in net.modules():
        if list(m.parameters(recurse=False)):
            assert isinstance(m, (nn.Conv2d, nn.GroupNorm)), m
        assert not isinstance(m, (nn.ConvTranspose2d, nn.modules.batchnorm._BatchNorm))
    assert list(net.buffers()) == []
    assert isinstance(build_model("unet", key=Key(0), width=4, depth=2, groups=2), UNetGN)


def test_unet_class_prior_sets_the_head_bias_only():
    plain, prior = unet_gn(key=Key(0)), unet_gn(key=Key(0), class_prior=(0.95, 0.05))
    assert torch.allclose(prior.head.bias, torch.tensor([math.log(0.95), math.log(0.05)]))
    assert torch.allclose(prior.head.bias.softmax(0), torch.tensor([0.95, 0.05]))
    other = {k: v for k, v in prior.named_parameters() if k != "head.bias"}
    assert all(torch.equal(other[k], v) for k, v in plain.named_parameters() if k != "head.bias")
    for bad in ((0.5,), (0.5, 0.6), (1.0, 0.0), (-0.1, 1.1)):
        with pytest.raises(ValueError, match="UNetGN: class_prior must give 2 probabilities"):
            unet_gn(key=Key(0), class_prior=bad)


def test_unet_refuses_bad_arguments():
    with pytest.raises(ValueError, match="UNetGN: width must be divisible by groups"):
        UNetGN(key=Key(0), width=6, groups=4)
    with pytest.raises(ValueError, match="UNetGN: depth"):
        UNetGN(key=Key(0), depth=0)
    with pytest.raises(ValueError, match=r"divisible by 2\*\*depth = 8, got 20×20"):
        UNetGN(key=Key(0))(torch.zeros(1, 1, 20, 20))
    with pytest.raises(TypeError, match="UNetGN: key"):
        UNetGN(key=0)


# ------------------------------------------------------------------- patient-level clipping


def _tiny(seed: int = 0):
    net = unet_gn(key=Key(seed), width=2, depth=1, groups=1).double()
    model = PackedSegmenter(net)
    _, params, buffers = functionalize(model)
    return model, params, buffers


def _patients(seed: int, counts, size: int = 8):
    return random_patients(seed, counts, size)


def test_unet_coord_channels_add_position_inputs_only():
    plain, coord = unet_gn(key=Key(0), width=4, depth=2, groups=2), unet_gn(key=Key(0), width=4, depth=2, groups=2, coord_channels=True)
    # the first convolution reads 1 + 2 channels; nothing else changes
    assert coord.down[0][0].weight.shape == (4, 3, 3, 3) and plain.down[0][0].weight.shape == (4, 1, 3, 3)
    extra = sum(p.numel() for p in coord.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == 2 * 4 * 9
    with torch.no_grad():  # zero weights on the position channels: the same function as the plain net
        w = coord.down[0][0].weight
        w.zero_()
        w[:, :1].copy_(plain.down[0][0].weight)
        for (n, a), (_, b) in zip(coord.named_parameters(), plain.named_parameters()):
            if n != "down.0.0.weight":
                a.copy_(b)
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(coord(x), plain(x))
    with pytest.raises(TypeError, match="UNetGN: coord_channels must be a bool"):
        unet_gn(key=Key(0), coord_channels=1)


@pytest.mark.parametrize("clip,coord", [(1e-3, False), (1e3, False), (1e-3, True)])
def test_fast_engine_equals_vmap_oracle_on_the_unet_patient_and_slice_units(clip, coord):
    net = unet_gn(key=Key(3), width=2, depth=2, groups=1, coord_channels=coord).double()  # two levels: nested skips
    model = PackedSegmenter(net)
    _, params, buffers = functionalize(model)
    assert_fast_engine_equals_vmap(model, params, buffers, _patients(1, [1, 3, 5, 2], size=8), clip,
                                   mask=torch.tensor([True, True, False, True]))


def test_patient_gradient_is_the_mean_over_its_slices_clipped_once():
    # Independent oracle: plain autograd on the patient's REAL slices (no packing, no padding, no vmap).
    model, params, buffers = _tiny(0)
    patients = _patients(4, [2, 5], size=8)
    k = 3
    x = patient_batch(patients, [0, 1], k, Key(9))
    out = segmentation_engine(model, FlatClipping(1e6), unit="patient", slices_per_patient=k)(params, buffers, (x,), None)
    for i, p in enumerate(patients):
        used = x[i, :, 2, 0, 0] > 0
        imgs, labs = x[i, used, :1], x[i, used, 1].long()
        assert int(used.sum()) == min(k, p.images.shape[0])
        for row in imgs:  # the drawn slices are the patient's own
            assert any(torch.equal(row, s) for s in p.images)
        loss = slice_losses(model.net(imgs), labs).mean()
        g = torch.autograd.grad(loss, list(model.net.parameters()))
        norm = torch.sqrt(sum((t**2).sum() for t in g))
        torch.testing.assert_close(out.grads.norms[i], norm, rtol=1e-9, atol=1e-12)


_TINY = _tiny(0)
_ENGINES: dict = {}


@settings(max_examples=10)
@given(seed=st.integers(0, 2**32 - 1), counts=st.lists(st.integers(1, 6), min_size=2, max_size=4),
       k=st.sampled_from([1, 2, 3, 8]), clip=st.sampled_from([1e-3, 0.05, 10.0]), drop=st.integers(0, 3))
def test_one_patient_moves_the_clipped_sum_by_at_most_C(seed, counts, k, clip, drop):
    """Invariant 3 with the patient as the unit: however many slices, one patient's contribution has
    norm <= C and adding/removing a patient moves the clipped sum by <= C (k = 8 >= every slice count:
    all of a patient's slices in one clipped unit, the rest padding)."""
    model, params, buffers = _TINY
    patients = _patients(seed, counts)
    drop %= len(counts)
    if (clip, k) not in _ENGINES:  # an engine caches its plan: build each once
        _ENGINES[clip, k] = segmentation_engine(model, FlatClipping(clip), unit="patient", slices_per_patient=k)
    engine = _ENGINES[clip, k]
    x = patient_batch(patients, range(len(counts)), k, Key(seed))
    full = engine(params, buffers, (x,), None)
    keep = torch.ones(len(counts), dtype=torch.bool)
    keep[drop] = False
    without = engine(params, buffers, (x,), keep)
    alone = engine(params, buffers, (x[drop:drop + 1],), None)
    diff = (flat(full.grads.grads) - flat(without.grads.grads)).norm()
    assert float(diff) <= clip * (1 + 1e-9)
    assert float(flat(alone.grads.grads).norm()) <= clip * (1 + 1e-9)
    torch.testing.assert_close(diff, flat(alone.grads.grads).norm(), rtol=1e-8, atol=1e-12)
    assert full.grads.sensitivity == clip and int(full.grads.num_real_rows) == len(counts)


def test_patient_batch_weights_padding_and_slice_draws():
    patients = _patients(0, [2, 7], size=8)
    x = patient_batch(patients, torch.tensor([0, 1]), 4, Key(5))
    assert x.shape == (2, 4, 3, 8, 8)
    torch.testing.assert_close(x[0, :, 2, 0, 0], torch.tensor([2.0, 2.0, 0.0, 0.0], dtype=x.dtype))  # K/s = 4/2
    assert torch.count_nonzero(x[0, 2:]) == 0  # padding slices are all zero
    torch.testing.assert_close(x[1, :, 2, 0, 0], torch.ones(4, dtype=x.dtype))
    drawn = [[torch.equal(r, s) for s in patients[1].images].index(True) for r in x[1, :, :1]]
    assert len(set(drawn)) == 4  # without replacement
    assert torch.equal(x, patient_batch(patients, [0, 1], 4, Key(5)))
    assert not torch.equal(x, patient_batch(patients, [0, 1], 4, Key(6)))
    # the mean of weight·loss over the K rows is the mean over the real slices
    model, params, buffers = _tiny(0)
    rows = packed_losses(model(x[0]))
    plain = packed_losses(model(x[0, :2].clone().index_fill_(1, torch.tensor([2]), 1.0)))
    torch.testing.assert_close(rows.mean(), plain.mean())
    assert patient_batch(patients, [], 4, Key(0)).shape == (0, 4, 3, 8, 8)
    with pytest.raises(ValueError, match="patient_batch: index 5 out of range"):
        patient_batch(patients, [5], 4, Key(0))


# ------------------------------------------------------------------------------------- metrics


def _dice_oracle(p: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    ps = {tuple(i) for i in np.argwhere(p)}
    ts = {tuple(i) for i in np.argwhere(t)}
    dice = 1.0 if not ps and not ts else 2 * len(ps & ts) / (len(ps) + len(ts))
    iou = 1.0 if not (ps | ts) else len(ps & ts) / len(ps | ts)
    return dice, iou


@given(seed=st.integers(0, 2**32 - 1), density=st.floats(0.0, 1.0), shape=st.sampled_from([(5,), (3, 4), (2, 3, 4)]))
def test_dice_and_iou_equal_the_set_oracle(seed, density, shape):
    rng = np.random.default_rng(seed)
    p = (rng.random(shape) < density).astype(np.int64)
    t = (rng.random(shape) < density).astype(np.int64)
    d, i = _dice_oracle(p, t)
    assert math.isclose(dice_score(torch.from_numpy(p), torch.from_numpy(t)), d, rel_tol=1e-12)
    assert math.isclose(iou_score(p, t), i, rel_tol=1e-12)
    assert math.isclose(dice_score(p, t), 2 * i / (1 + i), rel_tol=1e-12, abs_tol=1e-12)  # Dice = 2J/(1+J)


def test_metric_edge_cases_and_errors():
    z = torch.zeros(4, dtype=torch.int64)
    assert dice_score(z, z) == 1.0 and iou_score(z, z) == 1.0
    assert dice_score(z, torch.ones(4, dtype=torch.int64)) == 0.0
    with pytest.raises(ValueError, match="dice_score: prediction and truth must have the same shape"):
        dice_score(torch.zeros(3, dtype=torch.int64), z)
    with pytest.raises(ValueError, match="iou_score: prediction must be a binary mask"):
        iou_score(torch.full((4,), 2), z)
    with pytest.raises(ValueError, match="dice_score: truth must be a binary mask"):
        dice_score(z, torch.zeros(4))
    ci = mean_ci([0.5, 0.7, 0.9], seed=0, num_resamples=500)
    assert math.isclose(ci.estimate, 0.7) and 0.5 <= ci.lower <= 0.7 <= ci.upper <= 0.9
    flat = mean_ci([0.8] * 5, seed=1)
    assert flat.lower == flat.upper == flat.estimate == pytest.approx(0.8)
    with pytest.raises(ValueError, match="mean_ci: values must be a non-empty sequence"):
        mean_ci([], seed=0)
