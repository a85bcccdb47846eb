"""Two-party protocols on additive shares: openings, Beaver products, truncation, comparison, ReLU,
pooling and argmax.

Every function takes the party's :class:`~dpfunc.mpc.context.Context` first and this party's share(s);
both parties call it with the same public arguments (SPMD). Shares are int64 tensors in Z_2^64 holding
fixed-point numbers with ``ctx.fp.fractional_bits`` fractional bits unless a docstring says the share
holds an *integer* (bits from comparisons are integers 0/1 at scale 1).

Rounds and bytes (per element, per party, 64-bit words; ``W = 8`` bytes):

============================  ======  =============================================
protocol                      rounds  bytes sent
============================  ======  =============================================
open                          1       W
mul / matmul / conv2d         1       W·(|x| + |y|) (the masked inputs e, f)
square                        1       W·|x|
truncation (local)            0       0
ltz (A2B + B2A)               8       54 (AND openings) + 1 = 55
relu                          9       ltz + 2W = 71
============================  ======  =============================================

Comparison is CrypTen's arithmetic→binary conversion (Knott et al. 2021, §C): party 0's share and
party 1's share are XOR-shared as two 64-bit addends whose carry into the sign bit is computed by a
logarithmic carry tree (the generate/propagate reduction of parallel-prefix adders, Brent & Kung
1982) whose AND gates use dealer AND triples (Beaver 1991 over GF(2)); the sign bit is then
converted back to an additive share with one dealer bit. We pick it over
function secret sharing (AriaNN, Ryffel et al. 2022; one round) because it needs only AND triples
that the dealer makes with a few torch ops, no PRG-tree key generation (which would need a
vectorised AES we would have to hand-write), and its cost is easy to state exactly; on localhost
the extra rounds cost microseconds each.
"""

from __future__ import annotations

import torch

from dpfunc.mpc.context import Bilinear, Context, Kind, Request
from dpfunc.mpc.ring import div_public_local

__all__ = [
    "local_rank",
    "share_from",
    "reveal_to",
    "open_shares",
    "open_xor",
    "add_public",
    "mul_public_int",
    "mul_public",
    "truncate",
    "beaver",
    "mul",
    "mul_int",
    "square",
    "matmul",
    "conv2d",
    "and_words",
    "msb_xor",
    "bit_reverse",
    "b2a_bit",
    "ltz",
    "ge_public",
    "relu",
    "maximum",
    "max_last",
    "argmax_onehot",
    "avg_pool2d",
    "max_pool2d",
]

_WORD_BITS = 64


def local_rank(ctx: Context) -> int:
    """The rank to use in local formulas (the dealer computes dummy values as party 0)."""
    return 0 if ctx.is_dealer else ctx.rank


def share_from(ctx: Context, owner: int, value: torch.Tensor | None, shape: tuple[int, ...], key) -> torch.Tensor:
    """Secret-share an input held by ``owner`` (one one-way message).

    The owner draws a uniform mask ``r`` from its own ``key``, keeps ``x − r`` and sends ``r``; the
    other party's share is ``r`` alone — uniform and independent of ``x``. ``value`` is the owner's
    ring tensor (ignored elsewhere); ``shape`` is public.
    """
    from dpfunc.mpc.ring import uniform_ring

    like = torch.zeros(shape, dtype=torch.int64)
    if ctx.is_dealer:
        return like
    if ctx.rank == owner:
        if value is None or tuple(value.shape) != tuple(shape) or value.dtype != torch.int64:
            raise ValueError(f"share_from: the owner needs an int64 value of shape {tuple(shape)}")
        r = uniform_ring(shape, key.generator())
        ctx.send(r)
        return value - r
    return ctx.recv(like)


def reveal_to(ctx: Context, receiver: int, x: torch.Tensor) -> torch.Tensor | None:
    """Send this party's share to ``receiver``; the receiver returns the secret, the other ``None``."""
    if ctx.is_dealer:
        return None
    if ctx.rank == receiver:
        return x + ctx.recv(x)
    ctx.send(x)
    return None


def open_shares(ctx: Context, *xs: torch.Tensor) -> list[torch.Tensor]:
    """Open several additive sharings in one round; both parties learn the values."""
    flat = torch.cat([x.reshape(-1) for x in xs])
    total = flat + ctx.exchange(flat)
    out, i = [], 0
    for x in xs:
        out.append(total[i : i + x.numel()].view(x.shape))
        i += x.numel()
    return out


