"""Per-volume intensity normalisation (``VolumeNorm.RANK``): against a loop oracle, its invariances, that it is a
function of one patient alone (so the patient-level sensitivity bound holds with it in the pipeline), its wiring."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpfunc.clipping import FlatClipping
from dpfunc.keys import Key
from dpfunc.models import FixedFeatures
from dpfunc.segmentation import (PatientVolume, SegmentationConfig, VolumeNorm, normalize_volume, patient_batch, rank_normalize,
                                 segmentation_engine)
from dpfunc.segmentation._train import RANK_BIN_CENTRES, _bank_kwargs, _build

from _segmentation_helpers import flat

pytestmark = pytest.mark.usefixtures("one_thread")


def _volume(seed: int, slices: int, size: int = 8, levels: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Random windowed volume with air (0) and bone (1) pixels and, with ``levels``, quantised values (ties)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(slices, 1, size, size, generator=g, dtype=dtype)
    if levels:
        x = (x * levels).floor() / levels
    u = torch.rand(x.shape, generator=g, dtype=dtype)
    x = torch.where(u < 0.15, torch.zeros_like(x), x)
    return torch.where(u > 0.95, torch.ones_like(x), x)


def _oracle(x: torch.Tensor) -> torch.Tensor:
    """One pixel at a time: the share of the volume's in-window pixels that are <= it."""
    flat_x = x.flatten().tolist()
    inside = [v for v in flat_x if 0 < v < 1]
    out = [v if not 0 < v < 1 else sum(w <= v for w in inside) / len(inside) for v in flat_x]
    return torch.tensor(out, dtype=x.dtype).view_as(x)


@settings(max_examples=15)
@given(seed=st.integers(0, 2**32 - 1), slices=st.integers(1, 3), levels=st.sampled_from([0, 5, 40]))
def test_rank_normalize_equals_the_loop_oracle(seed, slices, levels):
    x = _volume(seed, slices, size=6, levels=levels)
    out = rank_normalize(x)
    torch.testing.assert_close(out, _oracle(x), rtol=0, atol=1e-12)
    assert out.shape == x.shape and out.dtype == x.dtype and float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.equal(out[x == 0], x[x == 0]) and torch.equal(out[x == 1], x[x == 1])  # outside the window: kept
    torch.testing.assert_close(x, _volume(seed, slices, size=6, levels=levels), rtol=0, atol=0)  # the input is not modified


@settings(max_examples=15)
@given(seed=st.integers(0, 2**32 - 1), power=st.floats(0.3, 3.0), low=st.floats(0.01, 0.3), span=st.floats(0.2, 0.69))
def test_rank_normalize_is_invariant_to_a_per_patient_monotone_intensity_change(seed, power, low, span):
    """A brighter / darker / more contrasted patient (any strictly increasing map of the in-window intensities that
    keeps them in the window) gets exactly the same normalised volume: what the head reads no longer depends on it."""
    x = _volume(seed, 2, levels=30)
    inside = (x > 0) & (x < 1)
    y = x.clone()
    y[inside] = low + span * x[inside] ** power  # strictly increasing, (0, 1) -> (low, low + span) inside the window
    assert not torch.equal(y, x)
    torch.testing.assert_close(rank_normalize(y), rank_normalize(x), rtol=0, atol=0)


