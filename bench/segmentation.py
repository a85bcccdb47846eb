"""Segmentation under DP on CT phantoms: Dice non-private vs patient-level DP, and the cost of a step.

    python bench/segmentation.py                       # both parts: bench/results/segmentation.{json,md}
    python bench/segmentation.py --part dice --seeds 0 1 2
    python bench/segmentation.py --part dice --seeds 1 --results /tmp/seed1.json   # one seed per process …
    python bench/segmentation.py --part report --merge /tmp/seed0.json /tmp/seed1.json  # … then their rows merged
    python bench/segmentation.py --part speed --repeats 5

Dice part: ``dpfunc make-phantoms`` data (40 patients, 128×128×24, phantom seed 0) read at 64×64 with
organ-range slice selection; for each run seed (which also draws the patient split 24/8/8, the
initial weights, the batches and the noise) a non-private Adam run and patient-level DP-Adam runs
at ε = 8 and ε = 3 (δ = 1e-5, PLD), the same U-Net (``--width``, depth 3, output bias at the
``--foreground-prior``), batches (``--batch-size`` expected patients, 4 slices each), epochs and
learning rate. Reported: mean test Dice over the 8 test patients (3-D per patient), its
patient-bootstrap 95% CI, HD95 (voxels, mean over the test patients), and the mean ± sd over seeds.
``--settings "features, non-private" "features, DP ε=8" "features, DP ε=3"`` runs the fixed-feature model
(:data:`FEATURE_RECIPE`: fixed filter bank + small head, Tramèr & Boneh 2021) on the same data and splits.

Speed part: one full training step (gradients, clipping, noise, Adam update) of the same U-Net at
64×64 for B = 16 and 64 rows (slices), non-private vs ``vmap_engine`` vs ``fast_engine``, for the
slice unit (B examples) and the patient unit (B/4 patients × 4 slices); methods alternate within
each round, median over rounds after a warm-up, reported as a ratio to the non-private step.

Figures, not tests. Phantom results demonstrate the pipeline, not clinical accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.func import grad_and_value

from dpfunc import FlatClipping, Key, make_step
from dpfunc.bridge import functionalize
from dpfunc.models import unet_gn
from dpfunc.private import dpadam
from dpfunc.segmentation import (PackedSegmenter, SegmentationConfig, make_phantoms, packed_losses, patient_batch,
                                 segmentation_engine, train_segmentation)
from dpfunc.segmentation._msd import PatientVolume
from dpfunc.transforms import adam, apply_updates
from _machine import cpu_model  # noqa: E402  (bench/ is on sys.path when a bench runs)

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = cpu_model()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average": os.getloadavg()[0], "python": platform.python_version()}


def _save(payload: dict, path: Path = RESULTS / "segmentation.json") -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


# ------------------------------------------------------------------------------------------ Dice


FEATURE_RECIPE = dict(model="features", head_hidden=0, head_smooth=3, position_products=False, batch_size=24, epochs=60,
                      learning_rate=0.02, slices_per_patient=4)
FEATURE_POS_RECIPE = {**FEATURE_RECIPE, "position_products": True}  # SegmentationConfig(model="features")'s own default
"""The fixed-feature model's recipe (tuned on seed 0's VALIDATION patients only, README 'Segmentation under DP'):
a linear head on the fixed filter bank and a 3×3 convolution of its logits (94 + 38 = 132 trained parameters), 24 expected patients per step (all 24 training
patients: q = 1, i.e. DP full-batch gradient descent), 60 steps, Adam lr 0.02. Overrides the U-Net flags.
'features+pos' settings add the bin × position products (114 features, 2·114 + 2 + 38 = 268 trained parameters)."""

FEATURE_LH_RECIPE = {**FEATURE_POS_RECIPE, "local_histograms": True}
"""'features+lh' settings: 'features+pos' + local soft histograms (the σ = 1 bins blurred at σ 3 and 6 px: 148 features,
2·148 + 2 + 38 = 336 trained parameters); the bank chosen on the validation patients of seeds 0–2 (README)."""

FEATURE_RANK_RECIPE = {**FEATURE_LH_RECIPE, "volume_norm": "rank", "learning_rate": 0.04}
"""'features+rank' settings: 'features+lh' on per-patient rank-normalised volumes (``VolumeNorm.RANK``: each in-window
pixel's rank in the patient's own volume; the soft bins at ``RANK_BIN_CENTRES``), Adam lr 0.04: the same 148 features and
336 trained parameters; the normalisation is a function of each patient alone (no privacy cost). Chosen on validation
patients and on 40 extra phantoms of another phantom seed (never the test patients; README)."""

FEATURE_RANK_C_RECIPE = {**FEATURE_LH_RECIPE, "volume_norm": "rank", "learning_rate": 0.02, "max_grad_norm": 0.3}
"""'features+rank+C0.3' settings: 'features+lh' on rank-normalised volumes with Adam lr 0.02 and the clipping bound C = 0.3
(the DP arms; the non-private arm does not clip): the fifth round's recipe (the README's until the sixth round), chosen on validation patients and the extra phantoms."""

FEATURE_RANK_C015_RECIPE = {**FEATURE_LH_RECIPE, "volume_norm": "rank", "learning_rate": 0.04, "max_grad_norm": 0.15}
"""'features+rank+C0.15+lr0.04' settings (issue 17, sixth round): 'features+rank+C0.3' with the clipping bound C = 0.15 and Adam lr
0.04 — chosen on the validation patients of run seeds 0–2 and the 40 extra phantoms (phantom seed 1), never test patients
(bench/results/segmentation_history.md). The non-private arm does not clip: it is 'features+rank''s non-private arm."""

