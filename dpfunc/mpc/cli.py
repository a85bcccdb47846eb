"""``dpfunc infer RUN_DIR [--encrypted]``: plaintext or encrypted inference of a trained run.

With ``--encrypted`` the command starts three OS processes on this machine (model owner, data
owner, dealer; :mod:`dpfunc.mpc.parties`) over gloo on localhost, classifies ``--limit`` images of
``--split``, and writes ``RUN_DIR/encrypted_inference.json`` with the agreement with the plaintext
predictions, the maximal logit error, seconds, bytes and rounds per image, and the plaintext
figures. This command plays both owners for the evaluation (it reads the weights and the images to
hand each process its own file and to compute the plaintext reference); the processes themselves
see only their own inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch

__all__ = ["add_parser", "run", "load_run_model"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("infer", help="classify images with a run's model, in plaintext or encrypted (2 parties + dealer)")
    p.add_argument("run_dir", help="a folder written by `dpfunc train`")
    p.add_argument("--encrypted", action="store_true",
                   help="secret-shared inference: model owner, data owner and dealer as three processes")
    p.add_argument("--split", choices=["train", "val", "test"], default="test", help="which images")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="first N images of the split (default: all)")
    p.add_argument("--batch-size", type=int, default=32, help="images per encrypted batch")
    p.add_argument("--data-dir", default=None, help="folder holding pneumoniamnist.npz (default: $DPFUNC_DATA)")
    p.add_argument("--port", type=int, default=0, help="rendezvous port on localhost (0: a free one)")
    p.add_argument("--timeout", type=float, default=3600.0, help="hard limit in seconds for the parties")
    from dpfunc.cli import add_compute_arguments

    add_compute_arguments(p, help="where the plaintext model runs (auto = the GPU when CUDA is available). "
                                  "--encrypted computes on the CPU only (the parties talk over gloo; an explicit cuda "
                                  "device is refused), and so does its plaintext reference")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def load_run_model(run_dir: str):
    """``(config, module with the run's best parameters, model kwargs)`` of a run folder (on the CPU, whatever
    device trained it)."""
    from dpfunc.keys import Key
    from dpfunc.models import build_model
    from dpfunc.train import load_run

    cfg, state = load_run(run_dir)
    kwargs = {"input_size": cfg.image_size} if cfg.model == "resnet18" else {}
    module = build_model(cfg.model, key=Key(cfg.seed).split(4)[0], **kwargs)
    module.load_state_dict({k: v for k, v in state["best_params"].items()}, strict=True)
    return cfg, module.eval(), kwargs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace) -> int:
    from dpfunc.data import pneumoniamnist
    from dpfunc.metrics import binary_metrics

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be an integer >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be an integer >= 1, got {args.batch_size}")
    from dpfunc.cli import CommandError, compute_device
    from dpfunc.devices import describe_device, to_device

    if args.encrypted and args.device.startswith("cuda"):
        raise CommandError(f"--encrypted computes on the CPU (the three parties exchange shares over gloo), so "
                           f"--device {args.device} does not apply; drop --device or use --device cpu")
    device = compute_device(args)  # --threads; refuse a device this machine lacks, before anything is read
    if args.encrypted:
        device = torch.device("cpu")  # auto: the plaintext reference on the parties' arithmetic device
    cfg, module, kwargs = load_run_model(args.run_dir)
    data = pneumoniamnist(args.split, args.data_dir, size=cfg.image_size)
    n = len(data) if args.limit is None else min(args.limit, len(data))
    images, labels = data.images[:n], data.labels[:n]
    t0 = time.perf_counter()
    with torch.no_grad():
        plain_logits = module.to(device)(to_device(images, device)).double().cpu()
    plain_seconds = time.perf_counter() - t0  # on CUDA: includes the upload and the read-back
    module.cpu()
    plain_pred = plain_logits.argmax(-1)
    plain_scores = torch.softmax(plain_logits, -1)[:, 1]
    plain = {"accuracy": float((plain_pred == labels).double().mean()),
             "auc": binary_metrics(labels, plain_scores).roc_auc,
             "seconds_per_image": plain_seconds / n, "device": describe_device(device)}
    if not args.encrypted:
        print(json.dumps({"images": n, "split": args.split, "plaintext": plain}, indent=2))
        return 0

    from dpfunc.mpc.parties import launch_parties
    from dpfunc.mpc.ring import decode

    b = min(args.batch_size, n)
    batches = -(-n // b)
    spec = {"model": cfg.model, "model_kwargs": kwargs, "input_shape": [b] + list(images.shape[1:]),
            "batches": batches, "fractional_bits": 16}
    with tempfile.TemporaryDirectory(prefix="dpfunc-infer-") as tmp:
        w_path, x_path, o_path = (os.path.join(tmp, f) for f in ("weights.pt", "images.pt", "out.pt"))
        torch.save(module.state_dict(), w_path)
        torch.save(images, x_path)
        if not args.quiet:
            print(f"dpfunc infer: {n} images in {batches} batch(es) of {b}; starting model owner, data owner, dealer")
        t0 = time.perf_counter()
        out = launch_parties(spec=spec, weights_path=w_path, images_path=x_path, out_path=o_path,
                             port=args.port or _free_port(), timeout=args.timeout)
        wall = time.perf_counter() - t0
    logits = decode(out["logits"][:n])
    pred = out["onehot"][:n].argmax(-1)
    scores = torch.softmax(logits, -1)[:, 1]
    stats = out["stats"]
    result = {
        "images": n,
        "split": args.split,
        "model": cfg.model,
        "batch_size": b,
        "agreement": float((pred == plain_pred).double().mean()),
        "max_abs_logit_error": float((logits - plain_logits).abs().max()),
        "accuracy": float((pred == labels).double().mean()),
        "auc": binary_metrics(labels, scores).roc_auc,
        "seconds_per_image": sum(out["online_seconds"]) / n,
        "wall_seconds_per_image": wall / n,
        "bytes_per_image": (stats["bytes_sent"] + stats["bytes_received"]) / n,
        "dealer_bytes_per_image": (out["offline_bytes_received"] - out["setup_offline_bytes_received"]) / n,
        "rounds": stats["rounds"] // batches,
        "setup": {"seconds": out["setup_seconds"], "rounds": out["setup_stats"]["rounds"],
                  "bytes": out["setup_stats"]["bytes_sent"] + out["setup_stats"]["bytes_received"],
                  "dealer_bytes": 2 * out["setup_offline_bytes_received"],
                  "reuse_weight_masks": out["reuse_weight_masks"]},
        "max_rss_bytes": out["max_rss_bytes"],
        "fractional_bits": out["fractional_bits"],
        "plaintext": plain,
        "notes": ("seconds_per_image: online phase of the data owner (sum over batches / images, waits for "
                  "the streamed dealer material included); bytes_per_image: data owner's bytes sent + "
                  "received between the two parties; dealer_bytes_per_image: corrections the dealer sends the "
                  "data owner (seeded shares: each party expands the rest from a seed; the model owner "
                  "receives only its 40-byte seed header); rounds: per batch; setup: once per session (weights shared and "
                  "masked once); max_rss_bytes: peak resident memory of each process"),
    }
    path = Path(args.run_dir) / "encrypted_inference.json"
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(result, indent=2))
    os.replace(tmp_path, path)
    print(json.dumps(result, indent=2))
    return 0
