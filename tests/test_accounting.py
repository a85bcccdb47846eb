"""Accounting: published values, properties (hypothesis), robustness, calibration, budget, errors.

Oracles (independent of the library code paths) live in ``test_accounting_oracles.py``.
"""

import math
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpfunc.accounting import (
    TF_PRIVACY_ORDERS,
    ComposedEvent,
    GaussianEvent,
    Neighboring,
    PoissonSampledEvent,
    PrivacyBudget,
    PrivacyBudgetExceededError,
    PrivacyLedger,
    SampledWithoutReplacementEvent,
    SelfComposedEvent,
    delta,
    dpsgd_epsilon,
    epsilon,
    epsilon_report,
    gdp_epsilon,
    gdp_mu,
    noise_multiplier_for,
    sampling_rate_for,
    steps_for,
)
from dpfunc.accounting.events import atoms

MNIST_Q = 256 / 60000
FAST = {"value_discretization_interval": 1e-3}  # coarse PLD grid for property tests (still an upper bound)


def _sgd(sigma, q, steps):
    return SelfComposedEvent(PoissonSampledEvent(q, GaussianEvent(sigma)), steps)


# --- published values ------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma,steps,published", [(1.1, 14062, 3.01), (1.3, 3515, 1.19), (0.7, 10546, 7.10)])
def test_tf_privacy_tutorial_table(sigma, steps, published):
    # TF Privacy's MNIST tutorial: classic conversion on its historical order grid.
    eps = dpsgd_epsilon(sigma, MNIST_Q, steps, 1e-5, method="rdp", orders=TF_PRIVACY_ORDERS, conversion="classic")
    assert eps == pytest.approx(published, abs=0.01)
    # The default (Balle et al. 2020) conversion and the default grid are strictly tighter.
    assert dpsgd_epsilon(sigma, MNIST_Q, steps, 1e-5, method="rdp") < eps - 0.1


def test_opacus_doc_value_uses_balle_conversion():
    orders = [2, 5, 10, 20, 100]
    report = epsilon_report(_sgd(1.0, 0.01, 300), 1e-5, "rdp", orders=orders)
    assert report.epsilon == pytest.approx(2.39, abs=0.01)
    assert report.order == 5
    classic = epsilon(_sgd(1.0, 0.01, 300), 1e-5, "rdp", orders=orders, conversion="classic")
    assert classic == pytest.approx(3.02, abs=0.01)  # the classic conversion does not give 2.39


def test_dong_roth_su_gdp_published_values():
    steps = int(70 * 60000 / 256)
    # Bu et al. 2020 Fig. 4: μ_CLT = 1.78, ε = 8.68 (δ = 1e-5) at epoch 70 — for their CLT-matched noise
    # σ̃ = 0.638 (printed rounded), not σ = 0.7. Both published numbers are rounded, so check that the
    # rounding intervals are consistent: ε(1.78) = 8.668, and σ̃ = 0.638 gives μ = 1.786, ε = 8.697.
    assert gdp_mu(atoms(_sgd(0.638, MNIST_Q, steps))) == pytest.approx(1.78, abs=0.01)
    with pytest.warns(UserWarning, match="approximation"):
        assert gdp_epsilon(1.78, 1e-5) == pytest.approx(8.68, abs=0.015)
    with pytest.warns(UserWarning):
        assert epsilon(_sgd(0.638, MNIST_Q, steps), 1e-5, "gdp") == pytest.approx(8.68, abs=0.02)
    # with σ = 0.7 itself the CLT gives μ ≈ 1.41 (ε ≈ 6.57): the paper's 1.78 is not for σ = 0.7
    assert gdp_mu(atoms(_sgd(0.7, MNIST_Q, steps))) == pytest.approx(1.414, abs=0.005)


def test_pld_reference_case_is_tighter_than_rdp():
    report = epsilon_report(_sgd(1.1, MNIST_Q, 14062), 1e-5)
    assert report.method == "pld"
    assert 2.34 <= report.lower <= report.epsilon <= 2.39  # RDP (Balle) gives 2.597
    assert report.discretization_error == pytest.approx(report.epsilon - report.lower)


