"""One-run audit (Steinke, Nasr, Jagielski 2023): the bound against a scipy oracle and closed forms, and
the invariants: the lower bound never exceeds the claimed ε; a broken mechanism is caught; power."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpfunc import DPConfig, FlatClipping, accounting, dp_aggregate
from dpfunc.audit import audit_scores, binomial_tail, black_box_run, epsilon_lower_bound, one_run_p_value, white_box_run
from dpfunc.keys import Key

SEEDS = st.integers(0, 2**32 - 1)
DELTA = 1e-5


def scipy_p_value(m, r, v, eps, delta):
    """The theorem's bound written directly with scipy (an independent oracle)."""
    from scipy.stats import binom

    p = 1 / (1 + math.exp(-eps))
    beta = binom.sf(v - 1, r, p)
    if delta == 0 or v == 0:
        return beta
    alpha = max((binom.sf(v - i - 1, r, p) - beta) / i for i in range(1, v + 1))
    return min(1.0, beta + 2 * m * delta * max(alpha, 0.0))


@given(r=st.integers(1, 300), frac=st.floats(0, 1), eps=st.floats(0, 8), delta=st.sampled_from([0.0, 1e-6, 1e-5, 1e-3]))
def test_p_value_matches_scipy(r, frac, eps, delta):
    v = int(round(frac * r))
    ours = one_run_p_value(1000, r, v, eps, delta)
    assert ours == pytest.approx(scipy_p_value(1000, r, v, eps, delta), rel=1e-9, abs=1e-15)


def test_binomial_tail_edges_and_closed_form_bound():
    assert binomial_tail(0, 5, 0.3) == 1.0 and binomial_tail(6, 5, 0.3) == 0.0
    assert binomial_tail(5, 5, 0.3) == pytest.approx(0.3**5)
    # all 100 guesses right, δ = 0: sigmoid(ε)^100 = 0.05  =>  ε = logit(0.05^(1/100))
    p = 0.05 ** (1 / 100)
    assert epsilon_lower_bound(1000, 100, 100, delta=0.0) == pytest.approx(math.log(p / (1 - p)), abs=1e-5)
    assert epsilon_lower_bound(1000, 100, 50, delta=DELTA) == 0.0  # chance level rejects nothing
    # δ makes the bound smaller, never larger
    assert epsilon_lower_bound(1000, 100, 100, delta=1e-4) < epsilon_lower_bound(1000, 100, 100, delta=0.0)


@pytest.mark.parametrize("eps0", [0.5, 1.0, 2.0])
def test_bound_exceeds_the_epsilon_of_randomized_response_at_most_at_the_stated_rate(eps0):
    """Each canary's score is its coin flip through ε0-randomized response, an exactly ε0-DP mechanism
    (the tightest case). At 95% confidence the bound may exceed ε0 in at most 5% of independent audits:
    over 100 audits that is ≤ 5 expected; more than 12 has probability < 0.3% if the bound is valid."""
    g = Key(int(eps0 * 10)).generator()
    m, trials, over = 500, 100, 0
    keep_p = math.exp(eps0) / (1 + math.exp(eps0))
    for _ in range(trials):
        included = torch.rand(m, generator=g) < 0.5
        keep = torch.rand(m, generator=g) < keep_p
        scores = torch.where(keep, included, ~included).double() + 1e-3 * torch.rand(m, generator=g, dtype=torch.float64)
        res = audit_scores(scores.tolist(), included.tolist(), delta=DELTA, guess_counts=[100])
        over += res.epsilon_lower_bound > eps0
    assert over <= 12, over


def test_audit_scores_checks_its_input():
    with pytest.raises(ValueError, match="audit_scores: scores and included must be"):
        audit_scores([1.0, 2.0], [True], delta=DELTA)
    with pytest.raises(ValueError, match="audit_scores: scores must be finite"):
        audit_scores([1.0, float("nan")], [True, False], delta=DELTA)
    with pytest.raises(ValueError, match=r"audit_scores: delta must be a number in \(0, 1\), got 0.0"):
        audit_scores([1.0, 2.0], [True, False], delta=0.0)
    with pytest.raises(ValueError, match=r"audit_scores: guess_counts\[i\] must be an int in \[1, 2\], got 3"):
        audit_scores([1.0, 2.0], [True, False], delta=DELTA, guess_counts=[3])


# ---- one DP-SGD run on a tiny model --------------------------------------------------------------------

N, DIM, Q, T, M, C = 64, 600, 0.25, 10, 1000, 1.0


def tiny_problem(seed):
    g = Key(seed).generator()
    x = torch.randn(N, DIM, generator=g)
    y = (x[:, 0] > 0).long()
    params = {"w": torch.zeros(2, DIM), "b": torch.zeros(2)}  # 1202 parameters: room for 1000 canaries
    return (lambda p, b, xb: xb @ p["w"].T + p["b"]), params, (x, y)


def white_box(sigma_run, seed):
    apply_fn, params, data = tiny_problem(seed)
    agg = dp_aggregate(DPConfig(FlatClipping(C), sigma_run, Q, N), Key(seed).fold_in(7))
    run = white_box_run(apply_fn, params, {}, data, aggregate=agg, max_grad_norm=C, sampling_rate=Q, steps=T,
                        learning_rate=0.5, canaries=M, key=Key(seed))
    return audit_scores(run.scores.tolist(), run.included.tolist(), delta=DELTA)


@settings(max_examples=6)
@given(sigma=st.floats(0.5, 4.0), seed=SEEDS)
def test_white_box_lower_bound_never_exceeds_the_claimed_epsilon(sigma, seed):
    claimed = accounting.dpsgd_epsilon(sigma, Q, T, DELTA)
    assert white_box(sigma, seed).epsilon_lower_bound <= claimed


def test_white_box_audit_has_power_at_large_epsilon():
    sigma = 0.3
    claimed = accounting.dpsgd_epsilon(sigma, Q, T, DELTA)
    assert claimed >= 50
    res = white_box(sigma, 0)
    assert res.epsilon_lower_bound >= 2.0, res


def test_a_mechanism_without_noise_is_caught():
    """The mechanism forgets its noise but the ledger would claim σ = 2: the audit refutes the claim."""
    claimed = accounting.dpsgd_epsilon(2.0, Q, T, DELTA)
    res = white_box(0.0, 1)
    assert res.epsilon_lower_bound > claimed, (res, claimed)


def test_black_box_run_scores_follow_membership_without_noise():
    apply_fn, params, data = tiny_problem(3)
    g = Key(4).generator()
    cx = torch.randn(200, DIM, generator=g)
    cy = 1 - (cx[:, 0] > 0).long()  # mislabelled canaries: training on them lowers their loss
    agg = dp_aggregate(DPConfig(FlatClipping(C), 0.0, 0.5, N), Key(5))
    run = black_box_run(apply_fn, params, {}, data, (cx, cy), aggregate=agg, max_grad_norm=C, sampling_rate=0.5,
                        steps=20, learning_rate=2.0, key=Key(6))
    assert run.scores.shape == (200,) and run.included.dtype == torch.bool
    inc = run.included
    assert float(run.scores[inc].mean()) > float(run.scores[~inc].mean())
