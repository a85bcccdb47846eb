"""Accounting against Google's dp_accounting (an optional, test-only oracle), round trips for every
method, the calibration property, typed options and bad input.

dp_accounting is in the ``test`` extra; where it is missing the oracle tests are skipped with the reason.
The ``ci`` profile runs few examples; ``DPFUNC_ACCOUNTING_THOROUGH=1`` runs 200 draws of the oracle property.
"""

import math
import os
import warnings

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from dpfunc.accounting import (
    GDP,
    PLD,
    RDP,
    CalibrationWarning,
    Conversion,
    GaussianEvent,
    Method,
    PoissonAtom,
    PoissonSampledEvent,
    PrivacyBudget,
    PrivacyLedger,
    SelfComposedEvent,
    delta,
    dpsgd_epsilon,
    epsilon,
    epsilon_report,
    noise_multiplier_for,
    sampling_rate_for,
    steps_for,
)
from dpfunc.accounting.events import atoms

# ``DPFUNC_ACCOUNTING_THOROUGH=1`` runs the oracle property on many more draws (minutes, not for CI)
_THOROUGH = bool(os.environ.get("DPFUNC_ACCOUNTING_THOROUGH"))


def _reference_epsilon(sigma, q, steps, d, h=1e-4):
    dp_accounting = pytest.importorskip("dp_accounting", reason="dp-accounting (test extra) is not installed")
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=h)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(d)


def _log_uniform(lo, hi):
    return st.floats(math.log(lo), math.log(hi)).map(math.exp)


