"""``dpfunc federated --engine flower --secure-aggregation``: secure aggregation over the Flower Message API
(a SuperLink and one SuperNode per site on localhost; four ``query.secagg`` round trips per round).

One small bounded run (3 sites, 1 round, 150 training examples, hard timeouts; the driver kills every
process group it started): the global model equals plain in-process FedAvg on the same keys within the
fixed-point bound.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("flwr")

from dpfunc.bridge.checkpoint import load_checkpoint  # noqa: E402
from dpfunc.federated.flower import run_flower  # noqa: E402
from dpfunc.federated.job import FederatedConfig, run_federated  # noqa: E402

from _trees import tensors_in as _tensors  # noqa: E402

pytestmark = pytest.mark.slow

TINY = dict(sites=3, rounds=1, train_subset=150, batch_size=25, accountant="rdp")


def test_flower_secure_aggregation_equals_plain_inprocess_fedavg(tmp_path, data_dir):
    fl = run_flower(FederatedConfig(**TINY, engine="flower", aggregator="secagg", round_timeout=150),
                    data_dir=data_dir, run_dir=tmp_path / "flower", bootstrap_resamples=10, log=lambda s: None,
                    run_timeout=400)
    run_federated(FederatedConfig(**TINY), data_dir=data_dir, run_dir=tmp_path / "plain", progress=False,
                  log=lambda s: None, bootstrap_resamples=10)
    a = load_checkpoint(tmp_path / "flower" / "checkpoint.pt")["state"]
    b = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")["state"]
    assert a.round == b.round == 1
    # bound: 3 sites · scale/2 · max_weight / Σw = 3 · 2^-26 · 8192 / 150 ≈ 2.4e-6 (+ float32 rounding)
    worst = max((a.params[k].double() - b.params[k].double()).abs().max().item() for k in b.params)
    assert worst <= 5e-6, worst
    # the round was applied (a secure round that silently kept the placeholders would leave the model still)
    from dpfunc.federated.job import build

    initial = build(FederatedConfig(**TINY))[2]
    assert max((a.params[k] - initial[k]).abs().max().item() for k in initial) > 1e-3
    for sa, sb in zip(a.sites, b.sites):
        assert sa.ledger == sb.ledger and sa.steps == sb.steps
        # the momentum buffer stayed at the site: what the server stored of its optimizer state has no tensor
        # (tests/test_secagg_flower_state.py pins the messages and the kept buffer's use)
        assert _tensors(sa.opt_state) == [] and _tensors(sb.opt_state) != []
    assert fl["history"][0]["sites_answered"] == [0, 1, 2]
    assert json.loads((tmp_path / "flower" / "config.json").read_text())["aggregator"] == "secagg"


def test_flower_site_vanishing_after_the_key_stages_is_recovered_from_shares(tmp_path, data_dir):
    """Site 2 vanishes mid-protocol: when the server sends it its inbox (after both key stages), its
    ClientApp kills its own SuperNode's process group — no reply, no process left. The server notices
    (Flower marks the node unavailable after its heartbeat patience, or the round timeout) and goes on
    with sites 0 and 1 (t = 2 of 3): the survivors' shares remove site 2's pairwise masks. The global
    model equals the in-process secure aggregation with site 2 dropped at the same stage on the same keys,
    and the history records included [0, 1], dropped [2], threshold 2. (A round left with fewer than t sites
    fails with nothing applied: pinned in process in test_secagg_federated.py, same aggregator code path.)
    Hard limits: round_timeout 150 s, run_timeout 420 s; run_flower kills every process group it started."""
    from dpfunc.federated.job import FederatedConfig
    from dpfunc.secagg import Stage
    from dpfunc.secagg.federated import SecureAggregator

    fl = run_flower(FederatedConfig(**TINY, engine="flower", aggregator="secagg", round_timeout=150),
                    data_dir=data_dir, run_dir=tmp_path / "flower", bootstrap_resamples=10, log=lambda s: None,
                    run_timeout=420, site_node_config={2: {"secagg-vanish": "inbox"}})
    agg = SecureAggregator(dropouts={0: {Stage.MASKED_INPUT: [2]}})
    run_federated(FederatedConfig(**TINY, aggregator="secagg"), data_dir=data_dir, run_dir=tmp_path / "inproc",
                  progress=False, log=lambda s: None, bootstrap_resamples=10, aggregator=agg)
    secure = fl["history"][0]["secure"]
    assert (secure["included"], secure["dropped"], secure["threshold"]) == ([0, 1], [2], 2)
    a = load_checkpoint(tmp_path / "flower" / "checkpoint.pt")["state"]
    b = load_checkpoint(tmp_path / "inproc" / "checkpoint.pt")["state"]
    assert a.round == b.round == 1
    # both are within 2 · scale/2 · max_weight / Σw (Σw = 100) of the plain mean of sites 0 and 1
    worst = max((a.params[k].double() - b.params[k].double()).abs().max().item() for k in b.params)
    assert worst <= 2 * 2 * 2.0 ** -26 * 8192 / 100 + 1e-6, worst
    assert [s.ledger for s in a.sites] == [s.ledger for s in b.sites]   # site 2 trained: charged in both
