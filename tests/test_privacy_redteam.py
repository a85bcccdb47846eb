"""Red-team regressions: each test pins a privacy-accounting bug that was found and fixed.

1. ``noise_multiplier_for(..., method=PLD)`` warm-started its bracket with the RDP calibration and
   re-raised RDP's "unreachable" error: RDP's conversion over finite orders has an ε floor (≈ 0.0035 at
   δ = 1e-5), so every target below it failed with "unreachable even with σ=1e8", although PLD (and the
   mechanism) reach it at a finite σ (q = 1, T = 1, ε = 1e-4: σ ≈ 9379, Balle & Wang 2018). steps_for and
   sampling_rate_for had the same RDP warm start (their PLD answers raised RDP's "unreachable").
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import log_ndtr

from dpfunc.accounting import PLD, RDP, PrivacyLedger, epsilon, noise_multiplier_for


def _exact_delta(eps: float, s: float) -> float:
    """δ(ε) of the Gaussian mechanism, sensitivity 1, noise std ``s`` (Balle & Wang 2018, Thm. 8)."""
    a, b = 0.5 / s, eps * s
    return math.exp(log_ndtr(a - b)) - math.exp(eps + log_ndtr(-a - b))


def _exact_sigma(eps: float, d: float) -> float:
    """The σ at which the Gaussian mechanism is exactly (ε, δ)-DP: δ(ε) falls with σ, so bisect on log σ."""
    lo, hi = 1e-3, 1e9
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if _exact_delta(eps, mid) > d:
            lo = mid
        else:
            hi = mid
    return hi


@settings(max_examples=4, deadline=None)
@given(log10_eps=st.floats(-4.0, -2.6), log10_delta=st.floats(-9.0, -5.0), steps=st.sampled_from([1, 4, 100]))
def test_pld_calibrates_targets_below_the_rdp_floor(log10_eps, log10_delta, steps):
    target, d = 10.0**log10_eps, 10.0**log10_delta
    sigma = noise_multiplier_for(target, d, 1.0, steps, PLD())
    eps = epsilon(PrivacyLedger().step(sigma, 1.0, steps), d, PLD())
    assert 0.99 * target <= eps <= target
    # q = 1: T Gaussian steps at σ are one Gaussian at σ/√T; the exact calibration is a closed form.
    exact = _exact_sigma(target, d) * math.sqrt(steps)
    assert exact <= sigma * (1 + 1e-6)  # an upper-bounding accountant never needs less noise than the truth
    assert sigma <= 1.02 * exact


def test_pld_calibration_below_the_rdp_floor_with_subsampling():
    sigma = noise_multiplier_for(1e-3, 1e-5, 0.01, 1000, PLD())
    assert 0.99e-3 <= epsilon(PrivacyLedger().step(sigma, 0.01, 1000), 1e-5, PLD()) <= 1e-3


def test_rdp_floor_is_named_in_the_error():
    with pytest.raises(ValueError, match=r"noise_multiplier_for: target_epsilon=0\.0001 unreachable.*RDP.*floor.*PLD"):
        noise_multiplier_for(1e-4, 1e-5, 1.0, 1, RDP())


def test_steps_and_sampling_rate_calibrate_below_the_rdp_floor():
    # PLD: σ = 1000, q = 0.01, 1000 steps cost ε ≈ 4.6e-4 < 1e-3, so both searches have an answer (they
    # raised "a single step already costs ε=0.0035" / "unreachable": RDP's floor, not PLD's ε).
    from dpfunc.accounting import sampling_rate_for, steps_for

    def eps(q, t):
        return epsilon(PrivacyLedger().step(1000.0, q, t), 1e-5, PLD())

    t = steps_for(1e-3, 1e-5, 1000.0, 0.01, PLD())
    assert t >= 1000 and eps(0.01, t) <= 1e-3 < eps(0.01, t + 1)
    q = sampling_rate_for(1e-3, 1e-5, 1000.0, 1000, PLD())
    assert q >= 0.01 and 0.99e-3 <= eps(q, 1000) <= 1e-3


def test_federated_site_epsilon_matches_an_independent_accountant(data_dir):
    """Each site's reported ε is Google's dp_accounting PLD ε of ITS OWN (σ_s, q_s = B / n_s, steps), with
    steps = (rounds the site was asked) × (its local steps per round): partial participation, unequal
    (Dirichlet) shards. An independent recomputation of what the metrics claim, not of our own code."""
    import dp_accounting as dpa
    from dp_accounting.pld import pld_privacy_accountant

    from dpfunc.federated.job import FederatedConfig, run_federated

    cfg = FederatedConfig(sites=3, rounds=2, train_subset=120, batch_size=20, fraction=0.67, partition="dirichlet",
                          accountant="pld", epsilon=3.0)
    m = run_federated(cfg, data_dir=data_dir, progress=False, log=lambda s: None, bootstrap_resamples=10)
    asked = [sum(s in h["sites_answered"] for h in m["history"]) for s in range(3)]
    assert sum(s["n"] for s in m["sites"]) == 120 and len({s["n"] for s in m["sites"]}) > 1
    for s, site in enumerate(m["sites"]):
        assert site["sampling_rate"] == min(1.0, 20 / site["n"])
        assert site["steps"] == asked[s] * max(1, round(site["n"] / 20))
        acc = pld_privacy_accountant.PLDAccountant()
        acc.compose(dpa.PoissonSampledDpEvent(site["sampling_rate"], dpa.GaussianDpEvent(site["noise_multiplier"])),
                    site["steps"])
        ref = acc.get_epsilon(site["delta"])
        assert site["epsilon"] == pytest.approx(ref, rel=2e-3, abs=1e-6), (s, site, ref)
        assert site["epsilon"] <= cfg.epsilon
    assert m["epsilon"] == max(s["epsilon"] for s in m["sites"])


def test_a_delta_not_below_one_over_n_is_warned_about():
    """δ ≥ 1/n is a vacuous guarantee (publishing one random record is (0, 1/n)-DP): `dpfunc train` and each
    federated site's plan warn (they said nothing: `dpfunc train --train-subset 600 --delta 0.01` ran quietly)."""
    import warnings

    from dpfunc.federated.job import FederatedConfig, plans_for
    from dpfunc.train import TrainConfig, _plan

    def warned(fn, *args) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn(*args)
        return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]

    train_msgs = warned(_plan, TrainConfig(delta=0.01, batch_size=60, epochs=1), 600)
    assert any(m.startswith("train: delta=0.01 is not below 1/n = 1/600") for m in train_msgs), train_msgs
    fed_msgs = warned(plans_for, FederatedConfig(sites=2, rounds=1, delta=0.01, batch_size=20, accountant="rdp"), [1000, 100])
    assert any(m.startswith("run_federated: delta=0.01 is not below 1/n = 1/100") for m in fed_msgs), fed_msgs
    assert warned(_plan, TrainConfig(delta=1e-3, batch_size=60, epochs=1), 600) == []  # 1e-3 < 1/600: no warning
    assert warned(_plan, TrainConfig(delta=0.5, batch_size=60, epochs=1, private=False), 600) == []  # non-private: no δ


def test_segmentation_warns_when_delta_is_not_below_one_over_the_number_of_patients(tmp_path):
    """The segmentation run counts privacy units as patients (or slices): δ ≥ 1/n warns there too."""
    import warnings

    pytest.importorskip("nibabel", reason="the phantom path writes NIfTI")
    from dpfunc.segmentation import SegmentationConfig, make_phantoms, train_segmentation

    data = make_phantoms(tmp_path / "liver", patients=5, seed=3, size=16, slices=4, progress=False)

    def warned(delta: float) -> list[str]:
        cfg = SegmentationConfig(epsilon=None, noise_multiplier=1.5, delta=delta, image_size=16, width=2, depth=1,
                                 groups=1, epochs=1, batch_size=2, accountant="rdp", seed=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_segmentation(cfg, data_dir=data, progress=False, log=lambda s: None, bootstrap_resamples=5)
        return [str(w.message) for w in caught if "is not below 1/n" in str(w.message)]

    loud = warned(0.5)
    assert len(loud) == 1 and loud[0].startswith("train_segmentation: delta=0.5 is not below 1/n") and "patients" in loud[0]
    assert warned(1e-5) == []
