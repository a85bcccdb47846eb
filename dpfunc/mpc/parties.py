"""Three OS processes over ``torch.distributed`` (gloo): model owner, data owner, dealer.

Each process is started with its rank, the rendezvous address and port, and only what that party
may know:

* rank 0, model owner: the architecture and the weights file;
* rank 1, data owner: the architecture and the images file; it writes the revealed outputs;
* rank 2, dealer: the architecture, the input shape and the number of batches — no weights, no
  images. It generates all correlated randomness from its own key: each party expands its shares
  from a seed the dealer sends it first (:func:`dpfunc.mpc.context.deal`), and the dealer streams
  the data owner only the corrections, in chunks while the parties compute (at most one chunk ahead:
  memory bounded by a few chunks, not by the batch's material); it never receives a message.

The same command runs across machines (``--addr`` the model owner's host; open the rendezvous port
and, for the parties' link, ``--party-port`` on the model owner's host).

**Links.** The rendezvous and the dealer's streamed material go over gloo. The per-round messages
between the two computing parties (~130 rounds per SmallCNN inference) go by default over one
direct TCP connection (:class:`SocketChannel`, :func:`connect_party_link`): gloo's send/recv cost
0.6–3 ms wall and up to ~2 ms CPU per round on this 2-core machine, the socket ~0.13 ms and
~25 µs. ``"party_link": "gloo"`` in the spec keeps the parties' messages on gloo as well (same
results bit for bit: the link only moves bytes).

What gloo (and the parties' TCP link) does not give: no TLS, no authentication of peers — anyone who can reach the port can
join the rendezvous, and traffic is readable on the wire. Shares and masked openings are uniformly
random to an eavesdropper of *one* link, but an eavesdropper of both directions of the party link
plus the dealer's links can reconstruct everything. Across hospitals run it inside an encrypted,
authenticated tunnel (WireGuard, or SSH port forwarding of the rendezvous port, e.g.
``ssh -N -L 29500:localhost:29500 model-owner-host``, with gloo's ``GLOO_SOCKET_IFNAME`` on the
tunnel interface) or behind a mutual-TLS proxy (stunnel/ghostunnel). Such a transport is not part
of dpfunc.

Command line (one per party)::

    python -m dpfunc.mpc.parties --role dealer --addr 127.0.0.1 --port 29500 --spec spec.json
    python -m dpfunc.mpc.parties --role model-owner ... --spec spec.json --weights w.pt
    python -m dpfunc.mpc.parties --role data-owner  ... --spec spec.json --images x.pt --out out.pt

Each party draws its own 256-bit key from OS entropy in its own process (:func:`party_key`; it keys
the party's AES-256-CTR generator and never leaves the process). ``--seed`` only reproduces a run: a key
made from a seed is NOT secret (a party whose seed another knows can have its masks regenerated).

``spec.json``: ``{"model": "cnn" | "resnet18", "model_kwargs": {...}, "input_shape": [B, C, H, W],
"batches": n, "fractional_bits": 16, "chunk_bytes": 8388608, "reuse_weight_masks": true,
"comparison_bits": 32, "party_link": "tcp", "dealer_replay": true}`` (public; the last six optional;
``comparison_bits``: see :func:`dpfunc.bridge.mpc.encrypted_inference`; ``party_link``: ``"tcp"`` or
``"gloo"``, see above; ``dealer_replay``: the dealer runs the program for the first batch only and
replays its requests for the others, :meth:`~dpfunc.mpc.context.DealerSource.replay`).
"""

from __future__ import annotations

import argparse
import enum
import gc
import json
import os
import select
import socket
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from dpfunc.keys import Key
from dpfunc.mpc.context import (
    DATA_OWNER,
    DEALER,
    DEFAULT_CHUNK_BYTES,
    HEADER_BYTES,
    MODEL_OWNER,
    CommStats,
    Context,
    DealerSource,
    MaterialStream,
)
from dpfunc.mpc.prg import StreamKey
from dpfunc.mpc.ring import FixedPoint, encode

__all__ = ["DistChannel", "SocketChannel", "PartyLink", "connect_party_link", "ROLES", "build_public_model", "party_key", "party_argv", "run_party", "launch_parties", "main"]

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


