"""Encrypted inference benchmark: seconds, bytes and rounds per image, beside plaintext.

The dealer and both parties run as three threads of one process (the same code as the three-process
deployment, with in-process channels; the dealer streams its material while the parties compute).
Each session first shares and masks the weights once (not timed), then runs one batch:

* ``online_s_per_image``: wall time of the batch (the slower party) / batch size — on a loaded
  machine this is mostly waiting for a core;
* ``cpu_s_per_image_party0`` / ``_party1`` / ``_parties``: CPU seconds of each party's thread (and
  their sum) in that batch / batch size (``time.thread_time``; with ``--threads 1`` torch runs in the
  calling thread, so this is the party's whole work). Steadier than wall time under load: on an idle
  2-core machine with the dealer's work done beforehand the wall time lies between half the sum and
  the sum;
* ``dealer_cpu_s_per_image``: CPU seconds of the dealer's thread (setup included) / batch size;
* ``bytes_per_image``: bytes one party sends plus receives from the other in the batch / batch size;
* ``dealer_bytes_per_image``: material the dealer sends to both parties for the batch / batch size
  (seeded shares: only the data owner's corrections; ``setup_dealer_bytes``: the two 40-byte
  headers with each party's seed — the weight masks are expanded from the seeds);
* ``rounds``: communication rounds of the batch (independent of the batch size below 2^20 compared
  elements);
* ``peak_material_bytes``: the most dealer material held at once for one party (streamed chunks);
* ``plain_s_per_image``: the same model in plain torch (float32), same batch.

Reference figures (issue 15): CrypTen, 2 parties on this 2-core machine: small CNN at 64² 0.18
s/image, ResNet-18 at 64² 1.51 s/image; PriMIA ~100 s per 224² image.

Usage::

    python bench/mpc.py --threads 1           # SmallCNN 28² and 64², ResNet-18-GN 64², batch 1 and 32
    python bench/mpc.py --quick               # SmallCNN only, batch 1
    python bench/mpc.py --run-dir runs/cnn-eps3.0-seed0   # trained weights for the SmallCNN rows
    python bench/mpc.py --threads 1 --processes cnn:64:1:16,cnn:64:32:2,resnet18:64:1:4
        # the real deployment: three OS processes (gloo rendezvous and dealer stream, the parties'
        # messages over TCP), wall time per image (mpc_processes.json)
    python bench/mpc.py --threads 1 --processes cnn:64:1:16 --party-link tcp,gloo --repeats 2
        # the parties' link over TCP and over gloo, interleaved (A/B on a loaded machine)

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

from dpfunc.bridge.mpc import compile_module, encode_weights, encrypted_inference, share_model  # noqa: E402
from dpfunc.keys import Key  # noqa: E402
from dpfunc.models import SmallCNN, resnet18_gn  # noqa: E402
from dpfunc.mpc import DEALER, CommStats, decode, encode, simulate  # noqa: E402
from dpfunc.mpc.context import HEADER_BYTES  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "mpc.json"


from _machine import cpu_model as _cpu_model  # noqa: E402


def measure(name: str, model: torch.nn.Module, size: int, batch: int, seed: int = 0) -> dict:
    model = model.eval()
    x = torch.rand(batch, 1, size, size, generator=Key(seed).generator())
    program = compile_module(model)
    weights, image = encode_weights(model, program), encode(x)
    clocks: dict[int, tuple[float, float]] = {}
    stats: dict[int, CommStats] = {}
    setup_material: dict[int, int] = {}

    def party(ctx):
        # the session's setup (weights shared and masked once), then the batch that is timed
        shared = share_model(ctx, program, weights if ctx.rank == 0 else None, key=Key(seed).fold_in(ctx.rank))
        before = CommStats(**ctx.stats.to_dict())
        t0, c0 = time.perf_counter(), time.thread_time()
        setup_material[ctx.rank] = HEADER_BYTES  # the dealer's header; masks are expanded from the seed
        out = encrypted_inference(ctx, program, tuple(x.shape), key=Key(seed).fold_in(10 + ctx.rank),
                                  image=image if ctx.rank == 1 else None, model=shared)
        clocks[ctx.rank] = (time.perf_counter() - t0, time.thread_time() - c0)
        stats[ctx.rank] = CommStats(**{k: v - before.to_dict()[k] for k, v in ctx.stats.to_dict().items()})
        return out

    res = simulate(party, dealer_key=Key(seed).fold_in(9), timeout=3600)
    with torch.no_grad():
        model(x)
        t0 = time.perf_counter()
        ref = model(x).double()
        plain_s = time.perf_counter() - t0
    out = res.outputs[1]
    st = stats[1]
    return {
        "model": name, "image": size, "batch": batch,
        "online_s_per_image": max(clocks[0][0], clocks[1][0]) / batch,
        "cpu_s_per_image_party0": clocks[0][1] / batch,
        "cpu_s_per_image_party1": clocks[1][1] / batch,
        "cpu_s_per_image_parties": (clocks[0][1] + clocks[1][1]) / batch,
        "dealer_cpu_s_per_image": clocks[DEALER][1] / batch,
        "plain_s_per_image": plain_s / batch,
        "bytes_per_image": (st.bytes_sent + st.bytes_received) / batch,
        "dealer_bytes_per_image": (sum(res.dealer_bytes) - setup_material[0] - setup_material[1]) / batch,
        "setup_dealer_bytes": setup_material[0] + setup_material[1],  # the two headers (seeds)
        "rounds": st.rounds,
        "peak_material_bytes": max(res.peak_material_bytes),
        "max_abs_logit_error": float((decode(out.logits) - ref).abs().max()),
        "agreement": float((out.onehot.argmax(-1) == ref.argmax(-1)).double().mean()),
        "loadavg_1min": os.getloadavg()[0],
    }


def measure_processes(name: str, size: int, batch: int, batches: int, seed: int = 0, run_dir: str | None = None,
                      threads: int = 1, link: str = "tcp") -> dict:
    """The real deployment: model owner, data owner and dealer as three OS processes (gloo rendezvous
    and dealer stream; the parties' per-round messages over ``link``: ``"tcp"`` or ``"gloo"``) on
    localhost (:func:`dpfunc.mpc.parties.launch_parties`), ``batches`` batches of ``batch`` images.

    ``wall_s_per_image``: the data owner's online time over all batches / images (the three processes
    share the machine's cores, so this is what a user waits per image once the session is set up;
    the dealer streams its material meanwhile). ``command_wall_s_per_image``: the whole launch
    (process start, imports, rendezvous, sharing and masking the weights, all batches) / images.
    """
    import socket
    import tempfile

    from dpfunc.mpc.parties import launch_parties

    kwargs = {"input_size": size} if name == "resnet18" else {}
    if run_dir:
        from dpfunc.mpc.cli import load_run_model

        _, model, kwargs = load_run_model(run_dir)
    else:
        model = (SmallCNN(key=Key(0)) if name == "cnn" else resnet18_gn(key=Key(0), **kwargs)).eval()
    n = batch * batches
    x = torch.rand(n, 1, size, size, generator=Key(seed).generator())
    spec = {"model": name, "model_kwargs": kwargs, "input_shape": [batch, 1, size, size], "batches": batches,
            "party_link": link}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="dpfunc-bench-mpc-") as tmp:
        w_path, x_path, o_path = (os.path.join(tmp, f) for f in ("w.pt", "x.pt", "out.pt"))
        torch.save(model.state_dict(), w_path)
        torch.save(x, x_path)
        t0 = time.perf_counter()
        out = launch_parties(spec=spec, weights_path=w_path, images_path=x_path, out_path=o_path, port=port,
                             timeout=900, threads=threads)
        command_wall = time.perf_counter() - t0
    with torch.no_grad():
        model(x[:batch])
        t0 = time.perf_counter()
        ref = model(x).double()
        plain_s = time.perf_counter() - t0
    st = out["stats"]
    online = out["online_seconds"]
    return {
        "model": name, "image": size, "batch": batch, "batches": batches, "party_link": link,
        "mode": f"3 processes (gloo rendezvous and dealer; parties' link {link})",
        "wall_s_per_image": sum(online) / n,
        "wall_s_per_image_median_batch": sorted(online)[len(online) // 2] / batch,
        "wall_s_per_image_best_batch": min(online) / batch,
        "command_wall_s_per_image": command_wall / n,
        "setup_s": out["setup_seconds"],
        "plain_s_per_image": plain_s / n,
        "bytes_per_image": (st["bytes_sent"] + st["bytes_received"]) / n,
        "dealer_bytes_per_image": (out["offline_bytes_received"] - out["setup_offline_bytes_received"]) / n,
        "rounds": st["rounds"] // batches,
        "max_rss_bytes": out["max_rss_bytes"],
        "process_cpu_s": out["cpu_seconds"],
        "max_abs_logit_error": float((decode(out["logits"]) - ref).abs().max()),
        "agreement": float((out["onehot"].argmax(-1) == ref.argmax(-1)).double().mean()),
        "loadavg_1min": os.getloadavg()[0],
    }


def _write_rows(path: Path, env: dict, rows: list) -> None:
    """The results so far, written atomically (a crash mid-bench keeps the finished rows)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    os.replace(tmp, path)


