"""Three OS processes over ``torch.distributed`` (gloo): model owner, data owner, dealer.

Each process is started with its rank, the rendezvous address and port, and only what that party
may know:

* rank 0, model owner: the architecture and the weights file;
* rank 1, data owner: the architecture and the images file; it writes the revealed outputs;
* rank 2, dealer: the architecture, the input shape and the number of batches — no weights, no
  images. It generates all correlated randomness from its own seed, sends each party its share of a
  batch's material, and never receives a message.

The same command runs across machines (``--addr`` the model owner's host, one port open).

What gloo does not give: no TLS, no authentication of peers — anyone who can reach the port can
join the rendezvous, and traffic is readable on the wire. Shares and masked openings are uniformly
random to an eavesdropper of *one* link, but an eavesdropper of both directions of the party link
plus the dealer's links can reconstruct everything. Across hospitals run it inside an encrypted,
authenticated tunnel (WireGuard, or SSH port forwarding of the rendezvous port, e.g.
``ssh -N -L 29500:localhost:29500 model-owner-host``, with gloo's ``GLOO_SOCKET_IFNAME`` on the
tunnel interface) or behind a mutual-TLS proxy (stunnel/ghostunnel). Such a transport is not part
of dpfunc.

Command line (one per party)::

    python -m dpfunc.mpc.parties --role dealer --addr 127.0.0.1 --port 29500 --spec spec.json --seed 7
    python -m dpfunc.mpc.parties --role model-owner ... --spec spec.json --weights w.pt --seed 11
    python -m dpfunc.mpc.parties --role data-owner  ... --spec spec.json --images x.pt --out out.pt --seed 13

``spec.json``: ``{"model": "cnn" | "resnet18", "model_kwargs": {...}, "input_shape": [B, C, H, W],
"batches": n, "fractional_bits": 16}`` (public).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from dpfunc.keys import Key
from dpfunc.mpc.context import DATA_OWNER, DEALER, MODEL_OWNER, CommStats, Context, MaterialStream
from dpfunc.mpc.ring import FixedPoint, encode
from dpfunc.mpc.simulation import run_dealer

__all__ = ["DistChannel", "ROLES", "build_public_model", "run_party", "launch_parties", "main"]

ROLES = {"model-owner": MODEL_OWNER, "data-owner": DATA_OWNER, "dealer": DEALER}


class DistChannel:
    """The link between ranks 0 and 1 over an initialised ``torch.distributed`` (gloo) group."""

    def __init__(self, peer: int):
        self.peer = peer

    def exchange(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        tensor = tensor.contiguous()
        work = dist.isend(tensor, self.peer)
        other = torch.empty_like(tensor)
        dist.recv(other, self.peer)
        work.wait()
        return other

    def send(self, tensor: torch.Tensor) -> None:
        import torch.distributed as dist

        dist.send(tensor.contiguous(), self.peer)

    def recv(self, like: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = torch.empty_like(like)
        dist.recv(out, self.peer)
        return out


def build_public_model(spec: dict):
    """The architecture from the public spec, with throw-away weights (key 0): what the dealer sees."""
    from dpfunc.models import build_model

    return build_model(spec["model"], key=Key(0), **spec.get("model_kwargs", {})).eval()


def run_party(role: str, *, addr: str, port: int, spec: dict, seed: int, timeout: float = 300.0,
              weights_path: Optional[str] = None, images_path: Optional[str] = None,
              out_path: Optional[str] = None) -> None:
    """Run one party to completion (blocks); see the module docstring."""
    import torch.distributed as dist

    from dpfunc.bridge.mpc import compile_module, encode_weights, encrypted_inference

    if role not in ROLES:
        raise ValueError(f"run_party: role must be one of {sorted(ROLES)}, got {role!r}")
    rank = ROLES[role]
    fp = FixedPoint(int(spec.get("fractional_bits", 16)))
    shape = tuple(int(v) for v in spec["input_shape"])
    batches = int(spec["batches"])
    model = build_public_model(spec)
    weights = None
    if rank == MODEL_OWNER:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    program = compile_module(model)
    if rank == MODEL_OWNER:
        weights = encode_weights(model, program, fp)
    images = torch.load(images_path, map_location="cpu", weights_only=True) if rank == DATA_OWNER else None
    key = Key(seed)
    dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=rank, world_size=3,
                            timeout=timedelta(seconds=timeout))
    try:
        stats, outputs, times = CommStats(), [], []
        offline_bytes = 0
        for b in range(batches):
            batch_key = key.fold_in(b)
            if rank == DEALER:
                def program_fn(ctx):
                    return encrypted_inference(ctx, program, shape, key=batch_key)
                source = run_dealer(program_fn, batch_key, fp)
                for party in (MODEL_OWNER, DATA_OWNER):
                    flat = source.flat(party)
                    dist.send(torch.tensor([flat.numel()], dtype=torch.int64), party)
                    dist.send(flat, party)
                continue
            n = torch.zeros(1, dtype=torch.int64)
            dist.recv(n, DEALER)
            flat = torch.empty(int(n), dtype=torch.uint8)
            dist.recv(flat, DEALER)
            offline_bytes += flat.numel()
            ctx = Context(rank, DistChannel(1 - rank), MaterialStream(flat), fp, stats)
            img = None
            if rank == DATA_OWNER:
                x = images[b * shape[0] : (b + 1) * shape[0]]
                if x.shape[0] < shape[0]:  # pad the last batch (public: the batch size)
                    x = torch.cat([x, x.new_zeros((shape[0] - x.shape[0],) + tuple(x.shape[1:]))])
                img = encode(x, fp)
            t0 = time.perf_counter()
            out = encrypted_inference(ctx, program, shape, key=batch_key, image=img, weights=weights)
            times.append(time.perf_counter() - t0)
            if not ctx.source.exhausted:
                raise RuntimeError(f"run_party: {role} did not consume all of the dealer's material")
            if out is not None:
                outputs.append(out)
        if rank == DATA_OWNER and out_path:
            tmp = Path(out_path).with_suffix(".tmp")
            torch.save({
                "logits": torch.cat([o.logits for o in outputs]),
                "onehot": torch.cat([o.onehot for o in outputs]),
                "online_seconds": times,
                "stats": stats.to_dict(),
                "offline_bytes_received": offline_bytes,
                "fractional_bits": fp.fractional_bits,
            }, tmp)
            os.replace(tmp, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def launch_parties(*, spec: dict, weights_path: str, images_path: str, out_path: str, port: int,
                   addr: str = "127.0.0.1", timeout: float = 600.0, seeds: Sequence[int] = (11, 13, 7),
                   threads: int = 1) -> dict[str, Any]:
    """Start the three parties as separate OS processes on this machine, wait, and clean up.

    Each process runs in its own session; all are killed (process group SIGKILL) if any fails or
    the hard ``timeout`` passes. Returns the data owner's output file's contents.

    Raises:
        RuntimeError: a party exited with an error (its stderr tail is in the message).
        TimeoutError: the parties did not finish within ``timeout`` seconds.
    """
    spec_path = Path(out_path).with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec))
    common = ["--addr", addr, "--port", str(port), "--spec", str(spec_path), "--timeout", str(timeout)]
    argv = {
        "dealer": common + ["--seed", str(seeds[2])],
        "model-owner": common + ["--seed", str(seeds[0]), "--weights", weights_path],
        "data-owner": common + ["--seed", str(seeds[1]), "--images", images_path, "--out", out_path],
    }
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    procs: dict[str, subprocess.Popen] = {}
    try:
        for role in ("model-owner", "data-owner", "dealer"):
            procs[role] = subprocess.Popen(
                [sys.executable, "-m", "dpfunc.mpc.parties", "--role", role] + argv[role],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, env=env,
            )
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs.values()):
            failed = [r for r, p in procs.items() if p.poll() not in (None, 0)]
            if failed:
                p = procs[failed[0]]
                err = p.stderr.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"launch_parties: the {failed[0]} process failed with exit code "
                                   f"{p.returncode} (negative: killed by that signal, e.g. -9 by the OOM killer):\n{err}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"launch_parties: the parties did not finish within {timeout}s")
            time.sleep(0.05)
        for role, p in procs.items():
            if p.returncode != 0:
                err = p.stderr.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"launch_parties: the {role} process failed:\n{err}")
        return torch.load(out_path, map_location="cpu", weights_only=True)
    finally:
        for p in procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()
            if p.stderr:
                p.stderr.close()
        spec_path.unlink(missing_ok=True)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dpfunc.mpc.parties", description=__doc__.split("\n\n")[0])
    p.add_argument("--role", choices=sorted(ROLES), required=True)
    p.add_argument("--addr", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--spec", required=True, help="public JSON spec (architecture, input shape, batches)")
    p.add_argument("--seed", type=int, required=True, help="this party's own seed")
    p.add_argument("--timeout", type=float, default=300.0, help="gloo timeout in seconds")
    p.add_argument("--weights", help="model owner: state dict file (torch.save)")
    p.add_argument("--images", help="data owner: float tensor file (N, C, H, W)")
    p.add_argument("--out", help="data owner: output file")
    a = p.parse_args(argv)
    spec = json.loads(Path(a.spec).read_text())
    run_party(a.role, addr=a.addr, port=a.port, spec=spec, seed=a.seed, timeout=a.timeout,
              weights_path=a.weights, images_path=a.images, out_path=a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