# --- properties ----------------------------------------------------------------------------------

sigmas = st.floats(0.6, 3.0)
rates = st.floats(1e-3, 0.2)
steps_st = st.integers(1, 200)
deltas = st.sampled_from([1e-3, 1e-5, 1e-7])


@settings(max_examples=12)
@given(sigmas, rates, steps_st, st.integers(1, 200), deltas)
def test_monotone_in_steps(sigma, q, t1, extra, d):
    for method, opts in (("pld", FAST), ("rdp", {})):
        e1 = epsilon(_sgd(sigma, q, t1), d, method, **opts)
        e2 = epsilon(_sgd(sigma, q, t1 + extra), d, method, **opts)
        assert e1 <= e2 + 1e-9


@settings(max_examples=12)
@given(sigmas, rates, st.floats(1.05, 3.0), steps_st, deltas)
def test_monotone_in_sampling_rate_and_sigma(sigma, q, factor, t, d):
    for method, opts, tol in (("pld", FAST, 1e-3), ("rdp", {}, 1e-12)):
        base = epsilon(_sgd(sigma, q, t), d, method, **opts)
        assert epsilon(_sgd(sigma, min(1.0, q * factor), t), d, method, **opts) >= base - tol
        assert epsilon(_sgd(sigma * factor, q, t), d, method, **opts) <= base + tol


@settings(max_examples=12)
@given(sigmas, rates, steps_st)
def test_monotone_in_delta(sigma, q, t):
    for method, opts in (("pld", FAST), ("rdp", {})):
        values = [epsilon(_sgd(sigma, q, t), d, method, **opts) for d in (1e-3, 1e-5, 1e-7, 1e-9)]
        assert values == sorted(values)


@settings(max_examples=15)
@given(sigmas, rates, st.integers(1, 2000), deltas)
def test_pld_lower_le_upper_le_rdp(sigma, q, t, d):
    report = epsilon_report(_sgd(sigma, q, t), d, **FAST)
    assert 0 <= report.lower <= report.epsilon <= epsilon(_sgd(sigma, q, t), d, "rdp") + 1e-9


@settings(max_examples=12)
@given(sigmas, rates, steps_st, deltas)
def test_delta_of_epsilon_round_trip(sigma, q, t, d):
    event = _sgd(sigma, q, t)
    for method, opts, rel in (("pld", FAST, 1e-3), ("rdp", {}, 1e-6)):
        eps = epsilon(event, d, method, **opts)
        if eps > 0:
            assert delta(event, eps, method, **opts) == pytest.approx(d, rel=rel)


@settings(max_examples=10)
@given(sigmas, rates, st.integers(1, 60))
def test_step_by_step_equals_self_composed(sigma, q, t):
    ledger = PrivacyLedger()
    for _ in range(t):
        ledger = ledger.step(sigma, q)
    assert ledger == PrivacyLedger().step(sigma, q, t)
    one_by_one = ComposedEvent(tuple(PoissonSampledEvent(q, GaussianEvent(sigma)) for _ in range(t)))
    for method, opts in (("pld", FAST), ("rdp", {})):
        assert epsilon(one_by_one, 1e-5, method, **opts) == epsilon(_sgd(sigma, q, t), 1e-5, method, **opts)
        assert epsilon(ledger, 1e-5, method, **opts) == epsilon(_sgd(sigma, q, t), 1e-5, method, **opts)


@settings(max_examples=8)
@given(st.lists(st.tuples(sigmas, rates, st.integers(1, 100)), min_size=2, max_size=3), st.randoms())
def test_heterogeneous_ledger_any_order(phases, rnd):
    shuffled = list(phases)
    rnd.shuffle(shuffled)
    led_a, led_b = PrivacyLedger(), PrivacyLedger()
    for s, q, t in phases:
        led_a = led_a.step(s, q, t)
    for s, q, t in shuffled:
        led_b = led_b.step(s, q, t)
    for method, opts in (("pld", FAST), ("rdp", {})):
        assert epsilon(led_a, 1e-5, method, **opts) == pytest.approx(epsilon(led_b, 1e-5, method, **opts), rel=1e-9)
    # and a heterogeneous ledger costs more than any of its phases alone
    assert epsilon(led_a, 1e-5, **FAST) >= max(epsilon(_sgd(s, q, t), 1e-5, **FAST) for s, q, t in phases) - 1e-9


