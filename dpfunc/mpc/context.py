"""Who a party is and how it talks: the :class:`Context` of one party, its channel, and the dealer.

Protocols are written once, in SPMD style: both computing parties run the same code on their own
shares; ``ctx.exchange(t)`` sends this party's tensor and returns the other party's (one round).
The dealer (a third party that never sees inputs or outputs) runs the *same* code with
``rank == DEALER``: its ``exchange`` returns zeros and every request for correlated randomness
(:class:`Request`) is answered by generating the material from the dealer's own key and recording
one share for each party. Because MPC control flow never depends on secret values, the dealer's run
produces exactly the sequence of requests the parties will make; the parties then consume their
recorded shares in order (:class:`MaterialStream`). The dealer therefore needs only the public
program and input shapes, and receives nothing from the other parties. The costly protocols
(products, comparisons) skip their arithmetic on the dealer and return zeros of the right shape, so
its own cost is mostly generating the material.

**Streaming.** The dealer does not hold a whole batch's material: :class:`DealerSource` collects
the shares of consecutive requests into a *chunk* and hands it to a ``sink`` as soon as it holds
``chunk_bytes`` (a chunk always ends at a request boundary, so it holds at most ``chunk_bytes`` plus
one request). The sink blocks while the parties are behind (a bounded :class:`MaterialQueue` in the
simulation, a gloo send that completes only when the party receives in the three-process
deployment), so the material held at any time is a few chunks, whatever the depth of the network;
the parties' :class:`MaterialStream` pulls the next chunk when the current one is used up. The
material is the same bytes in the same order as when it is generated whole (``sink=None``,
:meth:`DealerSource.flat`), so the results are bit-identical (tested).

**Fixed masks.** The model owner's weights are the same in every batch; a weight tensor ``w`` gets one
dealer mask ``b`` (:attr:`Kind.MASK`), ``f = w − b`` is opened once, and every later product with
``w`` uses a fresh half-triple ``(a, c = op(a, b))`` (:attr:`Kind.FIXED_TRIPLE`); see
:func:`dpfunc.mpc.protocols.mask_operands` for why this is secure and when it would not be.

Ranks: 0 = model owner, 1 = data owner, 2 = dealer.
"""

from __future__ import annotations

import enum
import functools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from dpfunc.mpc.prg import AnyKey, Keystream, StreamKey
from dpfunc.mpc.ring import FixedPoint

__all__ = [
    "MODEL_OWNER",
    "DATA_OWNER",
    "DEALER",
    "Kind",
    "Bilinear",
    "Request",
    "CommStats",
    "Channel",
    "QueueChannel",
    "queue_channel_pair",
    "Context",
    "DealerSource",
    "MaterialStream",
    "MaterialQueue",
    "DEFAULT_CHUNK_BYTES",
    "material_nbytes",
    "word_dtype",
]

MODEL_OWNER, DATA_OWNER, DEALER = 0, 1, 2
DEFAULT_CHUNK_BYTES = 8 << 20  # the dealer hands out material in chunks of about 8 MiB per party


class Bilinear(enum.Enum):
    """Bilinear maps with Beaver triples: ``c = op(a, b)``."""

    MUL = "mul"  # elementwise with broadcasting
    MATMUL = "matmul"
    CONV2D = "conv2d"


def apply_bilinear(op: Bilinear, x: torch.Tensor, y: torch.Tensor, params: tuple) -> torch.Tensor:
    """``op(x, y)`` on ring tensors (int64 torch ops wrap around modulo 2^64)."""
    if op is Bilinear.MUL:
        return x * y
    if op is Bilinear.MATMUL:
        return x @ y
    return ring_conv2d(x, y, params)


CONV_MATMUL_MIN_K = 2048
"""Ring convolutions with ``Cin·kh·kw`` at least this run as an unfold and an int64 matmul."""


