"""Our secure aggregation vs Flower's built-in SecAgg+, the same 3-site round on the same deployment.

    python bench/secagg_flwr.py                     # 3 sites, 1 round, 150 training examples
    python bench/secagg_flwr.py --rounds 2 --only ours-secure,flwr-secaggplus

Four runs, one after the other, each on a fresh local Deployment Engine (a SuperLink and one SuperNode per
site, started and killed by this script with the helpers of :mod:`dpfunc.federated.flower.driver`):

    ours-plain        dpfunc's apps, plain FedAvg (one ``train`` message per site and round)
    ours-secure       dpfunc's apps, ``--secure-aggregation`` (train + four ``query.secagg`` round trips)
    flwr-plain        Flower's legacy ``DefaultWorkflow`` + ``FedAvg`` (NumPyClient)
    flwr-secaggplus   the same + ``SecAggPlusWorkflow(num_shares=3, reconstruction_threshold=2)`` / ``secaggplus_mod``

Every client trains the same way (dpfunc's ``site_round`` on its shard with the same key, first round), so
the rows differ in the aggregation protocol and its transport. Figures:

* seconds per round: ours from the job history (training + messages + aggregation, validation excluded);
  Flower's from its strategy (``configure_fit`` to ``aggregate_fit``).
* bytes per site per round: payload of every message a site's ClientApp received and sent, measured by the
  same client mod in all four runs (array data and config values, as Flower's ``count_bytes``): model and
  masked vectors, keys, shares, configs, the site state dpfunc sends; no gRPC/HTTP framing.
* ``max |ours − flwr|`` of the round-1 global model (secure rows): the same updates, two protocols and
  quantisations (ours 26-bit updates, Flower's full weights clipped to ±8 at 2^22 levels).

Writes ``bench/results/secagg_flwr.{json,md}``; name the machine and its load next to every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
APP_MODULE = Path(__file__).resolve().parent / "_flwr_secagg_apps.py"
VARIANTS = ("ours-plain", "ours-secure", "flwr-plain", "flwr-secaggplus")


def _pyproject(server: str, client: str, config: dict) -> str:
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in config.items())
    return f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "dpfunc-bench-flwr"
version = "0.0.0"
dependencies = []

[tool.flwr.app]
publisher = "dpfunc"

[tool.flwr.app.components]
serverapp = "{server}"
clientapp = "{client}"

[tool.flwr.app.config]
{lines}
"""


