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

Every run (federated, alone, centralised) uses ``--threads`` torch threads (default 1). On this 2-core
machine, under load, two threads made a DP-SGD step of the CNN 7–12x slower in wall time (and 7x in CPU
time: the threads spin-wait for each other) than one thread: that, not the federated code, was why a
5-round federated run took 40–45 min at load 20.

Writes ``bench/results/federated_case_study.{json,md,png}``; run folders under ``runs/federated_case_study/``.
Rows are saved as they finish, and a finished run folder is reused (rerun to resume).
"""

from __future__ import annotations

import argparse
import json
import math
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
    t, load0 = time.perf_counter(), os.getloadavg()[0]
    m = run_federated(cfg, data_dir=data_dir, run_dir=run_dir, resume=(run_dir / "checkpoint.pt").exists(),
                      progress=False, log=lambda s: None, bootstrap_resamples=200)
    wall = time.perf_counter() - t
    _note_run(run_dir, wall, load0)
    print(f"  {run_dir.name}: test AUC {m['test']['roc_auc']:.4f} acc {m['test']['accuracy']:.4f} "
          f"ε {[round(s['epsilon'], 3) for s in m['sites']]} ({wall:.0f}s wall, load {load0:.1f}→"
          f"{os.getloadavg()[0]:.1f})", flush=True)
    return m


def _note_run(run_dir: Path, wall: float, load0: float) -> None:
    """Wall time and the machine's load around a run (the machine is shared: timings mean little without it)."""
    (run_dir / "bench_timing.json").write_text(json.dumps(
        {"wall_seconds": wall, "load_start": load0, "load_end": os.getloadavg()[0], "threads": torch.get_num_threads()}))


def _timing(run_dir: Path) -> dict:
    f = run_dir / "bench_timing.json"
    return json.loads(f.read_text()) if f.exists() else {}


def _central(seed: int, epochs: int, data_dir, runs: Path) -> dict:
    import subprocess

    run_dir = runs / f"central-e{epochs}-seed{seed}"
    if not (run_dir / "metrics.json").exists():
        cmd = [sys.executable, "-m", "dpfunc", "train", "--epochs", str(epochs), "--seed", str(seed), "--epsilon", "3",
               "--run-dir", str(run_dir), "--quiet", *(["--data-dir", str(data_dir)] if data_dir else []),
               *(["--resume"] if (run_dir / "checkpoint.pt").exists() else [])]
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same threads as the federated runs
        t, load0 = time.perf_counter(), os.getloadavg()[0]
        subprocess.run(cmd, check=True, env=env)
        _note_run(run_dir, time.perf_counter() - t, load0)
        print(f"  {run_dir.name}: {time.perf_counter() - t:.0f}s wall, load {load0:.1f}→{os.getloadavg()[0]:.1f}", flush=True)
    m = json.loads((run_dir / "metrics.json").read_text())
    return {"kind": f"centralised ({epochs} epochs)", "seed": seed, "partition": "pooled", "test_auc": m["test"]["roc_auc"],
            "test_accuracy": m["test"]["accuracy"], "epsilon": [m["epsilon"]], "n": [4708], "pneumonia_fraction": None,
            "best_round": m["best_epoch"], "train_seconds": m["train_seconds"], **_timing(run_dir)}


def _row(kind: str, seed: int, partition: str, m: dict, run_dir: Path) -> dict:
    return {"kind": kind, "seed": seed, "partition": partition, "test_auc": m["test"]["roc_auc"],
            "test_accuracy": m["test"]["accuracy"], "epsilon": [s["epsilon"] for s in m["sites"]],
            "n": [s["n"] for s in m["sites"]], "pneumonia_fraction": None, "best_round": m["best_round"],
            "train_seconds": m["train_seconds"], **_timing(run_dir)}


def _ms(values: list[float]) -> str:
    """Mean ± sample std over seeds, with the number of seeds in brackets."""
    if len(values) == 1:
        return f"{values[0]:.3f} (1)"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} ({len(values)})"


