"""The pure federated core: FedAvg vs hand computation, 1 site ≡ centralised DP-SGD, per-site ledgers,
partial participation, exclusion of bad updates, failed rounds, partitions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from dpfunc import FlatClipping, Key, accounting, dpsgd, make_step, poisson_sample, privacy_ledger, vmap_engine
from dpfunc.federated import (
    AggregationError,
    InProcessSites,
    Partition,
    RoundFailedError,
    SitePlan,
    SiteUpdate,
    WeightedFedAvg,
    apply_round,
    average_rounds,
    charge_site,
    check_update,
    fedadam,
    fedavgm,
    init_server_state,
    init_site_state,
    make_aggregator,
    partition_indices,
    run_round_inprocess,
    select_sites,
    site_key,
    site_keys,
    site_round,
)


def _loss(p, b, x, y):
    h = torch.tanh(x @ p["w1"] + p["b1"])
    return F.cross_entropy((h @ p["w2"])[None], y[None])


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w1": torch.randn(4, 5, generator=g) * 0.3, "b1": torch.zeros(5), "w2": torch.randn(5, 2, generator=g) * 0.3}


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, (x[:, 0] + 0.3 * torch.randn(n, generator=g) > 0).long()


ENGINE = vmap_engine(_loss, clipping=FlatClipping(1.0))


def _setup(sizes, *, sigma=1.0, batch=8, epochs=1, momentum=0.9, seed=0, fault=None):
    key = Key(seed)
    params = _params(seed)
    data = [_data(n, 100 + i) for i, n in enumerate(sizes)]
    plans = [SitePlan(n, batch, epochs, sigma, momentum=momentum, learning_rate=0.5) for n in sizes]
    states = [init_site_state(s, p, site_key(key, s), params) for s, p in enumerate(plans)]
    return key, init_server_state(params, states, None), InProcessSites(data, plans, ENGINE, key, fault=fault), plans


@settings(max_examples=25)
@given(seed=st.integers(0, 2**32 - 1), weights=st.lists(st.floats(0.1, 100.0), min_size=1, max_size=5))
def test_weighted_fedavg_equals_hand_computation(seed, weights):
    g = torch.Generator().manual_seed(seed)
    ref = {"a": torch.randn(3, 2, generator=g), "b": torch.randn(4, generator=g)}
    ups = [SiteUpdate(s, 0, {k: torch.randn(v.shape, generator=g) for k, v in ref.items()}, w, 1, 0.0)
           for s, w in enumerate(weights)]
    out = WeightedFedAvg().aggregate(ups, ref)
    for k in ref:
        hand = sum(w * u.params[k].double() for w, u in zip(weights, ups)) / sum(weights)
        torch.testing.assert_close(out[k], hand.float(), rtol=1e-6, atol=1e-6)
        assert out[k].dtype == ref[k].dtype
    # given weights replace the example counts
    fixed = WeightedFedAvg({s: 1.0 for s in range(len(ups))}).aggregate(ups, ref)
    for k in ref:
        torch.testing.assert_close(fixed[k], torch.stack([u.params[k] for u in ups]).mean(0), rtol=1e-6, atol=1e-6)


def test_fedavg_of_one_site_is_exact():
    ref = {"w": torch.randn(7)}
    p = {"w": torch.randn(7) * 1e3}
    assert torch.equal(WeightedFedAvg().aggregate([SiteUpdate(0, 0, p, 123.0, 1, 0.0)], ref)["w"], p["w"])


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_one_site_full_participation_equals_centralised_dpsgd(momentum):
    """Same keys → bit-identical parameters and ledger after 3 rounds × 2 local epochs."""
    key, state, sites, plans = _setup([48], momentum=momentum)
    for _ in range(3):
        state, rep = run_round_inprocess(state, sites, key=key)
        assert rep.applied == (0,)
    # centralised DP-SGD on the same data with the site's keys
    plan, (x, y) = plans[0], sites.data[0]
    sample_key, noise_key = site_keys(site_key(key, 0))
    tx = dpsgd(plan.learning_rate, noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
               sampling_rate=plan.sampling_rate, num_examples=plan.num_examples, key=noise_key, momentum=momentum)
    step = make_step(None, tx, engine=vmap_engine(_loss, clipping=FlatClipping(plan.max_grad_norm)))
    params, opt = _params(0), tx.init(_params(0))
    for t in range(3 * plan.steps_per_round):
        idx = poisson_sample(sample_key.fold_in(t), plan.num_examples, plan.sampling_rate)
        params, opt, _ = step(params, opt, (x[idx], y[idx]))
    for k in params:
        assert torch.equal(state.params[k], params[k]), k
    assert state.sites[0].ledger == privacy_ledger(opt)


def test_each_site_epsilon_from_its_own_ledger():
    key, state, sites, plans = _setup([40, 80, 24], sigma=1.2)
    for _ in range(2):
        state, _ = run_round_inprocess(state, sites, key=key)
    eps = []
    for s, plan in enumerate(plans):
        ledger = state.sites[s].ledger
        assert ledger.total_steps == 2 * plan.steps_per_round
        assert {(p.noise_multiplier, p.sampling_rate) for p in ledger.phases} == {(1.2, min(1.0, 8 / plan.num_examples))}
        eps.append(accounting.epsilon(ledger, 1e-5, method="rdp"))
    # the smallest site has the largest sampling rate: the largest ε at equal σ
    assert eps[2] > eps[0] > eps[1]


def test_partial_participation_is_accounted():
    key, state, sites, plans = _setup([32] * 4)
    counts = [0] * 4
    for r in range(6):
        sel = select_sites(key, r, 4, 0.5)
        assert len(sel) == 2 and list(sel) == sorted(sel)
        for s in sel:
            counts[s] += 1
        state, rep = run_round_inprocess(state, sites, key=key, fraction=0.5)
        assert rep.selected == sel
    assert sum(counts) == 12 and max(counts) < 6
    for s in range(4):
        assert state.sites[s].ledger.total_steps == counts[s] * plans[s].steps_per_round
        assert state.sites[s].rounds == counts[s]


def test_nan_update_is_excluded_with_reason_and_charged():
    def fault(site, rnd, ans):
        upd, st_ = ans
        if site == 1:
            upd = upd._replace(params={**upd.params, "w2": torch.full_like(upd.params["w2"], math.nan)})
        return upd, st_

    key, state0, sites, plans = _setup([32, 32, 32], fault=fault)
    state, rep = run_round_inprocess(state0, sites, key=key, min_sites=2)
    assert rep.applied == (0, 2) and set(rep.excluded) == {1}
    assert "non-finite" in rep.excluded[1]
    assert all(torch.isfinite(v).all() for v in state.params.values())
    # the failed site may have trained: its ledger and step counter still advance (no noise key reused)
    assert state.sites[1].ledger.total_steps == plans[1].steps_per_round
    assert state.sites[1].steps == plans[1].steps_per_round
    # the mean equals FedAvg of the two good sites alone
    answers = sites(state0, (0, 2))
    expect = WeightedFedAvg().aggregate([answers[0][0], answers[2][0]], state0.params)
    for k in expect:
        assert torch.equal(state.params[k], expect[k])


def test_crashed_and_malformed_sites_are_excluded():
    def fault(site, rnd, ans):
        upd, st_ = ans
        if site == 0:
            raise RuntimeError("disk full")
        if site == 1:
            return upd._replace(params={**upd.params, "w1": upd.params["w1"][:2]}), st_
        return ans

    key, state, sites, _ = _setup([32, 32, 32], fault=fault)
    state, rep = run_round_inprocess(state, sites, key=key, min_sites=1)
    assert rep.applied == (2,)
    assert "disk full" in rep.excluded[0] and "shape" in rep.excluded[1]


def test_site_state_that_under_reports_its_ledger_is_refused():
    def fault(site, rnd, ans):
        upd, st_ = ans
        if site == 0:  # claims a fresh ledger: would under-report ε
            return upd, init_site_state(0, sites.plans[0], site_key(key, 0), upd.params)._replace(steps=st_.steps, rounds=1)
        return ans

    key, state, sites, plans = _setup([32, 32], fault=fault)
    state, rep = run_round_inprocess(state, sites, key=key)
    assert rep.applied == (1,) and "does not account for this round" in rep.excluded[0]
    assert state.sites[0].ledger.total_steps == plans[0].steps_per_round


def test_too_few_sites_fails_the_round_and_changes_nothing():
    key, state, sites, _ = _setup([32, 32], fault=lambda s, r, a: RuntimeError("down") if s == 0 else a)
    before = {k: v.clone() for k, v in state.params.items()}
    with pytest.raises(RoundFailedError, match=r"at least 2 needed.*site 0: failed: RuntimeError: down"):
        run_round_inprocess(state, sites, key=key, min_sites=2)
    assert state.round == 0 and all(torch.equal(state.params[k], before[k]) for k in before)


def test_failed_aggregation_fails_the_round_and_changes_nothing():
    # an aggregator that cannot produce the sum (a secure round below its threshold raises this)
    # must fail the round like too few answers do, not escape as another exception type
    class Broken(WeightedFedAvg):
        def aggregate(self, updates, reference):
            raise AggregationError("only 1 of 2 shares")

    key, state, sites, _ = _setup([32, 32])
    before = {k: v.clone() for k, v in state.params.items()}
    with pytest.raises(RoundFailedError, match=r"round 0 failed in aggregation \(AggregationError: only 1 of 2"):
        run_round_inprocess(state, sites, key=key, aggregator=Broken())
    assert state.round == 0 and all(torch.equal(state.params[k], before[k]) for k in before)
    assert all(s.ledger.total_steps == 0 for s in state.sites)


def test_update_is_never_applied_twice():
    key, state, sites, plans = _setup([32, 32])
    answers = sites(state, (0, 1))
    state1, _ = apply_round(state, (0, 1), answers, plans=plans)
    # replaying round 0's answers into round 1 is refused
    assert "answers round 0" in check_update(answers[0][0], state1.params, 1)
    with pytest.raises(RoundFailedError, match="answers round 0"):
        apply_round(state1, (0, 1), answers, plans=plans)


def test_server_optimizers():
    key, state, sites, plans = _setup([32, 32])
    answers = sites(state, (0, 1))
    plain, _ = apply_round(state, (0, 1), answers, plans=plans)
    tx = fedavgm(1.0, 0.0)
    st_m = state._replace(opt_state=tx.init(state.params))
    m, _ = apply_round(st_m, (0, 1), answers, plans=plans, server_tx=tx)
    for k in plain.params:
        torch.testing.assert_close(m.params[k], plain.params[k], rtol=0, atol=1e-6)
    # FedAdam's first step moves each coordinate by lr·Δ/(|Δ|+eps·...) ≈ lr·sign(mean − global)
    tx = fedadam(0.01, eps=1e-8)
    st_a = state._replace(opt_state=tx.init(state.params))
    a, _ = apply_round(st_a, (0, 1), answers, plans=plans, server_tx=tx)
    for k in plain.params:
        delta = plain.params[k] - state.params[k]
        big = delta.abs() > 1e-4
        torch.testing.assert_close((a.params[k] - state.params[k])[big], 0.01 * delta.sign()[big], rtol=1e-3, atol=1e-5)


def test_partitions_cover_and_skew():
    labels = torch.tensor([0] * 300 + [1] * 700)
    for scheme in (Partition.IID, "dirichlet"):
        parts = partition_indices(Key(3), labels, 3, scheme, alpha=0.5)
        assert sorted(torch.cat(parts).tolist()) == list(range(1000))
        again = partition_indices(Key(3), labels, 3, scheme, alpha=0.5)
        assert all(torch.equal(a, b) for a, b in zip(parts, again))
    iid = partition_indices(Key(3), labels, 3, Partition.IID)
    assert max(len(p) for p in iid) - min(len(p) for p in iid) <= 1
    fr = lambda parts: [float(labels[p].float().mean()) for p in parts]  # noqa: E731
    assert max(fr(iid)) - min(fr(iid)) < 0.15
    skew = [max(fr(partition_indices(Key(k), labels, 3, "dirichlet", alpha=0.1))) -
            min(fr(partition_indices(Key(k), labels, 3, "dirichlet", alpha=0.1))) for k in range(5)]
    assert max(skew) > 0.3


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="SitePlan: momentum"):
        SitePlan(10, 5, 1, 1.0, momentum=1.0)
    with pytest.raises(ValueError, match="select_sites: fraction"):
        select_sites(Key(0), 0, 3, 0.0)
    with pytest.raises(ValueError, match="partition_indices: scheme"):
        partition_indices(Key(0), torch.zeros(10), 2, "random")
    with pytest.raises(ValueError, match="make_aggregator: aggregator must be one of"):
        make_aggregator("nope")
    key, state, sites, plans = _setup([32])
    with pytest.raises(ValueError, match="site_round: site 0 has 32 examples but its plan says num_examples=10"):
        site_round(state.params, state.sites[0], sites.data[0], key, plan=SitePlan(10, 5, 1, 1.0), engine=ENGINE, round=0)


@settings(max_examples=30)
@given(seed=st.integers(0, 2**32 - 1), num_sites=st.integers(1, 5), fraction=st.floats(0.2, 1.0),
       fail=st.lists(st.booleans(), min_size=20, max_size=20), rounds=st.integers(1, 4))
def test_ledgers_count_every_round_a_site_was_asked(seed, num_sites, fraction, fail, rounds):
    """Property: whatever the participation and failures, a site's ledger holds exactly its plan's steps for
    every round it was asked to train (answered or not), and nothing for the others."""
    key = Key(seed)
    params = {"w": torch.zeros(2)}
    plans = [SitePlan(10 + 5 * s, 5, 1, 1.0 + s) for s in range(num_sites)]
    state = init_server_state(params, [init_site_state(s, p, site_key(key, s), params) for s, p in enumerate(plans)], None)
    asked = [0] * num_sites
    for r in range(rounds):
        sel = select_sites(key, r, num_sites, fraction)
        answers = {}
        for s in sel:
            asked[s] += 1
            if fail[(r * 5 + s) % 20]:
                answers[s] = RuntimeError("down")
            else:
                new = charge_site(state.sites[s], plans[s])._replace(rounds=state.sites[s].rounds + 1)
                answers[s] = (SiteUpdate(s, r, {"w": torch.full((2,), float(s))}, float(plans[s].num_examples), 2, 0.0), new)
        try:
            state, rep = apply_round(state, sel, answers, plans=plans)
        except RoundFailedError:
            for s in sel:
                asked[s] -= 1  # a failed round changes nothing, ledgers included
    for s, plan in enumerate(plans):
        led = state.sites[s].ledger
        assert led.total_steps == asked[s] * plan.steps_per_round
        assert all(p.noise_multiplier == plan.noise_multiplier and p.sampling_rate == plan.sampling_rate for p in led.phases)


# ----------------------------------------------------------------------------- server-side iterate averaging


def _average_oracle(models, decay):
    """The average after R rounds written out: model r has weight (1 − d_r)·∏_{j>r} d_j, d_r = min(decay, r/(r+1))."""
    d = [min(decay, r / (r + 1)) for r in range(len(models))]
    out = {}
    for k in models[0]:
        acc = torch.zeros(models[0][k].shape, dtype=torch.float64)
        for r, m in enumerate(models):
            w = 1.0 - d[r]
            for j in range(r + 1, len(models)):
                w *= d[j]
            acc = acc + w * m[k].to(torch.float64)
        out[k] = acc
    return out


@settings(max_examples=30)
@given(seed=st.integers(0, 2**32 - 1), decay=st.floats(0.0, 0.99), rounds=st.integers(1, 8))
def test_server_average_equals_explicit_weights(seed, decay, rounds):
    models = [_params(seed + r) for r in range(rounds)]
    before = [{k: v.clone() for k, v in m.items()} for m in models]
    avg = None
    for r, m in enumerate(models):
        avg = average_rounds(avg, m, decay, r)
    oracle = _average_oracle(models, decay)
    for k in oracle:
        assert avg[k].dtype == models[0][k].dtype
        torch.testing.assert_close(avg[k].double(), oracle[k], rtol=1e-5, atol=1e-6)
    for m, b in zip(models, before):  # pure: inputs untouched
        assert all(torch.equal(m[k], b[k]) for k in m)


def test_server_average_closed_forms():
    models = [{"w": torch.tensor([float(v)])} for v in (3.0, 6.0, 0.0, 9.0)]
    avg = None
    for r, m in enumerate(models):  # decay above r/(r+1) for every r: the plain running mean
        avg = average_rounds(avg, m, 0.9, r)
    assert avg["w"].item() == pytest.approx(4.5, abs=1e-6)
    a = average_rounds(average_rounds(None, models[0], 0.5, 0), models[1], 0.5, 1)  # mean(3, 6) = 4.5
    assert average_rounds(a, models[2], 0.5, 2)["w"].item() == 2.25                 # 0.5·4.5 + 0.5·0 (d capped)
    last = average_rounds(a, models[3], 0.0, 3)                                         # decay 0: the last model
    assert torch.equal(last["w"], models[3]["w"]) and last["w"] is not models[3]["w"]
    with pytest.raises(ValueError, match="average_rounds: decay must be"):
        average_rounds(None, models[0], 1.0, 0)
    with pytest.raises(ValueError, match="average_rounds: average and params hold different names"):
        average_rounds({"v": torch.zeros(1)}, models[0], 0.5, 1)


def test_averaging_leaves_the_global_model_unchanged_and_tracks_it():
    """The average is pure post-processing of the global models: the global trajectory (and every ledger) is
    bit for bit the same with or without it, and the average equals the oracle over that trajectory."""
    runs = {}
    for decay in (0.0, 0.6):
        key, state, sites, _ = _setup([40, 80, 60])
        assert state.average is None
        trajectory = []
        for _ in range(3):  # round 2 has d = min(0.6, 2/3) = 0.6: past the running mean, into the EMA
            state, _ = run_round_inprocess(state, sites, key=key, average_decay=decay)
            trajectory.append(state.params)
        runs[decay] = (state, trajectory)
    (s0, t0), (s6, t6) = runs[0.0], runs[0.6]
    for a, b in zip(t0, t6):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert [s.ledger for s in s0.sites] == [s.ledger for s in s6.sites]
    assert all(torch.equal(s0.average[k], s0.params[k]) for k in s0.params)  # decay 0: the last model
    oracle = _average_oracle(t6, 0.6)
    for k in oracle:
        torch.testing.assert_close(s6.average[k].double(), oracle[k], rtol=1e-5, atol=1e-6)
