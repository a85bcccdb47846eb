"""Speed and memory of one DP-SGD step: dpfunc (vmap, fast) against non-private torch and Opacus.

One command regenerates everything under ``bench/results/`` (Markdown table, JSON, plot)::

    python bench/speed.py            # full: CNN 28×28, transformer, ResNet-18-GN 64×64, each at B = 64/256/1024
    python bench/speed.py --quick    # CNN and transformer at B = 64/256, 3 repeats, no memory runs
    python bench/speed.py --device cuda --no-memory   # on a GPU (timings synchronise the device per step)
    python bench/speed.py --threads 1 --clock cpu ... # a loaded CPU: one thread, process CPU time per step
    python bench/speed.py --malloc-thresholds 1073741824 ...   # glibc keeps freed memory: no page faults per step

Method (figures, not a test):
    * Same model, same data, same process; the methods of one configuration run alternately, one
      step each per round, so machine noise hits all of them alike; the time is the median of
      ``--repeats`` rounds after ``--warmup`` rounds, reported as a ratio to the non-private step.
    * Every step is a full training step: gradients, clipping, noise (σ = 1, C = 1), SGD update.
      dpfunc steps are ``make_step(…, dpsgd(…), engine=…)``; ``dpfunc_bridge_fast`` is the unchanged torch
      loop made private with ``dpfunc.bridge.make_private(grad_sample_mode="fast")``
      (``model(x)``, ``loss.backward()``, ``optimizer.step()``); Opacus steps are ``PrivacyEngine``
      with ``grad_sample_mode`` ``hooks`` / ``functorch`` / ``ghost`` (flat clipping, no Poisson
      sampling so that every step sees the same batch).
    * ``--clock cpu`` times each step by the process's CPU time (``time.process_time``) instead of the
      wall clock: with ``--threads 1`` on a machine that other jobs load, that is close to the step's
      wall time on an idle core (time spent waiting for the core is not counted; cache and memory
      bandwidth shared with the other jobs still are). The load average before and after is recorded.
      ``--clock thread`` takes the calling (main) thread's CPU time (``time.thread_time``): with several
      threads and ``OMP_WAIT_POLICY=PASSIVE`` (waiting OpenMP threads sleep instead of spinning) that
      is a lower bound of the idle wall time — it leaves out the time the main thread waits for a core
      and for the other threads — and the closest a loaded machine gives to a 2-thread figure.
    * Peak memory: each (configuration, method) runs alone in a fresh subprocess, which reports the
      growth of its peak resident set (``VmHWM``) over its resident set after building model
      and data and one warm-up step whose leftovers (``.grad``, Opacus' ``.grad_sample``) are then
      released (so the interpreter, torch, the data, lazily loaded kernels and optimizer state are
      not counted: what remains is the step's peak); median of
      ``--memory-repeats`` processes, run with a fixed glibc mmap threshold (otherwise heap
      fragmentation makes single RSS peaks vary by ±20% and more) and the timing run's ``--threads``.
    * The allocator: with glibc's defaults a step's large tensors come from memory that the previous step
      returned to the OS (the heap top is trimmed, large blocks are unmapped), so every step page-faults
      it back in — thousands of faults a step on the CNN at B = 256, a cost that does not shrink with
      threads. ``--malloc-thresholds N`` sets glibc's mmap and trim thresholds to ``N`` bytes
      (``mallopt``, for the whole timing process: every method alike) so that freed memory is kept and
      reused. The output states the allocator settings and the threading environment variables in effect,
      and each method's median minor page faults per step (JSON ``page_faults_per_step``).
    * Opacus rows are skipped with a note when Opacus is not installed (``pip install opacus``,
      the ``bench`` extra); dpfunc itself never imports it.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dpfunc import FlatClipping, Key, dpsgd, make_step, vmap_engine
from dpfunc.bridge.fast import fast_engine
from dpfunc.bridge.functional import functionalize

try:
    from dpfunc.models import SmallCNN, resnet18_gn
except ImportError:  # pragma: no cover - the models package is written concurrently
    SmallCNN = resnet18_gn = None

METHODS = ["nonprivate", "dpfunc_vmap", "dpfunc_fast", "dpfunc_bridge_fast", "opacus_hooks", "opacus_functorch", "opacus_ghost"]
OPACUS_MODES = {"opacus_hooks": "hooks", "opacus_functorch": "functorch", "opacus_ghost": "ghost"}
RESULTS = Path(__file__).resolve().parent / "results"
SIGMA, CLIP, LR = 1.0, 1.0, 0.05


# ------------------------------------------------------------------------------------------ models


class Encoder(nn.Module):
    """A small Embedding + pre-LN Transformer encoder classifier written with Linear/LayerNorm only.

    ``nn.MultiheadAttention`` is avoided on purpose: it reads ``in_proj_weight`` / ``out_proj.weight``
    directly inside ``F.multi_head_attention_forward`` (its fused fast path), so per-layer hooks
    (Opacus, and dpfunc's fast engine) cannot see those projections as Linear layers.
    """

    def __init__(self, vocab=1000, dim=128, heads=4, layers=2, seq_len=64, classes=2):
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict({
                "ln1": nn.LayerNorm(dim), "qkv": nn.Linear(dim, 3 * dim), "proj": nn.Linear(dim, dim),
                "ln2": nn.LayerNorm(dim), "fc1": nn.Linear(dim, 4 * dim), "fc2": nn.Linear(4 * dim, dim),
            }))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, idx):
        b, t = idx.shape
        positions = torch.arange(t, device=idx.device).repeat(b, 1)  # contiguous: Opacus ghost views it
        h = self.tok(idx) + self.pos(positions)
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["ln1"](h)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            att = F.scaled_dot_product_attention(q, k, v)
            h = h + blk["proj"](att.transpose(1, 2).reshape(b, t, -1))
            h = h + blk["fc2"](F.gelu(blk["fc1"](blk["ln2"](h))))
        return self.head(self.ln(h).mean(1))


class _SmallCNN(nn.Module):
    """The PneumoniaMNIST CNN, identical to ``dpfunc.models.SmallCNN`` (used only if that is missing)."""

    def __init__(self):
        super().__init__()
        layers, c = [], 1
        for i, w in enumerate((16, 32, 64)):
            if i:
                layers.append(nn.AvgPool2d(2))
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.GroupNorm(4, w), nn.Tanh()]
            c = w
        self.features, self.head = nn.Sequential(*layers), nn.Linear(c, 2)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def build(name: str, batch: int, seed: int = 0):
    """``(model, x, y)`` for a configuration; data from a local generator."""
    gen = torch.Generator().manual_seed(seed)
    if name == "cnn":
        model = SmallCNN(key=Key(seed)) if SmallCNN is not None else _SmallCNN()
        x = torch.randn(batch, 1, 28, 28, generator=gen)
    elif name == "resnet18":
        model = resnet18_gn(key=Key(seed), input_size=64)
        x = torch.randn(batch, 1, 64, 64, generator=gen)
    elif name == "transformer":
        model = Encoder()
        x = torch.randint(0, 1000, (batch, 64), generator=gen)
    else:
        raise ValueError(f"unknown model {name!r}")
    y = torch.randint(0, 2, (batch,), generator=gen)
    return model, x, y


# ----------------------------------------------------------------------------------------- methods


def per_example_ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def make_method(method: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """A zero-argument callable doing one full training step (state kept inside); model and data on one device."""
    b = x.shape[0]
    model = copy.deepcopy(model)
    if method == "dpfunc_bridge_fast":
        from dpfunc.bridge import make_private

        opt = torch.optim.SGD(model.parameters(), lr=LR)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=b)
        # the same batch every step (as the other rows): the loop calls the private model on (x, y) itself.
        # Timing only, no ε is reported: make_private's warning that fixed batches are not Poisson is expected here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="make_private: poisson_sampling=False", category=UserWarning)
            dp_model, dp_opt, _ = make_private(model, opt, loader, key=Key(1), noise_multiplier=SIGMA, max_grad_norm=CLIP,
                                               poisson_sampling=False, grad_sample_mode="fast", validate=False)

        def step():
            dp_opt.zero_grad(set_to_none=True)
            F.cross_entropy(dp_model(x), y).backward()
            dp_opt.step()

        step.release = lambda: dp_opt.zero_grad(set_to_none=True)
        return step
    if method == "nonprivate":
        opt = torch.optim.SGD(model.parameters(), lr=LR)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        step.release = lambda: opt.zero_grad(set_to_none=True)
        return step
    if method in ("dpfunc_vmap", "dpfunc_fast"):
        apply_fn, params, buffers = functionalize(model)
        clipping = FlatClipping(CLIP)
        if method == "dpfunc_fast":
            engine = fast_engine(apply_fn, per_example_ce, clipping)
        else:
            def loss_fn(p, bufs, xi, yi):
                return per_example_ce(apply_fn(p, bufs, xi.unsqueeze(0)), yi.unsqueeze(0))[0]

            engine = vmap_engine(loss_fn, clipping=clipping)
        tx = dpsgd(LR, noise_multiplier=SIGMA, max_grad_norm=clipping, sampling_rate=b / (100 * b),
                   num_examples=100 * b, key=Key(1))
        step_fn = make_step(None, tx, engine=engine)
        state = {"params": params, "opt": tx.init(params)}

        def step():
            state["params"], state["opt"], _ = step_fn(state["params"], state["opt"], (x, y), buffers=buffers)

        return step
    if method in OPACUS_MODES:
        from opacus import PrivacyEngine  # the optional peer; dpfunc never imports it

        opt = torch.optim.SGD(model.parameters(), lr=LR)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=b)
        engine = PrivacyEngine()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            made = engine.make_private(
                module=model, optimizer=opt, data_loader=loader, noise_multiplier=SIGMA, max_grad_norm=CLIP,
                poisson_sampling=False, grad_sample_mode=OPACUS_MODES[method], criterion=nn.CrossEntropyLoss(),
            )
        if method == "opacus_ghost":
            dp_model, dp_opt, criterion, _ = made

            def step():
                dp_opt.zero_grad(set_to_none=True)
                criterion(dp_model(x), y).backward()  # the wrapper runs both backward passes
                dp_opt.step()
        else:
            dp_model, dp_opt, _ = made

            def step():
                dp_opt.zero_grad(set_to_none=True)
                F.cross_entropy(dp_model(x), y).backward()
                dp_opt.step()

        step.release = lambda: dp_opt.zero_grad(set_to_none=True)  # drops .grad_sample / .summed_grad too
        return step
    raise ValueError(method)


def opacus_available() -> bool:
    try:
        import opacus  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------ measurements


def fits(name: str, batch: int, method: str, device: torch.device | None = None) -> bool:
    """Whether a method runs in a configuration by default: on these 24 GiB machines ResNet-18-GN's
    per-example methods stop at B = 64 (Opacus ghost at 256; see notes); a GPU with ≥ 64 GiB runs them
    all up to B = 256 (per-example gradients 11.5 GiB there)."""
    if name != "resnet18" or method in ("nonprivate", "dpfunc_fast", "dpfunc_bridge_fast"):
        return True
    if device is not None and device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory >= 64 * 2**30:
        return batch <= 256
    return batch <= (256 if method == "opacus_ghost" else 64)


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time, "thread": time.thread_time}
_CLOCK_WORDS = {"wall": "wall", "cpu": "process CPU time", "thread": "main-thread CPU time"}

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# environment variables that change allocation or threading behaviour: named in the output when set
_ENV_PREFIXES = ("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD", "OMP_", "GOMP_", "KMP_", "MKL_", "ONEDNN_", "DNNL_")


def set_malloc_thresholds(nbytes: int) -> None:
    """glibc's mmap and trim thresholds to ``nbytes`` (``mallopt(M_MMAP_THRESHOLD / M_TRIM_THRESHOLD)``):
    blocks below it come from the heap, and the heap's top is returned to the OS only beyond it, so the
    memory a step frees is reused by the next one instead of being page-faulted in again. Process-wide.

    Raises:
        ValueError: ``nbytes`` outside ``1 .. 2**31 - 1`` (mallopt takes a C int).
        RuntimeError: no glibc ``mallopt`` here, or it refused the value.
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or not 1 <= nbytes <= 2**31 - 1:
        raise ValueError(f"bench/speed.py: --malloc-thresholds must be an int in 1 .. 2**31 - 1 bytes, got {nbytes!r}")
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError) as e:
        raise RuntimeError(f"bench/speed.py: --malloc-thresholds needs glibc's mallopt, not found here ({e})") from e
    for param in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD):
        if mallopt(param, nbytes) != 1:
            raise RuntimeError(f"bench/speed.py: glibc mallopt({param}, {nbytes}) refused the value")


