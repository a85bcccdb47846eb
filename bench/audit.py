"""One-run empirical audit (Steinke, Nasr, Jagielski 2023) of DP-SGD on the case-study CNN.

For σ ∈ {0.5, 1, 2}: one DP-SGD run of the case-study CNN on PneumoniaMNIST (q = 256/4708, C = 1,
--epochs passes, plain SGD lr 1) with m = 1000 Dirac gradient canaries (white box), each included with
probability ½; the ε lower bound at 95% confidence (δ = 1e-5) next to the PLD accountant's claimed ε.
Plus one black-box run (flipped-label validation images, −loss scores) at σ = 0.5, and a broken
mechanism (σ = 0 while the ledger claims σ = 1) that the audit must catch.

Scaled to a loaded 2-core CPU: --epochs (default 3, 54 steps) instead of the case study's 15 (270 steps).

    python bench/audit.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpfunc.attacks.run import write_json  # noqa: E402
from dpfunc.audit.cli import make_engine  # noqa: E402
from dpfunc.audit.run import AuditJob, plot_scores, run_audit  # noqa: E402
from dpfunc.bridge import functionalize  # noqa: E402
from dpfunc.data import pneumoniamnist  # noqa: E402
from dpfunc.keys import Key  # noqa: E402
from dpfunc.models import build_model  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("DPFUNC_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    ap.add_argument("--canaries", type=int, default=1000)
    ap.add_argument("--engine", choices=["fast", "vmap"], default="fast")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-extras", action="store_true", help="skip the black-box and broken-mechanism runs")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t_start = time.perf_counter()
    train_set = pneumoniamnist("train", args.data_dir)
    val = pneumoniamnist("val", args.data_dir)
    n = len(train_set)
    q = 256 / n
    steps = round(n / 256) * args.epochs
    runs = [(s, "white-box", None) for s in args.sigmas]
    if not args.no_extras:
        runs += [(args.sigmas[0], "black-box", None), (0.0, "white-box", 1.0)]
    rows, panels = [], []
    for sigma, mode, claimed_sigma in runs:
        module = build_model("cnn", key=Key(args.seed).split(4)[0])
        apply_fn, params, buffers = functionalize(module)
        job = AuditJob(sigma, steps=steps, sampling_rate=q, canaries=args.canaries, mode=mode, claimed_sigma=claimed_sigma, seed=args.seed)
        out = run_audit(apply_fn, params, buffers, (train_set.images, train_set.labels), job, canary_pool=(val.images, val.labels),
                        engine=make_engine(args.engine, module, 1.0))
        scores, included = out.pop("_scores"), out.pop("_included")
        label = f"{mode}, σ = {sigma}" + (f" (claims σ = {claimed_sigma})" if claimed_sigma else "")
        out["label"] = label
        rows.append(out)
        RESULTS.mkdir(parents=True, exist_ok=True)  # saved as each run finishes
        write_json(RESULTS / "audit.json", {"meta": {"partial": True, "steps": steps, "sampling_rate": q}, "runs": rows})
        panels.append((f"{label}\nclaimed ε {out['epsilon_claimed']:.2f}, lower bound {out['epsilon_lower_bound']:.2f}", scores, included))
        print(f"{label:<40} claimed ε {out['epsilon_claimed']:8.3f}  lower bound {out['epsilon_lower_bound']:.3f}  "
              f"(k = {out['guesses']}, {out['correct_guesses']} right)  {out['train_seconds']:.0f}s", flush=True)
    total = time.perf_counter() - t_start
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "steps": steps, "sampling_rate": q,
            "epochs": args.epochs, "total_seconds": total, "machine": platform.machine(),
            "note": f"shared, heavily loaded 2-core machine; {args.epochs} epochs instead of the case study's 15"}
    try:
        meta["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "audit.json", {"meta": meta, "runs": rows})
    plot_scores(panels, RESULTS / "audit.png")
    lines = ["| audit | σ | ε claimed (PLD, δ = 1e-5) | ε lower bound (95%) | guesses right |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['job']['mode']} | {r['job']['noise_multiplier']}{' (claims ' + str(r['job']['claimed_sigma']) + ')' if r['job']['claimed_sigma'] else ''} | "
                     f"{r['epsilon_claimed']:.2f} | {r['epsilon_lower_bound']:.2f} | {r['correct_guesses']}/{r['guesses']} |")
    (RESULTS / "audit.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"total {total:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
