"""Flower 1.42 Message-API apps: the ServerApp runs :func:`dpfunc.federated.job.run_federated`; each
ClientApp runs :func:`dpfunc.federated.site_round` on its own shard. Referenced by the app pyproject that
:mod:`dpfunc.federated.flower.driver` writes (``dpfunc.federated.flower.apps:server_app`` / ``:client_app``).

Messages (one round trip per site and round; state is carried by the messages, so a site process keeps
nothing between rounds — Flower starts a fresh ClientApp process per message):

    train   server → site  "global": ArrayRecord(params)        site → server "params": ArrayRecord(local model)
                           "task": ConfigRecord(config json,                  "reply": ConfigRecord(site, trained,
                                   round, sites, plan-<s> json,                       round, weight, steps, [loss],
                                   state-<s> bytes)                                    state bytes)
    (secure aggregation: no "params", no loss, and "state" is the shared site state: no tensor)

``loss`` (the site's raw mean training loss, NOT covered by ε) is sent only when the run asks for it
(``report_train_loss``) AND the site's own node config agrees (``report-train-loss=1``): the server is
untrusted, so by default the reply holds no statistic of the raw data, and it cannot switch that on alone.

With ``aggregator="secagg"`` (issue 14) the train reply carries no ``params`` (and no loss): the site keeps its
encoded update in ``context.state`` and the server's :class:`~dpfunc.secagg.remote.RemoteSecureAggregator`
runs four ``query.secagg`` round trips (``ConfigRecord`` "secagg" both ways) and learns only the sum.

The site state (DP optimizer state with the privacy ledger) travels as bytes of
``torch.save(to_plain(state))`` and is read back with ``torch.load(weights_only=True)`` (no code runs).
Under secure aggregation only :func:`~dpfunc.federated.site.shared_site_state` travels (ids, step counters,
the DP state with the ledger; no tensor): the momentum buffer, a noisy function of the site's rounds close to
the update the masked sum hides, stays in the site's ``context.state`` ("dpfunc-site"), as its encoded update does, and
:func:`_site_state` puts it back before the site's next round. A site without a kept state whose counter
matches the server's (its first round, a resumed run — a new Flower run, a fresh ``context.state`` — or a
round whose reply the server lost after the site crashed) restarts its momentum from zero; its ledger and
noise keys come from the server's state as always, so ε is unchanged. Without secure aggregation the reply
carries the model anyway, and the whole site state travels as before.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

__all__ = ["server_app", "client_app", "encode_state", "decode_state"]

client_app = ClientApp()
server_app = ServerApp()


def encode_state(state) -> bytes:
    """A site or server state as bytes for a Flower record (plain containers and tensors only; :func:`decode_state`)."""
    from dpfunc.bridge.checkpoint import to_plain

    buf = io.BytesIO()
    torch.save(to_plain(state), buf)
    return buf.getvalue()


def decode_state(data: bytes):
    """The state :func:`encode_state` wrote (``torch.load(weights_only=True)``: no code is unpickled)."""
    from dpfunc.bridge.checkpoint import from_plain

    return from_plain(torch.load(io.BytesIO(data), weights_only=True))


def _state_dict(params) -> dict:
    return {k: v.detach().contiguous() for k, v in params.items()}


# ----------------------------------------------------------------------------------------- site side


def _site_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError("dpfunc ClientApp: start the SuperNode with --node-config 'partition-id=<site id>'")
    return int(context.node_config["partition-id"])


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    from dpfunc.federated.job import FederatedConfig, build, make_engine, site_data
    from dpfunc.devices import to_device
    from dpfunc.federated.site import SitePlan, shared_site_state, site_round

    task = msg.content["task"]
    site = _site_id(context)
    if site not in json.loads(str(task["sites"])):  # not asked this round: only say who this node is
        return Message(RecordDict({"reply": ConfigRecord({"site": site, "trained": False})}), reply_to=msg)
    cfg = FederatedConfig(**json.loads(str(task["config"])))
    plan = SitePlan(**json.loads(str(task[f"plan-{site}"])))
    data_dir = context.node_config.get("data-dir") or task["data_dir"] or None
    where = _site_device(context)  # node config device=auto|cpu|cuda|cuda:N (default auto), threads=N
    data = tuple(to_device(t, where) for t in site_data(cfg, site, data_dir))  # site_round computes where the data is
    module, apply_fn, _, buffers = build(cfg)
    module.to(where)
    global_params = msg.content["global"].to_torch_state_dict()
    state = decode_state(bytes(task[f"state-{site}"]))
    key = _site_key(context, cfg, site)
    _refuse_used_keys(context, state, site)  # a server that replays old counters gets no noise twice
    secure = cfg.aggregator == "secagg"
    if secure:  # the optimizer's tensors (momentum) come from this site's own store, never from the server
        state = _site_state(context, state, site, plan, key, global_params)
    report_loss = _reports_loss(cfg, context)  # under secagg an opted-in loss travels only in the masked sum
    update, new_state = site_round(global_params, state, data, key, plan=plan, engine=make_engine(cfg, module, apply_fn),
                                   round=int(task["round"]), buffers=buffers, report_loss=report_loss)
    params = dict(update.params)
    if str(context.node_config.get("fault", "")) == "nan":  # test hook: a malformed (NaN) update
        name = next(iter(params))
        params[name] = torch.full_like(params[name], math.nan)
    if secure:  # secure aggregation (issue 14): the model stays here; the server gets only the masked sum
        from dpfunc.secagg.remote import site_keep_input

        store = _secagg_store(context)
        from dpfunc.secagg.federated import SecureAggregator

        # the run's encoding (loss slots only if the run asks: report_train_loss); a site that does not
        # consent (report_loss False) leaves its loss NaN, so its slots stay 0 and it counts as not reporting
        site_keep_input(update._replace(params=params), global_params, store,
                        aggregator=SecureAggregator(report_train_loss=cfg.report_train_loss))
        context.state["secagg"] = ConfigRecord(store)
        context.state[_KEPT] = ConfigRecord({"state": encode_state(new_state)})  # with its momentum buffer
        new_state = shared_site_state(new_state)  # what the server needs: counters and ledger, no tensor
    _mark_used_keys(context, new_state)
    reply = {"site": site, "trained": True, "round": update.round, "weight": float(update.weight),
             "steps": update.steps, "state": encode_state(new_state)}
    if report_loss and not secure and math.isfinite(update.loss):  # opt-in only: a raw statistic, outside the site's (ε, δ)
        reply["loss"] = float(update.loss)
    reply = ConfigRecord(reply)
    if secure:
        return Message(RecordDict({"reply": reply}), reply_to=msg)
    return Message(RecordDict({"params": ArrayRecord(_state_dict(params)), "reply": reply}), reply_to=msg)


_NONCE = "dpfunc-key-nonce"  # context.state key of this run's nonce, drawn by the site (with a key-seed only)


def _site_key(context: Context, cfg, site: int):
    """This site's key for the run (its noise and Poisson keys derive from it).

    The noise key must be secret from the server in a real deployment: a SuperNode started with
    ``--node-config 'key-seed=<random 63-bit int>'`` uses its own key. A SuperNode serves every run
    submitted to it, and step t's noise derives from (key, t): with the key-seed alone, two runs would
    draw the same noise at the same steps, and the difference of their releases would be noise-free. So
    the site folds in a nonce of its own, drawn from OS entropy at its first message of a run and kept in
    ``context.state``: one key per (node, run), stable within the run. Without a key-seed the key derives
    from the run seed (reproducible, equal to the in-process runner's; the server could then recompute
    the noise).
    """
    import secrets

    from dpfunc.federated.job import _keys
    from dpfunc.federated.site import site_key
    from dpfunc.keys import Key

    secret = context.node_config.get("key-seed")
    if secret in (None, ""):
        return site_key(_keys(cfg)[3], site)
    if _NONCE not in context.state:
        context.state[_NONCE] = ConfigRecord({"nonce": secrets.randbits(63)})
    return Key(int(secret)).fold_in(int(context.state[_NONCE]["nonce"]))


_KEPT = "dpfunc-site"  # context.state key of the site's own full SiteState (secure aggregation only)
_USED = "dpfunc-used-keys"  # context.state key of the first unused sampling step and noise-key index


def _refuse_used_keys(context: Context, sent, site: int) -> None:
    """Refuse a round whose keys this site has already used in this run.

    The server sends each site its counters (sampling step ``steps``, noise-key index ``count`` of the DP
    state). An honest server only moves them forward; a malicious one could send old ones again, so that a
    site with a secret ``key-seed`` draws the same noise on new parameters and the difference of the two
    releases is noise-free. The site keeps the first unused step and index in its ``context.state`` (for the
    lifetime of the Flower run: a resumed run is a new run, whose nonce gives the site new keys anyway —
    :func:`_site_key`) and raises, which the server sees as a failed site (charged, excluded from the round).
    """
    from dpfunc.private import find_dp_state

    if _USED not in context.state:
        return
    used = context.state[_USED]
    steps, count = int(sent.steps), int(find_dp_state(sent.opt_state).count)
    if steps < int(used["steps"]) or count < int(used["count"]):
        raise ValueError(f"site {site}: the server asked for sampling step {steps} and noise-key index {count}, but this "
                         f"site has already used keys up to step {int(used['steps'])} and index {int(used['count'])} in "
                         "this run; refusing to draw the same noise twice (a replayed or stale site state)")


def _mark_used_keys(context: Context, new_state) -> None:
    """Record the first sampling step and noise-key index this site has not used yet (:func:`_refuse_used_keys`)."""
    from dpfunc.private import find_dp_state

    context.state[_USED] = ConfigRecord({"steps": int(new_state.steps),
                                         "count": int(find_dp_state(new_state.opt_state).count)})


def _site_state(context: Context, sent, site: int, plan, key, params):
    """The site's state for this round under secure aggregation: the server's ``sent`` state (ids, counters,
    ledger: authoritative) with the optimizer tensors of the state this site kept after its last round, if
    it kept one at the same step counter; else fresh ones (zero momentum: the site's first round, a resumed
    run, or a kept state the server's counter has moved past)."""
    from dpfunc.federated.site import SiteState, rejoin_site_state, site_optimizer
    from dpfunc.private import find_dp_state

    kept = decode_state(bytes(context.state[_KEPT]["state"])) if _KEPT in context.state else None
    if (isinstance(kept, SiteState) and kept.site == site == sent.site and kept.steps == sent.steps
            and find_dp_state(kept.opt_state).count == find_dp_state(sent.opt_state).count):
        local = kept.opt_state
    else:  # momentum restarts from zero (the noise keys and the ledger still follow the server's counters)
        local = site_optimizer(plan, key).init(params)
    return rejoin_site_state(sent, local)


def _reports_loss(cfg, context: Context) -> bool:
    """The site sends its raw training loss only if the run asks AND its node config consents."""
    return bool(cfg.report_train_loss) and str(context.node_config.get("report-train-loss", "")).lower() in ("1", "true")


def _site_device(context: Context):
    """The site's ``torch.device`` from its node config (``device``, default ``auto``), after applying ``threads``
    (torch's CPU threads; absent: torch's default). A device the node lacks fails the message with the reason."""
    from dpfunc.devices import resolve_device, set_threads

    threads = context.node_config.get("threads")
    if threads not in (None, ""):
        set_threads(int(threads), fn="dpfunc ClientApp", name="node-config threads")
    return resolve_device(str(context.node_config.get("device") or "auto"), fn="dpfunc ClientApp", name="node-config device")


def _secagg_store(context: Context) -> dict:
    """This site's private secure-aggregation storage (Flower keeps ``context.state`` on the node)."""
    return {k: bytes(v) for k, v in context.state["secagg"].items()} if "secagg" in context.state else {}


@client_app.query("secagg")
def _secagg(msg: Message, context: Context) -> Message:
    """One stage of secure aggregation (:func:`dpfunc.secagg.remote.site_handle`)."""
    from dpfunc.secagg.remote import site_handle

    store = _secagg_store(context)
    request = dict(msg.content["secagg"])
    if str(context.node_config.get("secagg-vanish", "")) == str(request.get("kind")):
        # test hook: this site vanishes mid-protocol (its SuperNode and every child die, nothing is answered)
        import signal

        os.killpg(os.getpgrp(), signal.SIGKILL)
    reply = site_handle(request, store)
    context.state["secagg"] = ConfigRecord(store)
    return Message(RecordDict({"secagg": ConfigRecord(reply)}), reply_to=msg)


# ----------------------------------------------------------------------------------------- server side


class FlowerSites:
    """The executor of :func:`run_federated` on Flower: one ``train`` message per selected site and round,
    answers collected with a timeout; anything missing, failed or unparsable is reported as the site's
    failure (the core then excludes it and charges its ledger).

    Which SuperNode is which site is learnt from the replies (each names its ``partition-id``): while some
    selected site is unmapped, every unmapped node is sent the states of all unmapped selected sites and
    trains as the one it is (or only names itself). This saves a separate discovery round trip, which
    costs a ClientApp start per node.
    """

    def __init__(self, grid: Grid, setup, node_ids: list[int], timeout: float, log, data_dir: str = ""):
        self.grid, self.setup, self.timeout, self.log = grid, setup, timeout, log
        self.node_ids, self.nodes = list(node_ids), {}
        self.data_dir = data_dir or ""

    def _message(self, state, node: int, sites: list[int]) -> Message:
        from dpfunc.federated.site import shared_site_state

        cfg_json = json.dumps(dataclasses.asdict(self.setup.config))
        task = {"config": cfg_json, "data_dir": self.data_dir, "round": state.round, "sites": json.dumps(sites)}
        secure = self.setup.config.aggregator == "secagg"
        for s in sites:  # under secure aggregation no optimizer tensor travels (a site uses its own kept ones)
            task[f"state-{s}"] = encode_state(shared_site_state(state.sites[s]) if secure else state.sites[s])
            task[f"plan-{s}"] = json.dumps(dataclasses.asdict(self.setup.plans[s]))
        content = RecordDict({"global": ArrayRecord(_state_dict(state.params)), "task": ConfigRecord(task)})
        return Message(content=content, dst_node_id=node, message_type="train")

    def __call__(self, state, selected):
        from dpfunc.federated.site import SiteState, SiteUpdate

        mapped = {s: n for s, n in self.nodes.items() if s in selected}
        unmapped_sites = [s for s in selected if s not in self.nodes]
        unmapped_nodes = [n for n in self.node_ids if n not in self.nodes.values()] if unmapped_sites else []
        msgs = [self._message(state, n, [s]) for s, n in sorted(mapped.items())]
        msgs += [self._message(state, n, unmapped_sites) for n in unmapped_nodes]
        replies = list(self.grid.send_and_receive(msgs, timeout=self.timeout)) if msgs else []
        answers: dict[int, object] = {}
        for r in replies:
            node = r.metadata.src_node_id
            if r.has_error():
                site = next((s for s, n in self.nodes.items() if n == node), None)
                if site is not None and site in selected:
                    answers[site] = f"site error: {r.error.reason}"
                else:
                    self.log(f"round {state.round}: error from unidentified node {node}: {r.error.reason}")
                continue
            try:
                rep = r.content["reply"]
                site = int(rep["site"])
                self.nodes.setdefault(site, node)
                if self.nodes[site] != node:
                    raise ValueError(f"node {node} claims site {site}, which is node {self.nodes[site]}")
                if site not in selected or not bool(rep["trained"]):
                    continue
                new_state = decode_state(bytes(rep["state"]))
                if not isinstance(new_state, SiteState):
                    raise TypeError("state is not a SiteState")
                # under secure aggregation the site keeps its model: the aggregator never reads params
                params = r.content["params"].to_torch_state_dict() if "params" in r.content else dict(state.params)
                # the raw training loss arrives only from a site that opted in (report_train_loss): else NaN
                loss = float(rep["loss"]) if "loss" in rep else math.nan
                answers[site] = (SiteUpdate(site, int(rep["round"]), params, float(rep["weight"]), int(rep["steps"]),
                                            loss), new_state)
            except Exception as e:  # malformed reply: excluded with the reason
                site = next((s for s, n in self.nodes.items() if n == node), None)
                if site is not None and site in selected:
                    answers[site] = f"unreadable reply: {type(e).__name__}: {e}"
                self.log(f"round {state.round}: unreadable reply from node {node}: {type(e).__name__}: {e}")
        for s in selected:
            if s not in answers:
                answers[s] = (f"no reply within {self.timeout:g}s (stalled or crashed)" if s in self.nodes or
                              unmapped_nodes else f"no SuperNode registered as site {s}")
        return answers


    def secagg_channel(self, requests: dict) -> dict:
        """Secure aggregation's transport: ``{site: record}`` out as ``query.secagg`` messages, the replies
        back by site; a site that errs or does not answer within the timeout is left out (it dropped)."""
        msgs = [Message(RecordDict({"secagg": ConfigRecord(req)}), dst_node_id=self.nodes[s], message_type="query.secagg")
                for s, req in requests.items() if s in self.nodes]
        by_node = {n: s for s, n in self.nodes.items()}
        out = {}
        for r in (self.grid.send_and_receive(msgs, timeout=self.timeout) if msgs else []):
            site = by_node.get(r.metadata.src_node_id)
            if site is None:
                continue
            if r.has_error():
                self.log(f"secure aggregation: site {site} failed a stage: {r.error.reason}")
                continue
            out[site] = dict(r.content["secagg"])
        return out


def _wait_nodes(grid: Grid, sites: int, timeout: float) -> list[int]:
    """The node ids once ``sites`` SuperNodes have registered (or what there is after ``timeout``)."""
    deadline = time.monotonic() + timeout
    nodes: list[int] = []
    while time.monotonic() < deadline:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= sites:
            break
        time.sleep(0.5)
    return nodes


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    from dpfunc.federated.job import FederatedConfig, run_federated
    from dpfunc.federated.rounds import RoundFailedError

    req = json.loads(Path(str(context.run_config["request"])).read_text())
    if req.get("threads") is not None:  # --threads: the server's evaluation, like the sites' training
        from dpfunc.devices import set_threads

        set_threads(int(req["threads"]), fn="dpfunc ServerApp", name="threads")
    cfg = FederatedConfig(**req["config"])
    run_dir = Path(req["run_dir"])
    data_dir = req["data_dir"] or None
    log_path = run_dir / "server.log"

    def log(text: str) -> None:
        with open(log_path, "a") as f:
            f.write(text + "\n")

    status = {"ok": False, "error": None}
    try:
        nodes = _wait_nodes(grid, cfg.sites, cfg.round_timeout)
        log(f"sites registered: {len(nodes)} SuperNode(s)")
        executors: list[FlowerSites] = []

        def executor(setup, model):
            executors.append(FlowerSites(grid, setup, nodes, cfg.round_timeout, log, req["data_dir"]))
            return executors[-1]

        aggregator = None
        if cfg.aggregator == "secagg":  # issue 14: four more round trips per round, to the same sites
            from dpfunc.secagg.remote import RemoteSecureAggregator

            aggregator = RemoteSecureAggregator(lambda requests: executors[-1].secagg_channel(requests),
                                                report_train_loss=cfg.report_train_loss)
        run_federated(cfg, data_dir=data_dir, run_dir=run_dir, resume=bool(req["resume"]), progress=False,
                      log=log, bootstrap_resamples=int(req["bootstrap"]), executor=executor, aggregator=aggregator)
        status["ok"] = True
    except RoundFailedError as e:
        status["error"] = str(e)
        status["kind"] = "round_failed"
    except Exception as e:  # reported to the driver through the status file
        status["error"] = f"{type(e).__name__}: {e}"
    finally:
        tmp = run_dir / "flower_status.json.tmp"
        tmp.write_text(json.dumps(status))
        os.replace(tmp, run_dir / "flower_status.json")
