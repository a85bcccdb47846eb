"""Secure aggregation over Flower: wall time per round, plain FedAvg vs ``--secure-aggregation``.

    python bench/secagg_flower.py                # 3 sites, 2 rounds, 150 training examples each way
    python bench/secagg_flower.py --rounds 3 --sites 3 --train-subset 300

Both runs use the same job (``dpfunc.federated.flower.run_flower``: a SuperLink and one SuperNode per
site on localhost), one after the other; the figure is the job's own per-round time (``history[i].seconds``
differences: training, messages, aggregation; validation excluded). Secure aggregation adds four
``query.secagg`` round trips per round; each starts a ClientApp process per site, which dominates on these
machines. Writes ``bench/results/secagg_flower.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine, machine_line  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _per_round(history: list) -> list:
    secs = [h["seconds"] for h in history]
    return [b - a for a, b in zip([0.0] + secs[:-1], secs)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--train-subset", type=int, default=150)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(RESULTS / "secagg_flower"))
    args = ap.parse_args(argv)
    from dpfunc.federated.flower import run_flower
    from dpfunc.federated.job import FederatedConfig

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, agg in (("plain", "fedavg"), ("secure", "secagg")):
            cfg = FederatedConfig(sites=args.sites, rounds=args.rounds, train_subset=args.train_subset, batch_size=25,
                                  accountant="rdp", engine="flower", aggregator=agg, round_timeout=300)
            t0 = time.perf_counter()
            m = run_flower(cfg, data_dir=args.data_dir, run_dir=Path(tmp) / name, bootstrap_resamples=10,
                           log=lambda s: None, run_timeout=120 + args.rounds * 400)
            rows[name] = {"aggregator": agg, "wall_s": time.perf_counter() - t0, "round_s": _per_round(m["history"]),
                          "test_auc": m["test"]["roc_auc"]}
            print(f"{name}: {rows[name]['round_s']} s per round", file=sys.stderr, flush=True)
    env = {**machine(), "sites": args.sites, "rounds": args.rounds, "train_subset": args.train_subset}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"env": env, "runs": rows}, indent=1))
    tmp.replace(out.with_suffix(".json"))
    p, s = rows["plain"], rows["secure"]
    md = (f"# Flower, {args.sites} sites, {args.rounds} rounds, {args.train_subset} training examples "
          f"({machine_line(env)})\n\n"
          "| aggregation | seconds per round | whole run (s) | test ROC-AUC |\n|---|---|---|---|\n"
          f"| plain FedAvg | {', '.join(f'{x:.1f}' for x in p['round_s'])} | {p['wall_s']:.0f} | {p['test_auc']:.4f} |\n"
          f"| secure aggregation | {', '.join(f'{x:.1f}' for x in s['round_s'])} | {s['wall_s']:.0f} | {s['test_auc']:.4f} |\n")
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(md)
    tmp.replace(out.with_suffix(".md"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
