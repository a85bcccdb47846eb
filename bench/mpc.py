"""Encrypted inference benchmark: seconds, bytes and rounds per image, beside plaintext.

Both parties run in one process (two threads, the same code as the three-process deployment, with
in-process channels), after the dealer's run; the figures are:

* ``online_s_per_image``: wall time of the two parties' online phase / batch size;
* ``online_cpu_s_per_image``: CPU time of both parties' threads in that phase / batch size (less
  sensitive to other jobs on the machine than wall time; on an idle 2-core machine the wall time
  lies between half of it and all of it);
* ``dealer_s_per_image``: the dealer's generation of the batch's material / batch size (CrypTen's
  TTP does this during the online phase, in its own process on the same cores);
* ``bytes_per_image``: bytes one party sends plus receives from the other (online), / batch size;
* ``dealer_bytes_per_image``: material the dealer sends to both parties, / batch size;
* ``rounds``: communication rounds of one batch (independent of the batch size);
* ``plain_s_per_image``: the same model in plain torch (float32), same batch.

Reference figures (issue 15): CrypTen, 2 parties on this 2-core machine: small CNN at 64² 0.18
s/image, ResNet-18 at 64² 1.51 s/image; PriMIA ~100 s per 224² image.

Usage::

    python bench/mpc.py                       # SmallCNN 28² and 64², ResNet-18-GN 64², batch 1 and 32
    python bench/mpc.py --quick               # SmallCNN only, batch 1
    python bench/mpc.py --run-dir runs/cnn-eps3.0-seed0   # trained weights for the SmallCNN rows

Writes ``bench/results/mpc.json`` (rows saved as they finish) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpfunc.bridge.mpc import compile_module, encode_weights, encrypted_inference  # noqa: E402
from dpfunc.keys import Key  # noqa: E402
from dpfunc.models import SmallCNN, resnet18_gn  # noqa: E402
from dpfunc.mpc import decode, encode, run_dealer, simulate  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "mpc.json"


from _machine import cpu_model as _cpu_model  # noqa: E402


def measure(name: str, model: torch.nn.Module, size: int, batch: int, seed: int = 0) -> dict:
    model = model.eval()
    x = torch.rand(batch, 1, size, size, generator=Key(seed).generator())
    program = compile_module(model)
    weights, image = encode_weights(model, program), encode(x)

    def party(ctx):
        return encrypted_inference(ctx, program, tuple(x.shape), key=Key(seed).fold_in(ctx.rank),
                                   image=image if ctx.rank == 1 else None,
                                   weights=weights if ctx.rank == 0 else None)

    t0, c0 = time.perf_counter(), time.process_time()
    run_dealer(party, Key(seed).fold_in(9))
    dealer_s, dealer_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    res = simulate(party, dealer_key=Key(seed).fold_in(9))
    total_s, total_cpu = time.perf_counter() - t0, time.process_time() - c0  # includes a second dealer run
    online_s = max(total_s - dealer_s, 1e-9)
    online_cpu = max(total_cpu - dealer_cpu, 1e-9)
    with torch.no_grad():
        model(x)
        t0 = time.perf_counter()
        ref = model(x).double()
        plain_s = time.perf_counter() - t0
    out = res.outputs[1]
    stats = res.stats[1]
    return {
        "model": name, "image": size, "batch": batch,
        "online_s_per_image": online_s / batch,
        "dealer_s_per_image": dealer_s / batch,
        "online_cpu_s_per_image": online_cpu / batch,
        "dealer_cpu_s_per_image": dealer_cpu / batch,
        "plain_s_per_image": plain_s / batch,
        "bytes_per_image": (stats.bytes_sent + stats.bytes_received) / batch,
        "dealer_bytes_per_image": sum(res.dealer_bytes) / batch,
        "rounds": stats.rounds,
        "max_abs_logit_error": float((decode(out.logits) - ref).abs().max()),
        "agreement": float((out.onehot.argmax(-1) == ref.argmax(-1)).double().mean()),
        "loadavg_1min": os.getloadavg()[0],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="SmallCNN 28² batch 1 only")
    p.add_argument("--run-dir", default=None, help="trained `dpfunc train` run for the SmallCNN rows")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--rows", default=None, help="comma list of model:size:batch, e.g. cnn:28:1,resnet18:64:1")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cnn = SmallCNN(key=Key(0))
    if args.run_dir:
        from dpfunc.mpc.cli import load_run_model

        cnn = load_run_model(args.run_dir)[1]
    if args.rows:
        rows = [(m, int(s), int(b)) for m, s, b in (r.split(":") for r in args.rows.split(","))]
    elif args.quick:
        rows = [("cnn", 28, 1)]
    else:
        rows = [("cnn", 28, 1), ("cnn", 28, 32), ("cnn", 64, 1), ("cnn", 64, 32), ("resnet18", 64, 1)]
    env = {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "python": platform.python_version(),
           "loadavg_at_start": os.getloadavg(),
           "mode": "two parties as threads of one process + dealer run before (see docstring)"}
    # warm-up (thread pools, allocator, lazy imports), discarded
    measure("warm-up", SmallCNN(key=Key(1), widths=(4, 8), groups=2), 12, 2)
    results = []
    for model_name, size, batch in rows:
        model = cnn if model_name == "cnn" else resnet18_gn(key=Key(0), input_size=size)
        row = measure(model_name, model, size, batch)
        results.append(row)
        print(json.dumps(row))
        OUT.parent.mkdir(parents=True, exist_ok=True)
        tmp = OUT.with_suffix(".tmp")
        tmp.write_text(json.dumps({"env": env, "rows": results}, indent=2))
        os.replace(tmp, OUT)
    print(f"\n{'model':<9}{'image':>6}{'batch':>6}{'online s/img':>13}{'CPU s/img':>10}{'dealer s/img':>13}{'plain s/img':>12}"
          f"{'MB/img':>9}{'dealer MB/img':>14}{'rounds':>7}{'max|Δlogit|':>12}")
    for r in results:
        print(f"{r['model']:<9}{r['image']:>6}{r['batch']:>6}{r['online_s_per_image']:>13.3f}{r['online_cpu_s_per_image']:>10.3f}{r['dealer_s_per_image']:>13.3f}"
              f"{r['plain_s_per_image']:>12.5f}{r['bytes_per_image'] / 1e6:>9.1f}{r['dealer_bytes_per_image'] / 1e6:>14.1f}"
              f"{r['rounds']:>7}{r['max_abs_logit_error']:>12.2e}")
    print(f"\n{env}\nload average now: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
