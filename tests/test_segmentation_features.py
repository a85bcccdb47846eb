"""Fixed-feature segmenter (Tramèr & Boneh 2021): no trained feature parameters, fast engine ≡ vmap oracle,
patient-level clipping bound, filter-bank oracles, configuration wiring."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dpfunc.bridge import functionalize
from dpfunc.clipping import FlatClipping
from dpfunc.keys import Key
from dpfunc.models import MODELS, FeatureSegmenter, FixedFeatures, build_model, feature_segmenter
from dpfunc.segmentation import PackedSegmenter, SegmentationConfig, patient_batch, segmentation_engine
from dpfunc.segmentation._train import SegModel, _build, _fixed_features

from _segmentation_helpers import assert_fast_engine_equals_vmap, flat, random_patients

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def _patients(seed: int, counts, size: int = 16):
    return random_patients(seed, counts, size)


def _tiny(hidden: int, smooth: int = 0, histogram_scales=()):
    net = feature_segmenter(key=Key(5), image_size=16, hidden=hidden, smooth_kernel=smooth, class_prior=(0.9, 0.1),
                            histogram_scales=histogram_scales).double()
    model = PackedSegmenter(net)
    _, params, buffers = functionalize(model)
    return model, params, buffers


def test_fixed_features_have_no_parameters_and_only_the_head_is_trained():
    feats = FixedFeatures()
    assert list(feats.parameters()) == [] and list(feats.buffers()) == []
    model = build_model("features", key=Key(0), hidden=0)
    assert MODELS["features"] is feature_segmenter and isinstance(model, FeatureSegmenter)
    names = [n for n, _ in model.named_parameters()]
    assert names == ["head.0.weight", "head.0.bias"]  # the linear head: F·2 + 2
    assert sum(p.numel() for p in model.parameters()) == feats.num_features * 2 + 2 == 94
    _, params, buffers = functionalize(PackedSegmenter(model))
    assert all(k.startswith("net.head.") for k in params) and buffers == {}
    hidden = feature_segmenter(key=Key(0), hidden=8, smooth_kernel=3)
    assert sum(p.numel() for p in hidden.parameters()) == 46 * 8 + 8 + 8 * 2 + 2 + (2 * 2 * 9 + 2)


def test_features_are_a_fixed_function_of_each_slice():
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    f1 = FixedFeatures(32)(x)
    f2 = FixedFeatures(32)(x)  # rebuilt: no state, no randomness
    torch.testing.assert_close(f1, f2, rtol=0, atol=0)
    x2 = x.clone()
    x2[1] = 1 - x2[1]
    g = FixedFeatures(32)(x2)  # one slice changed: only its own features change
    torch.testing.assert_close(g[[0, 2]], f1[[0, 2]], rtol=0, atol=0)
    assert not torch.allclose(g[1], f1[1])
    assert torch.isfinite(FixedFeatures(32)(torch.zeros(1, 1, 32, 32))).all()  # flat image: sqrt kept finite


def test_blur_equals_a_direct_2d_convolution_oracle():
    feats = FixedFeatures(64, blur_scales=(2.0,), edge_scales=(), std_scales=(), bin_scales=(), position=False)
    x = torch.rand(2, 1, 40, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    k1 = torch.tensor([math.exp(-t * t / 8) for t in range(-6, 7)], dtype=torch.float64)
    k1 /= k1.sum()
    oracle = F.conv2d(F.pad(x, (6, 6, 6, 6), mode="replicate"), torch.outer(k1, k1)[None, None])
    torch.testing.assert_close(feats(x)[:, 1:2], oracle, rtol=1e-12, atol=1e-12)
    const = torch.full((1, 1, 40, 40), 0.3, dtype=torch.float64)
    torch.testing.assert_close(feats(const)[:, 1:2], const)  # a constant image stays constant at the border too


def test_soft_bins_and_position_channels():
    feats = FixedFeatures(16, blur_scales=(), edge_scales=(), std_scales=(), bin_scales=(1.0,), bin_centres=(0.2, 0.5, 0.8))
    out = feats(torch.full((1, 1, 16, 16), 0.5))
    assert out.shape == (1, 1 + 3 + 2, 16, 16)
    torch.testing.assert_close(out[0, 2], torch.ones(16, 16))  # the bin at the intensity: 1
    torch.testing.assert_close(out[0, 1], torch.full((16, 16), math.exp(-0.5)))  # one bin width away
    assert float(out[0, 4, 0, 0]) == -1 and float(out[0, 4, -1, 0]) == 1 and float(out[0, 5, 0, -1]) == 1
    prod = FixedFeatures(16, blur_scales=(), edge_scales=(), std_scales=(), bin_scales=(1.0,), bin_centres=(0.2, 0.5, 0.8),
                         position_products=True)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    more, base = prod(x), feats(x)
    assert prod.num_features == more.shape[1] == 1 + 3 + 2 + 6
    torch.testing.assert_close(more[:, :6], base)  # the products come after the plain features
    torch.testing.assert_close(more[:, 6:9], base[:, 1:4] * base[:, 4:5])  # bins × row
    torch.testing.assert_close(more[:, 9:12], base[:, 1:4] * base[:, 5:6])  # bins × column
    with pytest.raises(ValueError, match="FixedFeatures: position_products=True needs position=True"):
        FixedFeatures(position=False, position_products=True)


def test_local_histograms_equal_a_direct_2d_convolution_oracle_of_the_soft_bins():
    centres = (0.2, 0.35, 0.5, 0.65, 0.8)
    plain = FixedFeatures(64, blur_scales=(), edge_scales=(), std_scales=(), bin_scales=(1.0, 2.0), bin_centres=centres)
    hist = FixedFeatures(64, blur_scales=(), edge_scales=(), std_scales=(), bin_scales=(1.0, 2.0), bin_centres=centres,
                         histogram_scales=(3.0, 1.5))
    x = torch.rand(2, 1, 30, 30, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    out = hist(x)
    assert hist.num_features == out.shape[1] == plain.num_features + 2 * len(centres)
    torch.testing.assert_close(out[:, :plain.num_features], plain(x), rtol=0, atol=0)  # appended last: the rest unchanged

    def gauss2d(sigma):  # the oracle: one 2-D kernel (outer product), replicate padding, no separability
        r = math.ceil(3 * sigma)
        k1 = torch.tensor([math.exp(-t * t / (2 * sigma * sigma)) for t in range(-r, r + 1)], dtype=torch.float64)
        k1 /= k1.sum()
        return torch.outer(k1, k1)[None, None], r

    def blur2d(img, sigma):
        k, r = gauss2d(sigma)
        return torch.cat([F.conv2d(F.pad(img[:, c:c + 1], (r, r, r, r), mode="replicate"), k) for c in range(img.shape[1])], 1)

    c = torch.tensor(centres, dtype=torch.float64).view(1, -1, 1, 1)
    bins = torch.exp(-((blur2d(x, 1.0) - c) ** 2) / (2 * 0.15**2))  # the FIRST bin scale's bins, width = the centre gap
    n = plain.num_features
    torch.testing.assert_close(out[:, n:n + 5], blur2d(bins, 3.0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out[:, n + 5:], blur2d(bins, 1.5), rtol=1e-10, atol=1e-12)
    assert float(out[:, n:].min()) >= 0 and float(out[:, n:].max()) <= 1  # shares of a neighbourhood
    flat_img = torch.full((1, 1, 30, 30), 0.5, dtype=torch.float64)  # a uniform region: its histogram is its bins
    torch.testing.assert_close(hist(flat_img)[:, n:n + 5], hist(flat_img)[:, 1:6])
    with pytest.raises(ValueError, match="FixedFeatures: histogram_scales=.* needs bin_scales"):
        FixedFeatures(bin_scales=(), histogram_scales=(3.0,))
    with pytest.raises(ValueError, match="FixedFeatures: histogram_scales must be positive"):
        FixedFeatures(histogram_scales=(-1.0,))
    with pytest.raises(ValueError, match="SegmentationConfig: local_histograms applies to model=SegModel.FEATURES"):
        SegmentationConfig(local_histograms=True)


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="FixedFeatures: blur_scales must be positive"):
        FixedFeatures(blur_scales=(0.0,))
    with pytest.raises(ValueError, match="FixedFeatures: bin_centres must be"):
        FixedFeatures(bin_centres=(0.5, 0.4))
    with pytest.raises(ValueError, match="FeatureSegmenter: smooth_kernel must be 0 or odd"):
        feature_segmenter(key=Key(0), smooth_kernel=2)
    with pytest.raises(ValueError, match="FixedFeatures: input must be"):
        FixedFeatures()(torch.rand(1, 2, 8, 8))
    with pytest.raises(ValueError, match="SegmentationConfig: pretrain_steps and coord_channels apply to model=SegModel.UNET"):
        SegmentationConfig(model="features", coord_channels=True)
    with pytest.raises(ValueError, match="SegmentationConfig: head_smooth must be 0 or odd"):
        SegmentationConfig(model="features", head_smooth=4)


def test_config_builds_the_feature_model_with_the_prior():
    cfg = SegmentationConfig(model="features", head_hidden=0, head_smooth=0, position_products=False, image_size=48)  # 48: no 2**depth constraint here
    assert cfg.model is SegModel.FEATURES and cfg.to_dict()["model"] == "features"
    model, apply_fn, params, buffers = _build(cfg)
    # the loader precomputes the features (channel 0 = the slice): the trained model is the head alone
    assert model.image_channels == FixedFeatures(48).num_features and set(params) == {"net.0.weight", "net.0.bias"}
    torch.testing.assert_close(params["net.0.bias"], torch.tensor([math.log(0.95), math.log(0.05)]))
    full = feature_segmenter(key=Key(cfg.seed).fold_in(1), image_size=48, hidden=0, class_prior=(0.95, 0.05))
    x = torch.rand(2, 1, 48, 48, generator=torch.Generator().manual_seed(3))
    packed = torch.cat([_fixed_features(cfg, x), torch.zeros(2, 2, 48, 48)], 1)  # the same function as the end-to-end module
    torch.testing.assert_close(apply_fn(params, buffers, packed)[0], full(x))
    assert isinstance(_build(SegmentationConfig())[0].net, type(build_model("unet", key=Key(0))))  # default unchanged
    recipe = _build(SegmentationConfig(model="features"))[2]  # the README recipe: bins × position, linear head, 3×3 logit conv
    assert sum(p.numel() for p in recipe.values()) == 114 * 2 + 2 + 2 * 2 * 9 + 2 == 268
    cfg_lh = SegmentationConfig(model="features", local_histograms=True)  # + local histograms: 148 channels, 336 parameters
    model, apply_fn, params, buffers = _build(cfg_lh)
    assert model.image_channels == 148 and sum(p.numel() for p in params.values()) == 148 * 2 + 2 + 2 * 2 * 9 + 2 == 336
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(4))
    full = feature_segmenter(key=Key(0).fold_in(1), class_prior=(0.95, 0.05), smooth_kernel=3, hidden=0, position_products=True,
                             histogram_scales=(3.0, 6.0))
    packed = torch.cat([_fixed_features(cfg_lh, x), torch.zeros(2, 2, 64, 64)], 1)
    torch.testing.assert_close(apply_fn(params, buffers, packed)[0], full(x))


@pytest.mark.parametrize("hidden,smooth,clip,hist", [(0, 0, 1e-3, ()), (0, 3, 1e3, ()), (4, 0, 1e-3, ()), (0, 3, 1e-3, (3.0, 6.0))])
def test_fast_engine_equals_vmap_oracle_on_the_feature_model(hidden, smooth, clip, hist):
    model, params, buffers = _tiny(hidden, smooth, hist)
    assert_fast_engine_equals_vmap(model, params, buffers, _patients(1, [1, 3, 5, 2]), clip,
                                   mask=torch.tensor([True, False, True, True]))


_LINEAR = {False: _tiny(0), True: _tiny(0, 3, (3.0, 6.0))}  # plain bank / + local histograms and the 3×3 logit conv
_ENGINES: dict = {}


@settings(max_examples=10)
@given(seed=st.integers(0, 2**32 - 1), counts=st.lists(st.integers(1, 6), min_size=2, max_size=4),
       k=st.sampled_from([1, 3, 8]), clip=st.sampled_from([1e-3, 0.05, 10.0]), drop=st.integers(0, 3), hist=st.booleans())
def test_one_patient_moves_the_clipped_sum_by_at_most_C_with_the_feature_model(seed, counts, k, clip, drop, hist):
    """The patient-level sensitivity bound holds unchanged for the feature model (with and without the local
    histograms): one patient's contribution (all of their slices, k = 8 >= every count) has norm <= C, and
    removing them moves the clipped sum by exactly that contribution."""
    model, params, buffers = _LINEAR[hist]
    patients = _patients(seed, counts)
    drop %= len(counts)
    if (clip, k, hist) not in _ENGINES:
        _ENGINES[clip, k, hist] = segmentation_engine(model, FlatClipping(clip), unit="patient", slices_per_patient=k)
    engine = _ENGINES[clip, k, hist]
    x = patient_batch(patients, range(len(counts)), k, Key(seed))
    keep = torch.ones(len(counts), dtype=torch.bool)
    keep[drop] = False
    full, without = engine(params, buffers, (x,), None), engine(params, buffers, (x,), keep)
    alone = engine(params, buffers, (x[drop:drop + 1],), None)
    diff = (flat(full.grads.grads) - flat(without.grads.grads)).norm()
    assert float(diff) <= clip * (1 + 1e-9) and float(flat(alone.grads.grads).norm()) <= clip * (1 + 1e-9)
    torch.testing.assert_close(diff, flat(alone.grads.grads).norm(), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("local_histograms,volume_norm", [(False, "none"), (True, "none"), (True, "rank")])
def test_feature_model_trains_under_patient_dp_and_its_run_folder_evaluates(tmp_path, local_histograms, volume_norm):
    pytest.importorskip("nibabel", reason="the phantom path writes NIfTI: pip install 'dpfunc[segmentation]'")
    from dpfunc.segmentation import evaluate_segmentation_run, make_phantoms, train_segmentation

    data = make_phantoms(tmp_path / "liver", patients=6, seed=3, size=32, slices=6, progress=False)
    cfg = SegmentationConfig(model="features", head_hidden=0, head_smooth=3, accountant="rdp", image_size=32, batch_size=4,
                             slices_per_patient=2, epochs=2, learning_rate=0.02, epsilon=8.0, local_histograms=local_histograms,
                             volume_norm=volume_norm)
    run = tmp_path / "run"
    result = train_segmentation(cfg, data_dir=data, run_dir=run, progress=False, log=lambda s: None, bootstrap_resamples=20)
    assert result.config["model"] == "features" and result.config["local_histograms"] is local_histograms
    assert result.config["volume_norm"] == volume_norm
    assert 0 <= result.test["dice"] <= 1 and result.epsilon <= 8.0 + 1e-9
    assert (run / "overlays.png").exists()
    again = evaluate_segmentation_run(run, bootstrap_resamples=20)  # the loader recomputes the same fixed features
    assert again.test["dice"] == pytest.approx(result.test["dice"], abs=1e-12)


def test_gaussian_window_is_the_one_helper_of_the_bank_and_of_ssim():
    """dpfunc._gaussian.gaussian_window against the closed form, with both callers' radius conventions."""
    from dpfunc._gaussian import gaussian_window
    from dpfunc.attacks.metrics import _gaussian_window
    from dpfunc.models._features import _gaussian_kernel

    for sigma, radius in ((1.0, 3), (1.5, 5), (0.3, 1), (2.0, 0)):
        w = gaussian_window(sigma, radius)
        raw = [math.exp(-t * t / (2 * sigma * sigma)) for t in range(-radius, radius + 1)]
        torch.testing.assert_close(w, torch.tensor([v / sum(raw) for v in raw], dtype=torch.float64), rtol=1e-14, atol=1e-15)
        assert torch.equal(w, w.flip(0))
    assert _gaussian_kernel(2.0).numel() == 2 * 6 + 1 and _gaussian_kernel(0.1).numel() == 3  # ceil(3σ), at least 1
    assert _gaussian_window(1.5, 3.5).numel() == 11  # scikit-image's int(truncate·σ + 0.5): 11×11 for SSIM's σ 1.5
    with pytest.raises(ValueError, match="gaussian_window: sigma"):
        gaussian_window(0.0, 2)
    with pytest.raises(ValueError, match="gaussian_window: radius"):
        gaussian_window(1.0, -1)
