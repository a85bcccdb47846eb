"""Throughput of data-parallel DP-SGD: ``dpfunc train --nproc N`` for N = 1, 2 on this machine.

Each configuration trains the case-study CNN on a fixed training subset (same flags, same keys; only
``--nproc`` differs) and reports examples/s = steps × expected batch / training seconds (the
``train_seconds`` of metrics.json: the training loop only, no start-up, no evaluation), the largest
parameter difference against N = 1 (float32; the all-reduce changes the summation order), and the
communication per step next to the model size.

    .venv/bin/python bench/distributed.py [--nprocs 1 2] [--train-subset 2048] [--epochs 1]

Writes bench/results/distributed.json and .md (``--tag`` appends to the file name).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


from _machine import cpu_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--train-subset", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--engine", default="fast")
    ap.add_argument("--tag", default="")
    ap.add_argument("--data-dir", default=os.environ.get("DPFUNC_DATA", str(ROOT.parent / "shared" / "data")))
    a = ap.parse_args()

    from dpfunc.bridge import functionalize
    from dpfunc.bridge.checkpoint import load_checkpoint
    from dpfunc.keys import Key
    from dpfunc.models import build_model

    _, params, _ = functionalize(build_model("cnn", key=Key(0)))
    numel = sum(p.numel() for p in params.values())
    grad_bytes = 4 * numel
    rows, params_of = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in a.nprocs:
            run = Path(tmp) / f"n{nproc}"
            cmd = [sys.executable, "-m", "dpfunc", "train", "--data-dir", a.data_dir, "--nproc", str(nproc), "--train-subset",
                   str(a.train_subset), "--epochs", str(a.epochs), "--batch-size", str(a.batch_size), "--engine", a.engine,
                   "--noise-multiplier", "1.0", "--bootstrap", "10", "--quiet", "--run-dir", str(run)]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            metrics = json.loads((run / "metrics.json").read_text())
            ckpt = load_checkpoint(run / "checkpoint.pt")
            params_of[len(rows)] = ckpt["params"]
            examples = metrics["steps"] * a.batch_size
            # ring all-reduce: each rank sends 2 (W-1)/W of the buffer; + the count (8 B) and 4 metric sums (32 B)
            sent = 0 if nproc == 1 else 2 * (nproc - 1) / nproc * (grad_bytes + 8 + 32)
            rows.append({"nproc": nproc, "steps": metrics["steps"], "train_seconds": metrics["train_seconds"],
                         "examples_per_s": examples / metrics["train_seconds"], "wall_seconds_with_startup": wall,
                         "bytes_sent_per_rank_per_step": sent,
                         "omp_num_threads": os.environ.get("OMP_NUM_THREADS", f"unset (torch default; --nproc N>1: {os.cpu_count()}//N)")})
    first = next(i for i, r in enumerate(rows) if r["nproc"] == 1) if any(r["nproc"] == 1 for r in rows) else 0
    for i, r in enumerate(rows):
        ref = params_of[first]
        r["max_param_diff_vs_first"] = max(float((params_of[i][k] - ref[k]).abs().max()) for k in ref)
    base = rows[first]["examples_per_s"]
    header = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "threads_per_process": torch.get_num_threads(),
              "load_average": os.getloadavg(), "model": "cnn", "model_parameters": numel, "model_bytes_float32": grad_bytes,
              "train_subset": a.train_subset, "batch_size": a.batch_size, "engine": a.engine}
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"distributed{a.tag}.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
    lines = [f"# dpfunc train --nproc N ({header['cpu']}, {header['cores']} cores, torch {header['torch']}, "
             f"load average {', '.join(f'{x:.1f}' for x in header['load_average'])})", "",
             f"CNN, {numel} parameters ({grad_bytes} B float32); subset {a.train_subset}, expected batch {a.batch_size}, "
             f"engine {a.engine}", "",
             "| processes | OMP threads per process | steps | train s | examples/s | × N=1 | max param diff vs N=1 | bytes sent per rank per step |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['nproc']} | {r['omp_num_threads']} | {r['steps']} | {r['train_seconds']:.1f} | {r['examples_per_s']:.1f} | "
                     f"{r['examples_per_s'] / base:.2f} | {r['max_param_diff_vs_first']:.2e} | {r['bytes_sent_per_rank_per_step']:.0f} |")
    (out / f"distributed{a.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