def allocation_settings(malloc_thresholds: int | None) -> str:
    """What the output says about the allocator and threading environment of the timing process."""
    text = (f"malloc: glibc mmap and trim thresholds {malloc_thresholds} B (mallopt)" if malloc_thresholds
            else "malloc: glibc defaults (adaptive mmap threshold, heap trimming)")
    env = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES))
    return text + "; environment: " + (", ".join(env) if env else "no allocator or OpenMP variables set")


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_config(name, batch, methods, warmup, repeats, device=torch.device("cpu"), clock=time.perf_counter, faults=None):
    """Median step time per method (``{method: s}``) and the raw times; with a dict ``faults``, also the
    median minor page faults per step of each method's timed rounds (the whole process's, all threads)."""
    model, x, y = build(name, batch)
    model, x, y = model.to(device), x.to(device), y.to(device)
    steps = {m: make_method(m, model, x, y) for m in methods}
    times = {m: [] for m in methods}
    counts = {m: [] for m in methods}
    for r in range(warmup + repeats):
        for m in methods:
            gc.collect()
            _sync(device)
            f0 = _minor_faults()
            t0 = clock()
            steps[m]()
            _sync(device)
            dt = clock() - t0
            if r >= warmup:
                times[m].append(dt)
                counts[m].append(_minor_faults() - f0)
    if faults is not None:
        faults.update({m: statistics.median(v) for m, v in counts.items()})
    return {m: statistics.median(v) for m, v in times.items()}, times


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """VmHWM of this process's address space. (Not ``ru_maxrss``: Linux carries that over ``fork`` +
    ``exec``, so a child started by a large parent would report the parent's size.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_child(name, batch, method, threads=2):
    """Runs in a fresh process: peak RSS over the resident set after setup and one warm-up step
    (so one-time costs — lazily loaded kernels, thread pools, optimizer state — are not counted)."""
    torch.set_num_threads(threads)
    model, x, y = build(name, batch)
    step = make_method(method, model, x, y)
    step()
    # what a step leaves behind until the next one clears it (.grad, Opacus' .grad_sample) is not part of
    # the base: the next step frees it, so counting it in the base would understate that method's peak
    getattr(step, "release", lambda: None)()
    gc.collect()
    base = _rss_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    for _ in range(2):
        step()
    print(json.dumps({"peak_delta_bytes": max(0, _peak_rss_bytes() - base)}))


def memory_config(name, batch, method, timeout):
    cmd = [sys.executable, __file__, "--_memory", name, str(batch), method, "--threads", str(torch.get_num_threads())]
    try:
        # a fixed mmap threshold: freed tensors go back to the OS at once, so the RSS peak measures
        # live memory rather than how glibc's adaptive threshold happened to fragment the heap
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])["peak_delta_bytes"]
    except (subprocess.SubprocessError, ValueError, IndexError) as e:
        print(f"  memory run failed for {name} B={batch} {method}: {type(e).__name__}", file=sys.stderr)
        return None


# ------------------------------------------------------------------------------------------ report


from _machine import cpu_model as _cpu_model  # noqa: E402


def _device_name(device: str) -> str:
    d = torch.device(device)
    if d.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(d)}"
    return "CPU"


def write_report(results, notes, args, show=True):
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = args.output_suffix if args.output_suffix is not None else ("_quick" if args.quick else "")
    meta = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "machine": _cpu_model(), "device": _device_name(args.device), "repeats": args.repeats, "warmup": args.warmup,
        "clock": args.clock, "load_average": getattr(args, "loads", None),
        "allocation": getattr(args, "allocation", None) or allocation_settings(getattr(args, "malloc_thresholds", None)),
        "command": "python bench/speed.py" + (" " + " ".join(args.argv) if args.argv else ""),
    }
    try:
        import opacus

        meta["opacus"] = opacus.__version__
    except ImportError:
        meta["opacus"] = None
    (RESULTS / f"speed{suffix}.json").write_text(json.dumps({"meta": meta, "notes": notes, "results": results}, indent=2))

    lines = [
        f"# One DP-SGD step: time ÷ non-private step (median of {args.repeats}), peak memory growth (MiB)",
        "",
        f"`{meta['command']}` — {meta['device']}, CPU {meta['machine']}, torch {meta['torch']}, {meta['threads']} threads, "
        f"opacus {meta['opacus']}; clock: {_CLOCK_WORDS[args.clock]}; "
        + (f"1-min load average {' → '.join(f'{v:.1f}' for v in meta['load_average'])} (start → end); " if meta["load_average"] else "")
        + f"{meta['allocation']}; "
        "σ = 1, C = 1, flat clipping. Memory: peak RSS of a fresh process over its RSS after setup and a warm-up step "
        "(the warm-up step's leftovers, `.grad` / `.grad_sample`, released).",
        "",
        "| model | B | non-private (s) | " + " | ".join(m for m in METHODS[1:]) + " |",
        "|---|---|---|" + "---|" * (len(METHODS) - 1),
    ]
    for r in results:
        base = r["time_s"].get("nonprivate")
        cells = []
        for m in METHODS[1:]:
            t = r["time_s"].get(m)
            mem = r.get("peak_mib", {}).get(m)
            if t is None:
                cells.append("—")
                continue
            cell = f"{t / base:.2f}×"
            if mem is not None:
                cell += f" / {mem:.0f}"
            cells.append(cell)
        mem0 = r.get("peak_mib", {}).get("nonprivate")
        first = f"{base:.3f}" + (f" / {mem0:.0f}" if mem0 is not None else "")
        lines.append(f"| {r['model']} | {r['batch']} | {first} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: time ratio / peak MiB. Notes:", ""] + [f"- {n}" for n in notes]
    faulted = [r for r in results if r.get("page_faults_per_step")]
    if faulted:  # runs before the fault count have none
        lines += ["", "Minor page faults per step (median over the timed rounds; the whole process, all threads): "
                  + "; ".join(f"{r['model']} B = {r['batch']}: " + ", ".join(f"{m} {v:.0f}" for m, v in r["page_faults_per_step"].items())
                              for r in faulted)]
    (RESULTS / f"speed{suffix}.md").write_text("\n".join(lines) + "\n")
    if show:
        print("\n".join(lines))

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    models = sorted({r["model"] for r in results}, key=[r["model"] for r in results].index)
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in results if r["model"] == model]
        batches = [r["batch"] for r in rows]
        width = 0.8 / (len(METHODS) - 1)
        for i, m in enumerate(METHODS[1:]):
            vals = [r["time_s"][m] / r["time_s"]["nonprivate"] if m in r["time_s"] else math.nan for r in rows]
            ax.bar([j + i * width for j in range(len(rows))], vals, width, label=m)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [str(bb) for bb in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel("time ÷ non-private step")
        ax.set_title(model)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"speed{suffix}.png", dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CNN and transformer at B = 64/256, 3 repeats, no memory")
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=None)
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-repeats", type=int, default=3, help="fresh processes per memory figure (median)")
    parser.add_argument("--memory-only", action="store_true", help="redo only the memory column of the last JSON")
    parser.add_argument("--report-only", action="store_true", help="rewrite the Markdown table and plot from the last JSON")
    parser.add_argument("--device", default="cpu", help="torch device of model and data: cpu, cuda, cuda:N or auto (CUDA when available)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall (default); cpu: process CPU time per step, for one thread on a loaded machine; "
                             "thread: the main thread's CPU time (with OMP_WAIT_POLICY=PASSIVE a lower bound of the idle "
                             "wall time at several threads)")
    parser.add_argument("--malloc-thresholds", type=int, default=None, metavar="BYTES",
                        help="glibc mmap and trim thresholds for the timing process (mallopt), e.g. 1073741824; "
                             "default: glibc's adaptive ones (the output states which)")
    parser.add_argument("--output-suffix", default=None, help="results/speed<SUFFIX>.{json,md,png} (default '' or '_quick')")
    parser.add_argument("--_memory", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    from dpfunc.devices import resolve_device

    try:  # the library's device check: spelling, and whether this machine has that GPU
        device = resolve_device(args.device, fn="bench/speed.py", name="--device")
    except ValueError as e:
        parser.error(str(e))
    args.device = str(device)
    if args._memory:
        name, batch, method = args._memory
        return memory_child(name, int(batch), method, args.threads)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.malloc_thresholds is not None:
        try:
            set_malloc_thresholds(args.malloc_thresholds)
        except (ValueError, RuntimeError) as e:
            parser.error(str(e))
    args.allocation = allocation_settings(args.malloc_thresholds)
    torch.set_num_threads(args.threads)
    args.loads = [os.getloadavg()[0]]
    args.repeats = args.repeats or (3 if args.quick else 5)
    if args.report_only or args.memory_only:  # work from the last run's JSON
        saved = json.loads((RESULTS / f"speed{'_quick' if args.quick else ''}.json").read_text())
        args.repeats, args.warmup = saved["meta"]["repeats"], saved["meta"]["warmup"]
        args.loads, args.clock = saved["meta"].get("load_average"), saved["meta"].get("clock", "wall")
        args.allocation = saved["meta"].get("allocation", "malloc: not recorded (a run before --malloc-thresholds)")
    if args.report_only:
        return write_report(saved["results"], saved["notes"], args)
    if args.memory_only:
        for row in saved["results"]:
            med = row["time_s"]
            reps = args.memory_repeats if med["nonprivate"] < 3 else 1
            row["peak_mib"] = {}
            for m in med:
                mems = [memory_config(row["model"], row["batch"], m, timeout=max(120, 40 * med[m] + 60)) for _ in range(reps)]
                mems = [v for v in mems if v is not None]
                row["peak_mib"][m] = statistics.median(mems) / 2**20 if mems else None
            print(row["model"], row["batch"], row["peak_mib"], flush=True)
        return write_report(saved["results"], saved["notes"], args)
    notes = []
    methods = args.methods or list(METHODS)
    if not opacus_available():
        methods = [m for m in methods if m not in OPACUS_MODES]
        notes.append("Opacus is not installed: its rows are skipped (`pip install opacus`, the `bench` extra).")
    if "nonprivate" not in methods:
        methods = ["nonprivate"] + methods
    if args.quick:
        configs = [("cnn", 64), ("cnn", 256), ("transformer", 64), ("transformer", 256)]
    else:
        configs = [(m, b) for m in ("cnn", "transformer", "resnet18") for b in (64, 256, 1024)]
        notes.append(
            "ResNet-18-GN (11.2M parameters, 64×64): the per-sample-gradient methods (dpfunc vmap, Opacus hooks / "
            "functorch) hold B × 11.2M floats — 2.9 GiB at B = 64, 11.5 GiB at B = 256 — so they run at B = 64 only "
            "on these 24 GiB machines; Opacus ghost runs at B = 64 and 256 (its peak grows linearly with B: "
            "1.6 GiB at 64, 6.2 GiB at 256 in our runs, so about 25 GiB at B = 1024)."
        )
    if args.models:
        configs = [(m, b) for m, b in configs if m in args.models] or [(m, b) for m in args.models for b in (args.batch_sizes or [64])]
    if args.batch_sizes:
        configs = [(m, b) for m, b in configs if b in args.batch_sizes] or [(m, b) for m in {m for m, _ in configs} for b in args.batch_sizes]
    notes.append(
        "The transformer is written with Linear/LayerNorm/Embedding and F.scaled_dot_product_attention, not "
        "nn.MultiheadAttention, whose fused forward reads its projection weights directly, so that every method "
        "sees the same Linear layers (dpfunc's fast engine has a MultiheadAttention rule; Opacus swaps the module)."
    )
    results = []
    for name, batch in configs:
        run = methods if args.methods else [m for m in methods if fits(name, batch, m, device)]
        print(f"== {name} B={batch}: timing {run}", flush=True)
        faults = {}
        med, raw = time_config(name, batch, run, args.warmup, args.repeats, device, CLOCKS[args.clock], faults)
        row = {"model": name, "batch": batch, "time_s": med, "raw_s": raw, "page_faults_per_step": faults}
        print("   " + ", ".join(f"{m} {t:.3f}s ({t / med['nonprivate']:.2f}×)" for m, t in med.items()), flush=True)
        if not (args.quick or args.no_memory or device.type != "cpu"):  # memory is the CPU RSS
            row["peak_mib"] = {}
            reps = args.memory_repeats if med["nonprivate"] < 3 else 1  # RSS peaks vary run to run: median
            for m in run:
                mems = [memory_config(name, batch, m, timeout=max(120, 40 * med[m] + 60)) for _ in range(reps)]
                mems = [v for v in mems if v is not None]
                row["peak_mib"][m] = statistics.median(mems) / 2**20 if mems else None
            print("   peak MiB " + ", ".join(f"{m} {v:.0f}" for m, v in row["peak_mib"].items() if v is not None), flush=True)
        results.append(row)
        args.loads = [args.loads[0], os.getloadavg()[0]]
        write_report(results, notes, args, show=False)  # after every configuration: a run that dies keeps its rows
    write_report(results, notes, args)


if __name__ == "__main__":
    main()