def main_processes(args) -> int:
    rows = [(m, int(s), int(b), int(k)) for m, s, b, k in (r.split(":") for r in args.processes.split(","))]
    out_path = Path(args.out if args.out != str(OUT) else OUT.with_name("mpc_processes.json"))
    env = {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads_per_process": args.threads,
           "python": platform.python_version(), "loadavg_at_start": os.getloadavg(),
           "mode": "model owner, data owner, dealer as three OS processes on localhost (launch_parties): gloo "
                   "rendezvous and dealer stream, the parties' link per row"}
    results = []
    links = args.party_link.split(",")
    if not links or any(link not in ("tcp", "gloo") for link in links) or args.repeats < 1:
        raise SystemExit(f"bench/mpc.py: --party-link must be tcp, gloo or tcp,gloo and --repeats >= 1, "
                         f"got {args.party_link!r} and {args.repeats}")
    for name, size, batch, batches in rows:
        for _ in range(args.repeats):
            for link in links:  # interleaved: A/B on the same (loaded) machine
                row = measure_processes(name, size, batch, batches, run_dir=args.run_dir if name == "cnn" else None,
                                        threads=args.threads, link=link)
                results.append(row)
                print(json.dumps(row), flush=True)
                _write_rows(out_path, env, results)
    print(f"\n{'model':<9}{'image':>6}{'batch':>6}{'batches':>8}{'link':>5}{'wall s/img':>11}{'best batch':>11}{'command s/img':>14}"
          f"{'plain s/img':>12}{'MB/img':>8}{'dealer MB/img':>14}{'rounds':>7}{'agree':>6}{'max|Δlogit|':>12}")
    for r in results:
        print(f"{r['model']:<9}{r['image']:>6}{r['batch']:>6}{r['batches']:>8}{r['party_link']:>5}{r['wall_s_per_image']:>11.3f}"
              f"{r['wall_s_per_image_best_batch']:>11.3f}{r['command_wall_s_per_image']:>14.3f}{r['plain_s_per_image']:>12.5f}"
              f"{r['bytes_per_image'] / 1e6:>8.1f}{r['dealer_bytes_per_image'] / 1e6:>14.1f}{r['rounds']:>7}"
              f"{r['agreement']:>6.2f}{r['max_abs_logit_error']:>12.2e}")
    print(f"\n{env}\nload average now: {os.getloadavg()}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="SmallCNN 28² batch 1 only")
    p.add_argument("--run-dir", default=None, help="trained `dpfunc train` run for the SmallCNN rows")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--out", default=str(OUT), help="JSON file for the rows")
    p.add_argument("--rows", default=None, help="comma list of model:size:batch, e.g. cnn:28:1,resnet18:64:1")
    p.add_argument("--processes", default=None, metavar="ROWS",
                   help="three real processes (gloo, TCP party link) instead of threads: comma list of model:size:batch:batches, "
                        "e.g. cnn:64:1:8,cnn:64:32:2,resnet18:64:1:4 (writes bench/results/mpc_processes.json)")
    p.add_argument("--party-link", default="tcp",
                   help="with --processes: the parties' link, tcp or gloo, or tcp,gloo to run each row with both "
                        "(interleaved)")
    p.add_argument("--repeats", type=int, default=1, help="with --processes: run each row (and link) this many times")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.processes:
        return main_processes(args)
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
           "mode": "dealer and two parties as threads of one process, dealer streaming (see docstring)"}
    # warm-up (thread pools, allocator, lazy imports), discarded
    measure("warm-up", SmallCNN(key=Key(1), widths=(4, 8), groups=2), 12, 2)
    results = []
    for model_name, size, batch in rows:
        model = cnn if model_name == "cnn" else resnet18_gn(key=Key(0), input_size=size)
        row = measure(model_name, model, size, batch)
        results.append(row)
        print(json.dumps(row))
        out_path = Path(args.out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        _write_rows(out_path, env, results)
    print(f"\n{'model':<9}{'image':>6}{'batch':>6}{'wall s/img':>11}{'CPU s/img P0+P1':>16}{'dealer CPU s/img':>17}"
          f"{'plain s/img':>12}{'MB/img':>9}{'dealer MB/img':>14}{'rounds':>7}{'max|Δlogit|':>12}")
    for r in results:
        print(f"{r['model']:<9}{r['image']:>6}{r['batch']:>6}{r['online_s_per_image']:>11.3f}"
              f"{r['cpu_s_per_image_party0']:>8.3f}+{r['cpu_s_per_image_party1']:<7.3f}{r['dealer_cpu_s_per_image']:>17.3f}"
              f"{r['plain_s_per_image']:>12.5f}{r['bytes_per_image'] / 1e6:>9.1f}{r['dealer_bytes_per_image'] / 1e6:>14.1f}"
              f"{r['rounds']:>7}{r['max_abs_logit_error']:>12.2e}")
    print(f"\n{env}\nload average now: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