def ring_conv2d(x: torch.Tensor, w: Optional[torch.Tensor], params: tuple, via_matmul: Optional[bool] = None,
                w_t: Optional[torch.Tensor] = None, kernel: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """``conv2d(x, w)`` in Z_2^64 (int64, wrapping), ``params = (stride, padding, dilation, groups)``.

    torch's int64 convolution has no fast kernel and slows down sharply with ``Cin·kh·kw`` and the
    batch (measured, one thread: 512→512 channels at 2×2, 56 ms at batch 1 and 2.1 s at batch 32).
    For ``Cin·kh·kw ≥`` :data:`CONV_MATMUL_MIN_K` (ResNet-18's layers 3 and 4), without groups or
    dilation, it is computed as an explicit unfold (patches ``(B·Ho·Wo, Cin·kh·kw)``) times the
    transposed weight ``(Cin·kh·kw, Cout)`` — an int64 matmul, 1.4–20× faster there (slower for
    narrow layers, which keep ``F.conv2d``). Both wrap modulo 2^64, so the results are identical
    (tested); ``via_matmul`` forces a path. ``w_t`` (with ``kernel = (kh, kw)``, ``w`` unused): the
    weight already as the ``(Cin·kh·kw, Cout)`` matrix (a fixed operand, transposed once).
    """
    stride, padding, dilation, groups = params
    if w_t is not None:
        (kh, kw), cout = kernel, w_t.shape[1]
        cin, via_matmul = w_t.shape[0] // (kh * kw), True
    else:
        cout, cin, kh, kw = w.shape
    if via_matmul is None:
        via_matmul = groups == 1 and tuple(dilation) == (1, 1) and cin * kh * kw >= CONV_MATMUL_MIN_K
    if not via_matmul:
        return F.conv2d(x, w, None, stride, padding, dilation, groups)
    if groups != 1 or tuple(dilation) != (1, 1):
        raise ValueError(f"ring_conv2d: the matmul path needs groups=1 and dilation 1, got {groups}, {dilation}")
    ph, pw = padding
    xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    patches = xp.unfold(2, kh, stride[0]).unfold(3, kw, stride[1])  # (B, Cin, Ho, Wo, kh, kw)
    b, _, ho, wo = patches.shape[:4]
    cols = patches.permute(0, 2, 3, 1, 4, 5).reshape(b * ho * wo, cin * kh * kw)
    out = cols @ (w_t if w_t is not None else w.reshape(cout, -1).t().contiguous())
    return out.view(b, ho, wo, cout).permute(0, 3, 1, 2).contiguous()


class Kind(enum.Enum):
    """Kinds of correlated randomness the dealer hands out."""

    TRIPLE = "triple"  # (a, b, c = op(a, b)), additive shares
    SQUARE = "square"  # (a, c = a*a), additive shares
    AND = "and"  # (a, b, c = a & b) on 64-bit words, XOR shares
    AND2 = "and2"  # (a, b1, b2, a & b1, a & b2): two AND gates sharing the operand a, XOR shares
    CROSS_AND = "cross_and"  # party 0 gets (A, c0), party 1 (B, c1), c0 ^ c1 = A & B (words)
    BIT = "bit"  # a random bit r as XOR shares of {0,1} and as additive shares
    BIT_MUL = "bit_mul"  # r as XOR shares, a uniform a, and additive shares of r and of a·r
    MASK = "mask"  # a uniform b for a fixed operand (kept by the dealer under Request.mask_id)
    FIXED_TRIPLE = "fixed_triple"  # (a, c = op(a, b)) with b the mask Request.mask_id, fresh a


class Request(NamedTuple):
    """One request for correlated randomness; everything in it is public (shapes, op)."""

    kind: Kind
    shape_x: tuple[int, ...]
    shape_y: tuple[int, ...] = ()
    op: Optional[Bilinear] = None
    params: tuple = ()
    mask_id: int = -1  # MASK / FIXED_TRIPLE: which fixed operand (public, e.g. a weight's index)
    release: bool = False  # FIXED_TRIPLE: the last product with this mask (the dealer forgets it)


def _output_shape(req: Request) -> tuple[int, ...]:
    if req.kind in (Kind.TRIPLE, Kind.FIXED_TRIPLE):
        return _bilinear_shape(req.op, req.shape_x, req.shape_y, req.params)
    return req.shape_x


@functools.lru_cache(maxsize=4096)
def _bilinear_shape(op: Bilinear, shape_x: tuple, shape_y: tuple, params: tuple) -> tuple[int, ...]:
    """The output shape of ``op`` (cached: a program asks for the same few shapes again and again,
    and shape inference on meta tensors costs about 0.4 ms a call)."""
    if op is Bilinear.MUL:
        return tuple(torch.broadcast_shapes(shape_x, shape_y))
    a = torch.empty(shape_x, device="meta", dtype=torch.float32)
    b = torch.empty(shape_y, device="meta", dtype=torch.float32)
    return tuple(apply_bilinear(op, a, b, params).shape)


@functools.lru_cache(maxsize=4096)
def _material_shapes(req: Request) -> tuple[tuple[int, ...], ...]:
    if req.kind is Kind.TRIPLE:
        return (req.shape_x, req.shape_y, _output_shape(req))
    if req.kind is Kind.FIXED_TRIPLE:
        return (req.shape_x, _output_shape(req))
    if req.kind is Kind.MASK:
        return (req.shape_y,)
    if req.kind is Kind.SQUARE:
        return (req.shape_x, req.shape_x)
    if req.kind is Kind.AND:
        return (req.shape_x,) * 3
    if req.kind is Kind.AND2:
        return (req.shape_x,) * 5
    if req.kind is Kind.BIT_MUL:
        return (req.shape_x,) * 4
    return (req.shape_x, req.shape_x)  # BIT, CROSS_AND


def word_dtype(bits: int) -> torch.dtype:
    """The narrowest dtype holding ``bits``-bit words (uint8, int16, int32, int64)."""
    return torch.uint8 if bits <= 8 else torch.int16 if bits <= 16 else torch.int32 if bits <= 32 else torch.int64


@functools.lru_cache(maxsize=4096)
def _material_dtypes(req: Request) -> tuple[torch.dtype, ...]:
    if req.kind in (Kind.AND, Kind.AND2):
        return (word_dtype(req.params[0] if req.params else 64),) * (3 if req.kind is Kind.AND else 5)
    if req.kind is Kind.CROSS_AND:
        return (word_dtype(req.params[0]),) * 2
    if req.kind is Kind.BIT:
        return (torch.uint8, torch.int64)
    if req.kind is Kind.BIT_MUL:
        return (torch.uint8, torch.int64, torch.int64, torch.int64)
    return (torch.int64,) * len(_material_shapes(req))


def _padded_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    nbytes = n * dtype.itemsize
    return -(-nbytes // 8) * 8  # segments start at multiples of 8 bytes (aligned views)


def _explicit(req: Request) -> int:
    """How many of party 1's last tensors of ``req`` the dealer sends: its corrections (none for a
    mask, two for a shared-operand AND pair, one otherwise)."""
    return 0 if req.kind is Kind.MASK else 2 if req.kind in (Kind.AND2, Kind.BIT_MUL) else 1


@functools.lru_cache(maxsize=8192)
def material_nbytes(req: Request, rank: int = 1) -> int:
    """Bytes the dealer *sends* to party ``rank`` for ``req``: party 1's corrections (its share of the
    output ``c``, or of the additive bit), 0 for party 0 and for a mask — the rest of each party's
    share is expanded from its seed (see :func:`deal`)."""
    k = _explicit(req)
    if rank == 0 or not k:
        return 0
    return sum(_padded_nbytes(sh, dt) for sh, dt in zip(_material_shapes(req)[-k:], _material_dtypes(req)[-k:]))


def _generate(ks: Keystream, req: Request, count: int) -> list[torch.Tensor]:
    """The first ``count`` tensors of a party's share of ``req``, from that party's seeded stream.

    One keystream call fills one buffer for all of them (each tensor a view of its own segment,
    segments padded to multiples of 8 bytes so that every view is aligned); the bit of
    :attr:`Kind.BIT` / :attr:`Kind.BIT_MUL` is its byte's lowest bit. Every byte is uniform, so
    each tensor is uniform and they are independent, as with one call per tensor (the layout is
    part of the protocol: dealer and parties expand alike)."""
    shapes, dtypes = _material_shapes(req)[:count], _material_dtypes(req)[:count]
    sizes = [_padded_nbytes(sh, dt) for sh, dt in zip(shapes, dtypes)]
    buf = ks.array(sum(sizes))  # numpy: slicing it costs a fraction of torch's view ops
    out, off = [], 0
    for k, (shape, dtype, size) in enumerate(zip(shapes, dtypes, sizes)):
        n = 1
        for d in shape:
            n *= d
        a = buf[off : off + n * dtype.itemsize].view(_NP_DTYPES[dtype]).reshape(shape)
        if req.kind in (Kind.BIT, Kind.BIT_MUL) and k == 0:
            a = a & 1  # a bit in {0, 1} (uint8)
        out.append(torch.from_numpy(a))
        off += size
    return out


_NP_DTYPES = {torch.uint8: np.uint8, torch.int16: np.int16, torch.int32: np.int32, torch.int64: np.int64}


def _deal_seeded(req: Request, ks0: Keystream, ks1: Keystream,
                 masks: Optional[dict[int, torch.Tensor]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Both parties' shares of ``req``: party 0's all from its stream ``ks0``, party 1's from ``ks1``
    except its last tensor, the correction that makes the shares add up (the only thing sent)."""
    if req.kind is Kind.MASK and (masks is None or req.mask_id in masks):
        raise ValueError(f"deal: mask {req.mask_id} is drawn twice (or there is no mask store)")
    if req.kind is Kind.FIXED_TRIPLE and (masks is None or req.mask_id not in masks):
        raise ValueError(f"deal: fixed triple for mask {req.mask_id}, which was never drawn")
    n = len(_material_shapes(req))
    s0 = _generate(ks0, req, n)
    s1 = _generate(ks1, req, n - _explicit(req))
    kind = req.kind
    if kind is Kind.MASK:
        masks[req.mask_id] = s0[0] + s1[0]
    elif kind is Kind.FIXED_TRIPLE:
        b = masks.pop(req.mask_id) if req.release else masks[req.mask_id]
        if req.op is Bilinear.MUL and req.params:  # a slice (start, stop) of the flattened mask
            b = b.reshape(-1)[req.params[0] : req.params[1]]
        if tuple(b.shape) != tuple(req.shape_y):
            raise ValueError(f"deal: mask {req.mask_id} has shape {tuple(b.shape)}, the request {req.shape_y}")
        if req.op is Bilinear.MUL:  # numpy int64 (2–4× faster than torch's here; the same ring values)
            c = np.add(s0[0].numpy(), s1[0].numpy())
            c *= b.numpy()
            c -= s0[1].numpy()
            s1.append(torch.from_numpy(c))
        else:
            s1.append(apply_bilinear(req.op, s0[0] + s1[0], b, req.params).sub_(s0[1]))
    elif kind is Kind.TRIPLE and req.op is Bilinear.MUL:
        c = np.multiply(np.add(s0[0].numpy(), s1[0].numpy()), np.add(s0[1].numpy(), s1[1].numpy()))
        c -= s0[2].numpy()
        s1.append(torch.from_numpy(c))
    elif kind is Kind.TRIPLE:
        s1.append(apply_bilinear(req.op, s0[0] + s1[0], s0[1] + s1[1], req.params).sub_(s0[2]))
    elif kind is Kind.SQUARE:
        a = np.add(s0[0].numpy(), s1[0].numpy())
        a *= a
        a -= s0[1].numpy()
        s1.append(torch.from_numpy(a))
    elif kind is Kind.AND:
        s1.append(((s0[0] ^ s1[0]) & (s0[1] ^ s1[1])) ^ s0[2])
    elif kind is Kind.AND2:
        a = s0[0] ^ s1[0]
        s1.append((a & (s0[1] ^ s1[1])) ^ s0[3])
        s1.append((a & (s0[2] ^ s1[2])) ^ s0[4])
    elif kind is Kind.CROSS_AND:
        # party 0's mask A, party 1's mask B, XOR shares of A & B (see protocols.cross_and)
        s1.append((s0[0] & s1[0]) ^ s0[1])
    elif kind is Kind.BIT_MUL:  # (r XOR-shared, a; additive shares of r and of a·r)
        r = (s0[0].numpy() ^ s1[0].numpy()).astype(np.int64)
        s1.append(torch.from_numpy(np.subtract(r, s0[2].numpy())))
        ar = np.add(s0[1].numpy(), s1[1].numpy())
        ar *= r
        ar -= s0[3].numpy()
        s1.append(torch.from_numpy(ar))
    else:  # BIT: r = r0 ^ r1 as XOR shares, and additive shares (m0, r − m0)
        r = (s0[0].numpy() ^ s1[0].numpy()).astype(np.int64)
        s1.append(torch.from_numpy(np.subtract(r, s0[1].numpy())))
    return s0, s1


def party_stream_key(key: AnyKey, rank: int) -> StreamKey:
    """The seed the dealer shares with party ``rank`` (0 or 1): a child of the dealer's key (a PRF
    output, so it says nothing about the dealer's key or the other party's seed). From a 64-bit
    :class:`~dpfunc.keys.Key` (tests) the seed has only that key's 64 bits of entropy."""
    label = _SEED_LABEL - rank  # apart from the small indices the parties fold in (batches, the setup's −1)
    if isinstance(key, StreamKey):
        return key.fold_in(label)
    return StreamKey.from_seed(key.fold_in(label).state)


_SEED_LABEL = -(1 << 40)


def deal(req: Request, key: AnyKey, masks: Optional[dict[int, torch.Tensor]] = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Generate the material for ``req`` as request 0 of a dealer with ``key``; return (party-0
    shares, party-1 shares).

    **Seeded shares** (CrypTen's trusted-third-party provider; the "PRG-seeded" dealer of the MPC
    literature): the dealer shares a seed with each party (:func:`party_stream_key`, sent once at
    the start of the stream), and both expand one AES-256-CTR stream ``Keystream(seed)``: each request
    takes the next bytes of it, in request order (the ``i``-th request's tensors are the bytes after
    those of requests ``0 … i−1``; one stream rather than a child key per request spares a BLAKE2b
    and a cipher set-up per request — ~15 µs, ~130 requests per SmallCNN image — and the parts stay
    disjoint, so independent). Party 0's shares are all from its seed; party 1's too, except the last tensor, the
    *correction* (e.g. ``c1 = op(a0 + a1, b0 + b1) − c0`` for a triple, XOR for an AND triple),
    which is the only thing the dealer sends — one output-sized tensor per request to party 1,
    nothing to party 0, nothing for a mask ``b = b0 + b1``. Each party's shares alone are uniform
    (pseudo-random from its own seed, the correction one-time padded by party 0's ``c0``), and a
    party never learns the other's seed, so ``a`` and ``b`` stay hidden from each party as before.
    ``masks`` is the dealer's store of fixed masks: a :attr:`Kind.MASK` request adds ``b`` under
    ``req.mask_id`` (each id once), a :attr:`Kind.FIXED_TRIPLE` request reads it.
    """
    return _deal_seeded(req, Keystream(party_stream_key(key, 0)), Keystream(party_stream_key(key, 1)), masks)


@dataclass
class CommStats:
    """Counters of one party: rounds (exchanges) and bytes it sent/received."""

    rounds: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"rounds": self.rounds, "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received}


class Channel(Protocol):
    """A link to the other computing party."""

    def exchange(self, tensor: torch.Tensor) -> torch.Tensor:
        """Send ``tensor``; return the other party's tensor of the same shape and dtype."""
        ...

    def send(self, tensor: torch.Tensor) -> None:
        """One-way message to the other party."""
        ...

    def recv(self, like: torch.Tensor) -> torch.Tensor:
        """Receive a one-way message shaped like ``like``."""
        ...


class QueueChannel:
    """In-process channel (threads) with a hard timeout, for the simulation and tests.

    :meth:`abort` (the other party's thread failed) makes a waiting receive fail at once with
    :class:`QueueAborted` instead of at the timeout.
    """

    def __init__(self, outbox: queue.Queue, inbox: queue.Queue, timeout: float = 60.0):
        self.outbox, self.inbox, self.timeout = outbox, inbox, timeout
        self.aborted = False

    def abort(self) -> None:
        """The other party failed: a waiting or later receive raises :class:`QueueAborted` now."""
        self.aborted = True

    def _receive(self, what: str) -> torch.Tensor:
        deadline = time.monotonic() + self.timeout
        while True:
            if self.aborted:
                raise QueueAborted(f"QueueChannel.{what}: the other party failed")
            try:
                return self.inbox.get(timeout=min(0.1, max(deadline - time.monotonic(), 0.001)))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"QueueChannel.{what}: no message within {self.timeout}s") from None

    def exchange(self, tensor: torch.Tensor) -> torch.Tensor:
        self.outbox.put(tensor)  # protocols never modify a tensor in place after sending it
        other = self._receive("exchange")
        if other.shape != tensor.shape or other.dtype != tensor.dtype:
            raise RuntimeError(
                f"QueueChannel.exchange: parties out of step (sent {tuple(tensor.shape)} "
                f"{tensor.dtype}, received {tuple(other.shape)} {other.dtype})"
            )
        return other

    def send(self, tensor: torch.Tensor) -> None:
        self.outbox.put(tensor)

    def recv(self, like: torch.Tensor) -> torch.Tensor:
        other = self._receive("recv")
        if other.shape != like.shape or other.dtype != like.dtype:
            raise RuntimeError(
                f"QueueChannel.recv: parties out of step (expected {tuple(like.shape)} {like.dtype}, "
                f"received {tuple(other.shape)} {other.dtype})"
            )
        return other


def queue_channel_pair(timeout: float = 60.0) -> tuple[QueueChannel, QueueChannel]:
    """Two connected in-process channels (party 0's, party 1's)."""
    a, b = queue.Queue(), queue.Queue()
    return QueueChannel(a, b, timeout), QueueChannel(b, a, timeout)


def _to_bytes(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Tensors as one uint8 vector, each tensor's bytes padded to a multiple of 8 (aligned views)."""
    parts = []
    for t in tensors:
        raw = t.contiguous().reshape(-1).view(torch.uint8)
        pad = -raw.numel() % 8
        parts.append(raw if not pad else torch.cat([raw, raw.new_zeros(pad)]))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)


Sink = Callable[[int, Optional[torch.Tensor]], None]
"""``sink(rank, chunk)``: deliver a chunk of party ``rank``'s material (``None``: the end)."""


HEADER_BYTES = 40
"""The first chunk of the dealer's stream to a party: its 32-byte seed and its rank (8 bytes)."""


def _header(seed: StreamKey, rank: int) -> torch.Tensor:
    return torch.frombuffer(bytearray(seed.raw + rank.to_bytes(8, "little")), dtype=torch.uint8)


class DealerSource:
    """The dealer's side: answers each request from its own key and records what it sends.

    The dealer shares one seed with each party (:func:`party_stream_key`, a child of its own key) and
    deals the ``i``-th request from the two seeds' streams for ``i`` (:func:`deal`); it sends each
    party a 40-byte header (seed and rank) first, then only party 1's corrections; it never receives
    data.

    Args:
        key: the dealer's own key (a 256-bit :class:`~dpfunc.mpc.prg.StreamKey` in a deployment).
        sink: ``None`` keeps all material until :meth:`flat` (the whole program's material in
            memory: the simple oracle of the streamed form). Otherwise ``sink(rank, chunk)`` gets each
            party's header at the first request, then party 1's next chunk once its pending
            corrections reach ``chunk_bytes`` (at a request boundary), and ``sink(rank, None)`` after
            :meth:`finish`.
        chunk_bytes: flush threshold (``>= 1``).

    Attributes:
        requests: number of requests answered so far.
        peak_pending_bytes: the largest number of bytes held before a flush (at most ``chunk_bytes``
            plus the largest single request).
        largest_request_bytes: the largest single request's correction (bytes).
        bytes_sent: bytes sent to party 0 and to party 1 so far (headers included; party 0 gets
            only its header).
        masks: the fixed masks drawn so far (:attr:`Kind.MASK`; one per fixed operand, kept for the
            whole session — the size of the weights, not of the batch or the depth).
    """

    def __init__(self, key: AnyKey, sink: Optional[Sink] = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise ValueError(f"DealerSource: chunk_bytes must be an int >= 1, got {chunk_bytes!r}")
        self.sink, self.chunk_bytes = sink, chunk_bytes
        self._seeds = (party_stream_key(key, 0), party_stream_key(key, 1))
        self._streams: Optional[tuple[Keystream, Keystream]] = None  # each party's one AES-256-CTR stream
        self.requests = 0
        self.masks: dict[int, torch.Tensor] = {}
        self.pending: list[torch.Tensor] = []  # party 1's corrections not yet sent
        self.pending_bytes = 0
        self.peak_pending_bytes = 0
        self.largest_request_bytes = 0
        self.bytes_sent = [0, 0]
        self._sent: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])  # without a sink: everything
        self._started = False
        self.finished = False
        self.recording: Optional[list[Request]] = None  # see record()

    def record(self) -> None:
        """Start keeping the requests drawn from now on (one batch's, to :meth:`replay` later)."""
        self.recording = []

    def stop_recording(self) -> Optional[tuple[Request, ...]]:
        """The requests drawn since :meth:`record`, or ``None`` when they cannot be replayed: a mask
        made during the batch (id ≥ 2^40, :meth:`Context.new_mask_id`) is still held, so drawing it
        again would be refused."""
        reqs, self.recording = self.recording, None
        if reqs is None or any(mid >= 1 << 40 for mid in self.masks):
            return None
        return tuple(reqs)

    def replay(self, requests: tuple[Request, ...]) -> None:
        """Answer ``requests`` in order without running the program (:meth:`draw` each).

        The dealer runs the public program only to learn the sequence of requests; for a fixed
        program and input shape that sequence is the same in every batch (control flow never depends
        on secrets, and the run-time masks of one batch are all released in it — checked by
        :meth:`stop_recording`; their public ids only name the dealer's slots), so after the first
        batch the dealer can replay it: the same material, byte for byte (tested), without the
        program's Python and its dummy arithmetic (SmallCNN 64², batch 1: 58 → 45 ms of dealer CPU
        per image, measured in one process)."""
        for req in requests:
            self.draw(req)

    @property
    def total_bytes(self) -> int:
        """Party 1's corrections so far (bytes, headers excluded)."""
        return self.bytes_sent[1] + self.pending_bytes - (HEADER_BYTES if self._started else 0)

    def _start(self) -> None:
        self._started = True
        for rank in (0, 1):
            header = _header(self._seeds[rank], rank)
            self.bytes_sent[rank] += HEADER_BYTES
            if self.sink is None:
                self._sent[rank].append(header)
            else:
                self.sink(rank, header)

    def draw(self, req: Request) -> list[torch.Tensor]:
        if self.finished:
            raise RuntimeError("DealerSource.draw: the dealer's stream is already finished")
        if not self._started:
            self._start()
        if self._streams is None:
            self._streams = (Keystream(self._seeds[0]), Keystream(self._seeds[1]))
        s0, s1 = _deal_seeded(req, self._streams[0], self._streams[1], self.masks)
        self.requests += 1
        if self.recording is not None:
            self.recording.append(req)
        nbytes = material_nbytes(req, 1)
        if nbytes:
            self.pending.extend(s1[len(s1) - _explicit(req):])
            self.pending_bytes += nbytes
        self.largest_request_bytes = max(self.largest_request_bytes, nbytes)
        self.peak_pending_bytes = max(self.peak_pending_bytes, self.pending_bytes)
        if self.sink is not None and self.pending_bytes >= self.chunk_bytes:
            self._flush()
        return s0

    def _flush(self) -> None:
        if self.pending_bytes:
            chunk = _to_bytes(self.pending)
            self.pending.clear()  # drop the tensors before the sink may block
            self.bytes_sent[1] += self.pending_bytes
            self.pending_bytes = 0
            if self.sink is None:
                self._sent[1].append(chunk)
            else:
                self.sink(1, chunk)
            del chunk

    def finish(self) -> None:
        """Streaming: deliver the last chunk and the end marker (``sink(rank, None)``)."""
        if self.sink is None:
            raise RuntimeError("DealerSource.finish: only a streaming source (with a sink) finishes")
        if not self.finished:
            if not self._started:
                self._start()
            self._flush()
            for rank in (0, 1):
                self.sink(rank, None)
            self.finished = True

    def flat(self, rank: int) -> torch.Tensor:
        """Everything party ``rank`` receives from the dealer, as one uint8 byte vector (its header,
        then its corrections, each tensor's bytes padded to a multiple of 8); only without a sink."""
        if self.sink is not None:
            raise RuntimeError("DealerSource.flat: a streaming source has handed its material to the sink")
        if not self._started:
            self._start()
        self._flush()
        return torch.cat(self._sent[rank]) if self._sent[rank] else torch.zeros(0, dtype=torch.uint8)


class QueueAborted(RuntimeError):
    """A :class:`MaterialQueue` or :class:`QueueChannel` wait ended because the thread on the other side failed."""


class MaterialQueue:
    """A bounded queue of one party's chunks between a dealer thread and a party thread, with a
    count of the bytes it holds (the simulation's stand-in for the dealer's network link).

    ``held_bytes`` counts chunks handed to :meth:`put` and not yet released: the one the dealer is
    waiting to put, those waiting in the queue, and the one the party is reading (released when it
    takes the next). ``peak_held_bytes`` is its maximum — at most ``maxsize + 2`` chunks, whatever
    the length of the program.
    """

    def __init__(self, maxsize: int = 1, timeout: float = 60.0):
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"MaterialQueue: maxsize must be an int >= 1, got {maxsize!r}")
        self._q: queue.Queue = queue.Queue(maxsize)
        self.timeout = timeout
        self._lock = threading.Lock()
        self._reading = 0
        self.held_bytes = 0
        self.peak_held_bytes = 0
        self.chunks = 0
        self.aborted = False

    def abort(self) -> None:
        """The other side failed: make a waiting :meth:`put` or :meth:`get` fail now, not at the timeout."""
        self.aborted = True

    def _wait(self, fn, what: str):
        deadline = time.monotonic() + self.timeout
        while True:
            if self.aborted:
                raise QueueAborted(f"MaterialQueue.{what}: the other side of the dealer's queue failed")
            try:
                return fn(timeout=min(0.1, max(deadline - time.monotonic(), 0.001)))
            except (queue.Full, queue.Empty):
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"MaterialQueue.{what}: "
                        + ("the party took no material" if what == "put" else "no material from the dealer")
                        + f" within {self.timeout}s"
                    ) from None

    def put(self, chunk: Optional[torch.Tensor]) -> None:
        n = 0 if chunk is None else chunk.numel()
        with self._lock:
            self.held_bytes += n
            self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)
            self.chunks += chunk is not None
        self._wait(lambda timeout: self._q.put(chunk, timeout=timeout), "put")

    def get(self) -> Optional[torch.Tensor]:
        chunk = self._wait(lambda timeout: self._q.get(timeout=timeout), "get")
        with self._lock:
            self.held_bytes -= self._reading  # the previous chunk is released
            self._reading = 0 if chunk is None else chunk.numel()
        return chunk


