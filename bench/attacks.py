"""Gradient inversion against the case study: what each protection stops.

For B ∈ {1, 4, 8}, at initialisation and after some DP training, Inverting Gradients (Geiping et al.
2020, breaching's ``invertinggradients`` recipe: cosine matching, TV 0.2, signed Adam 0.1 with step
decay, boxed pixels) attacks what the server sees in each scenario:

  nonprivate  one site's mean gradient;   clip  DP-SGD with σ = 0;   dp  DP-SGD at the case study's σ
  secagg      the sum of 3 sites' DP-SGD updates (the server's view under secure aggregation)

plus DLG (L-BFGS) on the non-private B = 1 update. Scaled to a shared 2-core CPU: breaching runs 24,000
iterations per reconstruction, this runs --iterations (default 300 for B = 1, 150 for B > 1), one restart.

Writes bench/results/attacks.json (every cell), attacks.md (the table) and attacks.png (reconstructions).

    python bench/attacks.py --data-dir ../shared/data
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

from dpfunc.attacks.run import AttackJob, attack_images, case_study_threat, plot_reconstructions, write_json  # noqa: E402
from dpfunc.bridge import functionalize  # noqa: E402
from dpfunc.data import pneumoniamnist  # noqa: E402
from dpfunc.keys import Key  # noqa: E402
from dpfunc.models import build_model  # noqa: E402

RESULTS = ROOT / "bench" / "results"
NAMES = {"nonprivate": "non-private", "clip": "clip only (σ = 0)", "dp": "DP-SGD (σ = {s:.2f})", "secagg": "secure agg. of 3 sites"}


def trained_params(data_dir: str, sigma: float, epochs: int, seed: int):
    """The last iterate of a short DP-SGD run at the case study's σ (what the server holds mid-training)."""
    from dpfunc.train import TrainConfig, load_run, train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(epsilon=None, noise_multiplier=sigma, epochs=epochs, seed=seed)
        res = train(cfg, data_dir=data_dir, run_dir=Path(tmp) / "run", progress=False, log=lambda s: None, bootstrap_resamples=10)
        _, state = load_run(Path(tmp) / "run")
        return state["params"], res.test["roc_auc"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("DPFUNC_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--iterations-b1", type=int, default=300)
    ap.add_argument("--iterations", type=int, default=150, help="iterations for B > 1")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--images-b1", type=int, default=3, help="single-image updates attacked per B = 1 cell")
    ap.add_argument("--train-epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t_start = time.perf_counter()
    train_set = pneumoniamnist("train", args.data_dir)
    threat = case_study_threat(num_examples=len(train_set))
    init_key = Key(args.seed).split(4)[0]  # the key `dpfunc train` initialises with
    apply_fn, params0, buffers = functionalize(build_model("cnn", key=init_key))
    train_s = auc = None
    trained = f"trained ({args.train_epochs} DP epochs)"
    weights = {"init": params0, trained: None}  # trained lazily, when its first cell comes
    # The plan, scaled to a loaded 2-core CPU: every scenario at B = 1 (init and trained); B = 4 and 8
    # non-private and DP at init (clip-only and secagg at B > 1 were left out for time).
    plan = [("init", 1, s) for s in ("nonprivate", "dp", "secagg", "clip")]
    plan += [("init", b, s) for b in args.batch_sizes if b > 1 for s in ("nonprivate", "dp")]
    plan += [(w, 1, s) for w in weights if w != "init" for s in ("nonprivate", "dp", "clip", "secagg")]
    cells, pictures = [], {}
    for wname, b, scenario in plan:
        if weights[wname] is None:
            t0 = time.perf_counter()
            weights[wname], auc = trained_params(args.data_dir, threat.noise_multiplier, args.train_epochs, args.seed)
            train_s = time.perf_counter() - t0
            print(f"trained {args.train_epochs} DP epochs at σ={threat.noise_multiplier:.4f}: test AUC {auc:.3f} ({train_s:.0f}s)", flush=True)
        params = weights[wname]
        iters = args.iterations_b1 if b == 1 else args.iterations
        job = AttackJob(scenario, batch_size=b, images=args.images_b1 if b == 1 else b, iterations=iters, seed=args.seed)
        out = attack_images(apply_fn, params, buffers, train_set.images, train_set.labels, job, threat)
        out["weights"] = wname
        pictures[(wname, b, scenario)] = (out.pop("_originals"), out.pop("_reconstructions"), out["psnr"])
        cells.append(out)
        RESULTS.mkdir(parents=True, exist_ok=True)  # saved as each cell finishes: a cut-short run keeps its rows
        write_json(RESULTS / "attacks.json", {"meta": {"partial": True, "sigma": threat.noise_multiplier,
                                                      "train_seconds": train_s, "trained_test_auc": auc}, "cells": cells})
        print(f"{wname:<24} B={b} {scenario:<10} PSNR median {out['psnr_median']:6.2f} (baseline {out['baseline_psnr']:.2f})  "
              f"SSIM median {out['ssim_median']:.3f}  labels {out['label_accuracy']}  {out['attack_seconds']:.0f}s", flush=True)
    # the second attack: DLG on the non-private single-image update at initialisation
    dlg_job = AttackJob("nonprivate", batch_size=1, images=args.images_b1, iterations=100, attack="dlg", seed=args.seed)
    out = attack_images(apply_fn, params0, buffers, train_set.images, train_set.labels, dlg_job, threat)
    out["weights"] = "init"
    pictures[("init", 1, "dlg")] = (out.pop("_originals"), out.pop("_reconstructions"), out["psnr"])
    cells.append(out)
    print(f"DLG init B=1 nonprivate PSNR median {out['psnr_median']:.2f} SSIM {out['ssim_median']:.3f}", flush=True)

    total = time.perf_counter() - t_start
    meta = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "sigma": threat.noise_multiplier, "sampling_rate": threat.sampling_rate, "max_grad_norm": threat.max_grad_norm,
            "train_seconds": train_s, "trained_test_auc": auc, "total_seconds": total,
            "note": "timings on a shared, loaded 2-core machine; breaching runs 24,000 iterations, this runs "
                    f"{args.iterations_b1} (B = 1) / {args.iterations} (B > 1), one restart"}
    try:
        meta["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "attacks.json", {"meta": meta, "cells": cells})
    lines = ["| weights | B | scenario | PSNR median (dB) | SSIM median | mean-image baseline PSNR | random-image PSNR | labels |",
             "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        sc = c["job"]["scenario"] if c["job"]["attack"] == "ig" else "nonprivate, DLG"
        name = NAMES.get(sc, sc).format(s=threat.noise_multiplier)
        lab = "known" if c["label_accuracy"] is None else f"iDLG {c['label_accuracy'] * 100:.0f}% right"
        lines.append(f"| {c['weights']} | {c['job']['batch_size']} | {name} | {c['psnr_median']:.1f} | {c['ssim_median']:.2f} | "
                     f"{c['baseline_mean_psnr_median']:.1f} | {c['baseline_random_psnr_median']:.1f} | {lab} |")
    (RESULTS / "attacks.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    rows = []
    first = pictures[("init", 1, "secagg")] if ("init", 1, "secagg") in pictures else pictures[("init", 1, "nonprivate")]
    rows.append(("original", first[0][:3], None))
    for sc in ("nonprivate", "clip", "dp", "secagg", "dlg"):
        if ("init", 1, sc) in pictures:
            orig, rec, ps = pictures[("init", 1, sc)]
            rows.append((("DLG" if sc == "dlg" else NAMES[sc].format(s=threat.noise_multiplier)).replace(" (", "\n("), rec[:3], ps[:3]))
    if ("init", 8, "nonprivate") in pictures:
        orig, rec, ps = pictures[("init", 8, "nonprivate")]
        rows += [("original\nB = 8", orig, None), ("non-private\nB = 8", rec, ps)]
    plot_reconstructions(rows, RESULTS / "attacks.png", title="Inverting Gradients on the case-study CNN at initialisation")
    print(f"total {total:.0f}s; wrote {RESULTS / 'attacks.json'}, attacks.md, attacks.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
