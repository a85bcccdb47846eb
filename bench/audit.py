"""One-run empirical audit (Steinke, Nasr, Jagielski 2023) of DP-SGD on the case-study CNN.

Every run: DP-SGD on PneumoniaMNIST (q = 256/4708, C = 1, plain SGD lr 1) with m canaries, each
included with probability ½, and the ε lower bound at 95% confidence (δ = 1e-5) next to the PLD
accountant's claimed ε. The runs, in this order (each saved as it finishes):

  1. case study: white box (m Dirac gradient canaries), σ calibrated to ε = 3 over --epochs (15, the
     case study's 270 steps), the setting of issue 16;
  2. broken-mechanism control: σ = 0 while the ledger claims σ = 1, then σ = 2 (--control-claims,
     --control-epochs); the audit must catch it (lower bound above the claim) -- it can only when the
     claim is below what m canaries can certify (about 4 for m = 1000 with every guess right);
  3. black box: flipped-label canaries (the validation and test images, which the run never trains on
     otherwise), scored by −loss of the final model, at σ = --black-box-sigma over --epochs;
  4. white box at each of --sigmas over --epochs.

--skip drops runs by number; --name renames the outputs (runs can go to separate processes). The
header printed first names the CPU, torch, threads and load; each run records the load average after it.

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
sys.path.insert(0, str(ROOT / "bench"))

from _machine import cpu_model  # noqa: E402

from dpfunc.attacks.run import case_study_threat, write_json  # noqa: E402
from dpfunc.audit.cli import make_engine  # noqa: E402
from dpfunc.audit.run import AuditJob, plot_scores, run_audit  # noqa: E402
from dpfunc.bridge import functionalize  # noqa: E402
from dpfunc.data import pneumoniamnist  # noqa: E402
from dpfunc.keys import Key  # noqa: E402
from dpfunc.models import build_model  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("DPFUNC_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--control-epochs", type=int, default=3)
    ap.add_argument("--control-claims", type=float, nargs="+", default=[1.0, 2.0], help="σ the broken (σ = 0) mechanism claims")
    ap.add_argument("--sigmas", type=float, nargs="*", default=[0.5, 1.0, 2.0])
    ap.add_argument("--black-box-sigma", type=float, default=0.5)
    ap.add_argument("--black-box-claims", type=float, default=None, help="σ the black-box run's ledger claims (needed for σ = 0)")
    ap.add_argument("--canaries", type=int, default=1000)
    ap.add_argument("--engine", choices=["fast", "vmap"], default="fast")
    ap.add_argument("--skip", type=int, nargs="*", default=[], choices=[1, 2, 3, 4])
    ap.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    ap.add_argument("--name", default="audit", help="outputs: bench/results/NAME.json, NAME.md, NAME.png")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    header = {"cpu": cpu_model(), "machine": platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "load_at_start": load(), "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
              "argv": sys.argv[1:]}
    print(f"machine: {header['cpu']} ({header['cores']} cores), torch {header['torch']}, threads {header['threads']}, "
          f"load {header['load_at_start']}, start {header['started_utc']} UTC", flush=True)
    train_set = pneumoniamnist("train", args.data_dir)
    val, test = pneumoniamnist("val", args.data_dir), pneumoniamnist("test", args.data_dir)
    pool = (torch.cat([val.images, test.images]), torch.cat([val.labels, test.labels]))  # black-box canary candidates
    n = len(train_set)
    q = 256 / n
    per_epoch = round(n / 256)
    cs_sigma = case_study_threat(num_examples=n, epochs=args.epochs).noise_multiplier
    # (number, label, σ, mode, claimed σ, epochs)
    runs = [(1, f"case study: white-box, σ = {cs_sigma:.2f} (ε = 3)", cs_sigma, "white-box", None, args.epochs),
            *[(2, f"control: white-box, σ = 0 (claims σ = {c:g})", 0.0, "white-box", c, args.control_epochs) for c in args.control_claims],
            (3, f"black-box, σ = {args.black_box_sigma:g}" + (f" (claims σ = {args.black_box_claims:g})" if args.black_box_claims else ""),
             args.black_box_sigma, "black-box", args.black_box_claims, args.epochs)]
    runs += [(4, f"white-box, σ = {s}", s, "white-box", None, args.epochs) for s in args.sigmas]
    runs = [r for r in runs if r[0] not in args.skip]
    rows, panels = [], []
    RESULTS.mkdir(parents=True, exist_ok=True)
    for _, label, sigma, mode, claimed_sigma, epochs in runs:
        module = build_model("cnn", key=Key(args.seed).split(4)[0])
        apply_fn, params, buffers = functionalize(module)
        job = AuditJob(sigma, steps=per_epoch * epochs, sampling_rate=q, canaries=args.canaries, mode=mode,
                       claimed_sigma=claimed_sigma, seed=args.seed)
        out = run_audit(apply_fn, params, buffers, (train_set.images, train_set.labels), job, canary_pool=pool,
                        engine=make_engine(args.engine, module, 1.0))
        scores, included = out.pop("_scores"), out.pop("_included")
        out.update(label=label, epochs=epochs, load_after=load())
        rows.append(out)
        panels.append((f"{label}, {epochs} epochs\nclaimed ε {out['epsilon_claimed']:.2f}, lower bound {out['epsilon_lower_bound']:.2f}",
                       scores, included))
        meta = {**header, "partial": True, "sampling_rate": q, "steps_per_epoch": per_epoch, "seconds_so_far": time.perf_counter() - t_start,
                "note": "shared, loaded 2-core machine (load_after per run)"}
        write_json(RESULTS / f"{args.name}.json", {"meta": meta, "runs": rows})
        plot_scores(panels, RESULTS / f"{args.name}.png")
        lines = ["| audit | epochs (steps) | m | ε claimed (PLD, δ = 1e-5) | ε lower bound (95%) | guesses right | run s (load) |",
                 "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['label']} | {r['epochs']} ({r['job']['steps']}) | {r['m']} | {r['epsilon_claimed']:.2f} | "
                         f"{r['epsilon_lower_bound']:.2f} | {r['correct_guesses']}/{r['guesses']} | {r['train_seconds']:.0f} ({r['load_after'][0]:.1f}) |")
        (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
        print(f"{label:<45} {epochs:2d} ep  claimed ε {out['epsilon_claimed']:8.3f}  lower bound {out['epsilon_lower_bound']:.3f}  "
              f"(k = {out['guesses']}, {out['correct_guesses']} right)  {out['train_seconds']:.0f}s  load {out['load_after']}", flush=True)
    meta.update(partial=False, total_seconds=time.perf_counter() - t_start)
    write_json(RESULTS / f"{args.name}.json", {"meta": meta, "runs": rows})
    print((RESULTS / f"{args.name}.md").read_text())
    print(f"total {time.perf_counter() - t_start:.0f}s, load {load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