def run_variant(name: str, cfg, run_dir: Path, data_dir: str | None, timeout: float) -> dict:
    from dpfunc.federated.flower import driver as D

    run_dir.mkdir(parents=True)
    app = run_dir / "app"
    app.mkdir()
    shutil.copy(APP_MODULE, app / "dpfunc_bench_flwr.py")
    sizes = run_dir / "sizes.jsonl"
    config = {"bench-out": str(sizes), "config": json.dumps(asdict(cfg)), "data-dir": str(Path(data_dir).resolve()) if data_dir else ""}
    if name.startswith("ours"):
        D.write_app(cfg, run_dir=run_dir, data_dir=data_dir, bootstrap_resamples=10)   # the request the ServerApp reads
        config["request"] = str((run_dir / "flower" / "request.json").resolve())
        server, client = "dpfunc.federated.flower.apps:server_app", "dpfunc_bench_flwr:ours_client"
    else:
        config.update(result=str(run_dir / "flwr_result.json"), secure="1" if name == "flwr-secaggplus" else "0")
        server = "dpfunc_bench_flwr:flwr_server"
        client = "dpfunc_bench_flwr:flwr_client" if name == "flwr-secaggplus" else "dpfunc_bench_flwr:flwr_client_plain"
    (app / "pyproject.toml").write_text(_pyproject(server, client, config))
    home = run_dir / "home"
    home.mkdir()
    port = D._free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    env = D.flower_env(home)
    bin_dir = Path(sys.executable).parent
    procs = []
    done = run_dir / "flower_status.json" if name.startswith("ours") else run_dir / "flwr_result.json"
    t0 = time.perf_counter()
    try:
        link = D._start([str(bin_dir / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                         "--host", "127.0.0.1", "--port", str(port), "--database", str(run_dir / "state.db")], env,
                        run_dir / "superlink.log")
        procs.append(link)
        D._wait_health(port, link, 60, run_dir / "superlink.log")
        for s in range(cfg.sites):
            procs.append(D._start([str(bin_dir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                                   "--node-config", f"partition-id={s} num-partitions={cfg.sites}",
                                   "--port", str(D._free_port())], env, run_dir / f"supernode-{s}.log"))
        out = D._flwr(["run", str(app), "local", "--format", "json"], env, 120)
        if "run-id" not in out.stdout:
            raise RuntimeError(f"{name}: flwr run failed: {out.stdout[-1500:]} {out.stderr[-1500:]}")
        while not done.exists():
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"{name}: no result within {timeout:g}s; superlink log:\n{D._tail(run_dir / 'superlink.log')}")
            time.sleep(0.5)
    finally:
        D._stop(procs)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in sizes.read_text().splitlines()] if sizes.exists() else []
    per_site = {}
    for r in rows:
        s = per_site.setdefault(r["site"], {"in": 0, "out": 0, "messages": 0})
        s["in"] += r["in"]
        s["out"] += r["out"]
        s["messages"] += 1
    if name.startswith("ours"):
        status = json.loads(done.read_text())
        if not status.get("ok"):
            raise RuntimeError(f"{name}: {status}")
        m = json.loads((run_dir / "metrics.json").read_text())
        secs = [h["seconds"] for h in m["history"]]
        round_s = [b - a for a, b in zip([0.0] + secs[:-1], secs)]
        from dpfunc.bridge.checkpoint import load_checkpoint

        params = {k: v.double() for k, v in load_checkpoint(run_dir / "checkpoint.pt")["state"].params.items()}
    else:
        res = json.loads(done.read_text())
        if not res.get("ok"):
            raise RuntimeError(f"{name}: {res.get('error')} (failures {res.get('failures')}); superlink log:\n"
                               f"{D._tail(run_dir / 'superlink.log', 60)}")
        round_s = res["round_s"]
        params = {k: torch.tensor(v, dtype=torch.float64) for k, v in res["params"].items()}
    return {"round_s": round_s, "wall_s": wall, "bytes_per_site": per_site, "params": params}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--train-subset", type=int, default=150)
    ap.add_argument("--data-dir", default=os.environ.get("DPFUNC_DATA"))
    ap.add_argument("--only", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    ap.add_argument("--out", default=str(RESULTS / "secagg_flwr"))
    ap.add_argument("--keep", default=None, help="keep the run folders (logs) under this folder")
    args = ap.parse_args(argv)
    from dpfunc.federated.job import FederatedConfig

    names = [v for v in args.only.split(",") if v]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        ap.error(f"--only: unknown variant(s) {bad}; choose from {VARIANTS}")
    load = {"before": os.getloadavg()}
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.keep:
            tmp = args.keep
            Path(tmp).mkdir(parents=True, exist_ok=True)
        for name in names:
            cfg = FederatedConfig(sites=args.sites, rounds=args.rounds, train_subset=args.train_subset, batch_size=25,
                                  accountant="rdp", engine="flower", round_timeout=300,
                                  aggregator="secagg" if name == "ours-secure" else "fedavg")
            runs[name] = run_variant(name, cfg, Path(tmp) / name, args.data_dir, args.timeout)
            r = runs[name]
            print(f"{name}: {', '.join(f'{x:.1f}' for x in r['round_s'])} s per round, "
                  f"{r['wall_s']:.0f} s wall, load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    load["after"] = os.getloadavg()
    diff = None
    if "ours-secure" in runs and "flwr-secaggplus" in runs and args.rounds == 1:
        a, b = runs["ours-secure"]["params"], runs["flwr-secaggplus"]["params"]
        diff = max((a[k] - b[k]).abs().max().item() for k in a)
    env = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
           "flwr": __import__("flwr").__version__, "threads": torch.get_num_threads(), "loadavg": load,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "sites": args.sites, "rounds": args.rounds,
           "train_subset": args.train_subset}
    table = {}
    for name, r in runs.items():
        per = r["bytes_per_site"]
        n = max(1, len(per))
        table[name] = {"round_s": r["round_s"], "mean_round_s": sum(r["round_s"]) / max(1, len(r["round_s"])),
                       "wall_s": r["wall_s"],
                       "site_in_bytes": sum(s["in"] for s in per.values()) / n / args.rounds,
                       "site_out_bytes": sum(s["out"] for s in per.values()) / n / args.rounds,
                       "messages_per_site_round": sum(s["messages"] for s in per.values()) / n / args.rounds}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"env": env, "runs": table, "max_abs_diff_round1": diff}, indent=1))
    tmp.replace(out.with_suffix(".json"))
    md = [f"# Secure aggregation over Flower {env['flwr']}: dpfunc vs Flower's SecAgg+ ({args.sites} sites, "
          f"{args.rounds} round(s), {args.train_subset} training examples)",
          "", f"{env['cpu']}, {env['cpu_count']} cores, torch {env['torch']}; load average "
          f"{load['before'][0]:.1f} before, {load['after'][0]:.1f} after (a shared, loaded machine).", "",
          "| run | seconds per round | messages per site per round | site receives (bytes) | site sends (bytes) |",
          "|---|---|---|---|---|"]
    for name, t in table.items():
        md.append(f"| {name} | {', '.join(f'{x:.1f}' for x in t['round_s'])} | {t['messages_per_site_round']:.0f} | "
                  f"{t['site_in_bytes']:,.0f} | {t['site_out_bytes']:,.0f} |")
    if diff is not None:
        md += ["", f"Round-1 global model, ours vs Flower's SecAgg+: max |difference| = {diff:.2e}."]
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(md) + "\n")
    tmp.replace(out.with_suffix(".md"))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