class PartyLink(enum.Enum):
    """Transport of the per-round messages between the model owner and the data owner."""

    TCP = "tcp"  # one TCP connection, full-duplex non-blocking exchange in the calling thread (default)
    GLOO = "gloo"  # torch.distributed send/recv over the gloo group (the dealer's link in both cases)


_MAX_SEND = 1 << 22  # bytes offered to one send() call


class SocketChannel:
    """The link between ranks 0 and 1 as one TCP connection (the default party link).

    ``exchange`` sends this party's bytes and receives the other's at the same time, in the calling
    thread: a non-blocking socket, ``send``/``recv_into`` straight from and into the tensors' memory,
    ``select`` only when neither can progress (so a message of any size cannot deadlock on full
    socket buffers). Measured on this 2-core machine (load ≈ 1–4), a 16-element round: 0.12–0.14 ms
    wall and ≈ 25 µs CPU per party over this socket, 0.65–2.8 ms wall and 0.2–2 ms CPU (mostly system
    time: gloo's send/recv hand every message to its device thread and back) with gloo send/recv; an
    inference is ~130 such rounds. Message sizes are known to both parties (the program is public), so
    nothing is framed. Like gloo: no TLS, no authentication beyond the session token (see the module
    docstring for tunnels).

    Args:
        sock: a connected stream socket (made non-blocking here; ``TCP_NODELAY`` set).
        timeout: seconds one message may wait for the peer before ``TimeoutError``.
    """

    def __init__(self, sock: socket.socket, timeout: float = 300.0):
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each round's message goes out now
        self.sock, self.timeout = sock, timeout

    @staticmethod
    def _bytes(tensor: torch.Tensor) -> memoryview:
        return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())

    def _transfer(self, out: Optional[memoryview], into: Optional[memoryview]) -> None:
        sent, got = 0, 0
        n_out = 0 if out is None else len(out)
        n_in = 0 if into is None else len(into)
        deadline = time.monotonic() + self.timeout
        while sent < n_out or got < n_in:
            moved = False
            if sent < n_out:
                try:
                    sent += self.sock.send(out[sent : sent + _MAX_SEND])
                    moved = True
                except BlockingIOError:
                    pass
            if got < n_in:
                try:
                    k = self.sock.recv_into(into[got:])
                except BlockingIOError:
                    k = -1
                if k == 0:
                    raise ConnectionError("SocketChannel: the other party closed the connection mid-message")
                if k > 0:
                    got += k
                    moved = True
            if not moved:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"SocketChannel: no progress from the other party within {self.timeout}s")
                select.select([self.sock] if got < n_in else [], [self.sock] if sent < n_out else [], [], left)

    def exchange(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        other = torch.empty_like(tensor)
        if tensor.numel():
            self._transfer(self._bytes(tensor), self._bytes(other))
        return other

    def send(self, tensor: torch.Tensor) -> None:
        tensor = tensor.contiguous()
        if tensor.numel():
            self._transfer(self._bytes(tensor), None)

    def recv(self, like: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(like, memory_format=torch.contiguous_format)
        if out.numel():
            self._transfer(None, self._bytes(out))
        return out

    def close(self) -> None:
        self.sock.close()


_TOKEN_BYTES = 32


def connect_party_link(rank: int, addr: str, party_port: int, timeout: float) -> SocketChannel:
    """Open the TCP link between the two computing parties, after ``torch.distributed`` is initialised.

    The model owner (rank 0) listens on ``addr:party_port`` (0: a free port) and sends the port and a
    fresh 32-byte session token to the data owner over gloo; the data owner connects and sends the
    token first, and the model owner accepts only a connection that presents it (so the socket's peer
    is the process that joined the rendezvous as rank 1 — no protection against an eavesdropper, as
    with gloo). Across machines give a fixed ``party_port`` (a second port to open or tunnel).
    """
    import secrets

    import torch.distributed as dist

    if rank == MODEL_OWNER:
        srv = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
        try:
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind((addr, party_port))
            srv.listen(4)
            srv.settimeout(timeout)
            token = secrets.token_bytes(_TOKEN_BYTES)
            msg = torch.tensor([srv.getsockname()[1]] + list(token), dtype=torch.int64)
            dist.send(msg, DATA_OWNER)
            deadline = time.monotonic() + timeout
            while True:
                srv.settimeout(max(deadline - time.monotonic(), 0.001))
                try:
                    conn, _ = srv.accept()
                except socket.timeout:
                    raise TimeoutError(f"connect_party_link: the data owner did not connect within {timeout}s") from None
                conn.settimeout(max(deadline - time.monotonic(), 0.001))
                try:
                    got = b""
                    while len(got) < _TOKEN_BYTES:
                        part = conn.recv(_TOKEN_BYTES - len(got))
                        if not part:
                            break
                        got += part
                except OSError:
                    got = b""
                if secrets.compare_digest(got, token):
                    return SocketChannel(conn, timeout)
                conn.close()  # not the data owner of this session: keep waiting
        finally:
            srv.close()
    msg = torch.zeros(1 + _TOKEN_BYTES, dtype=torch.int64)
    dist.recv(msg, MODEL_OWNER)
    port, token = int(msg[0]), bytes(int(v) for v in msg[1:])
    conn = socket.create_connection((addr, port), timeout=timeout)
    conn.sendall(token)
    return SocketChannel(conn, timeout)


def build_public_model(spec: dict):
    """The architecture from the public spec, with throw-away weights (key 0): what the dealer sees."""
    from dpfunc.models import build_model

    return build_model(spec["model"], key=Key(0), **spec.get("model_kwargs", {})).eval()


class _DealerLink:
    """The dealer's sink over gloo: each party's chunk goes out as a length header and the bytes
    (``isend``); before the next chunk to a party is sent, the previous one must have been received
    (gloo completes a send when the receiver takes it), so the dealer runs at most one chunk ahead
    and holds at most two chunks per party."""

    def __init__(self):
        self.pending: dict[int, list] = {MODEL_OWNER: [], DATA_OWNER: []}
        self._keep: dict[int, tuple] = {}

    def __call__(self, rank: int, chunk: Optional[torch.Tensor]) -> None:
        import torch.distributed as dist

        party = MODEL_OWNER if rank == 0 else DATA_OWNER
        for work in self.pending[party]:
            work.wait()
        header = torch.tensor([0 if chunk is None else chunk.numel()], dtype=torch.int64)
        works = [dist.isend(header, party)]
        if chunk is not None:
            works.append(dist.isend(chunk, party))
        self.pending[party] = works
        self._keep[party] = (header, chunk)  # alive until the sends complete

    def close(self) -> None:
        for works in self.pending.values():
            for work in works:
                work.wait()


def _receive_chunk() -> Optional[torch.Tensor]:
    """A party's next chunk from the dealer (``None``: the end of the dealer's stream)."""
    import torch.distributed as dist

    n = torch.zeros(1, dtype=torch.int64)
    dist.recv(n, DEALER)
    if int(n) == 0:
        return None
    chunk = torch.empty(int(n), dtype=torch.uint8)
    dist.recv(chunk, DEALER)
    return chunk


def party_key(seed: Optional[int] = None) -> StreamKey:
    """A party's 256-bit key: by default 32 bytes of this process's OS entropy; ``seed`` only to
    reproduce a run (:meth:`StreamKey.from_seed` — such a key is NOT secret).

    Every party's randomness (the dealer's correlated material, the owners' shares) is the AES-256-CTR
    keystream of this key (:class:`~dpfunc.mpc.prg.Keystream`), and a party that knows another's key
    can regenerate that party's masks and unmask its input: so by default each party draws its key
    inside its own process, and the key never leaves it (not in the command line, not in a message).

    Example:
        >>> len(party_key().raw), party_key() != party_key(), party_key(7) == party_key(7)
        (32, True, True)
    """
    if seed is None:
        return StreamKey.generate()
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"party_key: seed must be an int or None, got {seed!r}")
    return StreamKey.from_seed(seed)


def party_argv(*, addr: str, port: int, spec_path: str, timeout: float, weights_path: str, images_path: str,
               out_path: str, seeds: Optional[Sequence[int]] = None) -> dict[str, list[str]]:
    """Each role's command-line arguments for ``python -m dpfunc.mpc.parties``; with ``seeds=None`` no
    ``--seed`` is passed, so each party draws its own 256-bit key from OS entropy (:func:`party_key`)."""
    common = ["--addr", addr, "--port", str(port), "--spec", str(spec_path), "--timeout", str(timeout)]
    own = {"model-owner": [], "data-owner": [], "dealer": []}
    if seeds is not None:
        own = {"model-owner": ["--seed", str(seeds[0])], "data-owner": ["--seed", str(seeds[1])],
               "dealer": ["--seed", str(seeds[2])]}
    return {
        "dealer": common + own["dealer"],
        "model-owner": common + own["model-owner"] + ["--weights", weights_path],
        "data-owner": common + own["data-owner"] + ["--images", images_path, "--out", out_path],
    }


def run_party(role: str, *, addr: str, port: int, spec: dict, seed: Optional[int] = None, timeout: float = 300.0,
              weights_path: Optional[str] = None, images_path: Optional[str] = None,
              out_path: Optional[str] = None, party_port: int = 0) -> None:
    """Run one party to completion (blocks); see the module docstring.

    One session: the model owner shares its weights once and each conv/linear weight is masked once
    (``spec["reuse_weight_masks"]``, default true; :func:`dpfunc.bridge.mpc.share_model`), then the
    batches run. The dealer runs the same program alongside the parties and streams its material in
    chunks of ``spec["chunk_bytes"]`` (default :data:`~dpfunc.mpc.context.DEFAULT_CHUNK_BYTES`), so
    no process holds more than a few chunks of it.
    """
    import torch.distributed as dist

    from dpfunc.bridge.mpc import compile_module, encode_weights, encrypted_inference, share_model

    if role not in ROLES:
        raise ValueError(f"run_party: role must be one of {sorted(ROLES)}, got {role!r}")
    rank = ROLES[role]
    fp = FixedPoint(int(spec.get("fractional_bits", 16)))
    shape = tuple(int(v) for v in spec["input_shape"])
    batches = int(spec["batches"])
    chunk_bytes = int(spec.get("chunk_bytes", DEFAULT_CHUNK_BYTES))
    reuse = bool(spec.get("reuse_weight_masks", True))
    bits = int(spec.get("comparison_bits", 32))
    try:
        link_kind = PartyLink(spec.get("party_link", PartyLink.TCP.value))
    except ValueError:
        raise ValueError(f"run_party: spec['party_link'] must be one of {[k.value for k in PartyLink]}, "
                         f"got {spec.get('party_link')!r}") from None
    model = build_public_model(spec)
    weights = None
    if rank == MODEL_OWNER:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    program = compile_module(model)
    if rank == MODEL_OWNER:
        weights = encode_weights(model, program, fp)
    images = torch.load(images_path, map_location="cpu", weights_only=True) if rank == DATA_OWNER else None
    key = party_key(seed)  # None: 256 bits drawn here, from this process's OS entropy
    dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=rank, world_size=3,
                            timeout=timedelta(seconds=timeout))
    channel = None
    try:
        if rank != DEALER:
            channel = (connect_party_link(rank, addr, party_port, timeout) if link_kind is PartyLink.TCP
                       else DistChannel(1 - rank))
        if rank == DEALER:
            link = _DealerLink()
            source = DealerSource(key, sink=link, chunk_bytes=chunk_bytes)
            ctx = Context(DEALER, None, source, fp)
        else:
            ctx = Context(rank, channel, MaterialStream(next_chunk=_receive_chunk), fp, CommStats())
        t0 = time.perf_counter()
        shared = share_model(ctx, program, weights, key=key.fold_in(-1), reuse_masks=reuse)
        setup_seconds = time.perf_counter() - t0
        setup_stats = CommStats(**ctx.stats.to_dict())
        setup_material = HEADER_BYTES  # the dealer's header (seed, rank); the masks are expanded from the seed
        ctx.stats = CommStats()
        # the start-up objects (torch, numpy, the model: ~10^5-10^6) move to the permanent generation, so
        # the cyclic GC's occasional full collections during the batches no longer traverse them
        # (one took ~85 ms of a party's CPU in 16 SmallCNN 64² images, ~5 ms an image; the batches
        # themselves make few cycles). Nothing is collected or changed, only skipped by later scans.
        gc.freeze()
        outputs, times = [], []
        replay = None  # the dealer: batch 0's requests, replayed for the others (DealerSource.replay)
        for b in range(batches):
            if rank == DEALER and replay is not None:
                t0 = time.perf_counter()
                source.replay(replay)
                times.append(time.perf_counter() - t0)
                continue
            if rank == DEALER and b == 0 and spec.get("dealer_replay", True):
                source.record()
            img = None
            if rank == DATA_OWNER:
                x = images[b * shape[0] : (b + 1) * shape[0]]
                if x.shape[0] < shape[0]:  # pad the last batch (public: the batch size)
                    x = torch.cat([x, x.new_zeros((shape[0] - x.shape[0],) + tuple(x.shape[1:]))])
                img = encode(x, fp)
            t0 = time.perf_counter()
            out = encrypted_inference(ctx, program, shape, key=key.fold_in(b), image=img, model=shared,
                                      comparison_bits=bits)
            times.append(time.perf_counter() - t0)
            if rank == DEALER and b == 0:
                replay = source.stop_recording()
            if out is not None:
                outputs.append(out)
        if rank == DEALER:
            source.finish()
            link.close()
        elif not ctx.source.exhausted:
            raise RuntimeError(f"run_party: {role} did not consume all of the dealer's material")
        if rank == DATA_OWNER and out_path:
            tmp = Path(out_path).with_suffix(".tmp")
            torch.save({
                "logits": torch.cat([o.logits for o in outputs]),
                "onehot": torch.cat([o.onehot for o in outputs]),
                "online_seconds": times,
                "setup_seconds": setup_seconds,
                "stats": ctx.stats.to_dict(),
                "setup_stats": setup_stats.to_dict(),
                "offline_bytes_received": ctx.source.bytes_received,
                "setup_offline_bytes_received": setup_material,
                "fractional_bits": fp.fractional_bits,
                "reuse_weight_masks": reuse,
                "chunk_bytes": chunk_bytes,
            }, tmp)
            os.replace(tmp, out_path)
        dist.barrier()
    finally:
        if isinstance(channel, SocketChannel):
            channel.close()
        dist.destroy_process_group()