@settings(max_examples=4)
@given(st.floats(0.5, 8.0), st.sampled_from([0.01, 0.05]), st.integers(50, 300), st.sampled_from(["pld", "rdp"]))
def test_noise_multiplier_calibration_round_trip(target, q, t, method):
    opts = FAST if method == "pld" else {}
    sigma = noise_multiplier_for(target, 1e-5, q, t, method, **opts)
    eps = epsilon(_sgd(sigma, q, t), 1e-5, method, **opts)
    assert eps <= target
    assert eps >= 0.99 * target or epsilon(_sgd(sigma / 1.01, q, t), 1e-5, method, **opts) > target


def _check_steps_and_rate(target, sigma, q, method, opts):
    t = steps_for(target, 1e-5, sigma, q, method, **opts)
    assert epsilon(_sgd(sigma, q, t), 1e-5, method, **opts) <= target < epsilon(_sgd(sigma, q, t + 1), 1e-5, method, **opts)
    rate = sampling_rate_for(target, 1e-5, sigma, 100, method, **opts)
    eps = epsilon(_sgd(sigma, rate, 100), 1e-5, method, **opts)
    assert eps <= target
    assert rate == 1.0 or eps >= 0.99 * target or epsilon(_sgd(sigma, min(1.0, rate * 1.01), 100), 1e-5, method, **opts) > target


@settings(max_examples=4)
@given(st.floats(2.0, 6.0), st.floats(0.8, 2.0), st.floats(0.02, 0.1))
def test_steps_and_rate_calibration_round_trip_rdp(target, sigma, q):
    _check_steps_and_rate(target, sigma, q, "rdp", {})


def test_steps_and_rate_calibration_round_trip_pld():
    _check_steps_and_rate(2.0, 1.0, 0.05, "pld", FAST)


def test_reference_calibration_pld():
    sigma = noise_multiplier_for(2.0, 1e-5, MNIST_Q, 14062)
    eps = dpsgd_epsilon(sigma, MNIST_Q, 14062, 1e-5)
    assert 0.99 * 2.0 <= eps <= 2.0
    assert sigma < noise_multiplier_for(2.0, 1e-5, MNIST_Q, 14062, "rdp")


# --- GDP is never a bound ------------------------------------------------------------------------


