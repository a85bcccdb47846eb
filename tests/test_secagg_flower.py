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
    assert fl["history"][0]["sites_answered"] == [0, 1, 2]
    assert json.loads((tmp_path / "flower" / "config.json").read_text())["aggregator"] == "secagg"
