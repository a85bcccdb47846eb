"""Old fast engine against the current one, in ONE process, steps alternating (issue 11's method).

The fast engine's package (``bridge/fast``) at ``--old`` (a git revision) is extracted to a temporary
directory under another name and imported next to the working tree's; each round runs one step of
every method (non-private, old fast, new fast, new bridge fast) on the same CNN and batch, so machine
load hits them alike. The old step also runs the noise, update, metrics and norm code (``dpfunc/noise.py``,
``dpfunc/transforms.py``, ``dpfunc/step.py``'s ``step_metrics``, ``dpfunc/clipping.py``'s ``group_norms``
inside the old engine, and ``bridge/functional.py``'s ``functionalize``) at ``--old``: they are loaded under
other names and swapped into ``dpfunc.private`` / ``dpfunc.step`` for the duration of each old step
(``--old-core HEAD`` pins them to the working tree's committed version when only the engine is compared). Figures, not a test::

    python bench/speed_ab.py --old aefe468 --batch-sizes 64 256 --repeats 31 --clock cpu

Prints, per batch size, the median / first quartile / minimum step time of each method and its ratio
to the non-private step, the per-round (paired) ratio new fast / old fast, the minor page faults per step of each method, whether old and new fast
parameters are bit-identical after all steps, and the 1-minute load average before and after
(``/proc/loadavg``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import gc
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import speed  # noqa: E402

import dpfunc.private  # noqa: E402
import dpfunc.step  # noqa: E402
from dpfunc import FlatClipping, Key, chain, dp_aggregate, dpsgd, make_step  # noqa: E402
from dpfunc.private import _make_config  # noqa: E402
from dpfunc.bridge.fast import fast_engine  # noqa: E402
from dpfunc.bridge.functional import functionalize  # noqa: E402

OLD = "oldfast"


def import_old(rev: str, into: Path):
    """``bridge/fast`` at ``rev`` as the package ``oldfast`` (its absolute imports renamed)."""
    files = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "-r", "--name-only", rev, "bridge/fast"],
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if not name.endswith(".py"):
            continue
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{name}"], capture_output=True, text=True, check=True).stdout
        dest = into / OLD / Path(name).relative_to("bridge/fast")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text.replace("dpfunc.bridge.fast", OLD))
    sys.path.insert(0, str(into))
    import oldfast  # noqa: PLC0415

    return oldfast.fast_engine


def import_old_core(rev: str):
    """``dpfunc/noise.py``, ``dpfunc/transforms.py``, ``dpfunc/step.py``, ``dpfunc/clipping.py`` and
    ``bridge/functional.py`` at ``rev`` as modules of their own."""
    mods = {}
    for name, path in (("noise", "dpfunc/noise.py"), ("transforms", "dpfunc/transforms.py"), ("step", "dpfunc/step.py"),
                       ("clipping", "dpfunc/clipping.py"), ("functional", "bridge/functional.py")):
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True, check=True).stdout
        spec = importlib.util.spec_from_loader(f"oldcore_{name}", loader=None)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up there
        exec(compile(text, f"{rev}:{path}", "exec"), mod.__dict__)  # noqa: S102 (our own file at a revision)
        mods[name] = mod
    return mods


@contextlib.contextmanager
def core_swapped(core):
    """Run a step with the old ``privatize``, ``apply_updates`` and ``step_metrics`` (restored afterwards)."""
    saved = dpfunc.private.privatize, dpfunc.step.apply_updates, dpfunc.step.step_metrics
    dpfunc.private.privatize, dpfunc.step.apply_updates = core["noise"].privatize, core["transforms"].apply_updates
    dpfunc.step.step_metrics = getattr(core["step"], "step_metrics", saved[2])
    try:
        yield
    finally:
        dpfunc.private.privatize, dpfunc.step.apply_updates, dpfunc.step.step_metrics = saved


def use_old_norms(old_engine, core) -> None:
    """The old engine's module sums norms with the old ``group_norms`` (it imported the current one by name)."""
    module = sys.modules[old_engine.__module__]
    if hasattr(module, "group_norms") and hasattr(core["clipping"], "group_norms"):
        module.group_norms = core["clipping"].group_norms