def launch_parties(*, spec: dict, weights_path: str, images_path: str, out_path: str, port: int,
                   addr: str = "127.0.0.1", timeout: float = 600.0, seeds: Optional[Sequence[int]] = None,
                   threads: int = 1) -> dict[str, Any]:
    """Start the three parties as separate OS processes on this machine, wait, and clean up.

    ``seeds`` (model owner, data owner, dealer) only to reproduce a run (NOT secret): by default each
    party draws its own 256-bit key from OS entropy inside its process (:func:`party_key`) — fixed seeds
    would let any party regenerate the others' masks.

    Each process runs in its own session; all are killed (process group SIGKILL) if any fails or
    the hard ``timeout`` passes. Returns the data owner's output file's contents, plus
    ``max_rss_bytes``: each process's peak resident memory and ``cpu_seconds`` its user + system CPU time
    (by role; each process's own ``VmHWM`` as it reports it at exit, where ``/proc`` has one, else ``wait4``'s
    ``ru_maxrss``, which on Linux includes the launcher's resident set inherited over ``fork``; start-up and
    imports included).

    Raises:
        RuntimeError: a party exited with an error (its stderr tail is in the message).
        TimeoutError: the parties did not finish within ``timeout`` seconds.
    """
    spec_path = Path(out_path).with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec))
    argv = party_argv(addr=addr, port=port, spec_path=str(spec_path), timeout=timeout, weights_path=weights_path,
                      images_path=images_path, out_path=out_path, seeds=seeds)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    procs: dict[str, subprocess.Popen] = {}
    max_rss: dict[str, int] = {}
    cpu: dict[str, float] = {}
    usage_paths = {role: Path(out_path).with_suffix(f".{role}.usage.json") for role in ("model-owner", "data-owner", "dealer")}

    def poll(role: str) -> Optional[int]:
        """``Popen.poll`` that also keeps the child's peak resident memory (``wait4``'s rusage)."""
        p = procs[role]
        if p.returncode is None:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                p.returncode = os.waitstatus_to_exitcode(status)
                max_rss[role] = usage.ru_maxrss * 1024  # kilobytes on Linux
                cpu[role] = usage.ru_utime + usage.ru_stime
        return p.returncode

    try:
        for role in ("model-owner", "data-owner", "dealer"):
            procs[role] = subprocess.Popen(
                [sys.executable, "-m", "dpfunc.mpc.parties", "--role", role] + argv[role]
                + ["--usage-out", str(usage_paths[role])],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                # WORLD_SIZE/RANK as torchrun would: run_and_exit then leaves by os._exit (gloo can SIGABRT
                # at interpreter teardown, even after destroy_process_group, and the exit code would be lost)
                env={**env, "WORLD_SIZE": "3", "RANK": str(ROLES[role])},
            )
        deadline = time.monotonic() + timeout
        while any(poll(r) is None for r in procs):
            failed = [r for r in procs if procs[r].returncode not in (None, 0)]
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
        out = torch.load(out_path, map_location="cpu", weights_only=True)
        for role, path in usage_paths.items():
            own = json.loads(path.read_text()) if path.exists() else {}
            if own.get("peak_rss_bytes"):
                max_rss[role] = own["peak_rss_bytes"]
        out["max_rss_bytes"] = dict(max_rss)
        out["cpu_seconds"] = dict(cpu)  # whole process (start-up and imports included), user + system
        return out
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
        for path in usage_paths.values():
            path.unlink(missing_ok=True)


