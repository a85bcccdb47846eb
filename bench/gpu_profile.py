"""Where a DP step's time goes on a CUDA GPU (issue 11): host time, kernel time, kernel launches and
host-device synchronisations per step, the fast engine against the non-private step.

    python bench/gpu_profile.py --device cuda          # SmallCNN B = 1024, ResNet-18-GN 64² B = 256

Per configuration and method: ``wall`` = median step time with a synchronisation after each step;
``host`` = process CPU time per step (the time the host spends issuing it); ``kernel`` = the summed
duration of the step's CUDA kernels (torch.profiler); ``launches`` = kernel launches per step (the
profiler's ``cudaLaunchKernel``-family runtime calls); ``syncs`` = synchronising operations per step
as counted by ``torch.cuda.set_sync_debug_mode("warn")`` (an ``.item()``, a ``bool()`` of a tensor, a
blocking copy to the host …). Writes ``bench/results/gpu_profile.{json,md}`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine, machine_line  # noqa: E402
from speed import build, make_method  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchCooperativeKernel")


def _kernel_us(prof) -> float:
    """Summed duration (µs) of the CUDA kernels the profiler recorded."""
    total = 0.0
    for ev in prof.events():
        if getattr(ev, "device_type", None) == torch.autograd.DeviceType.CUDA:
            total += ev.device_time if hasattr(ev, "device_time") else ev.cuda_time
    return total


def measure(name: str, batch: int, method: str, device: torch.device, steps: int, warmup: int) -> dict:
    model, x, y = build(name, batch)
    step = make_method(method, model.to(device), x.to(device), y.to(device))
    for _ in range(warmup):
        step()
    torch.cuda.synchronize(device)
    walls, hosts = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        hosts.append(time.process_time() - c0)
        torch.cuda.synchronize(device)
        walls.append(time.perf_counter() - t0)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                step()
            torch.cuda.synchronize(device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message).lower() for w in caught) / steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize(device)
    launches = sum(ev.name in LAUNCHES for ev in prof.events()) / steps
    return {"model": name, "batch": batch, "method": method, "wall_ms": 1e3 * statistics.median(walls),
            "host_ms": 1e3 * statistics.median(hosts), "kernel_ms": _kernel_us(prof) / 1e3 / steps,
            "launches": launches, "syncs": syncs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--configs", default="cnn:1024,resnet18:256", help="comma list of model:batch")
    p.add_argument("--methods", default="nonprivate,dpfunc_fast,dpfunc_bridge_fast")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        print("gpu_profile: needs a CUDA device (--device cuda)", file=sys.stderr)
        return 2
    env = {**machine(), "gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}
    rows = []
    for cfg in args.configs.split(","):
        name, batch = cfg.split(":")
        for method in args.methods.split(","):
            rows.append(measure(name, int(batch), method, device, args.steps, args.warmup))
            print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu_profile.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")
    lines = [f"# One DP step on {env['gpu']} (CUDA {env['cuda']}), host {machine_line(env)}", "",
             "| model | B | method | wall ms | host ms | kernel ms | launches | syncs |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['method']} | {r['wall_ms']:.2f} | {r['host_ms']:.2f} | "
                     f"{r['kernel_ms']:.2f} | {r['launches']:.0f} | {r['syncs']:.1f} |")
    (RESULTS / "gpu_profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