def main(argv: list[str] | None = None) -> int:
    from dpfunc.data import pneumoniamnist
    from dpfunc.federated.job import FederatedConfig, site_indices

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--partitions", nargs="+", default=["iid", "dirichlet"])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--local-steps", type=int, default=None,
                   help="local steps per round instead of --local-epochs (1: FedSGD); rounds are then steps")
    p.add_argument("--batch-size", type=int, default=85, help="each site's expected batch (85 ≈ 256/3: the centralised q)")
    p.add_argument("--runs", default="runs/federated_case_study")
    p.add_argument("--no-alone", action="store_true", help="skip the sites-alone baselines")
    p.add_argument("--average-decay", type=float, default=None,
                   help="server-side averaging of the global models (default: FederatedConfig's)")
    p.add_argument("--lr", type=float, default=1.0, help="each site's local SGD step size")
    p.add_argument("--results-name", default="federated_case_study",
                   help="file names of the results under bench/results/ (another recipe: another name)")
    p.add_argument("--server-momentum", type=float, default=None,
                   help="FedAvgM on the server with this momentum (server lr 1); default plain FedAvg")
    p.add_argument("--threads", type=int, default=1, help="torch threads of every run (1: see the module docstring)")
    p.add_argument("--no-central", action="store_true", help="skip the centralised runs (another process makes them)")
    p.add_argument("--central-only", action="store_true", help="only the centralised runs (for a parallel process)")
    p.add_argument("--no-fed", action="store_true", help="skip the federated runs (for a parallel process)")
    p.add_argument("--no-report", action="store_true", help="train only; write no results (a --report-only pass does)")
    p.add_argument("--alone-from", default=None,
                   help="take the sites-alone rows of the table and plot from bench/results/<NAME>.json (another "
                        "recipe's baselines, e.g. when the alone runs of that recipe were better on validation)")
    p.add_argument("--diagnosis", action="store_true",
                   help="only collect the seed-0 runs of the README's 'Why' table (run folders under --runs; the "
                        "batch-768 centralised run: dpfunc train --batch-size 768 --epochs 15 --epsilon 3 --seed 0 "
                        "--run-dir RUNS/central-b768-e15-seed0) into bench/results/federated_case_study_diagnosis.*")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: the table, JSON and plot from the run folders that are finished")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.diagnosis:
        return _diagnosis(Path(args.runs))
    if args.average_decay is None:
        args.average_decay = FederatedConfig().average_decay
    labels = pneumoniamnist("train", args.data_dir).labels
    runs = Path(args.runs)
    rows: list[dict] = []

    def step(kind: str, run_dir: Path, make) -> None:
        """Train (unless --report-only) or read one run; a run not finished yet is left out of the table."""
        if args.report_only and not (run_dir / "metrics.json").exists():
            print(f"  (not run yet: {run_dir.name})")
            return
        lock = run_dir.parent / f".{run_dir.name}.lock"  # another bench process may be training this run
        if not args.report_only and not (run_dir / "metrics.json").exists():
            runs.mkdir(parents=True, exist_ok=True)
            try:
                os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                print(f"  (skipped, another process holds {lock.name}; remove it if none does)", flush=True)
                return
            try:
                rows.append(make())
            finally:
                lock.unlink(missing_ok=True)
        else:
            rows.append(make())
        if not args.report_only and not args.no_report:
            _write(rows, args)

    # IID first (the target), then the skewed split; within a split the centralised baselines, then
    # the federation for every seed, then the sites alone: what runs first is what a shortened session finishes.
    e = _epochs(args)
    for part in args.partitions:
        setups = []
        for seed in args.seeds:
            if not args.no_central:
                step("central", runs / f"central-e{e}-seed{seed}", lambda: _central(seed, e, args.data_dir, runs))
            base = dict(sites=3, rounds=args.rounds, local_epochs=args.local_epochs, epsilon=3.0, partition=part,
                        alpha=0.5, batch_size=args.batch_size, learning_rate=args.lr,
                        average_decay=args.average_decay, seed=seed, local_steps=args.local_steps)
            server = ""
            if args.server_momentum is not None:
                base.update(server_optimizer="fedavgm", server_learning_rate=1.0, server_momentum=args.server_momentum)
                server = f"-fedavgm{args.server_momentum:g}"
            local = f"e{args.local_epochs}" if args.local_steps is None else f"ls{args.local_steps}"
            tag = (f"{part}-r{args.rounds}-{local}-b{args.batch_size}-lr{args.lr:g}"
                   f"-avg{args.average_decay:g}{server}-seed{seed}")
            fracs = [float(labels[i].float().mean()) for i in site_indices(FederatedConfig(**base), labels)]
            setups.append((seed, base, tag, fracs))
        if args.central_only:
            continue
        for seed, base, tag, fracs in setups if not args.no_fed else ():
            d = runs / f"fed-{tag}"
            step("fed", d, lambda: {**_row("federated", seed, part, _run(FederatedConfig(**base), args.data_dir, d), d),
                                    "pneumonia_fraction": fracs})
        for seed, base, tag, fracs in setups:
            for s in range(3) if not args.no_alone else ():
                d = runs / f"alone{s}-{tag}"
                step("alone", d, lambda: {**_row(f"site {s} alone", seed, part,
                                                 _run(FederatedConfig(**base, alone=s), args.data_dir, d), d),
                                          "pneumonia_fraction": [fracs[s]]})
    if not args.no_report:
        if args.alone_from:
            other = json.loads((RESULTS / f"{args.alone_from}.json").read_text())["rows"]
            rows[:] = [r for r in rows if "alone" not in r["kind"]] + [
                {**r, "from": args.alone_from} for r in other if "alone" in r["kind"] and r["partition"] in args.partitions]
        _write(rows, args)
        _report(rows, args)
    return 0