SETTINGS = {"non-private": dict(private=False), "DP ε=8": dict(private=True, epsilon=8.0), "DP ε=3": dict(private=True, epsilon=3.0),
            "slice-level DP ε=8": dict(private=True, epsilon=8.0, unit="slice"),
            "non-private, slice batches": dict(private=False, unit="slice"),
            "features, non-private": dict(private=False, **FEATURE_RECIPE),
            "features, DP ε=8": dict(private=True, epsilon=8.0, **FEATURE_RECIPE),
            "features, DP ε=3": dict(private=True, epsilon=3.0, **FEATURE_RECIPE),
            "features+pos, non-private": dict(private=False, **FEATURE_POS_RECIPE),
            "features+pos, DP ε=8": dict(private=True, epsilon=8.0, **FEATURE_POS_RECIPE),
            "features+pos, DP ε=3": dict(private=True, epsilon=3.0, **FEATURE_POS_RECIPE),
            "features+lh, non-private": dict(private=False, **FEATURE_LH_RECIPE),
            "features+lh, DP ε=8": dict(private=True, epsilon=8.0, **FEATURE_LH_RECIPE),
            "features+lh, DP ε=3": dict(private=True, epsilon=3.0, **FEATURE_LH_RECIPE),
            "features+rank, non-private": dict(private=False, **FEATURE_RANK_RECIPE),
            "features+rank, DP ε=8": dict(private=True, epsilon=8.0, **FEATURE_RANK_RECIPE),
            "features+rank, DP ε=3": dict(private=True, epsilon=3.0, **FEATURE_RANK_RECIPE),
            "features+rank+C0.3, non-private": dict(private=False, **FEATURE_RANK_C_RECIPE),
            "features+rank+C0.3, DP ε=8": dict(private=True, epsilon=8.0, **FEATURE_RANK_C_RECIPE),
            "features+rank+C0.3, DP ε=3": dict(private=True, epsilon=3.0, **FEATURE_RANK_C_RECIPE),
            "features+rank+C0.15+lr0.04, non-private": dict(private=False, **FEATURE_RANK_C015_RECIPE),
            "features+rank+C0.15+lr0.04, DP ε=8": dict(private=True, epsilon=8.0, **FEATURE_RANK_C015_RECIPE),
            "features+rank+C0.15+lr0.04, DP ε=3": dict(private=True, epsilon=3.0, **FEATURE_RANK_C015_RECIPE)}
DEFAULT_SETTINGS = ["non-private", "DP ε=8", "DP ε=3"]


