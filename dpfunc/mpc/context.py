"""Who a party is and how it talks: the :class:`Context` of one party, its channel, and the dealer.

Protocols are written once, in SPMD style: both computing parties run the same code on their own
shares; ``ctx.exchange(t)`` sends this party's tensor and returns the other party's (one round).
The dealer (a third party that never sees inputs or outputs) runs the *same* code with
``rank == DEALER``: its ``exchange`` returns zeros and every request for correlated randomness
(:class:`Request`) is answered by generating the material from the dealer's own key and recording
one share for each party. Because MPC control flow never depends on secret values, the dealer's run
produces exactly the sequence of requests the parties will make; the parties then consume their
recorded shares in order (:class:`MaterialStream`). The dealer therefore needs only the public
program and input shapes, and receives nothing from the other parties.

Ranks: 0 = model owner, 1 = data owner, 2 = dealer.
"""

from __future__ import annotations

import enum
import queue
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional, Protocol

import torch
import torch.nn.functional as F

from dpfunc.keys import Key
from dpfunc.mpc.ring import FixedPoint, uniform_bits, uniform_ring

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
    "material_nbytes",
    "word_dtype",
]

MODEL_OWNER, DATA_OWNER, DEALER = 0, 1, 2


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
    stride, padding, dilation, groups = params
    return F.conv2d(x, y, None, stride, padding, dilation, groups)


class Kind(enum.Enum):
    """Kinds of correlated randomness the dealer hands out."""

    TRIPLE = "triple"  # (a, b, c = op(a, b)), additive shares
    SQUARE = "square"  # (a, c = a*a), additive shares
    AND = "and"  # (a, b, c = a & b) on 64-bit words, XOR shares
    BIT = "bit"  # a random bit r as XOR shares of {0,1} and as additive shares


class Request(NamedTuple):
    """One request for correlated randomness; everything in it is public (shapes, op)."""

    kind: Kind
    shape_x: tuple[int, ...]
    shape_y: tuple[int, ...] = ()
    op: Optional[Bilinear] = None
    params: tuple = ()


def _output_shape(req: Request) -> tuple[int, ...]:
    if req.kind is Kind.TRIPLE:
        a = torch.empty(req.shape_x, device="meta", dtype=torch.float32)
        b = torch.empty(req.shape_y, device="meta", dtype=torch.float32)
        return tuple(apply_bilinear(req.op, a, b, req.params).shape)
    return req.shape_x


def _material_shapes(req: Request) -> list[tuple[int, ...]]:
    if req.kind is Kind.TRIPLE:
        return [req.shape_x, req.shape_y, _output_shape(req)]
    if req.kind is Kind.SQUARE:
        return [req.shape_x, req.shape_x]
    if req.kind is Kind.AND:
        return [req.shape_x] * 3
    return [req.shape_x, req.shape_x]


def word_dtype(bits: int) -> torch.dtype:
    """The narrowest dtype holding ``bits``-bit words (uint8, int16, int32, int64)."""
    return torch.uint8 if bits <= 8 else torch.int16 if bits <= 16 else torch.int32 if bits <= 32 else torch.int64


def _material_dtypes(req: Request) -> list[torch.dtype]:
    if req.kind is Kind.AND:
        return [word_dtype(req.params[0] if req.params else 64)] * 3
    if req.kind is Kind.BIT:
        return [torch.uint8, torch.int64]
    return [torch.int64] * len(_material_shapes(req))


