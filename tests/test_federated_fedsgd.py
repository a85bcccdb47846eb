"""``local_steps`` (FedSGD when 1): the round is that many local steps; with plain FedAvg and one local step a
round is one heavy-ball step on the weighted mean of the sites' noisy gradients (an oracle that computes each
site's noisy gradient with centralised ``dpsgd`` on the site's keys); the ledger and the calibration use
the steps actually run; the ε report of long runs is thinned but the final one is complete."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from dpfunc import FlatClipping, Key, dpsgd, make_step, poisson_sample, vmap_engine
from dpfunc.federated import InProcessSites, SitePlan, init_server_state, init_site_state, run_round_inprocess, site_key, site_keys
from dpfunc.federated.job import EPSILON_REPORTS, FederatedConfig, epsilon_due, plans_for


def _loss(p, b, x, y):
    h = torch.tanh(x @ p["w1"] + p["b1"])
    return F.cross_entropy((h @ p["w2"])[None], y[None])


ENGINE = vmap_engine(_loss, clipping=FlatClipping(1.0))


def _params(g):
    return {"w1": torch.randn(4, 5, generator=g) * 0.3, "b1": torch.zeros(5), "w2": torch.randn(5, 2, generator=g) * 0.3}


def _data(n, g):
    x = torch.randn(n, 4, generator=g)
    return x, (x[:, 0] + 0.3 * torch.randn(n, generator=g) > 0).long()


def test_local_steps_sets_the_round_and_is_validated():
    assert SitePlan(100, 10, 3, 1.0).steps_per_round == 30
    assert SitePlan(100, 10, 3, 1.0, local_steps=2).steps_per_round == 2
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="SitePlan.*local_steps"):
            SitePlan(100, 10, 1, 1.0, local_steps=bad)
        with pytest.raises(ValueError, match="FederatedConfig.*local_steps"):
            FederatedConfig(local_steps=bad)
    with pytest.raises(ValueError, match="local_steps=2"):
        FederatedConfig(aggregator="secagg", distributed_noise=True, local_steps=2)


def test_calibration_counts_local_steps():
    """σ_s is calibrated for rounds × local_steps steps at q_s: more steps, more noise; 1 step/round ≡ T = R."""
    one = plans_for(FederatedConfig(rounds=40, local_steps=1, batch_size=50, accountant="rdp"), [500])[0]
    ten = plans_for(FederatedConfig(rounds=4, local_steps=10, batch_size=50, accountant="rdp"), [500])[0]
    epochs = plans_for(FederatedConfig(rounds=4, local_epochs=1, batch_size=50, accountant="rdp"), [500])[0]
    assert one.steps_per_round == 1 and ten.steps_per_round == 10 == epochs.steps_per_round
    assert one.noise_multiplier == ten.noise_multiplier == epochs.noise_multiplier  # same q, same 40 steps
    more = plans_for(FederatedConfig(rounds=80, local_steps=1, batch_size=50, accountant="rdp"), [500])[0]
    assert more.noise_multiplier > one.noise_multiplier


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), sizes=st.lists(st.integers(12, 40), min_size=2, max_size=3),
       momentum=st.sampled_from([0.0, 0.9]))
def test_fedsgd_is_heavy_ball_on_the_weighted_mean_of_noisy_gradients(seed, sizes, momentum):
    g = torch.Generator().manual_seed(seed)
    params0 = _params(g)
    data = [_data(n, g) for n in sizes]
    key, lr, rounds = Key(seed), 0.5, 3
    plans = [SitePlan(n, 8, 1, 1.3, learning_rate=lr, momentum=momentum, local_steps=1) for n in sizes]
    state = init_server_state(params0, [init_site_state(s, p, site_key(key, s), params0) for s, p in enumerate(plans)], None)
    sites = InProcessSites(data, plans, ENGINE, key)
    for _ in range(rounds):
        state, rep = run_round_inprocess(state, sites, key=key)
        assert rep.applied == tuple(range(len(sizes)))
    # oracle: each site's noisy clipped mean gradient from centralised dpsgd (lr 1, no momentum) on its keys,
    # then one heavy-ball step per round on their n-weighted mean
    params, buf = {k: v.double() for k, v in params0.items()}, {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params0.items()}
    weights = [n / sum(sizes) for n in sizes]
    for t in range(rounds):
        mean = {k: torch.zeros_like(v) for k, v in params.items()}
        for s, (plan, (x, y)) in enumerate(zip(plans, data)):
            sample_key, noise_key = site_keys(site_key(key, s))
            tx = dpsgd(1.0, noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
                       sampling_rate=plan.sampling_rate, num_examples=plan.num_examples, key=noise_key)
            opt = tx.init(params0)
            for _ in range(t):  # advance the noise counter to step t (the noise key of step t is fold_in(t))
                opt = _advance(opt)
            idx = poisson_sample(sample_key.fold_in(t), plan.num_examples, plan.sampling_rate)
            p32 = {k: v.float() for k, v in params.items()}
            new, _, _ = make_step(None, tx, engine=ENGINE)(p32, opt, (x[idx], y[idx]))
            for k in mean:
                mean[k] += weights[s] * (p32[k] - new[k]).double()   # the site's noisy gradient (lr 1)
        for k in params:
            buf[k] = momentum * buf[k] + mean[k]
            params[k] = params[k] - lr * buf[k]
    for k in params:
        torch.testing.assert_close(state.params[k].double(), params[k], rtol=1e-4, atol=1e-5)
    for s, plan in enumerate(plans):
        assert state.sites[s].ledger.total_steps == rounds and state.sites[s].steps == rounds


def _advance(opt):
    """Move the step counter of a dpsgd state (a chain) forward by one: the DP state's ``count``."""
    from dpfunc.federated.site import _replace_dp
    from dpfunc.private import find_dp_state

    dp = find_dp_state(opt)
    return _replace_dp(opt, dp._replace(count=dp.count + 1))


@given(rounds=st.integers(1, 400), r=st.integers(1, 400))
def test_epsilon_reports_are_thinned_but_bounded(rounds, r):
    r = min(r, rounds)
    if rounds <= EPSILON_REPORTS:
        assert epsilon_due(r, rounds)
    assert epsilon_due(rounds, rounds)  # the last round always reports
    due = [q for q in range(1, rounds + 1) if epsilon_due(q, rounds)]
    assert len(due) <= EPSILON_REPORTS + 1
    assert max(b - a for a, b in zip([0, *due], due)) <= math.ceil(rounds / EPSILON_REPORTS)