def dice_part(args, payload: dict) -> None:
    data = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="dpfunc-phantoms-")) / "liver"
    if not (data / "dataset.json").exists():
        make_phantoms(data, patients=args.patients, seed=0, size=128, slices=24, progress=False)
    rows = payload.setdefault("dice", [])
    done = {(r["setting"], r["seed"]) for r in rows}
    for seed in args.seeds:
        for name in args.settings:
            extra = dict(SETTINGS[name])
            if (name, seed) in done:
                continue
            batch = args.batch_size
            if extra.get("unit") == "slice":  # the same expected slices per step as the patient unit
                batch = args.batch_size * args.slices_per_patient
            base = dict(seed=seed, epochs=args.epochs, batch_size=batch, slices_per_patient=args.slices_per_patient,
                        learning_rate=args.lr, width=args.width, depth=3, groups=4 if args.width % 4 == 0 else 2,
                        foreground_prior=args.foreground_prior, ema_decay=args.ema_decay, ema_warmup=args.ema_warmup,
                        pretrain_steps=args.pretrain_steps, coord_channels=args.coord_channels)
            cfg = SegmentationConfig(**{**base, **extra})  # a setting's own recipe (the feature model's) wins
            t0 = time.perf_counter()
            run_dir = Path(tempfile.mkdtemp(prefix="dpfunc-seg-run-"))
            r = train_segmentation(cfg, data_dir=data, run_dir=run_dir / "run", progress=False, log=lambda s: None,
                                   bootstrap_resamples=1000)
            post = largest_component_scores(run_dir / "run", data)
            row = {"setting": name, "seed": seed, "test_dice": r.test["dice"], "ci_lower": r.test_ci["dice"]["lower"],
                   "ci_upper": r.test_ci["dice"]["upper"], "test_iou": r.test["iou"], "test_hd95": r.test["hd95"],
                   "hd95_ci_lower": r.test_ci["hd95"]["lower"], "hd95_ci_upper": r.test_ci["hd95"]["upper"],
                   "hd95_empty_mismatch": r.test["hd95_empty_mismatch"], "hd95_unit": r.test["hd95_unit"],
                   "val_dice": r.val["dice"], "epsilon": r.epsilon, "ema_decay": cfg.ema_decay, "ema_warmup": cfg.ema_warmup,
                   "max_grad_norm": cfg.max_grad_norm, "learning_rate": cfg.learning_rate,
                   "noise_multiplier": r.noise_multiplier, "steps": r.steps, "best_epoch": r.best_epoch,
                   "train_seconds": r.train_seconds, "seconds_per_epoch": r.train_seconds / cfg.epochs,
                   "wall_seconds": time.perf_counter() - t0, "load_average": os.getloadavg()[0], **post}
            rows.append(row)
            print(f"{name:<12} seed {seed}: Dice {row['test_dice']:.4f} [{row['ci_lower']:.4f}, {row['ci_upper']:.4f}] "
                  f"HD95 {row['test_hd95']:.2f} "
                  f"ε {row['epsilon']} σ {row['noise_multiplier']} {row['seconds_per_epoch']:.1f}s/epoch", flush=True)
            payload["dice_setup"] = {"patients": args.patients, "epochs": args.epochs, "image_size": 64, "width": args.width,
                                     "depth": 3, "batch_patients": args.batch_size, "slices_per_patient": args.slices_per_patient,
                                     "learning_rate": args.lr, "delta": 1e-5, "foreground_prior": args.foreground_prior,
                                     "ema_decay": args.ema_decay, "pretrain_steps": args.pretrain_steps,
                                     "coord_channels": args.coord_channels}
            _save(payload, args.results)


def largest_component_scores(run_dir: Path, data: Path) -> dict:
    """Test Dice / HD95 of the SAME selected model (the run's checkpoint) after keeping the largest 3-D connected
    component of each predicted volume (post-processing on the test patient's own prediction; no privacy cost)."""
    from dpfunc.bridge.checkpoint import load_checkpoint
    from dpfunc.segmentation._train import _build, _load, evaluate_patients, summarize_hd95

    state = load_checkpoint(run_dir / "checkpoint.pt")
    cfg = state["config"]
    _, _, test_set = _load(cfg, data)
    _, apply_fn, _, _ = _build(cfg)
    dice, _, hd_raw = evaluate_patients(apply_fn, state["best_params"], state["buffers"], test_set, largest_only=True)
    hd, _ = summarize_hd95(hd_raw, [tuple(p.labels.shape) for p in test_set], [p.spacing for p in test_set])
    return {"test_dice_lcc": statistics.mean(dice), "test_hd95_lcc": statistics.mean(hd)}