class MaterialStream:
    """A party's side: expands its seeded shares and consumes the dealer's corrections in request
    order, checking the layout.

    The stream begins with the dealer's 40-byte header (this party's seed and rank); for the ``i``-th
    request the party expands the next bytes of ``Keystream(seed)`` exactly as the dealer did (see
    :func:`deal`) and, as party 1, reads the correction from the dealer's bytes.

    Args:
        flat: all of the dealer's bytes at once (a 1-D uint8 tensor), or
        next_chunk: a function returning the next chunk (1-D uint8) or ``None`` at the end of the
            dealer's stream; the first chunk is the header, the others end at request boundaries.
    """

    def __init__(self, flat: Optional[torch.Tensor] = None, *, next_chunk: Optional[Callable[[], Optional[torch.Tensor]]] = None):
        if (flat is None) == (next_chunk is None):
            raise TypeError("MaterialStream: give exactly one of flat and next_chunk")
        if flat is not None:
            self._check(flat)
        self.flat = flat if flat is not None else torch.zeros(0, dtype=torch.uint8)
        self.offset = 0
        self.next_chunk = next_chunk
        self._ended = next_chunk is None
        self.bytes_received = self.flat.numel()
        self.seed: Optional[StreamKey] = None
        self._stream: Optional[Keystream] = None
        self.rank: Optional[int] = None
        self.requests = 0

    @staticmethod
    def _check(chunk: torch.Tensor) -> None:
        if chunk.dtype != torch.uint8 or chunk.dim() != 1:
            raise TypeError(f"MaterialStream: material must be a 1-D uint8 tensor, got {chunk.dtype} {tuple(chunk.shape)}")

    def _advance(self) -> bool:
        """Take the next chunk (streaming); False at the end of the stream."""
        if self._ended:
            return False
        chunk = self.next_chunk()
        if chunk is None:
            self._ended = True
            self.flat, self.offset = torch.zeros(0, dtype=torch.uint8), 0
            return False
        self._check(chunk)
        self.flat, self.offset = chunk, 0
        self.bytes_received += chunk.numel()
        return True

    def _read_header(self) -> None:
        if self.offset == self.flat.numel():
            self._advance()
        if self.offset + HEADER_BYTES > self.flat.numel():
            raise RuntimeError("MaterialStream: the dealer's stream does not start with a 40-byte header (seed, rank)")
        raw = self.flat[self.offset : self.offset + HEADER_BYTES].numpy().tobytes()
        self.offset += HEADER_BYTES
        self.seed, self.rank = StreamKey(raw[:32]), int.from_bytes(raw[32:], "little")
        if self.rank not in (0, 1):
            raise RuntimeError(f"MaterialStream: the dealer's header names rank {self.rank}, not 0 or 1")

    def draw(self, req: Request) -> list[torch.Tensor]:
        if self.seed is None:
            self._read_header()
        shapes, dtypes = _material_shapes(req), _material_dtypes(req)
        explicit = _explicit(req) if self.rank == 1 else 0
        need = material_nbytes(req, self.rank)
        if need and self.offset == self.flat.numel():
            self._advance()
        if self.offset + need > self.flat.numel():
            raise RuntimeError(
                f"MaterialStream.draw: the dealer's material ran out at {req.kind.value} of shape "
                f"{req.shape_x} (dealer and parties ran different programs or shapes)"
            )
        if self._stream is None:
            self._stream = Keystream(self.seed)
        out = _generate(self._stream, req, len(shapes) - explicit)
        self.requests += 1
        for s, dtype in zip(shapes[len(shapes) - explicit:], dtypes[len(dtypes) - explicit:]):
            n = 1
            for d in s:
                n *= d
            out.append(self.flat[self.offset : self.offset + n * dtype.itemsize].view(dtype).view(s))
            self.offset += _padded_nbytes(s, dtype)
        return out

    @property
    def exhausted(self) -> bool:
        """All material consumed (streaming: the current chunk is used up and the next thing from the
        dealer is the end marker; a further chunk means the programs differed)."""
        if self.seed is None:
            self._read_header()
        if self.offset != self.flat.numel():
            return False
        return not self._advance()


