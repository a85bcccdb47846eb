"""No raw training statistic leaves a site by default (the server is untrusted): the site's mean training
loss is outside its (ε, δ), so it is sent, aggregated and recorded only on an explicit opt-in
(``report_train_loss``). Checked on the pure core (SiteUpdate, RoundReport), the in-process job's
metrics.json, and the Flower ClientApp's reply message as the server's executor parses it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dpfunc.federated import apply_round, site_key, site_round

from test_federated import ENGINE, _setup


def test_site_update_carries_no_loss_unless_opted_in():
    key, state, sites, plans = _setup([40, 30])
    args = (state.params, state.sites[0], sites.data[0], site_key(key, 0))
    quiet, s_quiet = site_round(*args, plan=plans[0], engine=ENGINE, round=0)
    loud, s_loud = site_round(*args, plan=plans[0], engine=ENGINE, round=0, report_loss=True)
    assert math.isnan(quiet.loss) and math.isfinite(loud.loss) and loud.loss > 0
    for k in quiet.params:  # the opt-in changes what is reported, never the training
        assert torch.equal(quiet.params[k], loud.params[k]), k
    assert s_quiet.ledger == s_loud.ledger
    with pytest.raises(TypeError, match="site_round: report_loss must be a bool"):
        site_round(*args, plan=plans[0], engine=ENGINE, round=0, report_loss=1)


def test_round_report_loss_only_with_the_opt_in():
    key, state, sites, plans = _setup([40, 30])
    _, report = apply_round(state, [0, 1], sites(state, [0, 1]), plans=plans)
    assert math.isnan(report.loss)
    sites.report_train_loss = True
    _, report = apply_round(state, [0, 1], sites(state, [0, 1]), plans=plans)
    assert math.isfinite(report.loss)


def test_job_history_and_metrics_json_hold_no_train_loss_by_default(tmp_path, data_dir):
    from dpfunc.federated.job import FederatedConfig, run_federated

    tiny = dict(sites=2, rounds=1, train_subset=80, batch_size=40, accountant="rdp")
    lines: list[str] = []
    m = run_federated(FederatedConfig(**tiny), data_dir=data_dir, run_dir=tmp_path / "quiet", progress=False,
                      log=lines.append, bootstrap_resamples=10)
    saved = json.loads((tmp_path / "quiet" / "metrics.json").read_text())
    for h in (m["history"], saved["history"]):
        assert h and all("train_loss" not in r for r in h) and all("val_auc" in r for r in h)
    assert not any(" loss " in line for line in lines)
    with pytest.raises(ValueError, match="report_train_loss must be a bool"):
        FederatedConfig(**tiny, report_train_loss="yes")
    m = run_federated(FederatedConfig(**tiny, report_train_loss=True), data_dir=data_dir, progress=False,
                      log=lines.append, bootstrap_resamples=10)
    assert all(math.isfinite(r["train_loss"]) for r in m["history"])


@pytest.mark.parametrize("asked, consents", [(False, True), (True, False), (True, True)])
def test_flower_reply_holds_a_loss_only_if_run_and_site_opt_in(data_dir, monkeypatch, asked, consents):
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from dpfunc.data import pneumoniamnist
    from dpfunc.federated import init_server_state, init_site_state
    from dpfunc.federated.flower import apps
    from dpfunc.federated.job import FederatedConfig, build, prepare

    for name in ("_run_id", "_node_id", "_task_id"):  # what a Flower process sets before building messages
        monkeypatch.setattr(TaskIdentity, name, 7)
    cfg = FederatedConfig(sites=2, rounds=1, train_subset=60, batch_size=30, accountant="rdp", engine="flower",
                          report_train_loss=asked)
    setup = prepare(cfg, pneumoniamnist("train", data_dir).labels)
    _, _, params, _ = build(cfg)
    state = init_server_state(params, [init_site_state(s, p, site_key(setup.sites_key, s), params)
                                       for s, p in enumerate(setup.plans)], None)
    node_config = {"partition-id": 0, **({"report-train-loss": "1"} if consents else {})}
    replies = []

    class Grid:  # the ClientApp answers in this process; the server's executor parses its reply
        def send_and_receive(self, msgs, timeout):
            ctx = Context(run_id=7, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
            replies.extend(apps._train(m, ctx) for m in msgs)
            return list(replies)

    answers = apps.FlowerSites(Grid(), setup, [7], 10.0, lambda s: None, data_dir=str(data_dir))(state, [0])
    reply = replies[0].content["reply"]
    update, _ = answers[0]
    if asked and consents:
        assert math.isfinite(float(reply["loss"])) and update.loss == float(reply["loss"])
    else:  # nothing of the raw data but the DP model (and the public step/weight counts) on the wire
        assert "loss" not in reply and math.isnan(update.loss)
        assert set(reply.keys()) == {"site", "trained", "round", "weight", "steps", "state"}
        assert set(replies[0].content.keys()) == {"params", "reply"}


def test_the_command_line_opt_in_reaches_the_config():
    """`dpfunc federated` sends no loss unless --report-train-loss is given, and its help says it is not covered."""
    from dpfunc.cli import build_parser
    from dpfunc.federated.cli import config_from_args

    parser = build_parser()
    assert config_from_args(parser.parse_args(["federated"])).report_train_loss is False
    assert config_from_args(parser.parse_args(["federated", "--report-train-loss"])).report_train_loss is True
    sub = next(a for a in parser._subparsers._group_actions if a.choices).choices["federated"]
    flag = next(a for a in sub._actions if "--report-train-loss" in a.option_strings)
    assert "NOT covered by ε" in flag.help


@pytest.mark.parametrize("asked, consents", [(False, True), (True, False), (True, True)])
def test_a_secure_flower_site_encodes_a_loss_only_if_run_and_site_opt_in(data_dir, monkeypatch, asked, consents):
    """Under secure aggregation the reply holds no loss and no params; what the site keeps to mask has no
    loss slot unless the run asks (then zeros unless the site's node config consents)."""
    import numpy as np
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from dpfunc.data import pneumoniamnist
    from dpfunc.federated import init_server_state, init_site_state
    from dpfunc.federated.flower import apps
    from dpfunc.federated.job import FederatedConfig, build, prepare

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 7)
    cfg = FederatedConfig(sites=2, rounds=1, train_subset=60, batch_size=30, accountant="rdp", engine="flower",
                          aggregator="secagg", report_train_loss=asked)
    setup = prepare(cfg, pneumoniamnist("train", data_dir).labels)
    _, _, params, _ = build(cfg)
    state = init_server_state(params, [init_site_state(s, p, site_key(setup.sites_key, s), params)
                                       for s, p in enumerate(setup.plans)], None)
    node_config = {"partition-id": 0, **({"report-train-loss": "1"} if consents else {})}
    ctx = Context(run_id=7, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
    msg = apps.FlowerSites(None, setup, [7], 10.0, lambda s: None, data_dir=str(data_dir))._message(state, 7, [0])
    reply = apps._train(msg, ctx)
    assert set(reply.content.keys()) == {"reply"} and "loss" not in reply.content["reply"]
    vec = np.frombuffer(bytes(ctx.state["secagg"]["secagg-input"]), dtype=np.uint32)
    size = sum(v.numel() for v in params.values())
    if not asked:
        assert vec.size == size + 2  # update, weight, clipped flag
    else:
        assert vec.size == size + 4
        loss_slots = vec[size + 1:size + 3]
        assert (loss_slots != 0).all() if consents else (loss_slots == 0).all()
