"""Flower apps for ``bench/secagg_flwr.py`` (copied into each run's app folder as ``dpfunc_bench_flwr.py``).

* ``size_mod``: a client mod that appends, per message, the payload bytes in and out (:func:`record_bytes`:
  array data and config values, as Flower's ``count_bytes`` counts them) to the file named by the run
  config's ``bench-out`` (one JSON line per message).
* ``ours_client``: dpfunc's ClientApp (:mod:`dpfunc.federated.flower.apps`: ``train`` and ``query.secagg``)
  with ``size_mod`` in front; the ServerApp is dpfunc's own.
* ``flwr_server`` / ``flwr_client``: Flower's legacy path with its built-in SecAgg+ (``SecAggPlusWorkflow`` +
  ``secaggplus_mod``) or plain FedAvg (run config ``secure``), whose clients train exactly as dpfunc's sites
  do in their first round (``site_round`` on the same shard, same key, from a fresh site state).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp


def _append(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _value_bytes(v) -> int:
    if isinstance(v, (bytes, bytearray)):
        return len(v)
    if isinstance(v, str):
        return len(v.encode())
    if isinstance(v, (list, tuple)):
        return sum(_value_bytes(x) for x in v)
    return 8  # int, float, bool


def record_bytes(record) -> int:
    """Payload bytes of a record: array data, and config/metric values (8 bytes per number), keys not
    counted. (Flower's own ``count_bytes`` raises on an empty list in 1.42, which SecAgg+ sends.)"""
    from flwr.app import ArrayRecord

    if isinstance(record, ArrayRecord):
        return sum(len(a.data) for a in record.values())
    return sum(_value_bytes(v) for v in record.values())


def size_mod(msg: Message, context: Context, call_next) -> Message:
    t0 = time.perf_counter()
    size_in = sum(record_bytes(r) for r in msg.content.values())
    reply = call_next(msg, context)
    size_out = sum(record_bytes(r) for r in reply.content.values()) if reply.has_content() else 0
    out = str(context.run_config.get("bench-out", ""))
    if out:
        _append(out, {"site": int(context.node_config.get("partition-id", -1)), "type": msg.metadata.message_type,
                      "in": size_in, "out": size_out, "client_s": time.perf_counter() - t0})
    return reply


# ------------------------------------------------------------------------------------- ours, measured

ours_client = ClientApp(mods=[size_mod])


def _register_ours() -> None:
    from dpfunc.federated.flower import apps

    ours_client.train()(apps._train)
    ours_client.query("secagg")(apps._secagg)


_register_ours()


# ------------------------------------------------------------------------------------- Flower's SecAgg+

def _job(context: Context):
    from dpfunc.federated.job import FederatedConfig

    return FederatedConfig(**json.loads(str(context.run_config["config"])))


def _flwr_client_fn(context: Context):
    import numpy as np
    import torch
    from flwr.client import NumPyClient

    from dpfunc.data import pneumoniamnist
    from dpfunc.federated.job import _keys, build, make_engine, prepare, site_data
    from dpfunc.federated.site import init_site_state, site_key, site_round

    cfg = _job(context)
    site = int(context.node_config["partition-id"])
    data_dir = str(context.run_config.get("data-dir", "")) or None

    class Site(NumPyClient):
        def fit(self, parameters, config):
            module, apply_fn, params, buffers = build(cfg)
            names = list(params)
            global_params = {k: torch.from_numpy(np.asarray(a)).to(params[k].dtype) for k, a in zip(names, parameters)}
            plan = prepare(cfg, pneumoniamnist("train", data_dir).labels).plans[site]
            key = site_key(_keys(cfg)[3], site)
            state = init_site_state(site, plan, key, global_params)
            update, _ = site_round(global_params, state, site_data(cfg, site, data_dir), key, plan=plan,
                                   engine=make_engine(cfg, module, apply_fn), round=0, buffers=buffers)
            return [update.params[k].detach().numpy() for k in names], int(plan.num_examples), {}

    return Site().to_client()


def _flwr_client_app(secure: bool) -> ClientApp:
    from flwr.client.mod import secaggplus_mod

    return ClientApp(client_fn=_flwr_client_fn, mods=[size_mod, secaggplus_mod] if secure else [size_mod])


flwr_client = _flwr_client_app(secure=True)
flwr_client_plain = _flwr_client_app(secure=False)   # secaggplus_mod refuses messages without its stages


def _flwr_server_app():
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    app = ServerApp()

    @app.main()
    def main(grid, context: Context) -> None:
        from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

        from dpfunc.federated.job import build

        cfg = _job(context)
        out = Path(str(context.run_config["result"]))
        secure = str(context.run_config.get("secure", "0")) == "1"
        marks: list = []
        init = build(cfg)[2]
        final: dict = {}

        class Timed(FedAvg):
            def configure_fit(self, server_round, parameters, client_manager):
                marks.append(("start", server_round, time.perf_counter()))
                return super().configure_fit(server_round, parameters, client_manager)

            def aggregate_fit(self, server_round, results, failures):
                agg = super().aggregate_fit(server_round, results, failures)
                marks.append(("end", server_round, time.perf_counter()))
                if agg[0] is not None:
                    final["params"] = parameters_to_ndarrays(agg[0])
                final["failures"] = len(failures)
                return agg

        deadline = time.monotonic() + cfg.round_timeout
        while len(list(grid.get_node_ids())) < cfg.sites and time.monotonic() < deadline:
            time.sleep(0.5)
        strategy = Timed(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=cfg.sites,
                         min_available_clients=cfg.sites,
                         initial_parameters=ndarrays_to_parameters([v.detach().numpy() for v in init.values()]))
        ctx = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.rounds, round_timeout=cfg.round_timeout),
                            strategy=strategy)
        fit = (SecAggPlusWorkflow(num_shares=cfg.sites, reconstruction_threshold=max(2, cfg.sites // 2 + 1),
                                  max_weight=1000.0, timeout=cfg.round_timeout) if secure else None)
        t0 = time.perf_counter()
        status = {"ok": False}
        try:
            DefaultWorkflow(fit_workflow=fit)(grid, ctx)
            status["ok"] = "params" in final
        except Exception as e:  # reported through the result file
            status["error"] = f"{type(e).__name__}: {e}"
        starts = {r: t for kind, r, t in marks if kind == "start"}
        rounds = [t - starts[r] for kind, r, t in marks if kind == "end"]
        status.update({"round_s": rounds, "wall_s": time.perf_counter() - t0,
                       "failures": final.get("failures"),
                       "params": {k: a.tolist() for k, a in zip(init, final.get("params", []))}})
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(status))
        os.replace(tmp, out)

    return app


flwr_server = _flwr_server_app()