def fast_step(make_engine, model, x, y, core=None):
    model = copy.deepcopy(model)
    apply_fn, params, buffers = (functionalize if core is None else core["functional"].functionalize)(model)
    b = x.shape[0]
    clipping = FlatClipping(speed.CLIP)
    if core is None:
        tx = dpsgd(speed.LR, noise_multiplier=speed.SIGMA, max_grad_norm=clipping, sampling_rate=0.01, num_examples=100 * b, key=Key(1))
    else:  # dpsgd's chain with the old sgd
        cfg = _make_config("speed_ab", clipping, speed.SIGMA, 0.01, 100 * b)
        tx = chain(dp_aggregate(cfg, Key(1)), core["transforms"].sgd(speed.LR))
    step_fn = make_step(None, tx, engine=make_engine(apply_fn, speed.per_example_ce, clipping))
    state = {"params": params, "opt": tx.init(params)}

    def step():
        with core_swapped(core) if core is not None else contextlib.nullcontext():
            state["params"], state["opt"], _ = step_fn(state["params"], state["opt"], (x, y), buffers=buffers)

    step.state = state
    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", required=True, help="git revision of the old engine (bridge/fast)")
    parser.add_argument("--old-core", default=None, help="git revision of the old noise/transforms (default: --old)")
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=[64, 256])
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(speed.CLOCKS), default="cpu")
    parser.add_argument("--malloc-thresholds", type=int, default=None, metavar="BYTES",
                        help="glibc mmap and trim thresholds for this process (as bench/speed.py; default: glibc's own)")
    args = parser.parse_args(argv)
    if args.malloc_thresholds is not None:
        speed.set_malloc_thresholds(args.malloc_thresholds)
    torch.set_num_threads(args.threads)
    clock = speed.CLOCKS[args.clock]
    with tempfile.TemporaryDirectory() as tmp:
        old_engine = import_old(args.old, Path(tmp))
        core = import_old_core(args.old_core or args.old)
        use_old_norms(old_engine, core)
        print(f"old = bridge/fast at {args.old}; torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
              f"CPU {speed._cpu_model()}, clock {args.clock}, {args.repeats} rounds after {args.warmup}; "
              f"{speed.allocation_settings(args.malloc_thresholds)}")
        for b in args.batch_sizes:
            model, x, y = speed.build("cnn", b)
            steps = {"nonprivate": speed.make_method("nonprivate", model, x, y), "old_fast": fast_step(old_engine, model, x, y, core),
                     "new_fast": fast_step(fast_engine, model, x, y),
                     "new_bridge_fast": speed.make_method("dpfunc_bridge_fast", model, x, y)}
            times = {m: [] for m in steps}
            faults = {m: [] for m in steps}
            load0 = Path("/proc/loadavg").read_text().split()[0]
            for r in range(args.warmup + args.repeats):
                for m, step in steps.items():
                    gc.collect()
                    f0 = speed._minor_faults()
                    t0 = clock()
                    step()
                    if r >= args.warmup:
                        times[m].append(clock() - t0)
                        faults[m].append(speed._minor_faults() - f0)
            load1 = Path("/proc/loadavg").read_text().split()[0]
            same = all(torch.equal(steps["old_fast"].state["params"][k], v) for k, v in steps["new_fast"].state["params"].items())
            print(f"  old and new fast parameters after {args.warmup + args.repeats} steps bit-identical: {same}")
            print(f"CNN B={b} (load average {load0} -> {load1})")
            for label, stat in (("median", statistics.median), ("q1", lambda v: statistics.quantiles(v, n=4)[0]), ("min", min)):
                s = {m: stat(v) for m, v in times.items()}
                print(f"  {label:6s} " + "  ".join(f"{m} {s[m] * 1e3:.2f} ms ({s[m] / s['nonprivate']:.3f}x)" for m in steps))
            print("  minor page faults per step (median): " + ", ".join(f"{m} {statistics.median(v):.0f}" for m, v in faults.items()))
            # Paired: the same round's steps saw the same load, so per-round ratios cancel most of it.
            paired = sorted(n / o for n, o in zip(times["new_fast"], times["old_fast"]))
            diff = statistics.median(n - o for n, o in zip(times["new_fast"], times["old_fast"]))
            print(f"  paired new_fast / old_fast per round: median {statistics.median(paired):.3f} "
                  f"(quartiles {statistics.quantiles(paired, n=4)[0]:.3f}–{statistics.quantiles(paired, n=4)[2]:.3f}); "
                  f"median difference {diff * 1e3:+.2f} ms")


if __name__ == "__main__":
    main()