DIAGNOSIS = [  # (run folder, what it isolates)
    ("central-e15-seed0", "centralised DP, batch 256, 270 steps"),
    ("central-b768-e15-seed0", "centralised DP, batch 768 (the federation's per-step batch), 90 steps, central noise"),
    ("fed-iid-r90-ls1-b256-lr1-avg0.9-seed0", "FedSGD, 3 sites x batch 256, 90 steps, local noise (sqrt 3 x)"),
    ("fed-iid-r15-e1-b256-lr1-avg0.5-seed0", "FedAvg, 15 rounds x 6 local steps (client drift), 90 steps"),
    ("fed-iid-r15-e1-b85-lr1-avg0.7-seed0", "FedAvg, per-site batch 85, 270 steps"),
    ("fed-iid-r45-e1-b256-lr1-avg0.5-seed0", "FedAvg, 45 rounds x 6 local steps (3x compute), 270 steps"),
]


def _diagnosis(runs: Path) -> int:
    """Seed 0, IID: which of step count, local noise and client drift separates federated from centralised DP."""
    rows = []
    for name, what in DIAGNOSIS:
        f = runs / name / "metrics.json"
        if not f.exists():
            print(f"  (not run: {name})")
            continue
        m = json.loads(f.read_text())
        sigma, q = m["noise_multiplier"], m["sampling_rate"]
        batch = m["config"]["batch_size"]
        sites = 3 if "sites" in m and isinstance(m["sites"], list) else 1
        rows.append({"run": name, "what": what, "steps": m["steps"], "noise_multiplier": sigma, "sampling_rate": q,
                     "batch_per_site": batch, "noise_std_of_mean_step": sigma / (batch * math.sqrt(sites)),
                     "val_auc": m["val"]["roc_auc"], "test_auc": m["test"]["roc_auc"], "epsilon": m["epsilon"],
                     "train_seconds": m["train_seconds"], **_timing(runs / name)})
    (RESULTS / "federated_case_study_diagnosis.json").write_text(json.dumps({"machine": _machine(), "rows": rows}, indent=2) + "\n")
    lines = ["| run (seed 0, IID) | steps | σ | noise std of the averaged step (× C) | val AUC | test AUC |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['what']} | {r['steps']} | {r['noise_multiplier']:.2f} | {r['noise_std_of_mean_step']:.4f} | "
              f"{r['val_auc']:.3f} | {r['test_auc']:.3f} |" for r in rows]
    (RESULTS / "federated_case_study_diagnosis.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _epochs(args) -> int:
    """Passes over the pooled data the federation makes: R × E, or with --local-steps R × steps × 3B / n."""
    if args.local_steps is None:
        return args.rounds * args.local_epochs
    return max(1, math.ceil(args.rounds * args.local_steps * 3 * args.batch_size / 4708))


def _write(rows: list[dict], args) -> None:
    RESULTS.mkdir(exist_ok=True)
    seen, unique = set(), []
    for r in rows:  # a centralised run appears once per split in the loop
        k = (r["kind"], r["seed"], r["partition"])
        if k not in seen:
            seen.add(k)
            unique.append(r)
    rows[:] = unique
    (RESULTS / f"{args.results_name}.json").write_text(
        json.dumps({"args": vars(args), "machine": _machine(), "rows": rows}, indent=2) + "\n")


def _machine() -> dict:
    cpu = cpu_model()
    return {"cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
            "note": "timings taken on a shared, loaded machine (each row: wall_seconds, load_start, load_end)"}


def _report(rows: list[dict], args) -> None:
    saved = json.loads((RESULTS / "case_study.json").read_text())
    central = saved.get("rows", saved).get("3", [])  # files written before the machine record: the rows alone
    c_auc = [r["roc_auc"] for r in central]
    lines = [f"# Federated DP, PneumoniaMNIST, 3 sites, ε = 3 per site (δ = 1e-5), seeds {args.seeds}",
             "", f"{args.rounds} rounds × "
             f"{f'{args.local_epochs} local epoch' if args.local_steps is None else f'{args.local_steps} local step'}"
             f", per-site expected batch {args.batch_size}, "
             f"local SGD lr {args.lr:g} momentum 0.9, "
             f"{'FedAvg' if args.server_momentum is None else f'FedAvgM (server lr 1, momentum {args.server_momentum:g})'}, "
             f"server-side average decay {args.average_decay:g}; "
             "test ROC-AUC of the round selected on validation, mean ± std (number of seeds)."
             + (f" Sites-alone columns: from bench/results/{args.alone_from}.json (that recipe's alone runs)."
                if args.alone_from else ""), "",
             "| split | federated (3 sites) | site 0 alone | site 1 alone | site 2 alone | "
             f"centralised, same {_epochs(args)} epochs | centralised, 15 epochs (README) |",
             "|---|---|---|---|---|---|---|"]
    same = [r["test_auc"] for r in rows if r["kind"].startswith("centralised")]
    for part in args.partitions:
        cells = []
        for kind in ("federated", "site 0 alone", "site 1 alone", "site 2 alone"):
            v = [r["test_auc"] for r in rows if r["partition"] == part and r["kind"] == kind]
            cells.append(_ms(v) if v else "–")
        label = "IID" if part == "iid" else "Dirichlet α = 0.5"
        lines.append(f"| {label} | {' | '.join(cells)} | {_ms(same) if same else '–'} | {_ms(c_auc) if c_auc else '–'} |")
    (RESULTS / f"{args.results_name}.md").write_text("\n".join(lines) + "\n")
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
                   label=f"centralised DP, same {_epochs(args)} epochs")
    if c_auc:
        ax.axhline(statistics.mean(c_auc), color="black", ls="--", lw=1, label="centralised DP, 15 epochs (README)")
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_ylim(0.5, 1.0)
    ax.set_ylabel("test ROC-AUC")
    ax.set_title("PneumoniaMNIST, ε = 3 per site: federating vs training alone")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.results_name}.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