def _padded_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    return -(-nbytes // 8) * 8  # segments start at multiples of 8 bytes (aligned views)


def material_nbytes(req: Request) -> int:
    """Bytes of one party's share of the material for ``req`` in the dealer's stream."""
    return sum(_padded_nbytes(s, d) for s, d in zip(_material_shapes(req), _material_dtypes(req)))


def deal(req: Request, key: Key) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Generate the material for ``req`` from ``key``; return (party-0 shares, party-1 shares).

    Party 0's shares are uniform from ``key`` (so each party's shares alone are uniform); party 1
    gets the difference (additive) or XOR (binary).
    """
    g = key.generator()
    if req.kind is Kind.TRIPLE:
        a, b = uniform_ring(req.shape_x, g), uniform_ring(req.shape_y, g)
        values, xor = [a, b, apply_bilinear(req.op, a, b, req.params)], False
    elif req.kind is Kind.SQUARE:
        a = uniform_ring(req.shape_x, g)
        values, xor = [a, a * a], False
    elif req.kind is Kind.AND:
        # only the low `bits` bits are used: send them in the narrowest dtype (uniform low bits)
        dtype = word_dtype(req.params[0] if req.params else 64)
        a, b = uniform_ring(req.shape_x, g).to(dtype), uniform_ring(req.shape_x, g).to(dtype)
        s0 = [uniform_ring(req.shape_x, g).to(dtype) for _ in range(3)]
        return s0, [v ^ t for v, t in zip([a, b, a & b], s0)]
    else:
        r = uniform_bits(req.shape_x, g)
        r0 = uniform_bits(req.shape_x, g)
        m = uniform_ring(req.shape_x, g)
        return [r0.to(torch.uint8), m], [(r ^ r0).to(torch.uint8), r - m]
    s0 = [uniform_ring(v.shape, g) for v in values]
    s1 = [v ^ s if xor else v - s for v, s in zip(values, s0)]
    return s0, s1


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
    """In-process channel (threads) with a hard timeout, for the simulation and tests."""

    def __init__(self, outbox: queue.Queue, inbox: queue.Queue, timeout: float = 60.0):
        self.outbox, self.inbox, self.timeout = outbox, inbox, timeout

    def exchange(self, tensor: torch.Tensor) -> torch.Tensor:
        self.outbox.put(tensor)  # protocols never modify a tensor in place after sending it
        try:
            other = self.inbox.get(timeout=self.timeout)
        except queue.Empty:
            raise TimeoutError(f"QueueChannel.exchange: no message within {self.timeout}s") from None
        if other.shape != tensor.shape or other.dtype != tensor.dtype:
            raise RuntimeError(
                f"QueueChannel.exchange: parties out of step (sent {tuple(tensor.shape)} "
                f"{tensor.dtype}, received {tuple(other.shape)} {other.dtype})"
            )
        return other

    def send(self, tensor: torch.Tensor) -> None:
        self.outbox.put(tensor)

    def recv(self, like: torch.Tensor) -> torch.Tensor:
        try:
            other = self.inbox.get(timeout=self.timeout)
        except queue.Empty:
            raise TimeoutError(f"QueueChannel.recv: no message within {self.timeout}s") from None
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


class DealerSource:
    """The dealer's side: answers each request from its own key and records both parties' shares.

    The dealer's randomness is ``key.fold_in(i)`` for the ``i``-th request; it never receives data.
    """

    def __init__(self, key: Key):
        self.key = key
        self.requests: list[Request] = []
        self.shares: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])

    def draw(self, req: Request) -> list[torch.Tensor]:
        s0, s1 = deal(req, self.key.fold_in(len(self.requests)))
        self.requests.append(req)
        self.shares[0].extend(s0)
        self.shares[1].extend(s1)
        return s0

    def flat(self, rank: int) -> torch.Tensor:
        """Everything party ``rank`` receives from the dealer, as one uint8 byte vector (each
        tensor's bytes padded to a multiple of 8)."""
        parts = []
        for t in self.shares[rank]:
            raw = t.contiguous().reshape(-1).view(torch.uint8)
            pad = -raw.numel() % 8
            parts.append(raw if not pad else torch.cat([raw, raw.new_zeros(pad)]))
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)


class MaterialStream:
    """A party's side: consumes the dealer's byte vector in request order, checking the layout."""

    def __init__(self, flat: torch.Tensor):
        if flat.dtype != torch.uint8 or flat.dim() != 1:
            raise TypeError(f"MaterialStream: flat must be a 1-D uint8 tensor, got {flat.dtype} {tuple(flat.shape)}")
        self.flat, self.offset = flat, 0

    def draw(self, req: Request) -> list[torch.Tensor]:
        out = []
        for s, dtype in zip(_material_shapes(req), _material_dtypes(req)):
            nbytes = _padded_nbytes(s, dtype)
            if self.offset + nbytes > self.flat.numel():
                raise RuntimeError(
                    f"MaterialStream.draw: the dealer's material ran out at {req.kind.value} of shape "
                    f"{req.shape_x} (dealer and parties ran different programs or shapes)"
                )
            n = 1
            for d in s:
                n *= d
            size = n * torch.empty((), dtype=dtype).element_size()
            out.append(self.flat[self.offset : self.offset + size].view(dtype).view(s))
            self.offset += nbytes
        return out

    @property
    def exhausted(self) -> bool:
        return self.offset == self.flat.numel()


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