def test_rank_normalize_edge_cases_and_bad_input():
    empty = torch.zeros(2, 1, 4, 4)
    torch.testing.assert_close(rank_normalize(empty), empty)  # no in-window pixel: unchanged
    one = torch.full((1, 1, 3, 3), 0.4)
    torch.testing.assert_close(rank_normalize(one), torch.ones(1, 1, 3, 3))  # all tied: every pixel is <= itself
    assert normalize_volume(one, VolumeNorm.NONE) is one
    with pytest.raises(TypeError, match="rank_normalize: images must be a floating tensor"):
        rank_normalize(torch.zeros(1, 1, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"rank_normalize: images must be \(S, 1, H, W\)"):
        rank_normalize(torch.rand(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"rank_normalize: images must be windowed intensities in \[0, 1\]"):
        rank_normalize(torch.full((1, 1, 2, 2), 1.5))
    with pytest.raises(ValueError, match=r"rank_normalize: images must be windowed intensities"):
        rank_normalize(torch.full((1, 1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="SegmentationConfig: volume_norm must be"):
        SegmentationConfig(volume_norm="zscore")


_HEAD: dict = {}


def _pipeline(volumes, labels):
    """What training does with ``volume_norm=RANK``: each patient normalised ALONE, then the fixed bank per slice."""
    bank = FixedFeatures(16, bin_centres=RANK_BIN_CENTRES, histogram_scales=(3.0,))
    return [PatientVolume(f"p{i}", bank(rank_normalize(v)), lab) for i, (v, lab) in enumerate(zip(volumes, labels))]


@settings(max_examples=10)
@given(seed=st.integers(0, 2**32 - 1), counts=st.lists(st.integers(1, 4), min_size=2, max_size=4), who=st.integers(0, 3),
       clip=st.sampled_from([1e-3, 0.05, 10.0]))
def test_with_rank_normalisation_one_patient_moves_the_clipped_sum_by_at_most_C(seed, counts, who, clip):
    """The normalisation is per patient, so replacing one patient's volume (any other volume, any brightness) leaves
    every other patient's clipped gradient bit-identical, and removing that patient moves the clipped sum by <= C."""
    from dpfunc.bridge import functionalize
    from dpfunc.models import feature_segmenter
    from dpfunc.segmentation import PackedSegmenter

    who %= len(counts)
    if "model" not in _HEAD:
        net = feature_segmenter(key=Key(3), image_size=16, hidden=0, smooth_kernel=3, class_prior=(0.9, 0.1),
                                bin_centres=RANK_BIN_CENTRES, histogram_scales=(3.0,)).double()
        model = PackedSegmenter(net.head, image_channels=net.features.num_features)
        _HEAD["model"] = model
        _HEAD["params"], _HEAD["buffers"] = functionalize(model)[1:]
    model, params, buffers = _HEAD["model"], _HEAD["params"], _HEAD["buffers"]
    if clip not in _HEAD:
        _HEAD[clip] = segmentation_engine(model, FlatClipping(clip), unit="patient", slices_per_patient=4)
    engine = _HEAD[clip]
    g = torch.Generator().manual_seed(seed)
    volumes = [_volume(seed + i, s, size=16, levels=50) for i, s in enumerate(counts)]
    labels = [(torch.rand(s, 16, 16, generator=g) > 0.7).long() for s in counts]
    other = [v.clone() for v in volumes]
    other[who] = (_volume(seed ^ 0x5EED, counts[who], size=16) * 0.5 + 0.25)  # another patient in their place
    a, b = _pipeline(volumes, labels), _pipeline(other, labels)
    xa = patient_batch(a, range(len(counts)), 4, Key(seed))
    xb = patient_batch(b, range(len(counts)), 4, Key(seed))
    rest = [i for i in range(len(counts)) if i != who]
    torch.testing.assert_close(xa[rest], xb[rest], rtol=0, atol=0)  # nobody else's normalised input changed
    keep = torch.ones(len(counts), dtype=torch.bool)
    keep[who] = False
    full, without = engine(params, buffers, (xa,), None), engine(params, buffers, (xa,), keep)
    alone = engine(params, buffers, (xa[who:who + 1],), None)
    diff = (flat(full.grads.grads) - flat(without.grads.grads)).norm()
    assert float(diff) <= clip * (1 + 1e-9) and float(flat(alone.grads.grads).norm()) <= clip * (1 + 1e-9)
    swapped = engine(params, buffers, (xb,), None)
    assert float((flat(full.grads.grads) - flat(swapped.grads.grads)).norm()) <= 2 * clip * (1 + 1e-9)
    torch.testing.assert_close(flat(engine(params, buffers, (xb,), keep).grads.grads), flat(without.grads.grads),
                               rtol=0, atol=0)


def test_config_wires_the_rank_bank():
    cfg = SegmentationConfig(model="features", local_histograms=True, volume_norm="rank")
    assert cfg.volume_norm is VolumeNorm.RANK and cfg.to_dict()["volume_norm"] == "rank"
    assert _bank_kwargs(cfg)["bin_centres"] == RANK_BIN_CENTRES and len(RANK_BIN_CENTRES) == 17
    assert "bin_centres" not in _bank_kwargs(SegmentationConfig(model="features"))  # the default bank is unchanged
    model, _, params, _ = _build(cfg)  # the same channel and parameter counts as 'features+lh': 148 / 336
    assert model.image_channels == 148 and sum(p.numel() for p in params.values()) == 336
    from dpfunc.cli import build_parser

    args = build_parser().parse_args(["segment", "--data-dir", "x", "--model", "features", "--volume-norm", "rank"])
    from dpfunc.segmentation._cli_segment import _config

    assert _config(args).volume_norm is VolumeNorm.RANK


def test_rank_normalisation_is_refused_for_private_slice_level_runs():
    """Rank normalisation reads the whole volume, so under unit='slice' one slice changes the other slices'
    inputs: neighbouring datasets would differ in many examples. A private slice-level run refuses it; the
    patient unit and the non-private baseline keep it."""
    with pytest.raises(ValueError, match=r"volume_norm='rank' needs unit='patient' in a private run"):
        SegmentationConfig(model="features", unit="slice", volume_norm="rank", epsilon=8.0)
    assert SegmentationConfig(model="features", unit="patient", volume_norm="rank", epsilon=8.0).volume_norm is VolumeNorm.RANK
    assert SegmentationConfig(model="features", unit="slice", volume_norm="rank", private=False).unit.value == "slice"
    assert SegmentationConfig(model="features", unit="slice", epsilon=8.0).volume_norm is VolumeNorm.NONE
