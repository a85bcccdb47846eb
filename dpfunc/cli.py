"""The ``dpfunc`` command line: ``train``, ``evaluate``, ``account``.

Examples::

    dpfunc train --data-dir ../shared/data                      # DP-SGD, ε = 3, δ = 1e-5, CNN
    dpfunc train --data-dir ../shared/data --no-dp              # the non-private baseline
    dpfunc train --run-dir runs/eps3 --resume                   # continue an interrupted run
    dpfunc evaluate runs/eps3                                   # test metrics from the checkpoint
    dpfunc account --noise-multiplier 1.1 --sampling-rate 0.004267 --steps 14062 --delta 1e-5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

__all__ = ["main", "build_parser"]


def _positive_float(name: str):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number > 0, got {text!r}")
        return v

    return parse


def _unit_interval(name: str, *, closed_right: bool = False):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        ok = 0 < v <= 1 if closed_right else 0 < v < 1
        if not ok:
            raise argparse.ArgumentTypeError(f"{name} must be in (0, 1{']' if closed_right else ')'}, got {text!r}")
        return v

    return parse


def _int_at_least(name: str, low: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{name} must be >= {low}, got {text!r}")
        return v

    return parse


def build_parser() -> argparse.ArgumentParser:
    from dpfunc._version import __version__

    p = argparse.ArgumentParser(
        prog="dpfunc",
        description="Differentially private training, evaluation and accounting (paediatric pneumonia case study).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::", 1)[1],
    )
    p.add_argument("--version", action="version", version=f"dpfunc {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,evaluate,account}")

    t = sub.add_parser("train", help="train a classifier with DP-SGD (or --no-dp) and write a run folder",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--dataset", choices=["pneumoniamnist"], default="pneumoniamnist", help="the data set")
    t.add_argument("--data-dir", default=None,
                   help="folder holding pneumoniamnist.npz (default: $DPFUNC_DATA, then ~/.cache/dpfunc)")
    t.add_argument("--download", action="store_true", help="download the official file into the data folder if missing")
    t.add_argument("--model", choices=["cnn", "resnet18"], default="cnn", help="GroupNorm CNN or ResNet-18-GN")
    t.add_argument("--epsilon", type=_positive_float("--epsilon"), default=3.0,
                   help="target ε; σ is calibrated with the PLD accountant so that ε ≤ target")
    t.add_argument("--delta", type=_unit_interval("--delta"), default=1e-5, help="target δ")
    t.add_argument("--noise-multiplier", type=_positive_float("--noise-multiplier"), default=None,
                   help="train at this σ instead of calibrating to --epsilon")
    t.add_argument("--epochs", type=_int_at_least("--epochs", 1), default=15, help="passes over the data (in expectation)")
    t.add_argument("--batch-size", type=_int_at_least("--batch-size", 1), default=256,
                   help="EXPECTED Poisson batch size (sampling rate = batch size / n)")
    t.add_argument("--lr", type=_positive_float("--lr"), default=None,
                   help="SGD learning rate (default: 1.0 with DP, 0.05 with --no-dp)")
    t.add_argument("--momentum", type=float, default=0.9, help="SGD momentum in [0, 1)")
    t.add_argument("--ema-decay", type=float, default=0.9,
                   help="evaluate an exponential moving average of the iterates (free post-processing); 0 = last iterate")
    t.add_argument("--max-grad-norm", type=_positive_float("--max-grad-norm"), default=1.0, help="per-example clipping bound C")
    t.add_argument("--augment-views", type=_int_at_least("--augment-views", 0), default=0,
                   help="augmentation multiplicity K (0 = off): K views per example, clipped as one")
    t.add_argument("--image-size", type=int, choices=[28, 64], default=28, help="input side length (64 = upsampled)")
    t.add_argument("--engine", choices=["fast", "vmap"], default="fast",
                   help="per-example clipping: fast (ghost norms / book-keeping) or vmap (oracle)")
    t.add_argument("--no-dp", action="store_true", help="train the non-private baseline (same model and data)")
    t.add_argument("--seed", type=int, default=0, help="root of all keys (init, sampling, noise)")
    t.add_argument("--run-dir", default=None, help="run folder (default: runs/<model>-eps<ε>-seed<seed> or runs/<model>-nodp-seed<seed>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    t.add_argument("--bootstrap", type=_int_at_least("--bootstrap", 1), default=1000, help="bootstrap resamples for the CIs")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    e = sub.add_parser("evaluate", help="recompute the test metrics of a run folder from its checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("run_dir", help="a folder written by `dpfunc train`")
    e.add_argument("--data-dir", default=None, help="folder holding pneumoniamnist.npz (default: $DPFUNC_DATA)")
    e.add_argument("--bootstrap", type=_int_at_least("--bootstrap", 1), default=1000, help="bootstrap resamples")

    a = sub.add_parser("account", help="print ε of DP-SGD for every accountant",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a.add_argument("--noise-multiplier", type=_positive_float("--noise-multiplier"), required=True, help="σ")
    a.add_argument("--sampling-rate", type=_unit_interval("--sampling-rate", closed_right=True), required=True, help="q")
    a.add_argument("--steps", type=_int_at_least("--steps", 0), required=True, help="number of steps T")
    a.add_argument("--delta", type=_unit_interval("--delta"), default=1e-5, help="δ")
    a.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def _cmd_train(args: argparse.Namespace) -> int:
    from dpfunc.train import TrainConfig, train

    cfg = TrainConfig(
        model=args.model,
        epsilon=None if args.noise_multiplier is not None else args.epsilon,
        delta=args.delta,
        noise_multiplier=args.noise_multiplier,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        momentum=args.momentum,
        ema_decay=args.ema_decay,
        max_grad_norm=args.max_grad_norm,
        augment_views=args.augment_views,
        image_size=args.image_size,
        engine=args.engine,
        private=not args.no_dp,
        seed=args.seed,
    )
    if args.download:
        from dpfunc.data import download_pneumoniamnist, resolve_data_dir

        target = Path(args.data_dir) if args.data_dir else resolve_data_dir(None)
        if not (target / "pneumoniamnist.npz").exists():
            download_pneumoniamnist(target)
    tag = f"{cfg.model}-nodp" if args.no_dp else f"{cfg.model}-eps{cfg.epsilon if cfg.epsilon is not None else 'sigma' + str(cfg.noise_multiplier)}"
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / f"{tag}-seed{cfg.seed}"
    result = train(cfg, data_dir=args.data_dir, run_dir=run_dir, resume=args.resume, progress=not args.quiet,
                   bootstrap_resamples=args.bootstrap)
    _print_result(result.test, result.test_ci, result.epsilon, result.delta, result.train_seconds)
    print(f"run folder: {run_dir}  (metrics.json, checkpoint.pt, roc.png, confusion.png, training.png)")
    return 0


def _print_result(test: dict, ci: dict, eps, delta, seconds) -> None:
    print("test metrics (95% bootstrap CI):")
    for name in ("roc_auc", "accuracy", "mcc", "sensitivity", "specificity"):
        c = ci[name]
        print(f"  {name:<12} {test[name]:.4f}  [{c['lower']:.4f}, {c['upper']:.4f}]")
    eps_text = "∞ (non-private)" if eps is None else f"{eps:.3f}"
    print(f"privacy: ε = {eps_text} at δ = {delta:g}; training time {seconds:.0f}s")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from dpfunc.bridge import functionalize
    from dpfunc.data import pneumoniamnist
    from dpfunc.keys import Key
    from dpfunc.metrics import binary_metrics, bootstrap_ci
    from dpfunc.models import build_model
    from dpfunc.train import evaluate_scores, load_run

    cfg, state = load_run(args.run_dir)
    init_key = Key(cfg.seed).split(4)[0]
    module = build_model(cfg.model, key=init_key, **({"input_size": cfg.image_size} if cfg.model == "resnet18" else {}))
    apply_fn, _, _ = functionalize(module)
    test_set = pneumoniamnist("test", args.data_dir, size=cfg.image_size)
    scores = evaluate_scores(apply_fn, state["best_params"], state["buffers"], test_set)
    test = binary_metrics(test_set.labels, scores).to_dict()
    ci = {k: v.to_dict() for k, v in bootstrap_ci(test_set.labels, scores, seed=cfg.seed, num_resamples=args.bootstrap).items()}
    eps = None
    if cfg.private:
        from dpfunc import accounting
        from dpfunc.private import privacy_ledger

        eps = accounting.epsilon(privacy_ledger(state["opt_state"]), cfg.delta, method="pld")
    print(f"run {args.run_dir}: model {cfg.model}, best epoch {state['best_epoch']} of {state['epoch']} done")
    _print_result(test, ci, eps, cfg.delta, state["elapsed"])
    return 0


def _cmd_account(args: argparse.Namespace) -> int:
    import warnings

    from dpfunc import accounting

    rows = []
    for method in ("pld", "rdp", "gdp"):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GDP's approximation warning: stated in the table instead
            eps = accounting.dpsgd_epsilon(args.noise_multiplier, args.sampling_rate, args.steps, args.delta, method=method)
        rows.append({"method": method, "epsilon": eps, "seconds": time.perf_counter() - t0})
    notes = {"pld": "tight numerical upper bound (default)", "rdp": "upper bound (Balle et al. 2020 conversion)",
             "gdp": "CLT approximation, may UNDER-estimate: not a guarantee"}
    if args.json:
        print(json.dumps({"noise_multiplier": args.noise_multiplier, "sampling_rate": args.sampling_rate,
                          "steps": args.steps, "delta": args.delta, "results": rows}, indent=2))
        return 0
    print(f"DP-SGD  σ = {args.noise_multiplier}  q = {args.sampling_rate}  T = {args.steps}  δ = {args.delta:g}")
    print(f"{'method':<8}{'ε':>10}  {'time':>8}  note")
    for r in rows:
        print(f"{r['method']:<8}{r['epsilon']:>10.4f}  {r['seconds'] * 1000:>6.0f}ms  {notes[r['method']]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        for flag, value in (("--momentum", args.momentum), ("--ema-decay", args.ema_decay)):
            if not 0 <= value < 1:
                parser.error(f"{flag} must be in [0, 1), got {value}")
    handlers = {"train": _cmd_train, "evaluate": _cmd_evaluate, "account": _cmd_account}
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # Expected user errors: a clear message, no traceback (set DPFUNC_DEBUG=1 for one).
        if os.environ.get("DPFUNC_DEBUG"):
            raise
        print(f"dpfunc {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; resume with the same flags and --resume", file=sys.stderr)
        return 130

