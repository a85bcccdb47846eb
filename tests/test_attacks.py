"""Gradient inversion and image metrics: oracles (scipy, scikit-image, loops) and attack outcomes."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dpfunc.attacks import (
    DLGConfig,
    InvertingGradientsConfig,
    Scenario,
    SharedUpdate,
    ThreatModel,
    dlg,
    infer_label_counts,
    invert_gradients,
    match_reconstructions,
    model_update,
    psnr,
    recover_label,
    score_reconstructions,
    shared_update,
    ssim,
)
from dpfunc.attacks._hungarian import linear_sum_assignment
from dpfunc import DPConfig, FlatClipping, clip_and_sum, dp_aggregate, per_example_grads
from dpfunc.keys import Key
from dpfunc.models import SmallCNN

SEEDS = st.integers(0, 2**32 - 1)
SIDE = 12


def functionalize(module):
    """``(apply_fn, params, buffers)`` of a module, the way ``dpfunc.bridge.functionalize`` returns them."""
    params = {k: v.detach().clone() for k, v in module.named_parameters()}
    return (lambda p, b, x: torch.func.functional_call(module, (p, b), (x,))), params, {}


def tiny_model(seed=0, widths=(8, 16), groups=4):
    return functionalize(SmallCNN(key=Key(seed), widths=widths, groups=groups))


def smooth_image(seed: int, side: int = SIDE) -> torch.Tensor:
    """A (1, 1, side, side) image in [-1, 1]: two Gaussian blobs (smooth, like the TV prior expects)."""
    g = Key(seed).generator()
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")

    def blob(w):
        c = torch.rand(2, generator=g) * 1.2 - 0.6
        return torch.exp(-((xx - c[0]) ** 2 + (yy - c[1]) ** 2) / (2 * w * w))

    return (blob(0.3) - 0.7 * blob(0.25)).clamp(-1, 1)[None, None]


# ---- metrics ---------------------------------------------------------------------------------------


@given(seed=SEEDS, n=st.integers(1, 7), m=st.integers(1, 7))
def test_hungarian_matches_scipy(seed, n, m):
    from scipy.optimize import linear_sum_assignment as oracle

    cost = torch.rand(n, m, generator=Key(seed).generator(), dtype=torch.float64).numpy()
    rows, cols = linear_sum_assignment(cost)
    r2, c2 = oracle(cost)
    assert len(rows) == min(n, m) and len(set(rows)) == len(rows) and len(set(cols)) == len(cols)
    assert cost[rows, cols].sum() == pytest.approx(cost[r2, c2].sum(), abs=1e-12)
    assert np.all(np.diff(rows) > 0)


def test_hungarian_refuses_nan():
    with pytest.raises(ValueError, match="linear_sum_assignment: cost must be finite"):
        linear_sum_assignment(np.array([[0.0, np.nan], [1.0, 2.0]]))


@given(seed=SEEDS, side=st.integers(11, 20), channels=st.integers(1, 3), blur=st.floats(0.0, 1.0))
def test_ssim_matches_scikit_image(seed, side, channels, blur):
    from skimage.metrics import structural_similarity

    g = Key(seed).generator()
    x = torch.rand(2, channels, side, side, generator=g, dtype=torch.float64)
    y = (1 - blur) * x + blur * torch.rand(x.shape, generator=g, dtype=torch.float64)
    ours = ssim(x, y, data_range=1.0)
    for i in range(2):
        ref = structural_similarity(x[i].numpy(), y[i].numpy(), data_range=1.0, channel_axis=0,
                                    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert float(ours[i]) == pytest.approx(ref, abs=1e-10)


def test_ssim_small_window_matches_scikit_image_and_identity():
    from skimage.metrics import structural_similarity

    x = torch.rand(1, 1, 8, 8, generator=Key(1).generator(), dtype=torch.float64) * 2 - 1
    y = x.flip(-1)
    ref = structural_similarity(x[0, 0].numpy(), y[0, 0].numpy(), data_range=2.0, gaussian_weights=True, sigma=0.5,
                                use_sample_covariance=False)
    assert float(ssim(x, y, data_range=2.0, sigma=0.5)) == pytest.approx(ref, abs=1e-10)
    assert float(ssim(x, x, data_range=2.0, sigma=0.5)) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="smaller than the 11×11 window"):
        ssim(x, y, data_range=2.0)


def test_psnr_closed_form_and_errors():
    x = torch.zeros(3, 1, 4, 4)
    assert psnr(x, x + 0.1, data_range=1.0).tolist() == pytest.approx([20.0] * 3)
    assert psnr(x, x + 0.2, data_range=2.0).tolist() == pytest.approx([20.0] * 3)  # shift-invariant in range
    assert math.isinf(float(psnr(x, x, data_range=1.0)[0]))
    with pytest.raises(ValueError, match="psnr: data_range must be a finite number"):
        psnr(x, x, data_range=0.0)
    with pytest.raises(ValueError, match="psnr: images must be two"):
        psnr(x, x[:2], data_range=1.0)
    with pytest.raises(ValueError, match="psnr: images must be finite"):
        psnr(x, x * float("nan"), data_range=1.0)


@given(seed=SEEDS)
def test_matching_undoes_a_permutation(seed):
    g = Key(seed).generator()
    originals = torch.rand(6, 1, 5, 5, generator=g)
    perm = torch.randperm(6, generator=g)
    rec = originals[perm] + 0.01 * torch.randn(6, 1, 5, 5, generator=g)
    order = match_reconstructions(rec, originals)
    assert torch.equal(perm[order], torch.arange(6))
    scores = score_reconstructions(rec, originals, data_range=1.0, mean_image=originals.mean(0),
                                   random_images=originals.roll(1, 0), ssim_sigma=0.5)
    assert bool((scores.psnr > scores.baseline_mean_psnr).all())
    s = scores.summary()
    assert len(s["psnr"]) == 6 and s["order"] == order.tolist() and s["psnr_median"] > 30


# ---- the attacker's model of an update -------------------------------------------------------------


def test_clipped_model_update_equals_a_loop_of_clipped_gradients():
    apply_fn, params, buffers = tiny_model()
    g = Key(2).generator()
    x, y = torch.randn(3, 1, SIDE, SIDE, generator=g), torch.tensor([0, 1, 1])
    got = model_update(apply_fn, params, buffers, x, y, normalizer=7.0, max_grad_norm=0.05)
    want = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(3):
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        loss = F.cross_entropy(apply_fn(p, buffers, x[i : i + 1]), y[i : i + 1])
        gi = torch.autograd.grad(loss, list(p.values()))
        norm = torch.sqrt(sum(t.pow(2).sum() for t in gi))
        for k, t in zip(p, gi):
            want[k] += t * min(1.0, 0.05 / float(norm)) / 7.0
    for k in params:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-8)
    one = model_update(apply_fn, params, buffers, x[:1], y[:1], normalizer=7.0, max_grad_norm=0.05)
    both = model_update(apply_fn, params, buffers, x[:1].expand(2, -1, -1, -1), y[:1].expand(2), normalizer=14.0, max_grad_norm=0.05)
    for k in params:  # the B = 1 shortcut equals the per-example (vmap) path
        torch.testing.assert_close(one[k], both[k], rtol=1e-5, atol=1e-8)


def test_shared_update_scenarios_are_dpsgd_site_updates():
    apply_fn, params, buffers = tiny_model()
    threat = ThreatModel(noise_multiplier=1.0, max_grad_norm=0.05, sampling_rate=0.5, num_examples=8, sites=3)
    batches = [(torch.randn(2, 1, SIDE, SIDE, generator=Key(s).generator()), torch.tensor([0, 1])) for s in range(3)]
    clip = shared_update("clip", apply_fn, params, buffers, batches[:1], threat=threat, key=Key(0))
    want = model_update(apply_fn, params, buffers, *batches[0], normalizer=4.0, max_grad_norm=0.05)
    for k in params:
        torch.testing.assert_close(clip.grads[k], want[k], rtol=1e-5, atol=1e-9)
    assert (clip.batch_size, clip.normalizer, clip.max_grad_norm) == (2, 4.0, 0.05)
    dp1 = shared_update(Scenario.DP, apply_fn, params, buffers, batches[:1], threat=threat, key=Key(0))
    dp2 = shared_update(Scenario.DP, apply_fn, params, buffers, batches[:1], threat=threat, key=Key(0))
    noise = torch.cat([(dp1.grads[k] - clip.grads[k]).reshape(-1) for k in params]) * 4.0
    assert all(torch.equal(dp1.grads[k], dp2.grads[k]) for k in params)  # same key, same noise
    assert float(noise.std()) == pytest.approx(0.05, rel=0.15)  # σ·C per coordinate before normalising
    sec = shared_update("secagg", apply_fn, params, buffers, batches, threat=threat, key=Key(0))
    parts = []
    for s, (x, y) in enumerate(batches):  # each site: one dpfunc DP-SGD aggregation with its own key
        per = per_example_grads(lambda p, b, xi, yi: F.cross_entropy(apply_fn(p, b, xi[None]), yi[None]), params, buffers,
                                x, y, in_dims=(None, 0, 0))
        tx = dp_aggregate(DPConfig(FlatClipping(0.05), 1.0, 0.5, 8), Key(0).fold_in(s))
        parts.append(tx.update(clip_and_sum(per, FlatClipping(0.05)), tx.init(params), params)[0])
    for k in params:  # the server's view under secure aggregation: the sum of the site updates
        torch.testing.assert_close(sec.grads[k], sum(p[k] for p in parts), rtol=1e-5, atol=1e-7)
    assert sec.batch_size == 6
    with pytest.raises(ValueError, match="shared_update: scenario 'secagg' needs 3 site batch"):
        shared_update("secagg", apply_fn, params, buffers, batches[:1], threat=threat, key=Key(0))
    with pytest.raises(ValueError, match="shared_update: scenario must be a Scenario"):
        shared_update("bogus", apply_fn, params, buffers, batches[:1], threat=threat, key=Key(0))


# ---- labels ------------------------------------------------------------------------------------------


@settings(max_examples=10)
@given(seed=SEEDS, label=st.integers(0, 2), scenario=st.sampled_from(["nonprivate", "clip"]))
def test_idlg_label_recovery_is_exact_for_one_image(seed, label, scenario):
    apply_fn, params, buffers = functionalize(SmallCNN(num_classes=3, key=Key(seed), widths=(4,), groups=2))
    x = torch.randn(1, 1, 6, 6, generator=Key(seed).fold_in(1).generator())
    up = shared_update(scenario, apply_fn, params, buffers, [(x, torch.tensor([label]))],
                       threat=ThreatModel(0.0, max_grad_norm=1e-3), key=Key(0))
    assert recover_label(up) == label


@given(seed=SEEDS)
def test_label_counts_are_exact_given_the_mean_prediction(seed):
    apply_fn, params, buffers = functionalize(SmallCNN(num_classes=3, key=Key(seed), widths=(4,), groups=2))
    g = Key(seed).fold_in(1).generator()
    x, y = torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    up = shared_update("nonprivate", apply_fn, params, buffers, [(x, y)], threat=ThreatModel(0.0), key=Key(0))
    with torch.no_grad():
        mean_probs = apply_fn(params, buffers, x).softmax(-1).mean(0)
    assert torch.equal(infer_label_counts(up, mean_probs), torch.bincount(y, minlength=3))
    clipped = up._replace(max_grad_norm=1.0)
    with pytest.raises(ValueError, match="infer_label_counts: the update was clipped"):
        infer_label_counts(clipped, mean_probs)


# ---- the attacks: they work without protection and fail under DP ----------------------------------


def test_inverting_gradients_recovers_one_image_unless_dp():
    apply_fn, params, buffers = tiny_model()
    x = smooth_image(3)
    baseline = float(psnr(torch.zeros_like(x), x, data_range=2.0))  # the data-free guess
    cfg = InvertingGradientsConfig(iterations=300, tv_weight=0.01)
    threat = ThreatModel(noise_multiplier=1.5)  # the case study's σ for ε = 3
    out = {}
    for scenario in ("nonprivate", "dp"):
        up = shared_update(scenario, apply_fn, params, buffers, [(x, torch.tensor([1]))], threat=threat, key=Key(5))
        res = invert_gradients(apply_fn, params, buffers, up, torch.tensor([recover_label(up)]), (1, SIDE, SIDE),
                               key=Key(1), config=cfg)
        assert res.images.min() >= -1 and res.images.max() <= 1  # boxed
        out[scenario] = float(psnr(res.images, x, data_range=2.0))
    assert out["nonprivate"] >= 25.0, out
    assert out["dp"] <= baseline + 1.0, (out, baseline)


def test_dlg_lowers_the_gradient_distance_and_beats_the_mean_image():
    apply_fn, params, buffers = tiny_model()
    x = smooth_image(3)
    up = shared_update("nonprivate", apply_fn, params, buffers, [(x, torch.tensor([1]))], threat=ThreatModel(0.0), key=Key(0))
    first = dlg(apply_fn, params, buffers, up, torch.tensor([1]), (1, SIDE, SIDE), key=Key(1), config=DLGConfig(iterations=1))
    res = dlg(apply_fn, params, buffers, up, torch.tensor([1]), (1, SIDE, SIDE), key=Key(1), config=DLGConfig(iterations=60, learning_rate=0.1))
    assert res.objective < 0.2 * first.objective
    assert float(psnr(res.images, x, data_range=2.0)) > float(psnr(torch.zeros_like(x), x, data_range=2.0)) + 3.0


def test_attack_arguments_are_checked():
    apply_fn, params, buffers = tiny_model()
    up = SharedUpdate({k: torch.zeros_like(v) for k, v in params.items()}, 1, 1.0)
    with pytest.raises(ValueError, match="InvertingGradientsConfig: iterations must be an int >= 1, got 0"):
        InvertingGradientsConfig(iterations=0)
    with pytest.raises(ValueError, match="DLGConfig: box must be"):
        DLGConfig(box=(1.0, -1.0))
    with pytest.raises(ValueError, match=r"invert_gradients: labels must be an int64 tensor of shape \(1,\)"):
        invert_gradients(apply_fn, params, buffers, up, torch.tensor([0, 1]), (1, SIDE, SIDE), key=Key(0))
    with pytest.raises(ValueError, match="dlg: update.grads and params must have the same keys"):
        dlg(apply_fn, params, buffers, up._replace(grads={}), torch.tensor([0]), (1, SIDE, SIDE), key=Key(0))
    with pytest.raises(ValueError, match="recover_label: bias_name 'fc.bias' is not in the update"):
        recover_label(up, "fc.bias")
