"""Secure aggregation inside the federated rounds: the same global model as plain FedAvg up to the
stated fixed-point bound, dropouts recovered or the round failing loudly and not applied."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from dpfunc import FlatClipping, Key, vmap_engine
from dpfunc.federated import (AggregationError, InProcessSites, RoundFailedError, SitePlan, SiteUpdate, WeightedFedAvg,
                              init_server_state, init_site_state, make_aggregator, run_round_inprocess, site_key)
from dpfunc.secagg import ProtocolError, Stage
from dpfunc.secagg.federated import SecureAggregationFailed, SecureAggregator


def _seed(i: int) -> bytes:
    return hashlib.sha256(f"fed{i}".encode()).digest()


def _close_within(a: dict, b: dict, bound: float) -> None:
    for k in a:
        diff = (a[k].double() - b[k].double()).abs()
        # the bound on the float64 means, plus one float32 rounding of each side
        tol = bound + 2 * torch.finfo(a[k].dtype).eps * torch.maximum(a[k].double().abs(), b[k].double().abs())
        assert bool((diff <= tol).all()), f"{k}: max diff {diff.max().item():.3g} > bound {bound:.3g}"


@settings(max_examples=20)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 10), size=st.integers(1, 30),
       bits=st.integers(12, 28), data=st.data())
def test_secure_mean_equals_weighted_fedavg_up_to_the_bound(seed, n, size, bits, data):
    weights = data.draw(st.lists(st.integers(1, 500), min_size=n, max_size=n))
    g = torch.Generator().manual_seed(seed)
    ref = {"a": torch.randn(size, generator=g), "b": torch.randn(2, 3, generator=g)}
    ups = [SiteUpdate(s, 4, {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in ref.items()},
                      float(w), 1, float(s)) for s, w in enumerate(weights)]
    agg = SecureAggregator(delta_clip=2.0, precision_bits=bits, ring_bits=bits + 6, max_weight=500,
                           seed=_seed(seed), report_train_loss=True)
    secure = agg.aggregate(ups, ref)
    plain = WeightedFedAvg().aggregate(ups, ref)
    info = agg.last_round
    assert info.sites_clipped == 0 and info.included == tuple(range(n)) and info.total_weight == sum(weights)
    assert info.error_bound == pytest.approx(n * (2.0 / (2 ** (bits - 1) - 1)) / 2 * 500 / sum(weights))
    _close_within(secure, plain, info.error_bound)
    assert info.mean_loss == pytest.approx(sum(w * s for s, w in enumerate(weights)) / sum(weights),
                                           abs=n * 100.0 / (2 ** (bits - 1) - 1) * 500 / sum(weights))


@pytest.mark.parametrize("stage", [Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASK])
def test_dropouts_inside_the_protocol(stage):
    """Sites 1 and 3 of 6 drop at ``stage``: before masked input they are left out of the mean, after it
    (UNMASK) they are in it; t = 4 holds either way."""
    g = torch.Generator().manual_seed(1)
    ref = {"w": torch.randn(7, generator=g)}
    ups = [SiteUpdate(s, 2, {"w": ref["w"] + 0.1 * torch.randn(7, generator=g)}, float(10 + s), 1, 0.0)
           for s in range(6)]
    agg = SecureAggregator(precision_bits=24, max_weight=100, threshold=4, dropouts={2: {stage: [1, 3]}})
    secure = agg.aggregate(ups, ref)
    kept = ups if stage == Stage.UNMASK else [u for u in ups if u.site not in (1, 3)]
    assert agg.last_round.included == tuple(u.site for u in kept)
    _close_within(secure, WeightedFedAvg().aggregate(kept, ref), agg.last_round.error_bound)


def test_secagg_plus_in_the_federated_mean():
    g = torch.Generator().manual_seed(5)
    ref = {"w": torch.randn(9, generator=g)}
    ups = [SiteUpdate(s, 0, {"w": ref["w"] + 0.1 * torch.randn(9, generator=g)}, float(5 + s), 1, 0.0) for s in range(12)]
    agg = SecureAggregator(max_weight=100, neighbours=4, dropouts={0: {Stage.MASKED_INPUT: [3]}})
    out = agg.aggregate(ups, ref)
    assert agg.last_round.threshold == 3 and agg.last_round.included == tuple(s for s in range(12) if s != 3)
    _close_within(out, WeightedFedAvg().aggregate([u for u in ups if u.site != 3], ref), agg.last_round.error_bound)


def test_too_many_dropouts_fail_the_round_loudly():
    ref = {"w": torch.zeros(3)}
    ups = [SiteUpdate(s, 0, {"w": torch.ones(3)}, 5.0, 1, 0.0) for s in range(5)]
    agg = SecureAggregator(threshold=3, dropouts={0: {Stage.MASKED_INPUT: [0, 1, 2]}})
    with pytest.raises(SecureAggregationFailed, match="round 0 failed at stage MASKED_INPUT") as info:
        agg.aggregate(ups, ref)
    assert isinstance(info.value, AggregationError)
    assert (info.value.cause.available, info.value.cause.needed) == (2, 3)
    with pytest.raises(SecureAggregationFailed, match="at least 2 sites"):
        SecureAggregator().aggregate(ups[:1], ref)


def _linear_loss(p, b, x, y):
    return F.cross_entropy((torch.tanh(x @ p["w1"]) @ p["w2"])[None], y[None])


def test_federated_rounds_give_the_same_global_model_with_and_without_secure_aggregation():
    """Three DP sites, two rounds, the in-process runner on the same keys: plain FedAvg vs secure
    aggregation. The global models agree within the accumulated per-round bound (the site updates of
    round r depend on the global model of round r − 1, so the bound is checked round by round from the
    same starting model, and end to end with the sum of the bounds times a margin for the sites' own
    sensitivity to their starting point)."""
    engine = vmap_engine(_linear_loss, clipping=FlatClipping(1.0))
    g = torch.Generator().manual_seed(0)
    params = {"w1": torch.randn(4, 6, generator=g) * 0.3, "w2": torch.randn(6, 2, generator=g) * 0.3}
    sizes = [20, 30, 25]
    data = []
    for i, n in enumerate(sizes):
        x = torch.randn(n, 4, generator=g)
        data.append((x, (x[:, 0] > 0).long()))
    plans = [SitePlan(n, 10, 1, 1.0, learning_rate=0.5) for n in sizes]
    key = Key(3)

    def init():
        return init_server_state(params, [init_site_state(s, p, site_key(key, s), params) for s, p in enumerate(plans)], None)

    sites = InProcessSites(data, plans, engine, key)
    plain, secure = init(), init()
    agg = SecureAggregator(delta_clip=8.0, precision_bits=24, max_weight=100, seed=_seed(0))
    for r in range(2):
        # round-by-round: from the same (plain) global model, the two aggregators agree within the bound
        one_secure, _ = run_round_inprocess(plain, sites, key=key, aggregator=agg)
        plain, _ = run_round_inprocess(plain, sites, key=key)
        assert agg.last_round.sites_clipped == 0
        _close_within(one_secure.params, plain.params, agg.last_round.error_bound)
        secure, report = run_round_inprocess(secure, sites, key=key, aggregator=agg)
        assert report.applied == (0, 1, 2)
    # end to end, 2 rounds: still equal to ~1e-6 (bound per round ~ 1e-6 here)
    for k in params:
        assert torch.allclose(secure.params[k], plain.params[k], atol=1e-5), k
    assert secure.sites[0].ledger == plain.sites[0].ledger


def test_a_failed_secure_round_is_not_applied():
    engine = vmap_engine(lambda p, b, x, y: F.cross_entropy((x @ p["w"])[None], y[None]), clipping=FlatClipping(1.0))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(20, 3, generator=g), torch.randint(0, 2, (20,), generator=g)) for _ in range(3)]
    plans = [SitePlan(20, 5, 1, 1.0) for _ in data]
    key = Key(0)
    params = {"w": torch.zeros(3, 2)}
    state = init_server_state(params, [init_site_state(s, p, site_key(key, s), params) for s, p in enumerate(plans)], None)
    agg = SecureAggregator(threshold=3, dropouts={0: {Stage.SHARE_KEYS: [2]}})
    # the federated round fails as a whole (the CLI prints it, the checkpoint stays), caused by the secure round
    with pytest.raises(RoundFailedError, match="failed in aggregation") as info:
        run_round_inprocess(state, InProcessSites(data, plans, engine, key), key=key, aggregator=agg)
    assert isinstance(info.value.__cause__, SecureAggregationFailed)
    assert state.round == 0 and torch.equal(state.params["w"], params["w"])


def test_clipped_updates_are_counted_and_warned():
    ref = {"w": torch.zeros(4)}
    ups = [SiteUpdate(0, 0, {"w": torch.tensor([5.0, 0, 0, 0])}, 10.0, 1, 0.0),
           SiteUpdate(1, 0, {"w": torch.zeros(4)}, 10.0, 1, 0.0)]
    agg = SecureAggregator(delta_clip=0.01, max_weight=10)
    with pytest.warns(RuntimeWarning, match="1 site\\(s\\) had update coordinates beyond delta_clip"):
        out = agg.aggregate(ups, ref)
    assert agg.last_round.sites_clipped == 1
    assert out["w"][0].item() == pytest.approx(0.005, abs=1e-6)   # clipped to 0.01 then averaged


def test_registry_and_bad_configuration():
    assert isinstance(make_aggregator("secagg", precision_bits=16, ring_bits=20), SecureAggregator)
    with pytest.raises(ValueError, match="check_sum_fits"):
        SecureAggregator(precision_bits=24, ring_bits=24)
    agg = SecureAggregator(precision_bits=16, ring_bits=18, max_weight=1000)
    assert agg.max_sites() == 4     # 4 · (2^15 − 1) ≤ 2^17 − 1 < 5 · (2^15 − 1)
    ups = [SiteUpdate(s, 0, {"w": torch.zeros(2)}, 1.0, 1, 0.0) for s in range(5)]
    agg.aggregate(ups[:4], {"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="SecureAggregator.aggregate: check_sum_fits: the sum of 5 sites"):
        agg.aggregate(ups, {"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="weight of site 0 must be an integer in \\[1, max_weight=8192\\], got 1.5"):
        SecureAggregator().aggregate([u._replace(weight=1.5) for u in ups[:2]], {"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="SecureAggregator: delta_clip must be a finite number"):
        SecureAggregator(delta_clip=0.0)
    with pytest.raises(ValueError, match="SecureAggregator: seed must be 32 bytes"):
        SecureAggregator(seed=b"x")


@pytest.mark.slow
def test_cli_secure_aggregation_gives_the_same_global_model(tmp_path, data_dir):
    """``dpfunc federated --secure-aggregation`` (in process) vs plain FedAvg on the same seed: the final
    global models agree to within the per-round bound (≈ 1.5e-6 per coordinate here) compounded over two
    rounds of local training, checked at 1e-4."""
    from dpfunc.bridge.checkpoint import load_checkpoint
    from dpfunc.federated.cli import main

    finals = {}
    for secure in (False, True):
        run = tmp_path / ("secure" if secure else "plain")
        argv = ["--sites", "2", "--rounds", "2", "--train-subset", "160", "--batch-size", "40", "--accountant", "rdp",
                "--epsilon", "3", "--data-dir", str(data_dir), "--run-dir", str(run), "--bootstrap", "20", "--quiet"]
        assert main(argv + (["--secure-aggregation"] if secure else [])) == 0
        finals[secure] = load_checkpoint(run / "checkpoint.pt")["state"].params
        assert json.loads((run / "config.json").read_text())["aggregator"] == ("secagg" if secure else "fedavg")
        history = json.loads((run / "metrics.json").read_text())["history"]
        if secure:  # each round's secure details: only what the server saw (participation, sums' metadata)
            assert [(h["secure"]["included"], h["secure"]["dropped"], h["secure"]["threshold"],
                     h["secure"]["sites_clipped"], h["secure"]["total_weight"]) for h in history] == [([0, 1], [], 2, 0, 160)] * 2
            assert all(h["secure"]["bytes_sent"] > 0 for h in history)
        else:
            assert all("secure" not in h for h in history)
    worst = max((finals[True][k].double() - finals[False][k].double()).abs().max().item() for k in finals[False])
    assert worst <= 1e-4, worst


# ---------------------------------------------------------------- sites in other processes (transport-neutral)

def _remote_setup(n, drop_kind=None, drop=(), report=False):
    from dpfunc.secagg.remote import site_handle, site_keep_input

    g = torch.Generator().manual_seed(n)
    ref = {"w": torch.randn(5, generator=g), "b": torch.randn(2, generator=g)}
    ups = [SiteUpdate(s, 1, {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in ref.items()},
                      float(20 + s), 1, 0.3) for s in range(n)]
    stores = {s: {} for s in range(n)}
    for u in ups:
        site_keep_input(u, ref, stores[u.site], aggregator=SecureAggregator(max_weight=100, report_train_loss=report))
    log = []

    def channel(requests):
        # each request is copied through the record codec's types only (what a transport would carry)
        out = {}
        for s, req in requests.items():
            log.append((s, req["kind"]))
            if req["kind"] == drop_kind and s in drop:
                continue
            out[s] = site_handle(dict(req), stores[s])
        return out

    # what the server receives from the sites in place of updates: ids, round, weight; no params
    placeholders = [u._replace(params=dict(ref), loss=float("nan")) for u in ups]
    return ref, ups, placeholders, stores, channel, log


@pytest.mark.parametrize("drop_kind", [None, "begin", "directory", "inbox", "unmask_request"])
def test_remote_secure_aggregation_over_a_channel(drop_kind):
    from dpfunc.secagg.remote import RemoteSecureAggregator

    report = drop_kind in (None, "inbox")  # the loss slots (opt-in) in some runs, none in the others
    ref, ups, placeholders, stores, channel, log = _remote_setup(5, drop_kind, drop=(1,), report=report)
    agg = RemoteSecureAggregator(channel, max_weight=100, report_train_loss=report)
    out = agg.aggregate(placeholders, ref)
    kept = [u for u in ups if drop_kind in (None, "unmask_request") or u.site != 1]
    assert agg.last_round.included == tuple(u.site for u in kept)
    _close_within(out, WeightedFedAvg().aggregate(kept, ref), agg.last_round.error_bound)
    if report:
        assert agg.last_round.mean_loss == pytest.approx(0.3, abs=1e-5)
    else:  # the sites' updates hold a loss (0.3), but nothing of it was encoded
        assert agg.last_round.mean_loss is None and "mean_loss" not in agg.last_round.to_record(range(5))
    assert [k for _, k in log[:5]] == ["begin"] * 5
    assert all(st == {} for s, st in stores.items() if s != 1 or drop_kind is None)  # secrets forgotten after unmasking


def test_remote_site_refuses_out_of_order_requests_and_failed_rounds_raise():
    from dpfunc.secagg.remote import RemoteSecureAggregator, site_handle, site_keep_input

    ref, ups, placeholders, stores, channel, _ = _remote_setup(3, "inbox", drop=(0, 1))
    with pytest.raises(ProtocolError, match="before the key advertisement"):
        site_handle({"kind": "inbox", "from": [], "ct": []}, stores[2])
    with pytest.raises(ProtocolError, match="the server asks for round 7"):
        site_handle({"kind": "begin", "round": 7, "threshold": 2, "vector_length": 10, "ring_bits": 32,
                     "neighbours": -1}, stores[2])
    with pytest.raises(ProtocolError, match="encoding .* differs"):
        RemoteSecureAggregator(lambda reqs: {s: site_handle(r, stores[s]) for s, r in reqs.items()}).aggregate(placeholders, ref)
    fresh = {}
    site_keep_input(ups[0], ref, fresh, aggregator=SecureAggregator(max_weight=100))
    begin = {"kind": "begin", "round": 1, "threshold": 2, "vector_length": 9, "ring_bits": 32, "neighbours": -1,
             "encoding": json.dumps([1.0, 26, 100, None])}  # 7 coordinates + weight + clipped flag: no loss slot
    site_handle(begin, fresh)
    with pytest.raises(ProtocolError, match="never masked twice"):
        site_handle(begin, fresh)
    with pytest.raises(ProtocolError, match="holds no input"):
        site_handle({"kind": "begin"}, {})
    with pytest.raises(SecureAggregationFailed, match="failed at stage MASKED_INPUT"):
        RemoteSecureAggregator(channel, max_weight=100).aggregate(placeholders, ref)