@settings(max_examples=200 if _THOROUGH else 4, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(
    q=_log_uniform(1e-4, 1.0),
    sigma=_log_uniform(0.5, 100.0),
    steps=_log_uniform(1, 1e5).map(lambda t: max(1, int(round(t)))),
    d=_log_uniform(1e-12, 1e-3),
)
@example(q=math.exp(-6), sigma=1.0, steps=98716, d=math.exp(-26))  # found by the thorough run: see the 4× finer reference
# thorough run, seed 2511: ours 0.09968, 3.0 % above the reference 0.09674 (h 1e-4; 0.0963 on 1e-5): the Chernoff tilt
# (30) left the round-off charge at 19 % of δ; the tilt search now finds ~52 (ours 0.096834, charge ~1 % of δ)
@example(q=math.exp(-9), sigma=1.0, steps=1097, d=math.exp(-26))
def test_pld_matches_dp_accounting(q, sigma, steps, d):
    """Upper bound ≥ reference·(1 − 2e-3), ≤ reference·1.02, finite wherever the reference is.

    The reference is itself an upper bound whose grid error dominates when ε is tiny (a loss per step
    far below h = 1e-4); for the lower side its grid is then refined to max(ε/2000, 2e-5). Cases whose
    RDP ε exceeds 30 are skipped (dp_accounting's fixed grid makes them minutes long)."""
    q = min(q, 1.0)
    # dp_accounting does not coarsen its grid: at ε in the hundreds it needs minutes; keep CI bounded
    assume(dpsgd_epsilon(sigma, q, steps, d, RDP()) <= 30)
    report = epsilon_report(PrivacyLedger().step(sigma, q, steps), d)
    ours = report.epsilon
    ref = _reference_epsilon(sigma, q, steps, d)
    assert math.isfinite(ours) or not math.isfinite(ref)
    assert ours <= ref * 1.02 + 1e-6, (ours, ref)
    refined = report.method == "pld" and report.value_discretization_interval < 1e-4
    h = 1e-4
    if ref < 0.2 or refined:  # grid-dominated reference, or our default refined its grid: compare the lower
        # side with a reference grid at least as fine as ours (else ours, on a finer grid, may be below it:
        # σ 1, q e^-8, T 98716, δ e^-16: ours 0.636185 on h 4.2e-5, the reference 0.638426 on 1e-4, 0.636186 on 4.2e-5)
        h = max(ref / 2000, 2e-5) if ref < 0.2 else 1e-4
        if report.method == "pld":
            h = min(h, report.value_discretization_interval)
        ref = _reference_epsilon(sigma, q, steps, d, h=h)
    if ours < ref * (1 - 2e-3):
        # The reference's grid error can exceed ours on the same grid; its bound decreases towards the true ε
        # as its grid is refined, so a 4× finer reference decides (σ 1, q e^-6, T 98716, δ e^-26: ours 7.30479
        # on h 1e-4; the reference 7.32620 on 1e-4, 7.30425 on 5e-5, 7.28114 on 2.5e-5; RDP 7.609)
        ref = _reference_epsilon(sigma, q, steps, d, h=h / 4)
    assert ours >= ref * (1 - 2e-3), (ours, ref)


@pytest.mark.parametrize("d", [1e-8, 1e-10])
def test_small_delta_long_run_against_dp_accounting(d):
    ref = _reference_epsilon(1.0, 0.01, 10000, d)
    ours = dpsgd_epsilon(1.0, 0.01, 10000, d)
    assert ref * (1 - 2e-3) <= ours <= ref * 1.02


def test_tail_heavy_small_delta_matches_dp_accounting_live():
    """σ 1, q 1.5e-4, T 10182, δ 5.6e-9 (the session-24 case: ours was 9 % above): on the same grids as
    dp_accounting, within 1 % above it and never below it by more than 2e-3 (its ε is itself a bound)."""
    ledger = PrivacyLedger().step(1.0, 1.5e-4, 10182)
    report = epsilon_report(ledger, 5.6e-9)
    for h in (1e-4, report.value_discretization_interval):
        ref = _reference_epsilon(1.0, 1.5e-4, 10182, 5.6e-9, h=h)
        ours = epsilon(ledger, 5.6e-9, PLD(h))
        assert ref * (1 - 2e-3) <= ours <= ref * 1.01, (h, ours, ref)
        assert report.lower <= ours


# --- round trips, every method --------------------------------------------------------------------


@pytest.mark.parametrize("method", [PLD(), RDP(), RDP(conversion=Conversion.CLASSIC), GDP()])
@pytest.mark.parametrize("sigma,q,steps", [(1.0, 0.01, 1000), (2.0, 1.0, 1), (1.5, 0.2, 30)])
def test_round_trips(method, sigma, q, steps):
    ledger = PrivacyLedger().step(sigma, q, steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for e in (0.5, 2.0):
            d = delta(ledger, e, method)
            if 1e-300 < d < 1:
                assert epsilon(ledger, d, method) == pytest.approx(e, rel=2e-3, abs=2e-4)
        for d in (1e-5, 1e-10):
            e = epsilon(ledger, d, method)
            assert delta(ledger, e, method) == pytest.approx(d, rel=2e-2)


def test_rdp_delta_uses_the_tight_conversion():
    ledger = PrivacyLedger().step(1.0, 0.01, 1000)
    tight, classic = delta(ledger, 5.0, RDP()), delta(ledger, 5.0, RDP(conversion="classic"))
    assert tight < classic and tight >= delta(ledger, 5.0)  # Balle et al. is tighter, PLD tighter still


# --- calibration property ---------------------------------------------------------------------------


@settings(max_examples=3)
@given(target=st.floats(0.3, 6.0), q=_log_uniform(1e-3, 0.2), steps=st.integers(10, 2000),
       d=_log_uniform(1e-10, 1e-5))
def test_noise_multiplier_for_lands_within_one_percent(target, q, steps, d):
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        sigma = noise_multiplier_for(target, d, q, steps, RDP())
    assert 0.99 * target <= dpsgd_epsilon(sigma, q, steps, d, RDP()) <= target


def test_pld_calibration_within_one_percent_and_steps_exact():
    sigma = noise_multiplier_for(1.0, 1e-8, 0.01, 500)
    assert 0.99 <= dpsgd_epsilon(sigma, 0.01, 500, 1e-8) <= 1.0
    t = steps_for(3.0, 1e-8, 1.0, 0.01, RDP())
    assert dpsgd_epsilon(1.0, 0.01, t, 1e-8, RDP()) <= 3.0 < dpsgd_epsilon(1.0, 0.01, t + 1, 1e-8, RDP())


def test_unreachable_band_says_so():
    # one step at σ = 3 costs ε ≈ 1.3; two cost ≈ 1.9: a target of 1.8 cannot be met within 1%
    with pytest.warns(CalibrationWarning, match="not reachable within 1%"):
        assert steps_for(1.8, 1e-5, 3.0, 1.0) == 1


# --- typed options and legacy strings -------------------------------------------------------------


def test_typed_options_equal_legacy_strings():
    ledger = PrivacyLedger().step(1.1, 0.01, 200)
    assert epsilon(ledger, 1e-6, RDP(orders=(2, 4, 8, 16))) == epsilon(ledger, 1e-6, "rdp", orders=[2, 4, 8, 16])
    assert epsilon(ledger, 1e-6, PLD(value_discretization_interval=1e-3)) == epsilon(
        ledger, 1e-6, method="pld", value_discretization_interval=1e-3)
    assert epsilon(ledger, 1e-6, Method.RDP) == epsilon(ledger, 1e-6, "rdp")
    budget = PrivacyBudget(5.0, 1e-6, method=RDP())
    budget.check(ledger)
    assert atoms(ledger.to_event())[0] == PoissonAtom("poisson", 1.1, 0.01, 200)
    assert atoms(ledger.to_event())[0].sampling_rate == 0.01


# --- bad input ----------------------------------------------------------------------------------------

_L = PrivacyLedger().step(1.0, 0.1, 10)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: epsilon(_L, float("nan")), r"epsilon_report: delta must be a number in \(0, 1\), got nan"),
        (lambda: epsilon(_L, True), r"delta must be a number in \(0, 1\), got True"),
        (lambda: delta(_L, float("nan")), r"delta: epsilon must be a number >= 0, got nan"),
        (lambda: delta(_L, True), r"delta: epsilon must be a number >= 0, got True"),
        (lambda: dpsgd_epsilon(True, 0.1, 10, 1e-5), "dpsgd_epsilon: noise_multiplier must be a number >= 0, got True"),
        (lambda: dpsgd_epsilon(float("nan"), 0.1, 10, 1e-5), "noise_multiplier must be a number >= 0, got nan"),
        (lambda: dpsgd_epsilon(1.0, True, 10, 1e-5), r"sampling_rate must be in \(0, 1\], got True"),
        (lambda: dpsgd_epsilon(1.0, float("nan"), 10, 1e-5), r"sampling_rate must be in \(0, 1\], got nan"),
        (lambda: dpsgd_epsilon(1.0, 0.1, 10.0, 1e-5), "steps must be an int >= 0, got 10.0"),
        (lambda: dpsgd_epsilon(1.0, 0.1, True, 1e-5), "steps must be an int >= 0, got True"),
        (lambda: PrivacyLedger().step(float("inf"), 0.1), "PrivacyLedger.step: noise_multiplier must be a finite"),
        (lambda: PrivacyLedger().step(True, 0.1), "PrivacyLedger.step: noise_multiplier"),
        (lambda: noise_multiplier_for(float("inf"), 1e-5, 0.1, 10), "target_epsilon must be a finite number > 0"),
        (lambda: noise_multiplier_for(1.0, 1e-5, True, 10), r"noise_multiplier_for: sampling_rate must be in \(0, 1\]"),
        (lambda: noise_multiplier_for(1.0, 1e-5, 0.1, True), "noise_multiplier_for: steps must be an int >= 1"),
        (lambda: steps_for(1.0, 1e-5, float("inf"), 0.1), "steps_for: noise_multiplier must be a finite number > 0"),
        (lambda: steps_for(1.0, 1e-5, True, 0.1), "steps_for: noise_multiplier must be a finite number > 0"),
        (lambda: sampling_rate_for(1.0, 1e-5, 1.0, -3), "sampling_rate_for: steps must be an int >= 1"),
        (lambda: PLD(value_discretization_interval=0.0), r"PLD: value_discretization_interval must be in \(0, 1\]"),
        (lambda: PLD(value_discretization_interval=True), "PLD: value_discretization_interval"),
        (lambda: RDP(orders=(1.0, 2.0)), "RDP: orders must be"),
        (lambda: RDP(orders=(2.0, float("nan"))), "RDP: orders must be"),
        (lambda: RDP(conversion="x"), "RDP: conversion must be"),
        (lambda: epsilon(_L, 1e-5, PLD(), value_discretization_interval=1e-3), "set them in the option object"),
        (lambda: epsilon(_L, 1e-5, 3), "method must be one of"),
        (lambda: PrivacyBudget(True, 1e-5), "PrivacyBudget: epsilon must be a finite number > 0, got True"),
        (lambda: PrivacyBudget(1.0, float("nan")), "PrivacyBudget: delta must be"),
        (lambda: GaussianEvent(float("nan")), "GaussianEvent: noise_multiplier must be a number >= 0"),
        (lambda: PoissonSampledEvent(True, GaussianEvent(1.0)), "PoissonSampledEvent: sampling_rate must be in"),
        (lambda: SelfComposedEvent(GaussianEvent(1.0), 2.0), "SelfComposedEvent: count must be an int >= 0"),
        (lambda: PrivacyLedger.from_dict({"phases": [[1.0, 0.1, 2.5]]}), "malformed ledger"),
    ],
)
def test_bad_input_names_function_argument_and_range(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_checkpoint_format_unchanged():
    """Ledgers written by the previous code (lists of [σ, q, T]) load; the format is unchanged."""
    old = {"phases": [[1.1, 0.01, 5], [2.0, 0.02, 3]]}
    ledger = PrivacyLedger.from_dict(old)
    assert ledger.to_dict() == old and ledger.total_steps == 8
