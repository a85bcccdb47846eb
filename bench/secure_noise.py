"""Secure-noise benchmark (issue 18): discrete Gaussian throughput vs ``torch.randn``, and the DP-SGD
step-time ratio of the SmallCNN (23,650 parameters) with ``secure=True`` vs the default sampler, and
the sampler's time as a share of a default step (steadier than the ratio on a loaded machine).

Run: ``python bench/secure_noise.py [--big]``. Prints a table and writes ``bench/results/secure_noise.json``.
``--big`` adds 11.2M samples (ResNet-18's parameter count), one repetition. Every ratio is measured in
the same process, interleaved; the header names CPU, torch version, threads and the 1-minute load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from dpfunc.secure_noise import SecureRandom, discrete_gaussian_params, grid_exponent_for, sample_discrete_gaussian
from _machine import cpu_model  # noqa: E402  (bench/ is on sys.path when a bench runs)


def _machine() -> dict:
    cpu = cpu_model()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_1min": os.getloadavg()[0]}


def _median(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def sampler_rows(sizes, reps) -> list[dict]:
    rows = []
    for n in sizes:
        k = grid_exponent_for(n, 1.0)
        params = discrete_gaussian_params(1.1 * 2.0**k * 1.01)  # σ = 1.1, C = 1: the grid-unit std
        rng = SecureRandom()
        r = reps if n < 1_000_000 else 1
        secure = _median(lambda: sample_discrete_gaussian(n, params, rng), r)
        randn = _median(lambda: torch.randn(n), max(r, 5))
        rows.append({"samples": n, "grid_bits": k, "secure_s": secure, "randn_s": randn, "secure_per_s": n / secure,
                     "randn_per_s": n / randn, "ratio": secure / randn})
    return rows


def step_rows(reps: int) -> dict:
    from dpfunc import Key, make_step
    from dpfunc.bridge import functionalize
    from dpfunc.clipping import FlatClipping
    from dpfunc.models import build_model
    from dpfunc.private import dpsgd
    from dpfunc.train import TrainConfig, _make_engine

    cfg = TrainConfig(train_subset=300)
    module = build_model("cnn", key=Key(0))
    apply_fn, params, buffers = functionalize(module)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 28, 28, generator=g)
    y = torch.randint(0, 2, (256,), generator=g)
    batch = (x, y)
    d = sum(p.numel() for p in params.values())
    out = {"parameters": d, "batch": 256}
    steps = {}
    for secure in (False, True):
        tx = dpsgd(1.0, noise_multiplier=1.1, max_grad_norm=1.0, sampling_rate=256 / 4708, num_examples=4708, key=Key(1),
                   secure=secure)
        engine = _make_engine(cfg, module, apply_fn, FlatClipping(1.0))
        steps[secure] = (make_step(None, tx, engine=engine), tx.init(params))
    times = {False: [], True: []}
    for _ in range(reps):  # interleaved, so load changes hit both
        for secure in (False, True):
            step, state = steps[secure]
            t = time.perf_counter()
            step(params, state, batch)
            times[secure].append(time.perf_counter() - t)
    out["default_step_s"] = statistics.median(times[False])
    out["secure_step_s"] = statistics.median(times[True])
    out["step_ratio"] = out["secure_step_s"] / out["default_step_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--big", action="store_true", help="also 11.2M samples (ResNet-18), one repetition")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    machine = _machine()
    sizes = [23_650, 1_000_000] + ([11_200_000] if args.big else [])
    rows = sampler_rows(sizes, args.reps)
    print(f"# {machine}")
    print(f"{'samples':>10} {'k':>3} {'secure s':>10} {'randn s':>10} {'secure/s':>12} {'ratio':>8}")
    for r in rows:
        print(f"{r['samples']:>10} {r['grid_bits']:>3} {r['secure_s']:>10.4f} {r['randn_s']:>10.5f} {r['secure_per_s']:>12.3g} {r['ratio']:>8.1f}")
    step = step_rows(args.reps)
    print(f"CNN DP-SGD step (B=256, d={step['parameters']}): default {step['default_step_s']:.3f}s, "
          f"secure {step['secure_step_s']:.3f}s, ratio {step['step_ratio']:.2f}")
    step["sampler_share"] = rows[0]["secure_s"] / step["default_step_s"]  # robust to load swings between steps
    print(f"sampler time for d={rows[0]['samples']} / default step time = {step['sampler_share']:.3f}")
    machine["load_1min_end"] = os.getloadavg()[0]
    out = Path(__file__).parent / "results" / "secure_noise.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"machine": machine, "sampler": rows, "step": step}, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