def open_xor(ctx: Context, *xs: torch.Tensor) -> list[torch.Tensor]:
    """Open several XOR sharings in one round."""
    flat = torch.cat([x.reshape(-1) for x in xs])
    total = flat ^ ctx.exchange(flat)
    out, i = [], 0
    for x in xs:
        out.append(total[i : i + x.numel()].view(x.shape))
        i += x.numel()
    return out


def add_public(ctx: Context, x: torch.Tensor, c: torch.Tensor | int) -> torch.Tensor:
    """Share of ``x + c`` for a public ring value ``c`` (party 0 adds it)."""
    if local_rank(ctx) == 0:
        return x + c
    return x + torch.zeros_like(c) if isinstance(c, torch.Tensor) else x


def mul_public_int(x: torch.Tensor, c: int | torch.Tensor) -> torch.Tensor:
    """Share of ``c·x`` for a public integer ``c`` (local, exact)."""
    return x * c


def mul_public(ctx: Context, x: torch.Tensor, c: float) -> torch.Tensor:
    """Share of ``c·x`` for a public real ``c`` (encode ``c``, multiply, truncate; error ≤ 1 ulp + |x|·2^-f-1)."""
    return truncate(ctx, x * int(round(c * ctx.fp.scale)))


def truncate(ctx: Context, x: torch.Tensor, divisor: int | None = None) -> torch.Tensor:
    """Divide a shared value by a public integer (``2^f`` by default) — local, no communication.

    SecureML's two-party local truncation (Mohassel & Zhang 2017); see
    :func:`dpfunc.mpc.ring.div_public_local` for the guarantee: error < 1 unit of the last place,
    failure probability ``|x| / 2^64`` per element (``x`` the ring integer being divided; for a
    product of two reals whose product is ``v``, ``|x| = |v|·2^2f``, i.e. ``|v|·2^-32`` for f = 16).
    """
    d = ctx.fp.scale if divisor is None else divisor
    return div_public_local(x, d, local_rank(ctx))


def beaver(ctx: Context, x: torch.Tensor, y: torch.Tensor, op: Bilinear, params: tuple = ()) -> torch.Tensor:
    """Share of ``op(x, y)`` for a bilinear ``op`` with a dealer triple (Beaver 1991); one round.

    With ``e = x − a`` and ``f = y − b`` opened: ``op(x, y) = c + op(e, b) + op(a, f) + op(e, f)``.
    Exact in the ring (no fixed-point rescaling: the result has the sum of the inputs' scales).
    """
    from dpfunc.mpc.context import apply_bilinear

    a, b, c = ctx.draw(Request(Kind.TRIPLE, tuple(x.shape), tuple(y.shape), op, params))
    e, f = open_shares(ctx, x - a, y - b)
    z = c + apply_bilinear(op, e, b, params) + apply_bilinear(op, a, f, params)
    if local_rank(ctx) == 0:
        z = z + apply_bilinear(op, e, f, params)
    return z


