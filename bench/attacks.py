"""Gradient inversion against the case study: what each protection stops.

Inverting Gradients (Geiping et al. 2020, breaching's ``invertinggradients`` recipe: cosine matching,
TV 0.2, signed Adam 0.1 with step decay, boxed pixels) attacks what the server sees in each scenario:

  nonprivate  one site's mean gradient;   clip  DP-SGD with σ = 0;   dp  DP-SGD at the case study's σ
  secagg      the sum of 3 sites' DP-SGD updates (the server's view under secure aggregation)

Two parts (``--parts``), each with its own outputs so that they can run as separate processes:

  b1     B = 1, every scenario, at initialisation and after --train-epochs DP epochs at the case study's σ
         (--images-b1 single-image updates per cell, --iterations-b1 iterations), plus DLG (L-BFGS) on the
         non-private B = 1 update at initialisation.
         -> bench/results/attacks.json, attacks.md, attacks.png (originals over reconstructions per scenario)
  batch  B ∈ --batch-sizes (> 1) at initialisation, --batch-scenarios (default non-private, DP, secure
         aggregation), one update per cell (B images, 3B under secure aggregation), --iterations iterations.
         -> bench/results/attacks-batch.json, attacks-batch.md, attacks-batch.png

Scaled to a shared 2-core CPU: breaching runs 24,000 iterations per reconstruction, one restart here.
Every output is rewritten after each cell, so a run cut short keeps the cells that finished; each cell
records the load average before and after it. The header printed first names the CPU, torch, threads
and load.

    python bench/attacks.py --data-dir ../shared/data --parts b1
    python bench/attacks.py --data-dir ../shared/data --parts batch --batch-sizes 4 8 --iterations 1000
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _machine import cpu_model  # noqa: E402

from dpfunc.attacks.run import AttackJob, attack_images, case_study_threat, plot_reconstructions, write_json  # noqa: E402
from dpfunc.bridge import functionalize  # noqa: E402
from dpfunc.data import pneumoniamnist  # noqa: E402
from dpfunc.keys import Key  # noqa: E402
from dpfunc.models import build_model  # noqa: E402

RESULTS = ROOT / "bench" / "results"
NAMES = {"nonprivate": "non-private", "clip": "clip only (σ = 0)", "dp": "DP-SGD (σ = {s:.2f})", "secagg": "secure agg. of 3 sites",
         "dlg": "non-private, DLG"}
SCENARIOS = ("nonprivate", "clip", "dp", "secagg")


def trained_params(data_dir: str, sigma: float, epochs: int, seed: int):
    """The last iterate of a short DP-SGD run at the case study's σ (what the server holds mid-training)."""
    from dpfunc.train import TrainConfig, load_run, train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(epsilon=None, noise_multiplier=sigma, epochs=epochs, seed=seed)
        res = train(cfg, data_dir=data_dir, run_dir=Path(tmp) / "run", progress=False, log=lambda s: None, bootstrap_resamples=10)
        _, state = load_run(Path(tmp) / "run")
        return state["params"], res.test["roc_auc"]


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def table(cells: list[dict], sigma: float) -> str:
    lines = ["| weights | B | scenario | attack | iterations | images | PSNR median (dB) | SSIM median | "
             "mean-image baseline PSNR / SSIM | random-image PSNR | labels | attack s (load) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        j = c["job"]
        sc = j["scenario"] if j["attack"] == "ig" else "dlg"
        lab = "known" if c["label_accuracy"] is None else f"iDLG {c['label_accuracy'] * 100:.0f}% right"
        lines.append(f"| {c['weights']} | {j['batch_size']} | {NAMES[sc].format(s=sigma)} | {j['attack']} | {j['iterations']} | "
                     f"{c['images_attacked']} | {c['psnr_median']:.1f} | {c['ssim_median']:.2f} | "
                     f"{c['baseline_mean_psnr_median']:.1f} / {c['baseline_mean_ssim_median']:.2f} | "
                     f"{c['baseline_random_psnr_median']:.1f} | {lab} | {c['attack_seconds']:.0f} ({c['load_after'][0]:.1f}) |")
    return "\n".join(lines) + "\n"


def figure_b1(pictures: dict, sigma: float, path: Path, columns: int) -> None:
    """Originals over reconstructions, the same private images in every row: one row per scenario, the
    first ``columns`` images attacked at initialisation, then the same images after DP training."""
    weights = list(dict.fromkeys(w for w, _, _ in pictures))
    rows = []
    for sc in (*SCENARIOS, "dlg"):
        recs, values = [], []
        for w in weights:
            if (w, 1, sc) in pictures:
                orig, rec, ps = pictures[(w, 1, sc)]
                if not rows:
                    rows.append(("original", torch.cat([orig[:columns]] * len(weights)), None))
                recs.append(rec[:columns])
                values += ps[:columns]
        if recs:
            rows.append((NAMES[sc].format(s=sigma).replace(" (", "\n(").replace(", ", "\n"), torch.cat(recs), values))
    if rows:
        what = " | ".join(f"{columns} at {w}" for w in weights)
        plot_reconstructions(rows, path, max_columns=columns * len(weights),
                             title=f"Inverting Gradients / DLG, case-study CNN, B = 1\ncolumns: {what}")


def figure_batch(pictures: dict, sigma: float, path: Path) -> None:
    """Per batch size: the originals of the non-private cell, then each scenario's reconstructions of ITS
    originals (secure aggregation: the first 8 of the 3B images, with their own originals row)."""
    rows = []
    for (wname, b, sc), (orig, rec, ps) in pictures.items():
        if sc == "secagg" or not any(r[0] == f"original\nB = {b}" for r in rows):
            rows.append((f"original\nB = {b}" + (", 3 sites" if sc == "secagg" else ""), orig[:8], None))
        rows.append((NAMES[sc].format(s=sigma).replace(" (", "\n(") + f"\nB = {b}", rec[:8], ps[:8]))
    if rows:
        plot_reconstructions(rows, path, max_columns=8, title="Inverting Gradients on the case-study CNN at initialisation, B > 1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("DPFUNC_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--parts", nargs="+", choices=["b1", "batch"], default=["b1", "batch"])
    ap.add_argument("--iterations-b1", type=int, default=300)
    ap.add_argument("--images-b1", type=int, default=3, help="single-image updates attacked per B = 1 cell")
    ap.add_argument("--no-trained", action="store_true", help="b1: skip the trained-weights rows")
    ap.add_argument("--train-epochs", type=int, default=2)
    ap.add_argument("--dlg-iterations", type=int, default=100)
    ap.add_argument("--iterations", type=int, default=1000, help="iterations for B > 1")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--batch-scenarios", nargs="+", choices=SCENARIOS, default=["nonprivate", "dp", "secagg"])
    ap.add_argument("--batch-name", default="attacks-batch", help="batch part's outputs: bench/results/NAME.json, .md, .png")
    ap.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    header = {"cpu": cpu_model(), "machine": platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "load_at_start": load(), "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
              "argv": sys.argv[1:]}
    print(f"machine: {header['cpu']} ({header['cores']} cores), torch {header['torch']}, threads {header['threads']}, "
          f"load {header['load_at_start']}, start {header['started_utc']} UTC, parts {args.parts}", flush=True)
    train_set = pneumoniamnist("train", args.data_dir)
    threat = case_study_threat(num_examples=len(train_set))
    sigma = threat.noise_multiplier
    init_key = Key(args.seed).split(4)[0]  # the key `dpfunc train` initialises with
    apply_fn, params0, buffers = functionalize(build_model("cnn", key=init_key))
    RESULTS.mkdir(parents=True, exist_ok=True)

    def run_cell(params, wname, b, scenario, images, iterations, attack="ig"):
        job = AttackJob(scenario, batch_size=b, images=images, iterations=iterations, attack=attack, seed=args.seed)
        before = load()
        out = attack_images(apply_fn, params, buffers, train_set.images, train_set.labels, job, threat)
        out["weights"], out["load_before"], out["load_after"] = wname, before, load()
        pic = (out.pop("_originals"), out.pop("_reconstructions"), out["psnr"])
        print(f"{wname:<22} B={b} {scenario:<10} {attack:<3} {iterations:5d} it  {out['images_attacked']:2d} images  PSNR median "
              f"{out['psnr_median']:6.2f} (mean-image baseline {out['baseline_psnr']:.2f})  SSIM median {out['ssim_median']:.3f}  "
              f"labels {out['label_accuracy']}  {out['attack_seconds']:.0f}s  load {out['load_after']}", flush=True)
        return out, pic

    def save(name, cells, meta, draw):
        meta = {**header, **meta, "sigma": sigma, "sampling_rate": threat.sampling_rate, "max_grad_norm": threat.max_grad_norm,
                "seconds_so_far": time.perf_counter() - t_start, "load_now": load(),
                "note": "shared, loaded 2-core machine (see load_* per cell); breaching runs 24,000 iterations, one restart here"}
        write_json(RESULTS / f"{name}.json", {"meta": meta, "cells": cells})
        (RESULTS / f"{name}.md").write_text(table(cells, sigma))
        draw()

    if "b1" in args.parts:
        cells, pictures, meta = [], {}, {"partial": True, "iterations_b1": args.iterations_b1, "images_b1": args.images_b1}
        weights = [("init", params0)] + ([] if args.no_trained else [(f"trained ({args.train_epochs} DP epochs)", None)])
        draw = lambda: figure_b1(pictures, sigma, RESULTS / "attacks.png", args.images_b1)  # noqa: E731
        for wname, params in weights:
            if params is None:
                t0 = time.perf_counter()
                params, auc = trained_params(args.data_dir, sigma, args.train_epochs, args.seed)
                meta.update(train_seconds=time.perf_counter() - t0, trained_test_auc=auc, train_epochs=args.train_epochs)
                print(f"trained {args.train_epochs} DP epochs at σ={sigma:.4f}: test AUC {auc:.3f} ({meta['train_seconds']:.0f}s)", flush=True)
            for sc in SCENARIOS:
                out, pic = run_cell(params, wname, 1, sc, args.images_b1, args.iterations_b1)
                cells.append(out)
                pictures[(wname, 1, sc)] = pic
                save("attacks", cells, meta, draw)
            if wname == "init":  # the second attack: DLG (L-BFGS) on the non-private single-image update
                out, pic = run_cell(params0, "init", 1, "nonprivate", args.images_b1, args.dlg_iterations, attack="dlg")
                cells.append(out)
                pictures[("init", 1, "dlg")] = pic
                save("attacks", cells, meta, draw)
        meta["partial"] = False
        save("attacks", cells, meta, draw)
        print(table(cells, sigma), flush=True)

    if "batch" in args.parts:
        cells, pictures, meta = [], {}, {"partial": True, "iterations": args.iterations}
        draw = lambda: figure_batch(pictures, sigma, RESULTS / f"{args.batch_name}.png")  # noqa: E731
        for b in args.batch_sizes:
            for sc in args.batch_scenarios:
                out, pic = run_cell(params0, "init", b, sc, b, args.iterations)
                cells.append(out)
                pictures[("init", b, sc)] = pic
                save(args.batch_name, cells, meta, draw)
        meta["partial"] = False
        save(args.batch_name, cells, meta, draw)
        print(table(cells, sigma), flush=True)

    print(f"total {time.perf_counter() - t_start:.0f}s, load {load()}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
