"""Federated DP on PneumoniaMNIST split across 3 sites: federated vs each site alone vs centralised.

Every site spends ε = 3 (δ = 1e-5) on its own patients. For each seed and split (IID, Dirichlet α = 0.5
label skew) it runs, in process (``dpfunc federated --engine inprocess`` semantics):

* the federation: 3 sites, FedAvg, R rounds × E local epochs;
* each site alone: the same shard, plan and σ, trained by itself (``FederatedConfig(alone=s)``) —
  what a hospital gets without federating;

and compares with centralised DP-SGD on the pooled data (all data in one place, which federation avoids):
``dpfunc train --epochs R·E`` at ε = 3 for the same compute (run here), and the README's main table
(15 epochs, ``bench/results/case_study.json``).

    nice python bench/federated_case_study.py --data-dir ../shared/data                 # seeds 0 1 2
    nice python bench/federated_case_study.py --data-dir ../shared/data --seeds 0 --partitions iid

Writes ``bench/results/federated_case_study.{json,md,png}``; run folders under ``runs/federated_case_study/``.
Rows are saved as they finish, and a finished run folder is reused (rerun to resume).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from _machine import cpu_model  # noqa: E402  (bench/ is on sys.path when a bench runs)

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _run(cfg, data_dir, run_dir: Path) -> dict:
    from dpfunc.federated.job import run_federated

    metrics = run_dir / "metrics.json"
    if metrics.exists():
        return json.loads(metrics.read_text())
    t = time.perf_counter()
    m = run_federated(cfg, data_dir=data_dir, run_dir=run_dir, resume=(run_dir / "checkpoint.pt").exists(),
                      progress=False, log=lambda s: None, bootstrap_resamples=200)
    print(f"  {run_dir.name}: test AUC {m['test']['roc_auc']:.4f} acc {m['test']['accuracy']:.4f} "
          f"ε {[round(s['epsilon'], 3) for s in m['sites']]} ({time.perf_counter() - t:.0f}s)", flush=True)
    return m


def _central(seed: int, epochs: int, data_dir, runs: Path) -> dict:
    import subprocess

    run_dir = runs / f"central-e{epochs}-seed{seed}"
    if not (run_dir / "metrics.json").exists():
        cmd = [sys.executable, "-m", "dpfunc", "train", "--epochs", str(epochs), "--seed", str(seed), "--epsilon", "3",
               "--run-dir", str(run_dir), "--quiet", *(["--data-dir", str(data_dir)] if data_dir else [])]
        subprocess.run(cmd, check=True)
    m = json.loads((run_dir / "metrics.json").read_text())
    return {"kind": f"centralised ({epochs} epochs)", "seed": seed, "partition": "pooled", "test_auc": m["test"]["roc_auc"],
            "test_accuracy": m["test"]["accuracy"], "epsilon": [m["epsilon"]], "n": [4708], "pneumonia_fraction": None,
            "best_round": m["best_epoch"], "train_seconds": m["train_seconds"]}


def _row(kind: str, seed: int, partition: str, m: dict) -> dict:
    return {"kind": kind, "seed": seed, "partition": partition, "test_auc": m["test"]["roc_auc"],
            "test_accuracy": m["test"]["accuracy"], "epsilon": [s["epsilon"] for s in m["sites"]],
            "n": [s["n"] for s in m["sites"]], "pneumonia_fraction": None, "best_round": m["best_round"],
            "train_seconds": m["train_seconds"]}


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main(argv: list[str] | None = None) -> int:
    from dpfunc.data import pneumoniamnist
    from dpfunc.federated.job import FederatedConfig, site_indices

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--partitions", nargs="+", default=["iid", "dirichlet"])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=85, help="each site's expected batch (85 ≈ 256/3: the centralised q)")
    p.add_argument("--runs", default="runs/federated_case_study")
    p.add_argument("--no-alone", action="store_true", help="skip the sites-alone baselines")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    labels = pneumoniamnist("train", args.data_dir).labels
    out_json = RESULTS / "federated_case_study.json"
    rows: list[dict] = []
    for seed in args.seeds:
        if not args.no_alone:
            rows.append(_central(seed, args.rounds * args.local_epochs, args.data_dir, Path(args.runs)))
        for part in args.partitions:
            base = dict(sites=3, rounds=args.rounds, local_epochs=args.local_epochs, epsilon=3.0, partition=part,
                        alpha=0.5, batch_size=args.batch_size, seed=seed)
            tag = f"{part}-r{args.rounds}-e{args.local_epochs}-b{args.batch_size}-seed{seed}"
            cfg = FederatedConfig(**base)
            fracs = [float(labels[i].float().mean()) for i in site_indices(cfg, labels)]
            m = _run(cfg, args.data_dir, Path(args.runs) / f"fed-{tag}")
            rows.append({**_row("federated", seed, part, m), "pneumonia_fraction": fracs})
            if not args.no_alone:
                for s in range(3):
                    m = _run(FederatedConfig(**base, alone=s), args.data_dir, Path(args.runs) / f"alone{s}-{tag}")
                    rows.append({**_row(f"site {s} alone", seed, part, m), "pneumonia_fraction": [fracs[s]]})
            RESULTS.mkdir(exist_ok=True)
            out_json.write_text(json.dumps({"args": vars(args), "machine": _machine(), "rows": rows}, indent=2) + "\n")
    _report(rows, args)
    return 0


def _machine() -> dict:
    cpu = cpu_model()
    return {"cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "note": "timings taken on a shared, loaded machine"}


def _report(rows: list[dict], args) -> None:
    central = json.loads((RESULTS / "case_study.json").read_text()).get("3", [])
    c_auc = [r["roc_auc"] for r in central]
    lines = [f"# Federated DP, PneumoniaMNIST, 3 sites, ε = 3 per site (δ = 1e-5), seeds {args.seeds}",
             "", f"{args.rounds} rounds × {args.local_epochs} local epoch, per-site expected batch {args.batch_size}; "
             "test ROC-AUC of the round selected on validation.", "",
             "| split | federated (3 sites) | site 0 alone | site 1 alone | site 2 alone | "
             f"centralised, same {args.rounds * args.local_epochs} epochs | centralised, 15 epochs (README) |",
             "|---|---|---|---|---|---|---|"]
    same = [r["test_auc"] for r in rows if r["kind"].startswith("centralised")]
    for part in args.partitions:
        cells = []
        for kind in ("federated", "site 0 alone", "site 1 alone", "site 2 alone"):
            v = [r["test_auc"] for r in rows if r["partition"] == part and r["kind"] == kind]
            cells.append(_ms(v) if v else "–")
        label = "IID" if part == "iid" else "Dirichlet α = 0.5"
        lines.append(f"| {label} | {' | '.join(cells)} | {_ms(same) if same else '–'} | {_ms(c_auc) if c_auc else '–'} |")
    (RESULTS / "federated_case_study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(rows, args, c_auc)


def _plot(rows, args, c_auc) -> None:
    from matplotlib.figure import Figure

    kinds = ["federated", "site 0 alone", "site 1 alone", "site 2 alone"]
    fig = Figure(figsize=(8, 3.6))
    ax = fig.subplots()
    width = 0.8 / len(args.partitions)
    for j, part in enumerate(args.partitions):
        means, errs = [], []
        for kind in kinds:
            v = [r["test_auc"] for r in rows if r["partition"] == part and r["kind"] == kind] or [float("nan")]
            means.append(statistics.mean(v))
            errs.append(statistics.stdev(v) if len(v) > 1 else 0.0)
        xs = [i + (j - (len(args.partitions) - 1) / 2) * width for i in range(len(kinds))]
        ax.bar(xs, means, width, yerr=errs, capsize=3, label="IID" if part == "iid" else "Dirichlet α=0.5")
    same = [r["test_auc"] for r in rows if r["kind"].startswith("centralised")]
    if same:
        ax.axhline(statistics.mean(same), color="grey", ls=":", lw=1.2,
                   label=f"centralised DP, same {args.rounds * args.local_epochs} epochs")
    if c_auc:
        ax.axhline(statistics.mean(c_auc), color="black", ls="--", lw=1, label="centralised DP, 15 epochs (README)")
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_ylim(0.5, 1.0)
    ax.set_ylabel("test ROC-AUC")
    ax.set_title("PneumoniaMNIST, ε = 3 per site: federating vs training alone")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "federated_case_study.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
