"""``dpfunc attack``: gradient inversion against a run's model in one threat scenario.

    dpfunc attack --run-dir runs/cnn-eps3.0-seed0 --scenario dp --batch-size 1 --images 4 --iterations 400 [--device cuda]

Writes ``RUN/attack-<scenario>.json`` (per-image and mean/median ``psnr``, ``ssim``, ``mse``, the
baselines, ``baseline_psnr``) and ``RUN/attack-<scenario>.png`` (originals over reconstructions, PSNR
under each). With a checkpoint in RUN the model is the run's last iterate (``--weights init`` for its
initialisation) and σ, C, q are the run's; without one, the case study's CNN at initialisation and its
ε = 3 settings.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dpfunc._argtypes import int_at_least as _int_at_least

__all__ = ["add_parser", "run"]


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("attack", help="gradient-inversion attack on what the server sees (writes attack-<scenario>.json/.png)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="a `dpfunc train` run folder (or a new folder: case-study CNN at init)")
    p.add_argument("--scenario", required=True, choices=["nonprivate", "clip", "dp", "secagg"],
                   help="nonprivate: mean gradient; clip: DP-SGD with σ = 0; dp: DP-SGD at the run's σ; "
                        "secagg: the sum of 3 sites' DP-SGD updates")
    p.add_argument("--batch-size", type=_int_at_least("--batch-size", 1), default=1, help="images per site update (B)")
    p.add_argument("--images", type=_int_at_least("--images", 1), default=None, help="images attacked per site (default: B)")
    p.add_argument("--iterations", type=_int_at_least("--iterations", 1), default=400,
                   help="optimiser steps per update (breaching uses 24,000; scale to your CPU)")
    p.add_argument("--attack", choices=["ig", "dlg"], default="ig", help="ig: Inverting Gradients; dlg: DLG (L-BFGS)")
    p.add_argument("--tv-weight", type=float, default=0.2, help="total-variation prior weight (ig)")
    p.add_argument("--restarts", type=_int_at_least("--restarts", 1), default=1, help="random restarts per update")
    p.add_argument("--weights", choices=["last", "init"], default="last",
                   help="attack the run's last iterate or its initialisation (no checkpoint: always init)")
    p.add_argument("--noise-multiplier", type=float, default=None, help="σ of the dp/secagg scenarios (default: the run's)")
    p.add_argument("--data-dir", default=None, help="folder holding pneumoniamnist.npz")
    p.add_argument("--seed", type=int, default=0, help="which images, the noise and the initial guesses")
    from dpfunc.cli import add_compute_arguments

    add_compute_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    import math

    from dpfunc._progress import progress
    from dpfunc.attacks.run import AttackJob, attack_images, case_study_threat, plot_reconstructions, write_json
    from dpfunc.attacks.scenarios import ThreatModel
    from dpfunc.bridge import functionalize
    from dpfunc.data import pneumoniamnist
    from dpfunc.keys import Key
    from dpfunc.models import build_model
    from dpfunc.cli import compute_device
    from dpfunc.train import TrainConfig, load_run

    device = compute_device(args)  # --threads; refuse a device this machine lacks, before anything is read
    run_dir = Path(args.run_dir)
    has_run = (run_dir / "checkpoint.pt").is_file()
    cfg, state = load_run(run_dir) if has_run else (TrainConfig(), None)
    train_set = pneumoniamnist("train", args.data_dir, size=cfg.image_size)
    module = build_model(cfg.model, key=Key(cfg.seed).split(4)[0], **({"input_size": cfg.image_size} if cfg.model == "resnet18" else {}))
    apply_fn, params, buffers = functionalize(module.to(device))
    where = "initialisation"
    if has_run and args.weights == "last":
        params, buffers, where = state["params"], state["buffers"], f"last iterate (epoch {state['epoch']})"
    sigma = args.noise_multiplier
    if sigma is None and args.scenario in ("nonprivate", "clip"):
        sigma = 0.0  # not used by these scenarios: skip the (slow) calibration
    threat = case_study_threat(sigma, num_examples=len(train_set), batch_size=cfg.batch_size,
                               epochs=cfg.epochs, epsilon=cfg.epsilon or 3.0, delta=cfg.delta, max_grad_norm=cfg.max_grad_norm)
    if has_run and cfg.private and args.noise_multiplier is None and state.get("noise_multiplier"):
        threat = ThreatModel(float(state["noise_multiplier"]), cfg.max_grad_norm, float(state["sampling_rate"]), len(train_set))
    images = args.images or args.batch_size
    job = AttackJob(args.scenario, batch_size=args.batch_size, images=images, iterations=args.iterations,
                    attack=args.attack, tv_weight=args.tv_weight, restarts=args.restarts, seed=args.seed)
    sites = threat.sites if args.scenario == "secagg" else 1
    total = math.ceil(images / args.batch_size) * args.iterations * args.restarts
    bar = progress(total=total, desc=f"attack {args.scenario}", unit="it")
    try:
        out = attack_images(apply_fn, params, buffers, train_set.images, train_set.labels, job, threat, on_step=bar.update,
                            device=device)
    finally:
        bar.close()
    out["model"] = {"name": cfg.model, "weights": where, "run_dir": str(run_dir)}
    from dpfunc.devices import describe_device

    out["device"] = describe_device(device)
    run_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = run_dir / f"attack-{args.scenario}.json", run_dir / f"attack-{args.scenario}.png"
    originals, recs = out.pop("_originals"), out.pop("_reconstructions")
    write_json(json_path, out)
    sigma = f", σ = {threat.noise_multiplier:.2f}" if args.scenario in ("dp", "secagg") else ""
    plot_reconstructions([("original", originals, None), ("reconstruction", recs, out["psnr"])], png_path,
                         title=f"{args.attack} on {args.scenario}{sigma}, B = {args.batch_size}"
                               f"{f' × {sites} sites' if sites > 1 else ''}, {where}")
    print(f"{args.scenario}: PSNR median {out['psnr_median']:.2f} dB (mean-image baseline {out['baseline_psnr']:.2f} dB), "
          f"SSIM median {out['ssim_median']:.3f} over {out['images_attacked']} images")
    print(f"wrote {json_path} and {png_path}")
    return 0
