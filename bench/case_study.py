"""The case-study results table: non-private vs ε ∈ {1, 3, 8} at δ = 1e-5, mean ± std over seeds.

Each cell is a full ``dpfunc train`` run (the exact command is printed and stored), run one after the
other in this process's machine; test metrics come from each run's ``metrics.json``.

    python bench/case_study.py --data-dir ../shared/data                 # CNN, seeds 0 1 2, all budgets
    python bench/case_study.py --data-dir ../shared/data --budgets 3 --seeds 0

Writes ``bench/results/case_study.{md,json}`` and keeps the run folders under ``runs/case_study/``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine, machine_line  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def run_one(model: str, budget: str, seed: int, data_dir: str, runs: Path, extra: list[str]) -> dict:
    run_dir = runs / f"{model}-{'nodp' if budget == 'none' else 'eps' + budget}-seed{seed}"
    cmd = ["dpfunc", "train", "--model", model, "--seed", str(seed), "--run-dir", str(run_dir), "--quiet", *extra]
    cmd += ["--no-dp"] if budget == "none" else ["--epsilon", budget]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    metrics = run_dir / "metrics.json"
    if not metrics.exists():
        print("$", shlex.join(cmd), flush=True)
        subprocess.run([sys.executable, "-m", "dpfunc", *cmd[1:]], check=True)
    m = json.loads(metrics.read_text())
    return {"command": shlex.join(cmd), "seed": seed, "epsilon": m["epsilon"], "sigma": m["noise_multiplier"],
            "train_seconds": m["train_seconds"], **{k: m["test"][k] for k in ("roc_auc", "accuracy", "mcc", "sensitivity", "specificity")}}


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default="cnn")
    p.add_argument("--budgets", nargs="+", default=["none", "1", "3", "8"], help="'none' = non-private")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--runs", default="runs/case_study")
    p.add_argument("--extra", default="", help="extra flags for dpfunc train, quoted")
    args = p.parse_args(argv)
    rows = {b: [run_one(args.model, b, s, args.data_dir, Path(args.runs), shlex.split(args.extra)) for s in args.seeds]
            for b in args.budgets}
    RESULTS.mkdir(exist_ok=True)
    env = machine()  # each run is a child process with dpfunc train's own thread setting
    (RESULTS / "case_study.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    lines = [
        f"# PneumoniaMNIST test split, {args.model}, δ = 1e-5, mean ± std over seeds {args.seeds}",
        "",
        f"Machine: {machine_line(env)} (train times are one run after the other on this machine).",
        "",
        "| privacy | ε spent (PLD) | ROC-AUC | accuracy | MCC | sensitivity | specificity | train time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b, rs in rows.items():
        eps = "∞ (non-private)" if b == "none" else mean_std([r["epsilon"] for r in rs])
        cells = [mean_std([r[k] for r in rs]) for k in ("roc_auc", "accuracy", "mcc", "sensitivity", "specificity")]
        t = mean_std([r["train_seconds"] for r in rs]).replace(".000", "")
        lines.append(f"| {'non-private' if b == 'none' else 'ε = ' + b} | {eps} | {' | '.join(cells)} | {t} |")
    lines += ["", "Commands: see `case_study.json` (one `dpfunc train` per cell)."]
    (RESULTS / "case_study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