def main(argv: Optional[list[str]] = None) -> int:
    """One party's process (``python -m dpfunc.mpc.parties --role …``, module docstring): parse ``argv``,
    run :func:`run_party`, return its exit code."""
    p = argparse.ArgumentParser(prog="python -m dpfunc.mpc.parties", description=__doc__.split("\n\n")[0])
    p.add_argument("--role", choices=sorted(ROLES), required=True)
    p.add_argument("--addr", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--spec", required=True, help="public JSON spec (architecture, input shape, batches)")
    p.add_argument("--seed", type=int, default=None,
                   help="only to reproduce a run; NOT secret (default: a 256-bit key from OS entropy drawn in this "
                        "process; a seed another party knows lets it regenerate this party's masks)")
    p.add_argument("--timeout", type=float, default=300.0, help="gloo timeout in seconds")
    p.add_argument("--party-port", type=int, default=0,
                   help="model owner: port of the parties' TCP link on --addr (0: a free one, sent to the data "
                        "owner over gloo; fix it across machines)")
    p.add_argument("--weights", help="model owner: state dict file (torch.save)")
    p.add_argument("--images", help="data owner: float tensor file (N, C, H, W)")
    p.add_argument("--out", help="data owner: output file")
    p.add_argument("--usage-out", default=None,
                   help="write this process's peak resident memory (VmHWM) and CPU seconds here as JSON at exit")
    a = p.parse_args(argv)
    spec = json.loads(Path(a.spec).read_text())
    run_party(a.role, addr=a.addr, port=a.port, spec=spec, seed=a.seed, timeout=a.timeout,
              weights_path=a.weights, images_path=a.images, out_path=a.out, party_port=a.party_port)
    if a.usage_out:
        _write_usage(a.usage_out)
    return 0


def _peak_rss_bytes() -> Optional[int]:
    """This process's own peak resident set (``VmHWM``; Linux only, else None).

    Not ``ru_maxrss``: Linux carries the forked launcher's resident set over ``fork`` + ``exec`` into the
    child's ``ru_maxrss``, so small parties would all report the launcher's size.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kilobytes
    except OSError:
        pass
    return None


def _write_usage(path: str) -> None:
    """Atomically write ``{"peak_rss_bytes", "cpu_seconds"}`` of this process (user + system) to ``path``."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps({"peak_rss_bytes": _peak_rss_bytes(), "cpu_seconds": usage.ru_utime + usage.ru_stime}))
    os.replace(tmp, path)


if __name__ == "__main__":
    from dpfunc.distributed import run_and_exit

    run_and_exit(main)