@dataclass
class Context:
    """Everything one party's protocol code needs.

    Attributes:
        rank: 0 (model owner), 1 (data owner) or 2 (dealer: runs the program to produce material).
        channel: the link to the other computing party (``None`` for the dealer).
        source: correlated randomness (:class:`DealerSource` for the dealer, :class:`MaterialStream`
            for a party).
        fp: fixed-point encoding.
        stats: communication counters (updated by :meth:`exchange`).
        transcript: if a list, every received tensor is appended (for view-independence tests).
    """

    rank: int
    channel: Optional[Channel]
    source: Any
    fp: FixedPoint = FixedPoint()
    stats: CommStats = field(default_factory=CommStats)
    transcript: Optional[list] = None
    next_mask_id: int = 1 << 40  # ids of masks made during a run (below: the weights' ids)

    def new_mask_id(self) -> int:
        """A fresh public id for a mask made during the run (the same sequence on every party and the
        dealer, since they run the same program)."""
        self.next_mask_id += 1
        return self.next_mask_id

    def __post_init__(self) -> None:
        if self.rank not in (MODEL_OWNER, DATA_OWNER, DEALER):
            raise ValueError(f"Context: rank must be 0, 1 or 2, got {self.rank!r}")
        if self.rank != DEALER and self.channel is None:
            raise ValueError("Context: a computing party (rank 0 or 1) needs a channel")

    @property
    def is_dealer(self) -> bool:
        return self.rank == DEALER

    def exchange(self, tensor: torch.Tensor) -> torch.Tensor:
        """One communication round: send ``tensor``, receive the other party's."""
        if self.is_dealer:
            return torch.zeros_like(tensor)
        other = self.channel.exchange(tensor)
        nbytes = tensor.numel() * tensor.element_size()
        self.stats.rounds += 1
        self.stats.bytes_sent += nbytes
        self.stats.bytes_received += other.numel() * other.element_size()
        if self.transcript is not None:
            self.transcript.append(other.clone())
        return other

    def send(self, tensor: torch.Tensor) -> None:
        """One-way message (one round for the pair; counted on the sender's side)."""
        if self.is_dealer:
            return
        self.channel.send(tensor)
        self.stats.rounds += 1
        self.stats.bytes_sent += tensor.numel() * tensor.element_size()

    def recv(self, like: torch.Tensor) -> torch.Tensor:
        """Receive a one-way message shaped like ``like`` (zeros for the dealer)."""
        if self.is_dealer:
            return torch.zeros_like(like)
        other = self.channel.recv(like)
        self.stats.rounds += 1
        self.stats.bytes_received += other.numel() * other.element_size()
        if self.transcript is not None:
            self.transcript.append(other.clone())
        return other

    def draw(self, req: Request) -> list[torch.Tensor]:
        """This party's share of the correlated randomness for ``req``."""
        return self.source.draw(req)