# ----------------------------------------------------------------------------------------- speed


def speed_part(args, payload: dict, path: Path) -> None:
    torch.set_num_threads(args.threads)
    net = unet_gn(key=Key(0), width=args.width, depth=3, groups=4 if args.width % 4 == 0 else 2)
    model = PackedSegmenter(net)
    apply_fn, params, buffers = functionalize(model)
    g = torch.Generator().manual_seed(0)
    patients = [PatientVolume(f"p{i}", torch.rand(8, 1, 64, 64, generator=g), (torch.rand(8, 64, 64, generator=g) > 0.7).long())
                for i in range(16)]
    rows = []
    for b in args.batch_sizes:
        for unit in ("slice", "patient"):
            k = 4 if unit == "patient" else None
            n_ex = b // 4 if unit == "patient" else b
            x = patient_batch(patients, list(range(n_ex)), 4, Key(1)) if unit == "patient" else \
                patient_batch(patients, list(range(b // 8)), 8, Key(1)).flatten(0, 1)
            flat = x.flatten(0, 1) if unit == "patient" else x

            np_tx = adam(1e-3)
            np_state = np_tx.init(params)
            grad_fn = grad_and_value(lambda p, bu, xx: packed_losses(apply_fn(p, bu, xx)).mean())

            def nonprivate():
                grads, _ = grad_fn(params, buffers, flat)
                updates, _ = np_tx.update(grads, np_state, params)
                return apply_updates(params, updates)

            steps = {"non-private": nonprivate}
            for engine in ("vmap", "fast"):
                tx = dpadam(1e-3, noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=0.1, num_examples=1000, key=Key(2))
                state = tx.init(params)
                step = make_step(None, tx, engine=segmentation_engine(model, FlatClipping(1.0), unit=unit, slices_per_patient=k,
                                                                       engine=engine))
                steps[f"dpfunc {engine}"] = (lambda step=step, state=state: step(params, state, (x,), buffers=buffers))
            times = {m: [] for m in steps}
            for rnd in range(args.repeats + 1):
                for m, fn in steps.items():
                    t0 = time.perf_counter()
                    fn()
                    if rnd:  # round 0 is the warm-up
                        times[m].append(time.perf_counter() - t0)
            base = statistics.median(times["non-private"])
            for m, ts in times.items():
                med = statistics.median(ts)
                rows.append({"rows": b, "unit": unit, "examples": n_ex, "method": m, "median_seconds": med, "ratio": med / base,
                             "repeats": len(ts)})
                print(f"B={b:<3} unit={unit:<7} ({n_ex:>2} examples) {m:<12} {med * 1000:8.1f} ms  {med / base:5.2f}×", flush=True)
    payload["speed"] = rows
    payload["speed_machine"] = machine()
    _save(payload, path)


# ---------------------------------------------------------------------------------------- report


def report(payload: dict) -> str:
    lines = ["# Segmentation under DP (phantoms)", "",
             "Phantom results demonstrate the pipeline, NOT clinical accuracy.", ""]
    m = payload.get("machine", {})
    lines.append(f"Machine: {m.get('cpu')} ({m.get('cores')} cores, shared and loaded: load average "
                 f"{m.get('load_average', float('nan')):.1f} at start), torch {m.get('torch')}, {m.get('threads')} threads.")
    lines.append("")
    if payload.get("dice"):
        s = payload.get("dice_setup", {})
        dm = payload.get("dice_machine")
        if dm:
            lines += [f"Dice runs: {dm.get('cpu')}, torch {dm.get('torch')}, {dm.get('threads')} thread per run, one process per "
                      f"run (seed × setting) in parallel (load average {dm.get('load_average', float('nan')):.1f} at the start; per-row load below).", ""]
        lines += [f"Dice: {s.get('patients')} phantom patients (split 60/20/20 % by patient per seed: 24/8/8 at 40), 64×64, U-Net width "
                  f"{s.get('width')} depth {s.get('depth')}, {s.get('epochs')} epochs, {s.get('batch_patients')} expected "
                  f"patients × {s.get('slices_per_patient')} slices per step, Adam lr {s.get('learning_rate')}, output-bias "
                  f"prior {s.get('foreground_prior')}, EMA {s.get('ema_decay')}, public pretraining steps {s.get('pretrain_steps', 0)}, "
                  f"position channels {s.get('coord_channels', False)}, δ = 1e-5. HD95 in "
                  f"{'mm (NIfTI spacing of the resized grid)' if all(r.get('hd95_unit') == 'mm' for r in payload['dice']) else 'voxels of the 64² grid'} "
                  f"(a patient whose prediction is empty counts as the grid diagonal). The slice-level row (if any) is "
                  f"deepee's weaker unit — ε per SLICE, batch = patients × slices per step expected slices — not the target.", "",
                  "| setting | seed | test Dice (95% CI over patients) | HD95 (95% CI) | Dice / HD95, largest component | val Dice | ε | σ | s/epoch | load |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(payload["dice"], key=lambda r: (r["seed"], list(SETTINGS).index(r["setting"]))):
            eps = "∞" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
            sig = "–" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3f}"
            hd = (f"{r['test_hd95']:.2f} [{r['hd95_ci_lower']:.2f}, {r['hd95_ci_upper']:.2f}]"
                  + (f" ({r['hd95_empty_mismatch']} empty)" if r.get("hd95_empty_mismatch") else "")) if "test_hd95" in r else "–"
            lcc = f"{r['test_dice_lcc']:.3f} / {r['test_hd95_lcc']:.2f}" if "test_dice_lcc" in r else "–"
            lines.append(f"| {r['setting']} | {r['seed']} | {r['test_dice']:.3f} [{r['ci_lower']:.3f}, {r['ci_upper']:.3f}] | {hd} | {lcc} | "
                         f"{r.get('val_dice', float('nan')):.3f} | {eps} | {sig} | {r['seconds_per_epoch']:.1f} | "
                         f"{r.get('load_average', float('nan')):.1f} |")
        if any(r["setting"].startswith("features") for r in payload["dice"]):
            f = FEATURE_RECIPE
            lines += ["", f"'features' rows: the fixed filter bank (46 channels) + a linear head + a 3×3 convolution of the logits "
                      f"(132 trained parameters; Tramèr & Boneh 2021); 'features+pos' adds the bin × position products (114 "
                      f"channels, 268 parameters); 'features+lh' adds local soft histograms to 'features+pos' (148 channels, 336 "
                      f"parameters); 'features+rank' is 'features+lh' on per-patient rank-normalised volumes (the same 148 channels, "
                      f"336 parameters, the bins in rank units, Adam lr 0.04); 'features+rank+C0.3' is the same with Adam lr 0.02 and the "
                      f"clipping bound C = 0.3 (the fifth round's recipe); 'features+rank+C0.15+lr0.04' the same with C = 0.15 and Adam lr 0.04 (the "
                      f"sixth round's). {f['batch_size']} expected patients per step (q = 1 at 24 training patients), "
                      f"{f['slices_per_patient']} slices each, {f['epochs']} epochs, Adam lr {f['learning_rate']}; the rest as above."]
        low = [r for r in payload["dice"] if r["test_dice"] < 0.3]
        if low:
            lines += ["", "Rows with Dice < 0.3 (" + ", ".join(f"{r['setting']} seed {r['seed']}" for r in low) + "): the model "
                      "predicts (almost) no organ; kept in the means."]
        lines += ["", "| setting | seeds | mean test Dice ± sd over seeds | mean HD95 | largest component: Dice ± sd / HD95 |",
                  "|---|---|---|---|---|"]
        for name in SETTINGS:
            rows = [r for r in payload["dice"] if r["setting"] == name]
            if rows:
                vals = [r["test_dice"] for r in rows]
                sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
                hds = [r["test_hd95"] for r in rows if "test_hd95" in r]
                hd = f"{statistics.mean(hds):.2f}" if hds else "–"
                lv = [r["test_dice_lcc"] for r in rows if "test_dice_lcc" in r]
                lh = [r["test_hd95_lcc"] for r in rows if "test_hd95_lcc" in r]
                lcc = (f"{statistics.mean(lv):.3f} ± {statistics.stdev(lv) if len(lv) > 1 else float('nan'):.3f} / "
                       f"{statistics.mean(lh):.2f}") if lv else "–"
                lines.append(f"| {name} | {len(vals)} | {statistics.mean(vals):.3f} ± {sd:.3f} | {hd} | {lcc} |")
        lines.append("")
    if payload.get("dice_previous"):
        prev = payload.get("dice_setup_previous", {})
        lines += [f"Previous recipe (width {prev.get('width')}, default output bias, otherwise the same; one seed after another "
                  f"at load ≈ 14–19; kept for comparison):", "",
                  "| setting | seed | test Dice (95% CI) |", "|---|---|---|"]
        for r in payload["dice_previous"]:
            lines.append(f"| {r['setting']} | {r['seed']} | {r['test_dice']:.3f} [{r['ci_lower']:.3f}, {r['ci_upper']:.3f}] |")
        lines.append("")
    if payload.get("speed"):
        sm = payload.get("speed_machine", {})
        lines += [f"Step time (median; load average {sm.get('load_average', float('nan')):.1f}, {sm.get('threads')} threads):", "",
                  "| rows B | unit | examples | method | ms/step | × non-private |", "|---|---|---|---|---|---|"]
        for r in payload["speed"]:
            lines.append(f"| {r['rows']} | {r['unit']} | {r['examples']} | {r['method']} | {r['median_seconds'] * 1000:.0f} | {r['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["dice", "speed", "all", "report"], default="all")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--patients", type=int, default=40)
    p.add_argument("--data-dir", default=None, help="reuse a phantom folder (default: a fresh temporary one)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fresh", action="store_true", help="start a new JSON instead of adding to the last one")
    p.add_argument("--width", type=int, default=4, help="U-Net width")
    p.add_argument("--slices-per-patient", type=int, default=4, help="K, slices of a sampled patient per step")
    p.add_argument("--coord-channels", action="store_true", help="row/column position channels into the U-Net")
    p.add_argument("--pretrain-steps", type=int, default=0, help="public shape-scene pretraining steps (0 = none)")
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=DEFAULT_SETTINGS,
                   help="which rows to run (the slice-level row uses batch-size × slices-per-patient expected slices)")
    p.add_argument("--batch-size", type=int, default=8, help="expected patients per step")
    p.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate")
    p.add_argument("--foreground-prior", type=float, default=0.05, help="output-bias prior (see SegmentationConfig)")
    p.add_argument("--ema-decay", type=float, default=0.9, help="EMA of the iterates that is evaluated")
    p.add_argument("--ema-warmup", type=float, default=10.0, help="the EMA's warm-up (SegmentationConfig.ema_warmup)")
    p.add_argument("--results", type=Path, default=RESULTS / "segmentation.json", help="the JSON to add rows to")
    p.add_argument("--merge", type=Path, nargs="+", default=[],
                   help="JSONs (of --results runs) whose Dice rows and setup are merged into --results")
    args = p.parse_args(argv)
    path = args.results
    payload = json.loads(path.read_text()) if path.exists() and not args.fresh else {}
    for other in args.merge:
        extra = json.loads(other.read_text())
        have = {(r["setting"], r["seed"]) for r in payload.get("dice", [])}
        payload.setdefault("dice", []).extend(r for r in extra.get("dice", []) if (r["setting"], r["seed"]) not in have)
        payload["dice_setup"] = extra.get("dice_setup", payload.get("dice_setup"))
        payload.setdefault("dice_machine", extra.get("machine"))
    torch.set_num_threads(args.threads)
    payload.setdefault("machine", machine())
    if args.part in ("dice", "all"):
        dice_part(args, payload)
    if args.part in ("speed", "all"):
        speed_part(args, payload, path)
    if args.merge:
        _save(payload, path)
    path.with_suffix(".md").write_text(report(payload))
    print(report(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
