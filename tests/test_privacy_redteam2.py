"""Red-team pass 2: the audit's statistics checked by hand, and the PLD accountant's cost on ledgers of
many distinct phases (each step's grid must be built once per query, not once per pass over the phases)."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpfunc.accounting import PLD, PrivacyLedger, epsilon
from dpfunc.accounting import pld as _pld
from dpfunc.audit import audit_scores, epsilon_lower_bound


@settings(max_examples=40, deadline=None)
@given(r=st.integers(1, 400), frac=st.floats(0.5, 1.0), confidence=st.sampled_from([0.9, 0.95, 0.99]))
def test_delta_zero_bound_is_the_logit_of_the_one_sided_clopper_pearson_limit(r, frac, confidence):
    """With δ = 0 the one-run bound is a pure binomial test: the largest ε with P[Bin(r, sigmoid ε) ≥ v] ≤ α
    is logit of the exact one-sided Clopper–Pearson lower limit of the guess accuracy, Beta⁻¹(α; v, r−v+1)
    (hand computation with scipy, independent of dpfunc's binomial tails). It must never be above it
    (a bound above it would not hold at the stated confidence) and within the bisection tolerance below it."""
    from scipy.stats import beta

    v = max(1, int(round(frac * r)))
    alpha = 1 - confidence
    p_lo = beta.ppf(alpha, v, r - v + 1)
    expected = max(0.0, math.log(p_lo / (1 - p_lo))) if p_lo < 1 else math.inf
    got = epsilon_lower_bound(1000, r, v, delta=0.0, confidence=confidence)
    assert got <= expected + 1e-9
    assert got >= expected - 1e-5


def test_audit_scores_charges_each_guess_count_its_bonferroni_share():
    """Perfect separation of 200 canaries: every guess count is all right, and the reported bound is the
    best single-count bound at confidence 1 − α/4, not at 1 − α (which would overstate it)."""
    scores = [float(i) for i in range(200)]
    included = [i >= 100 for i in range(200)]
    res = audit_scores(scores, included, delta=1e-5, confidence=0.95)
    ks = sorted(res.per_guess_count)
    assert ks == [4, 10, 20, 40] and all(res.per_guess_count[k][0] == k for k in ks)
    best = max(epsilon_lower_bound(200, k, k, delta=1e-5, confidence=1 - 0.05 / 4) for k in ks)
    assert res.epsilon_lower_bound == pytest.approx(best, abs=1e-9)
    assert res.epsilon_lower_bound < max(epsilon_lower_bound(200, k, k, delta=1e-5, confidence=0.95) for k in ks)


def test_pld_builds_each_distinct_phase_grid_once_per_query(monkeypatch):
    """A ledger of 40 distinct (σ, q) phases: 80 one-step grids (two directions). The tilt chooser, the
    moments and the composition each walk all phases; a count-bounded cache of 32 entries evicted every
    grid before its reuse (240 builds here; a 300-phase ledger took 44 s). Each grid must be built once."""
    calls = []
    real = _pld._single_step_masses

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(_pld, "_single_step_masses", counting)
    _pld._step_cache.clear()
    monkeypatch.setattr(_pld, "_step_cache_bytes", 0)
    ledger = PrivacyLedger()
    for i in range(40):
        ledger = ledger.step(1.0 + 0.01 * i, 0.01 + 1e-4 * i, 2)
    eps = epsilon(ledger, 1e-5, PLD(1e-2))
    assert math.isfinite(eps) and eps > 0
    assert len(calls) == len(set(calls)) == 80, (len(calls), len(set(calls)))


@pytest.mark.usefixtures("one_thread")
def test_slice_unit_accounts_over_training_slices_and_labels_epsilon_per_slice(tmp_path):
    """``unit=SLICE``: q must be the expected slices per step over the number of TRAINING slices (not
    patients), the ledger must hold exactly that q, and every log line with an ε must say "per slice"."""
    pytest.importorskip("nibabel", reason="the phantom path writes NIfTI")
    from dpfunc.accounting import dpsgd_epsilon
    from dpfunc.segmentation import SegmentationConfig, make_phantoms, train_segmentation

    data = make_phantoms(tmp_path / "liver", patients=5, seed=3, size=16, slices=4, progress=False)
    cfg = SegmentationConfig(epsilon=None, noise_multiplier=1.5, unit="slice", image_size=16, width=2, depth=1, groups=1,
                             epochs=2, batch_size=3, accountant="rdp", seed=0, selection="all")
    lines = []
    result = train_segmentation(cfg, data_dir=data, run_dir=tmp_path / "run", progress=False, log=lines.append,
                                bootstrap_resamples=20)
    start = next(s for s in lines if s.startswith("DP (unit = slice)"))
    n_slices = int(start.split("n=")[1].split()[0])
    assert "slices" in start and n_slices > 5  # slices, not the ≤ 5 patients
    assert result.sampling_rate == pytest.approx(3 / n_slices)
    steps = max(1, round(n_slices / 3)) * 2
    assert result.steps == steps
    assert result.epsilon == pytest.approx(dpsgd_epsilon(1.5, 3 / n_slices, steps, cfg.delta, method="rdp"), rel=1e-9)
    epoch_lines = [s for s in lines if s.startswith("epoch")]
    assert len(epoch_lines) == 2 and all("per slice" in s for s in epoch_lines), epoch_lines