def mul(ctx: Context, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fixed-point elementwise product (broadcasting), truncated back to ``f`` fractional bits."""
    return truncate(ctx, beaver(ctx, x, y, Bilinear.MUL))


def mul_int(ctx: Context, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``x · b`` where ``b`` holds shared integers (e.g. comparison bits); no truncation, exact."""
    return beaver(ctx, x, bits, Bilinear.MUL)


def square(ctx: Context, x: torch.Tensor) -> torch.Tensor:
    """Fixed-point ``x²`` with a square pair ``(a, a²)``: one round, one opened word per element."""
    a, c = ctx.draw(Request(Kind.SQUARE, tuple(x.shape)))
    (e,) = open_shares(ctx, x - a)
    z = c + 2 * e * a
    if local_rank(ctx) == 0:
        z = z + e * e
    return truncate(ctx, z)


def matmul(ctx: Context, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fixed-point ``x @ y``, truncated."""
    return truncate(ctx, beaver(ctx, x, y, Bilinear.MATMUL))


def conv2d(ctx: Context, x: torch.Tensor, weight: torch.Tensor, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """Fixed-point ``conv2d(x, weight)`` (no bias), truncated; int64 convolution wraps mod 2^64."""
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    params = (pair(stride), pair(padding), pair(dilation), int(groups))
    return truncate(ctx, beaver(ctx, x, weight, Bilinear.CONV2D, params))


def _narrow(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The low ``bits`` bits of int64 words in the smallest dtype that holds them (for the wire)."""
    if bits <= 8:
        return x.to(torch.uint8)
    if bits <= 16:
        return x.to(torch.int16)
    if bits <= 32:
        return x.to(torch.int32)
    return x


def _widen(x: torch.Tensor, bits: int) -> torch.Tensor:
    return x.to(torch.int64) & ((1 << bits) - 1) if bits < 64 else x


def and_words(ctx: Context, xs: list[torch.Tensor], ys: list[torch.Tensor], bits: int = 64) -> list[torch.Tensor]:
    """Bitwise AND of XOR-shared words, several pairs in one round (dealer AND triples).

    Only the low ``bits`` bits of the inputs are used and returned; the openings are sent in the
    narrowest dtype holding ``bits`` bits (uint8/int16/int32/int64).
    """
    x = torch.cat([t.reshape(-1) for t in xs])
    y = torch.cat([t.reshape(-1) for t in ys])
    a, b, c = (_widen(t, bits) for t in ctx.draw(Request(Kind.AND, tuple(x.shape), params=(bits,))))
    flat = _narrow(torch.cat([x ^ a, y ^ b]), bits)
    opened = _widen(flat ^ ctx.exchange(flat), bits)
    e, f = opened[: x.numel()], opened[x.numel() :]
    z = c ^ (e & b) ^ (f & a)
    if local_rank(ctx) == 0:
        z = z ^ (e & f)
    if bits < 64:
        z = z & ((1 << bits) - 1)
    out, i = [], 0
    for t in xs:
        out.append(z[i : i + t.numel()].view(t.shape))
        i += t.numel()
    return out


def _index_swap(k: int, l: int) -> tuple[int, int]:
    """Delta-swap (distance, mask) exchanging bit positions whose index bits k and l differ."""
    mask = sum(1 << p for p in range(64) if (p >> k) & 1 and not (p >> l) & 1)
    return (1 << l) - (1 << k), mask


_INDEX_SWAPS = [_index_swap(0, 5), _index_swap(1, 4), _index_swap(2, 3)]
_BIT63 = -(2**63)  # the int64 word with only bit 63 set


def bit_reverse(x: torch.Tensor) -> torch.Tensor:
    """Permute the 64 bits of each int64 word by bit-reversal of their 6-bit index (bit i ↦ bit
    rev6(i)); linear over XOR. Then bits 2j and 2j+1 sit 32 apart, pairs of pairs 16 apart, …"""
    for d, mask in _INDEX_SWAPS:
        t = (x ^ (x >> d)) & mask
        x = x ^ t ^ (t << d)
    return x


def msb_xor(ctx: Context, x: torch.Tensor) -> torch.Tensor:
    """XOR shares (0/1 in each party's int64) of the sign bit of the shared ``x``; 7 rounds.

    CrypTen's A2B idea with a carry tree instead of a full adder: the two additive shares are the
    addends ``a = (x0, 0)`` and ``b = (0, x1)`` as XOR sharings; the sign is ``P_63 ^ c_63`` with
    ``P = a ^ b`` and ``c_63`` the carry into bit 63, i.e. the group generate of bits 0…62
    (Brent–Kung style reduction of ``(G, P)`` pairs, ``(G, P) ∘ (G', P') = (G ^ P·G', P·P')``; bit 63
    is made neutral with ``(G, P) = (0, 1)``). The inputs are bit-reversed first so that every
    level pairs the high half of a word with its low half: level widths 32, 16, 8, 4, 2, 1 bits.
    Bytes sent per element: 16 (the first AND) + 16 + 8 + 4 + 4 + 4 + 2 = 54.
    """
    xr = bit_reverse(x)
    zero = torch.zeros_like(xr)
    a, b = (xr, zero) if local_rank(ctx) == 0 else (zero, xr)
    p = a ^ b
    (g,) = and_words(ctx, [a], [b])
    sign_p = (p >> 63) & 1  # rev6(63) = 63
    not63 = 2**63 - 1
    g = g & not63
    p = (p & not63) | (_BIT63 if local_rank(ctx) == 0 else 0)  # the neutral (G, P) = (0, 1)
    width = 64
    while width > 1:
        half = width // 2
        mask = (1 << half) - 1
        g_hi, g_lo = (g >> half) & mask, g & mask
        p_hi, p_lo = (p >> half) & mask, p & mask
        if half > 1:
            gg, p = and_words(ctx, [p_hi, p_hi], [g_lo, p_lo], bits=half)
        else:
            (gg,) = and_words(ctx, [p_hi], [g_lo], bits=1)
        g = g_hi ^ gg
        width = half
    return sign_p ^ g


def b2a_bit(ctx: Context, bit: torch.Tensor) -> torch.Tensor:
    """XOR-shared bit → additive share of the integer 0/1, with a dealer bit ``r``; one round.

    Open ``c = b ^ r`` (one byte per element); then ``b = c + r − 2cr`` with ``c`` public.
    """
    r_xor, r_add = ctx.draw(Request(Kind.BIT, tuple(bit.shape)))
    flat = (bit.to(torch.uint8) ^ r_xor).reshape(-1)
    c = (flat ^ ctx.exchange(flat)).to(torch.int64).view(bit.shape)
    out = r_add - 2 * c * r_add
    if local_rank(ctx) == 0:
        out = out + c
    return out


def ltz(ctx: Context, x: torch.Tensor) -> torch.Tensor:
    """Additive share of the integer ``[x < 0]`` (0/1); 8 rounds. Exact for every ring element."""
    return b2a_bit(ctx, msb_xor(ctx, x))


def ge_public(ctx: Context, x: torch.Tensor, threshold_ring: int) -> torch.Tensor:
    """Additive share of the integer ``[x ≥ t]`` for a public ring value ``t``."""
    return add_public(ctx, -ltz(ctx, add_public(ctx, x, -threshold_ring)), 1)


def relu(ctx: Context, x: torch.Tensor) -> torch.Tensor:
    """``max(x, 0) = x − x·[x < 0]``; exact (no truncation); 9 rounds."""
    return x - mul_int(ctx, x, ltz(ctx, x))


def maximum(ctx: Context, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Elementwise ``max(x, y) = y + relu(x − y)``; exact."""
    return y + relu(ctx, x - y)


def max_last(ctx: Context, x: torch.Tensor) -> torch.Tensor:
    """Max over the last dimension by a pairwise tree (``⌈log2 n⌉`` comparison layers); exact."""
    while x.shape[-1] > 1:
        n = x.shape[-1]
        half = n // 2
        m = maximum(ctx, x[..., :half], x[..., half : 2 * half])
        x = torch.cat([m, x[..., 2 * half :]], dim=-1) if n % 2 else m
    return x[..., 0]


def argmax_onehot(ctx: Context, x: torch.Tensor) -> torch.Tensor:
    """Additive shares of the one-hot integer vector of ``argmax(x, dim=-1)`` (first max on ties).

    A tournament: for each pair (earlier ``u``, later ``w``), ``s = [u ≥ w]``, the winner's value
    ``w + s(u − w)`` and its one-hot ``h_w + s(h_u − h_w)`` go on. No softmax, exact.
    """
    n = x.shape[-1]
    eye = torch.eye(n, dtype=torch.int64)
    onehot = (eye if local_rank(ctx) == 0 else torch.zeros_like(eye)).expand(*x.shape[:-1], n, n).clone()
    vals = x  # (..., n); onehot (..., n, n): one row per candidate
    while vals.shape[-1] > 1:
        m = vals.shape[-1]
        half = m // 2
        u, w = vals[..., :half], vals[..., half : 2 * half]
        hu, hw = onehot[..., :half, :], onehot[..., half : 2 * half, :]
        s = add_public(ctx, -ltz(ctx, u - w), 1)  # [u >= w]
        prod = mul_int(ctx, torch.cat([(u - w).unsqueeze(-1), hu - hw], dim=-1), s.unsqueeze(-1))
        new_v = w + prod[..., 0]
        new_h = hw + prod[..., 1:]
        if m % 2:
            new_v = torch.cat([new_v, vals[..., 2 * half :]], dim=-1)
            new_h = torch.cat([new_h, onehot[..., 2 * half :, :]], dim=-2)
        vals, onehot = new_v, new_h
    return onehot[..., 0, :]


def avg_pool2d(ctx: Context, x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Non-overlapping ``kernel × kernel`` average pooling (stride = kernel, no padding); local.

    Sum of the window (exact) divided by ``kernel²`` by local division (error < 1 ulp).
    """
    b, c, h, w = x.shape
    ho, wo = h // kernel, w // kernel
    s = x[:, :, : ho * kernel, : wo * kernel].reshape(b, c, ho, kernel, wo, kernel).sum(dim=(3, 5))
    return truncate(ctx, s, kernel * kernel)


def max_pool2d(ctx: Context, x: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """Max pooling; padding uses a public very negative value (−2^40 in the ring); exact."""
    if padding:
        pad = -(1 << 40) if local_rank(ctx) == 0 else 0
        x = torch.nn.functional.pad(x, (padding,) * 4, value=pad)
    win = x.unfold(2, kernel, stride).unfold(3, kernel, stride)  # (B, C, Ho, Wo, k, k)
    return max_last(ctx, win.reshape(*win.shape[:4], kernel * kernel))