def test_gdp_warns_and_bounds_do_not():
    event = _sgd(1.1, MNIST_Q, 14062)
    with pytest.warns(UserWarning, match="not an upper bound"):
        eps_gdp = epsilon(event, 1e-5, "gdp")
    with pytest.warns(UserWarning):
        delta(event, 1.0, "gdp")
    with pytest.warns(UserWarning):
        dpsgd_epsilon(1.1, MNIST_Q, 14062, 1e-5, method="gdp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eps_pld = epsilon(event, 1e-5)
        epsilon(event, 1e-5, "rdp")
    assert eps_gdp < eps_pld  # the CLT under-estimates here: it must not be stated as a bound


# --- robustness ------------------------------------------------------------------------------------


def test_pld_large_epsilon_many_steps_does_not_crash():
    # Opacus' PRV accountant fails with "Discrete mean differs" here.
    report = epsilon_report(_sgd(0.5, 0.1, 10000), 1e-5)
    assert math.isinf(report.epsilon) or (report.lower <= report.epsilon <= epsilon(_sgd(0.5, 0.1, 10000), 1e-5, "rdp"))
    assert report.epsilon > 100


@pytest.mark.parametrize("method", ["pld", "rdp", "gdp"])
def test_zero_noise_is_infinite_epsilon(method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert math.isinf(dpsgd_epsilon(0.0, 0.1, 10, 1e-5, method=method))
        assert dpsgd_epsilon(1.0, 0.1, 0, 1e-5, method=method) == 0.0
        assert epsilon(PrivacyLedger(), 1e-5, method) == 0.0


def test_tiny_sigma_and_full_batch():
    assert math.isfinite(dpsgd_epsilon(0.05, 0.5, 20, 1e-5))
    assert dpsgd_epsilon(0.05, 0.5, 20, 1e-5) <= dpsgd_epsilon(0.05, 0.5, 20, 1e-5, method="rdp")


def test_sampling_without_replacement():
    wor = SelfComposedEvent(SampledWithoutReplacementEvent(256, 60000, GaussianEvent(2.2)), 1000)
    eps = epsilon(wor, 1e-5, "rdp", neighboring=Neighboring.REPLACE_ONE)
    assert 0 < eps < math.inf
    # replace-one has sensitivity 2C: the same noise gives less privacy than add/remove Poisson at 1.1·2/2
    assert eps > epsilon(_sgd(2.2, 256 / 60000, 1000), 1e-5, "rdp")
    with pytest.raises(ValueError, match="REPLACE_ONE"):
        epsilon(wor, 1e-5, "rdp")
    with pytest.raises(ValueError, match="method='rdp'"):
        epsilon(wor, 1e-5, "pld", neighboring=Neighboring.REPLACE_ONE)
    with pytest.raises(ValueError, match="ADD_OR_REMOVE_ONE"):
        epsilon(_sgd(1.0, 0.1, 10), 1e-5, "rdp", neighboring=Neighboring.REPLACE_ONE)
    # the same adjacency rule in every accountant (one shared check)
    for method in ("rdp", "pld", "gdp"):
        with pytest.raises(ValueError, match=rf"{method}: Poisson sampling is accounted under Neighboring.ADD_OR_REMOVE_ONE only"):
            epsilon(_sgd(1.0, 0.1, 10), 1e-5, method, neighboring=Neighboring.REPLACE_ONE)
    for method in ("rdp", "gdp"):
        with pytest.raises(ValueError, match=rf"{method}: SampledWithoutReplacementEvent is accounted under Neighboring.REPLACE_ONE only"):
            epsilon(wor, 1e-5, method)
    # plain Gaussian under replace-one = add/remove at half the noise
    g = SelfComposedEvent(GaussianEvent(2.0), 5)
    assert epsilon(g, 1e-5, neighboring=Neighboring.REPLACE_ONE) == pytest.approx(epsilon(SelfComposedEvent(GaussianEvent(1.0), 5), 1e-5))


# --- budget ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,sigma,q", [("rdp", 1.5, 0.01), ("pld", 3.0, 0.2)])
def test_budget_boundary_matches_steps_for_and_message(method, sigma, q):
    budget = PrivacyBudget(1.0, 1e-5, method=method)
    t_max = steps_for(1.0, 1e-5, sigma, q, method)
    ledger = PrivacyLedger().step(sigma, q, t_max)
    budget.check(ledger)
    assert budget.remaining_steps(ledger, sigma, q) == 0
    assert budget.remaining_steps(PrivacyLedger().step(sigma, q, 3), sigma, q) == t_max - 3
    with pytest.raises(PrivacyBudgetExceededError, match=r"spends ε=1\.0\d* > allowed ε=1") as info:
        budget.check(ledger.step(sigma, q))
    assert isinstance(info.value, RuntimeError)
    assert info.value.spent_epsilon > 1.0 == info.value.allowed_epsilon
    # a heterogeneous ledger: the second phase is checked given the first
    two = PrivacyLedger().step(sigma, q, t_max // 2).step(3 * sigma, q, 3)
    budget.check(two)
    assert 0 < budget.remaining_steps(two, 3 * sigma, q) < budget.remaining_steps(PrivacyLedger(), 3 * sigma, q)


def test_budget_checks_every_step_cheaply():
    budget = PrivacyBudget(3.0, 1e-5)
    ledger = PrivacyLedger()
    for _ in range(300):
        ledger = ledger.step(1.1, MNIST_Q)
        budget.check(ledger)  # RDP fast path: no PLD run below the RDP boundary
    assert ledger.total_steps == 300


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: epsilon(_sgd(1, 0.1, 1), 0.0), "epsilon_report: delta must be a number in \\(0, 1\\), got 0.0"),
        (lambda: epsilon(_sgd(1, 0.1, 1), 1.0), "delta must be"),
        (lambda: epsilon(_sgd(1, 0.1, 1), 1e-5, "moments"), "method must be one of"),
        (lambda: epsilon(_sgd(1, 0.1, 1), 1e-5, "rdp", value_discretization_interval=1e-3), "unknown option"),
        (lambda: epsilon(_sgd(1, 0.1, 1), 1e-5, "rdp", orders=[0.5, 2]), "orders must be"),
        (lambda: epsilon(_sgd(1, 0.1, 1), 1e-5, "rdp", conversion="x"), "conversion must be"),
        (lambda: epsilon("ledger", 1e-5), "as_event: expected a privacy event"),
        (lambda: delta(_sgd(1, 0.1, 1), -1.0), "delta: epsilon must be a number >= 0, got -1.0"),
        (lambda: dpsgd_epsilon(1.0, 0.0, 10, 1e-5), "dpsgd_epsilon: sampling_rate must be in \\(0, 1\\], got 0.0"),
        (lambda: dpsgd_epsilon(1.0, 1.5, 10, 1e-5), "sampling_rate"),
        (lambda: dpsgd_epsilon(-1.0, 0.1, 10, 1e-5), "noise_multiplier must be a number >= 0, got -1.0"),
        (lambda: dpsgd_epsilon(1.0, 0.1, -1, 1e-5), "steps must be an int >= 0, got -1"),
        (lambda: GaussianEvent(-0.1), "GaussianEvent: noise_multiplier"),
        (lambda: PoissonSampledEvent(0.0, GaussianEvent(1.0)), "PoissonSampledEvent: sampling_rate must be in"),
        (lambda: SelfComposedEvent(GaussianEvent(1.0), -2), "SelfComposedEvent: count must be an int >= 0, got -2"),
        (lambda: SampledWithoutReplacementEvent(10, 5, GaussianEvent(1.0)), "sample_size must be <= population_size"),
        (lambda: noise_multiplier_for(0.0, 1e-5, 0.01, 100), "noise_multiplier_for: target_epsilon must be"),
        (lambda: noise_multiplier_for(1.0, 1e-5, 0.01, 0), "noise_multiplier_for: steps must be an int >= 1"),
        (lambda: steps_for(0.01, 1e-5, 0.5, 0.5, "rdp"), "steps_for: target_epsilon=0.01 is unreachable"),
        (lambda: sampling_rate_for(1e-9, 1e-5, 0.3, 100, "rdp"), "sampling_rate_for: target_epsilon=1e-09 unreachable"),
        (lambda: PrivacyBudget(1.0, 2.0), "PrivacyBudget: delta must be"),
        (lambda: PrivacyBudget(-1.0, 1e-5), "PrivacyBudget: epsilon must be"),
        (lambda: PrivacyBudget(1.0, 1e-5, method="x"), "PrivacyBudget: method must be one of"),
    ],
)
def test_bad_input_raises_clear_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_ledger_event_and_serialisation():
    ledger = PrivacyLedger().step(1.1, 0.01, 5).step(2.0, 0.02, 3)
    event = ledger.to_event()
    assert atoms(event) == (("poisson", 1.1, 0.01, 5), ("poisson", 2.0, 0.02, 3))
    assert PrivacyLedger.from_dict(ledger.to_dict()) == ledger
    assert epsilon(event, 1e-5, **FAST) == epsilon(ledger, 1e-5, **FAST)
    assert hash(event) == hash(ledger.to_event())  # events are immutable values
