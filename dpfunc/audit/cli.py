"""``dpfunc audit``: the one-run empirical ε lower bound of DP-SGD on the case-study CNN.

    dpfunc audit --run-dir runs/audit-sigma1 --noise-multiplier 1.0 --epochs 3 --canaries 1000 [--device cuda]

Trains once with m canaries (each included with probability ½), scores them (white box: Dirac gradient
canaries read from every update; black box: −loss of flipped-label validation images on the final
model), and writes ``RUN/audit.json`` (``epsilon_claimed`` from the PLD accountant,
``epsilon_lower_bound`` at ``confidence``, ``m``, …) and ``RUN/audit.png`` (score histograms, included
vs excluded).
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("audit", help="one-run empirical ε lower bound of DP-SGD (writes audit.json/.png)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="folder for audit.json and audit.png")
    p.add_argument("--noise-multiplier", type=float, required=True, help="σ of the audited DP-SGD run")
    p.add_argument("--mode", choices=["white-box", "black-box"], default="white-box")
    p.add_argument("--canaries", type=int, default=1000, help="m")
    p.add_argument("--epochs", type=int, default=3, help="passes over the data in expectation (steps = epochs · n / batch)")
    p.add_argument("--batch-size", type=int, default=256, help="expected Poisson batch size")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1.0, help="SGD step on the private mean")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--engine", choices=["fast", "vmap"], default="fast", help="per-example clipping engine")
    p.add_argument("--data-dir", default=None, help="folder holding pneumoniamnist.npz")
    p.add_argument("--seed", type=int, default=0)
    from dpfunc.cli import add_compute_arguments

    add_compute_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def make_engine(name: str, module, max_grad_norm: float):
    """The gradient engine (a ClippedSum per step): the bridge's fast engine or the vmap oracle."""
    import torch.nn.functional as F

    from dpfunc.clipping import FlatClipping

    if name == "fast":
        from dpfunc.bridge.fast import fast_engine

        return fast_engine(module, lambda out, y: F.cross_entropy(out, y, reduction="none"), FlatClipping(max_grad_norm))
    return None  # run_audit's default: vmap_engine with flat clipping


def run(args: argparse.Namespace) -> int:
    from dpfunc._progress import progress
    from dpfunc.attacks.run import write_json
    from dpfunc.audit.run import AuditJob, plot_scores, run_audit
    from dpfunc.bridge import functionalize
    from dpfunc.data import pneumoniamnist
    from dpfunc.keys import Key
    from dpfunc.cli import compute_device
    from dpfunc.devices import describe_device
    from dpfunc.models import build_model

    device = compute_device(args)  # --threads; refuse a device this machine lacks, before anything is read
    train_set = pneumoniamnist("train", args.data_dir)
    n = len(train_set)
    q = min(1.0, args.batch_size / n)
    steps = max(1, round(n / args.batch_size)) * args.epochs
    job = AuditJob(args.noise_multiplier, steps=steps, sampling_rate=q, canaries=args.canaries, mode=args.mode,
                   max_grad_norm=args.max_grad_norm, learning_rate=args.lr, delta=args.delta, confidence=args.confidence,
                   seed=args.seed)
    module = build_model("cnn", key=Key(args.seed).split(4)[0])
    apply_fn, params, buffers = functionalize(module.to(device))
    pool = None
    if job.mode.value == "black-box":
        val = pneumoniamnist("val", args.data_dir)
        pool = (val.images, val.labels)
    bar = progress(total=steps, desc=f"audit σ={args.noise_multiplier}", unit="step")
    try:
        out = run_audit(apply_fn, params, buffers, (train_set.images, train_set.labels), job, canary_pool=pool,
                        engine=make_engine(args.engine, module, args.max_grad_norm), on_step=bar.update, device=device)
    finally:
        bar.close()
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    scores, included = out.pop("_scores"), out.pop("_included")
    out["device"] = describe_device(device)
    write_json(run_dir / "audit.json", out)
    plot_scores([(f"{job.mode.value}, σ = {job.noise_multiplier}: ε claimed {out['epsilon_claimed']:.2f}, "
                  f"lower bound {out['epsilon_lower_bound']:.2f}", scores, included)], run_dir / "audit.png")
    print(f"ε claimed {out['epsilon_claimed']:.3f} (PLD, δ = {job.delta:g}); empirical lower bound "
          f"{out['epsilon_lower_bound']:.3f} at {job.confidence:.0%} confidence (m = {job.canaries}, {job.mode.value})")
    print(f"wrote {run_dir / 'audit.json'} and {run_dir / 'audit.png'}")
    return 0
