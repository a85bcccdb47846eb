"""Secure-noise benchmark (issue 18): exact discrete Gaussian throughput vs the default sampler, the
per-step noise cost for ResNet-18 (11.2M coordinates), the DP-SGD step-time ratio of the SmallCNN
(23,650 parameters) with ``secure=True`` vs the default, and a timing side-channel probe.

Run: ``python bench/secure_noise.py [--big] [--reps R]``. Prints tables and writes
``bench/results/secure_noise.json``. ``--big`` adds the 11.2M rows (ResNet-18's parameter count) and the
full ResNet-18 privatize comparison. Every ratio is measured in one process, interleaved (baseline and
secure alternate, the ratio is the median of the per-pair ratios), so load swings hit both; the header
names CPU, torch version, threads and the 1-minute load at the start and the end.

Baselines: ``torch.randn(d)`` (float32, torch's default threads) and the default path's actual sampler,
:func:`dpfunc.noise.gaussian_noise` on the model's parameter dict (a ``torch.Generator`` per step, one
``randn`` per tensor, times σC). Secure rows: the slot-table sampler (the default for ≥ 4096 coordinates)
and the CKS sampler it replaced (23,650 and 1M only: 11.2M would take ~20 s).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from dpfunc.secure_noise import (
    SecureRandom,
    discrete_gaussian_params,
    grid_exponent_for,
    sample_discrete_gaussian_cks,
)
from dpfunc.secure_noise_table import sample_discrete_gaussian_table, slot_table
from _machine import cpu_model  # noqa: E402  (bench/ is on sys.path when a bench runs)


def _machine() -> dict:
    cpu = cpu_model()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "numpy": np.__version__,
            "threads": torch.get_num_threads(), "load_1min": os.getloadavg()[0]}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _pairs(base, other, reps: int) -> tuple[float, float, float]:
    """Interleaved timings: (median base s, median other s, median of the per-pair ratios other/base)."""
    b, o, r = [], [], []
    for _ in range(reps):
        tb = _timed(base)
        to = _timed(other)
        b.append(tb)
        o.append(to)
        r.append(to / tb)
    return statistics.median(b), statistics.median(o), statistics.median(r)


def _params_for(d: int):
    k = grid_exponent_for(d, 1.0)
    return k, discrete_gaussian_params(1.1 * 2.0**k * 1.01)  # σ = 1.1, C = 1: the grid-unit std


def sampler_rows(sizes, reps) -> list[dict]:
    rows = []
    for n in sizes:
        k, params = _params_for(n)
        t = time.perf_counter()
        slot_table(params.variance)
        build = time.perf_counter() - t
        rng = SecureRandom()
        r = reps if n <= 1_000_000 else max(3, reps // 2)
        randn_s, table_s, ratio = _pairs(lambda: torch.randn(n), lambda: sample_discrete_gaussian_table(n, params, rng), r)
        row = {"samples": n, "grid_bits": k, "sigma_grid": math.sqrt(params.variance), "table_build_s": build,
               "randn_s": randn_s, "table_s": table_s, "table_per_s": n / table_s, "table_over_randn": ratio}
        if n <= 1_000_000:
            _, cks_s, cks_ratio = _pairs(lambda: torch.randn(n), lambda: sample_discrete_gaussian_cks(n, params, rng), max(1, r // 3))
            row.update(cks_s=cks_s, cks_per_s=n / cks_s, cks_over_randn=cks_ratio, table_speedup_over_cks=cks_s / table_s)
        rows.append(row)
    return rows


def resnet_rows(reps: int) -> dict:
    """ResNet-18 (11.2M parameters): the default sampler and privatize vs the secure ones, per step."""
    from dpfunc import Key
    from dpfunc.bridge import functionalize
    from dpfunc.models import build_model
    from dpfunc.noise import gaussian_noise, privatize
    from dpfunc.secure_noise import secure_privatize

    _, params, _ = functionalize(build_model("resnet18", key=Key(0)))
    d = sum(int(p.numel()) for p in params.values())
    g = torch.Generator().manual_seed(0)
    grads = {k: torch.randn(p.shape, generator=g) * 1e-3 for k, p in params.items()}
    k, dg = _params_for(d)
    rng = SecureRandom()
    slot_table(dg.variance)
    out = {"parameters": d, "grid_bits": k}
    step = [0]

    def default_noise():
        step[0] += 1
        gaussian_noise(Key(1).fold_in(step[0]), grads, 1.1)

    out["gaussian_noise_s"], out["table_s"], out["table_over_gaussian_noise"] = _pairs(
        default_noise, lambda: sample_discrete_gaussian_table(d, dg, rng), reps)
    kw = dict(noise_multiplier=1.1, sensitivity=1.0, expected_batch_size=256.0)
    out["privatize_s"], out["secure_privatize_s"], out["secure_privatize_over_privatize"] = _pairs(
        lambda: privatize(grads, Key(2), **kw), lambda: secure_privatize(grads, rng=rng, **kw), reps)
    return out


def timing_probe(n: int, calls: int) -> dict:
    """Does one call's time depend on the values it drew? Pearson correlation, over ``calls`` calls,
    between the call time and (a) the number of draws beyond 2σ, (b) the sum of squares."""
    _, params = _params_for(n)
    slot_table(params.variance)
    rng = SecureRandom()
    sd = math.sqrt(params.variance)
    times, beyond, squares = [], [], []
    for _ in range(calls):
        t = time.perf_counter()
        y = sample_discrete_gaussian_table(n, params, rng)
        times.append(time.perf_counter() - t)
        beyond.append(float((np.abs(y) > 2 * sd).sum()))
        squares.append(float((y.astype(float) ** 2).sum()))
    corr = lambda a, b: float(np.corrcoef(a, b)[0, 1])  # noqa: E731
    return {"samples": n, "calls": calls, "time_median_s": statistics.median(times),
            "time_p10_s": float(np.percentile(times, 10)), "time_p90_s": float(np.percentile(times, 90)),
            "corr_time_beyond_2sigma": corr(times, beyond), "corr_time_sum_squares": corr(times, squares),
            "no_correlation_band_99pct": 2.576 / math.sqrt(calls)}


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
    ap.add_argument("--big", action="store_true", help="also 11.2M samples and the ResNet-18 privatize rows")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--no-step", action="store_true", help="skip the SmallCNN DP-SGD step rows")
    args = ap.parse_args()
    machine = _machine()
    print(f"# {machine}")
    sizes = [23_650, 1_000_000] + ([11_200_000] if args.big else [])
    rows = sampler_rows(sizes, args.reps)
    print(f"{'samples':>10} {'k':>3} {'randn s':>9} {'table s':>9} {'table/s':>9} {'ratio':>6} {'cks s':>8} {'cks ratio':>9}")
    for r in rows:
        cks = f"{r['cks_s']:>8.3f} {r['cks_over_randn']:>9.0f}" if "cks_s" in r else f"{'-':>8} {'-':>9}"
        print(f"{r['samples']:>10} {r['grid_bits']:>3} {r['randn_s']:>9.4f} {r['table_s']:>9.4f} {r['table_per_s']:>9.3g} "
              f"{r['table_over_randn']:>6.2f} {cks}")
    result = {"machine": machine, "sampler": rows}
    if args.big:
        res = resnet_rows(max(3, args.reps // 2))
        result["resnet18"] = res
        print(f"ResNet-18 (d={res['parameters']}): gaussian_noise {res['gaussian_noise_s']:.3f}s, table sampler "
              f"{res['table_s']:.3f}s, ratio {res['table_over_gaussian_noise']:.2f}; privatize {res['privatize_s']:.3f}s, "
              f"secure_privatize {res['secure_privatize_s']:.3f}s, ratio {res['secure_privatize_over_privatize']:.2f}")
    probe = timing_probe(23_650, 300)
    result["timing_probe"] = probe
    print(f"timing probe (d=23,650, {probe['calls']} calls): median {probe['time_median_s'] * 1e3:.2f} ms "
          f"(p10-p90 {probe['time_p10_s'] * 1e3:.2f}-{probe['time_p90_s'] * 1e3:.2f}); corr(time, #|y|>2σ) = "
          f"{probe['corr_time_beyond_2sigma']:+.3f}, corr(time, Σy²) = {probe['corr_time_sum_squares']:+.3f} "
          f"(|r| < {probe['no_correlation_band_99pct']:.3f}: no correlation at 99 %)")
    if not args.no_step:
        step = step_rows(args.reps)
        step["sampler_share"] = rows[0]["table_s"] / step["default_step_s"]
        result["step"] = step
        print(f"CNN DP-SGD step (B=256, d={step['parameters']}): default {step['default_step_s']:.3f}s, "
              f"secure {step['secure_step_s']:.3f}s, ratio {step['step_ratio']:.2f}; sampler / default step = {step['sampler_share']:.4f}")
    machine["load_1min_end"] = os.getloadavg()[0]
    out = Path(__file__).parent / "results" / "secure_noise.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
