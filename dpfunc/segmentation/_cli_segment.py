"""``dpfunc segment --task liver --data-dir DIR``: train a U-Net with patient-level DP; and the
segmentation branch of ``dpfunc evaluate``."""

from __future__ import annotations

import argparse
from pathlib import Path


from dpfunc._argtypes import int_at_least as _int_at_least, positive_float as _positive_float, unit_interval as _unit_interval


def _ema_decay(text: str) -> float:
    """--ema-decay: a number in [0, 1) (argparse prints the message with the usage line)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ema-decay must be a number in [0, 1), got {text!r}") from None
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"--ema-decay must be in [0, 1), got {text!r}")
    return v


def _ema_warmup(text: str) -> float:
    """--ema-warmup: a finite number > 1."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ema-warmup must be a number > 1, got {text!r}") from None
    if not (v > 1 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"--ema-warmup must be a finite number > 1, got {text!r}")
    return v


__all__ = ["add_parser", "run", "evaluate"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "segment", help="train a GroupNorm U-Net segmenter with patient-level DP (MSD layout or phantoms)",
        description="Patient-level DP: each patient (all of their slices) is one example for Poisson sampling and "
                    "clipping, so (ε, δ) protects everything a patient contributes. Writes a run folder like "
                    "`dpfunc train` (config.json, checkpoint.pt, metrics.json with test.dice, overlays.png, training.png).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=["liver"], default="liver", help="the segmentation task (MSD Task03 layout)")
    p.add_argument("--data-dir", required=True, help="an MSD task folder (dataset.json, imagesTr/, labelsTr/), e.g. "
                                                     "from `dpfunc make-phantoms`")
    p.add_argument("--epsilon", type=_positive_float("--epsilon"), default=8.0, help="target ε (σ calibrated with PLD)")
    p.add_argument("--delta", type=_positive_float("--delta"), default=1e-5, help="target δ (< 1)")
    p.add_argument("--noise-multiplier", type=_positive_float("--noise-multiplier"), default=None,
                   help="train at this σ instead of calibrating to --epsilon")
    p.add_argument("--no-dp", action="store_true", help="the non-private baseline (same model, data, optimiser)")
    p.add_argument("--unit", choices=["patient", "slice"], default="patient",
                   help="privacy unit: patient (all slices clipped as one) or slice (deepee's slice-level DP; weaker)")
    p.add_argument("--accountant", choices=["pld", "rdp"], default="pld",
                   help="σ calibration and ε: pld (tight) or rdp (an upper bound; faster at large sampling rates)")
    p.add_argument("--engine", choices=["fast", "vmap"], default="fast", help="per-example clipping engine")
    p.add_argument("--epochs", type=_int_at_least("--epochs", 1), default=30, help="passes over the patients")
    p.add_argument("--batch-size", type=_int_at_least("--batch-size", 1), default=8,
                   help="EXPECTED patients (or slices with --unit slice) per step")
    p.add_argument("--slices-per-patient", type=_int_at_least("--slices-per-patient", 1), default=4,
                   help="slices of a sampled patient used per step (drawn without replacement)")
    p.add_argument("--lr", type=_positive_float("--lr"), default=5e-3, help="Adam step size")
    p.add_argument("--max-grad-norm", type=_positive_float("--max-grad-norm"), default=1.0, help="clipping bound C")
    p.add_argument("--image-size", type=_int_at_least("--image-size", 8), default=64, help="slice side (64/128/256)")
    p.add_argument("--model", choices=["unet", "features"], default="unet",
                   help="unet: GroupNorm U-Net learned end to end; features: a FIXED data-independent filter bank (no "
                        "parameters, no privacy cost) + a small learned per-pixel head (Tramèr & Boneh 2021) — far "
                        "fewer trained parameters, so far less DP noise (README 'Segmentation under DP')")
    p.add_argument("--head-hidden", type=_int_at_least("--head-hidden", 0), default=0,
                   help="--model features: hidden width of the head (0 = linear, the README's recipe; hidden heads "
                        "collapsed to 'no organ' under DP in our runs)")
    p.add_argument("--head-smooth", type=_int_at_least("--head-smooth", 0), default=3,
                   help="--model features: side of a final convolution of the logits (0 = none; odd)")
    p.add_argument("--position-products", action=argparse.BooleanOptionalAction, default=True,
                   help="--model features: also intensity bins × row / column position features (the README's recipe)")
    p.add_argument("--local-histograms", action="store_true",
                   help="--model features: also local soft histograms (intensity bins blurred at σ 3 and 6 px; "
                        "the README's best recipe)")
    p.add_argument("--volume-norm", choices=["none", "rank"], default="none",
                   help="per-patient intensity normalisation before the model: rank = each in-window pixel's rank in "
                        "the patient's OWN volume (histogram equalisation; a function of that patient alone, no privacy "
                        "cost; README 'Segmentation under DP')")
    p.add_argument("--width", type=_int_at_least("--width", 1), default=4, help="U-Net channels at full resolution")
    p.add_argument("--depth", type=_int_at_least("--depth", 1), default=3, help="U-Net downsamplings")
    p.add_argument("--selection", choices=["organ", "all"], default="organ",
                   help="axial slices kept: organ (the organ's extent ± --margin) or all")
    p.add_argument("--margin", type=_int_at_least("--margin", 0), default=2, help="slices beyond the organ's extent")
    p.add_argument("--foreground-prior", type=_unit_interval("--foreground-prior"), default=0.05,
                   help="the untrained net predicts organ with this probability (output-bias prior; a public constant, "
                        "not counted from the labels); keeps rare-organ runs from collapsing to Dice 0")
    p.add_argument("--pretrain-steps", type=_int_at_least("--pretrain-steps", 0), default=0,
                   help="start from a U-Net pretrained for this many steps on PUBLIC synthetic shape scenes (not CT, "
                        "no patient data; both arms start there; cached in $DPFUNC_CACHE_DIR); 0 = random init")
    p.add_argument("--coord-channels", action="store_true", help="row/column position channels into the U-Net (CoordConv)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant", help="Adam step size over the steps")
    p.add_argument("--largest-component", action="store_true",
                   help="evaluate the largest 3-D connected component of each predicted volume (post-processing, no privacy cost)")
    p.add_argument("--ema-decay", type=_ema_decay, default=0.9,
                   help="evaluate an exponential moving average of the iterates (post-processing, no privacy cost); "
                        "0 = the last iterate; in [0, 1)")
    p.add_argument("--ema-warmup", type=_ema_warmup, default=10.0,
                   help="the average's decay at step t is min(--ema-decay, (1+t)/(W+t)): W = 10 averages about the last "
                        "steps/9 steps, 3 the whole run with linearly growing weights, 2 uniformly; > 1")
    p.add_argument("--window", type=float, nargs=2, default=(-160.0, 240.0), metavar=("LOW", "HIGH"), help="HU window")
    p.add_argument("--seed", type=int, default=0, help="root of all keys (split, init, sampling, noise)")
    p.add_argument("--run-dir", default=None, help="run folder (default: runs/<task>-<unit>-eps<ε>-seed<seed> or "
                                                   "runs/<task>-nodp-seed<seed>)")
    p.add_argument("--resume", action="store_true", help="continue the run in the run folder from its checkpoint")
    p.add_argument("--bootstrap", type=_int_at_least("--bootstrap", 1), default=1000, help="bootstrap resamples")
    from dpfunc.cli import add_compute_arguments

    add_compute_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _config(args: argparse.Namespace):
    from dpfunc.segmentation._train import SegmentationConfig

    private = not args.no_dp
    return SegmentationConfig(
        task=args.task, image_size=args.image_size, epsilon=args.epsilon if args.noise_multiplier is None else None,
        delta=args.delta, noise_multiplier=args.noise_multiplier, epochs=args.epochs, batch_size=args.batch_size,
        slices_per_patient=args.slices_per_patient, learning_rate=args.lr, max_grad_norm=args.max_grad_norm,
        unit=args.unit, engine=args.engine, private=private, seed=args.seed, width=args.width, depth=args.depth,
        window_low=args.window[0], window_high=args.window[1], selection=args.selection, margin=args.margin,
        accountant=args.accountant, foreground_prior=args.foreground_prior, ema_decay=args.ema_decay, ema_warmup=args.ema_warmup,
        pretrain_steps=args.pretrain_steps, coord_channels=args.coord_channels, lr_schedule=args.lr_schedule,
        largest_component=args.largest_component, model=args.model, head_hidden=args.head_hidden,
        head_smooth=args.head_smooth, position_products=args.position_products, local_histograms=args.local_histograms,
        volume_norm=args.volume_norm)


def _print(result) -> None:
    ci = result.test_ci
    print(f"test Dice (mean over {result.test['num_patients']} patients, 95% bootstrap CI over patients): "
          f"{result.test['dice']:.4f} [{ci['dice']['lower']:.4f}, {ci['dice']['upper']:.4f}]; IoU {result.test['iou']:.4f}")
    missed = result.test["hd95_empty_mismatch"]
    print(f"test HD95 ({'mm' if result.test.get('hd95_unit') == 'mm' else 'voxels'}, mean over patients): {result.test['hd95']:.2f} [{ci['hd95']['lower']:.2f}, {ci['hd95']['upper']:.2f}]"
          + (f"; {missed} patient(s) with exactly one empty mask counted as the grid diagonal" if missed else ""))
    eps = "∞ (non-private)" if result.epsilon is None else f"{result.epsilon:.3f}"
    unit = result.config["unit"]
    print(f"privacy: ε = {eps} at δ = {result.delta:g} per {unit}; training time {result.train_seconds:.0f}s")


def run(args: argparse.Namespace) -> int:
    from dpfunc.cli import compute_device
    from dpfunc.segmentation._train import train_segmentation

    device = compute_device(args)  # --threads; refuse a device this machine lacks, before anything is read
    cfg = _config(args)
    if args.run_dir is None:
        tag = ("features-" if args.model == "features" else "") + ("nodp" if not cfg.private else (f"{cfg.unit.value}-eps{cfg.epsilon}" if cfg.epsilon is not None
                                              else f"{cfg.unit.value}-sigma{cfg.noise_multiplier}"))
        run_dir = Path("runs") / f"{cfg.task}-{tag}-seed{cfg.seed}"
    else:
        run_dir = Path(args.run_dir)
    print(f"run folder: {run_dir}   data: {args.data_dir}")
    result = train_segmentation(cfg, data_dir=args.data_dir, run_dir=run_dir, resume=args.resume,
                                bootstrap_resamples=args.bootstrap, device=device)
    _print(result)
    print(f"run folder: {run_dir}  (metrics.json, checkpoint.pt, overlays.png, training.png)")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """``dpfunc evaluate RUN`` on a segmentation run folder (``--data-dir`` overrides the saved one)."""
    from dpfunc.cli import compute_device
    from dpfunc.segmentation._train import evaluate_segmentation_run

    result = evaluate_segmentation_run(args.run_dir, data_dir=args.data_dir, bootstrap_resamples=args.bootstrap,
                                       device=compute_device(args))
    print(f"run {args.run_dir}: task {result.config['task']}, best validation epoch {result.best_epoch}")
    _print(result)
    return 0
