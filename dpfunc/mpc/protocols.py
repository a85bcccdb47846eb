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
  with a masked fixed weight  1       W·|x| (``f = w − b`` opened once per session)
square                        1       W·|x|
truncation (local)            0       0
ltz (A2B + B2A), 64 bits      8       37 (AND openings) + 1 = 38 (8 per slice of 2^20)
ltz on 32-bit words           7       21 + 1 = 22 (exact while |x| < 2^31 in the ring)
relu                          8 (7)   sign + mul_bit (W + 1) = 46 (30)
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

from typing import NamedTuple

import numpy as np
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
    "MaskedOperand",
    "mask_operands",
    "beaver_fixed",
    "mul_chain_operand",
    "mul_fixed",
    "mul",
    "mul_batch",
    "mul_int",
    "square",
    "matmul",
    "conv2d",
    "and_words",
    "and_shared",
    "msb_xor",
    "bit_reverse",
    "b2a_bit",
    "mul_bit",
    "sign_bits",
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

    The owner draws a uniform mask ``r`` from the AES-256-CTR keystream of its own ``key`` (a 256-bit
    :class:`~dpfunc.mpc.prg.StreamKey` in a deployment, or a :class:`~dpfunc.keys.Key`), keeps
    ``x − r`` and sends ``r``; the other party's share is ``r`` alone — uniform and independent of
    ``x``. ``value`` is the owner's ring tensor (ignored elsewhere); ``shape`` is public.
    """
    from dpfunc.mpc.prg import Keystream

    like = torch.zeros(shape, dtype=torch.int64)
    if ctx.is_dealer:
        return like
    if ctx.rank == owner:
        if value is None or tuple(value.shape) != tuple(shape) or value.dtype != torch.int64:
            raise ValueError(f"share_from: the owner needs an int64 value of shape {tuple(shape)}")
        r = Keystream(key).ring(shape)
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


def open_masked(ctx: Context, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Open ``x − a`` for several pairs in one round: the same as ``open_shares(ctx, *(x − a))``,
    with each difference written straight into the message buffer (no concatenation copy)."""
    sizes = [x.numel() for x, _ in pairs]
    flat = torch.empty(sum(sizes), dtype=torch.int64)
    fn, i = flat.numpy(), 0
    for (x, a), n in zip(pairs, sizes):
        np.subtract(_np(x.reshape(-1)), _np(a.reshape(-1)), out=fn[i : i + n])
        i += n
    total = torch.from_numpy(np.add(fn, _np(ctx.exchange(flat))))
    out, i = [], 0
    for (x, _), n in zip(pairs, sizes):
        out.append(total[i : i + n].view(x.shape))
        i += n
    return out


def _np(t: torch.Tensor) -> np.ndarray:
    """A CPU int tensor's memory as a numpy array (no copy). numpy's int64 add/sub/mul run 2–4× faster
    than torch's on this machine (65536 elements, one thread: add 33 vs 75 µs, sub 20 vs 84, mul 39
    vs 91) and wrap modulo 2^64 alike, so the hot Beaver arithmetic uses them (identical results)."""
    return t.numpy() if not t.requires_grad else t.detach().numpy()


def _beaver_mul_local(rank: int, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, e: torch.Tensor,
                      f: torch.Tensor, b_plus_f: torch.Tensor | None = None) -> torch.Tensor:
    """This party's share of ``x·y`` (elementwise, same shapes) from its triple share and the opened
    ``e, f``: ``c + e·b + a·f`` (+ ``e·f`` on party 0, as ``e·(b + f)``; ``b_plus_f`` if known),
    accumulated in place in one new tensor (numpy int64 arithmetic, see :func:`_np`)."""
    if rank == 0:
        bf = _np(b_plus_f) if b_plus_f is not None else np.add(_np(b), _np(f))
    else:
        bf = _np(b)
    out = np.multiply(_np(e), bf)
    tmp = np.multiply(_np(a), _np(f))
    out += tmp
    out += _np(c)
    return torch.from_numpy(out)


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
    if ctx.is_dealer:  # the dealer's values are never used; only shapes matter
        return x
    d = ctx.fp.scale if divisor is None else divisor
    return div_public_local(x, d, local_rank(ctx))


def _dealer_zeros(req: Request) -> torch.Tensor:
    """What the dealer computes for a product: zeros of the output's shape (its values are never
    used; skipping the arithmetic saves the dealer most of its work besides the material)."""
    from dpfunc.mpc.context import _output_shape

    return torch.zeros(_output_shape(req), dtype=torch.int64)


PRODUCT_SLICE = 1 << 20
"""Elementwise products of more elements than this take their triples in slices of this many."""


def _beaver_mul_sliced(ctx: Context, x: torch.Tensor, y: torch.Tensor, limit: int) -> torch.Tensor:
    """Elementwise Beaver product with one triple per slice of ``limit`` elements, all opened in
    one round (so the dealer can hand out a large product's material chunk by chunk)."""
    xf, yf = x.reshape(-1), y.reshape(-1)
    n = xf.numel()
    cuts = [(i, min(i + limit, n)) for i in range(0, n, limit)]
    mats = [ctx.draw(Request(Kind.TRIPLE, (j - i,), (j - i,), Bilinear.MUL)) for i, j in cuts]
    if ctx.is_dealer:
        return torch.zeros(x.shape, dtype=torch.int64)
    opened = open_masked(ctx, [(xf[i:j], m[0]) for (i, j), m in zip(cuts, mats)]
                         + [(yf[i:j], m[1]) for (i, j), m in zip(cuts, mats)])
    es, fs = opened[: len(cuts)], opened[len(cuts) :]
    out = torch.empty(n, dtype=torch.int64)
    for (i, j), (a, b, c), e, f in zip(cuts, mats, es, fs):
        out[i:j] = _beaver_mul_local(ctx.rank, a, b, c, e, f)
    return out.view(x.shape)


def beaver(ctx: Context, x: torch.Tensor, y: torch.Tensor, op: Bilinear, params: tuple = (),
           slice_elements: int | None = None) -> torch.Tensor:
    """Share of ``op(x, y)`` for a bilinear ``op`` with a dealer triple (Beaver 1991); one round.

    With ``e = x − a`` and ``f = y − b`` opened: ``op(x, y) = c + op(e, b) + op(a, f) + op(e, f)``,
    computed as ``c + op(e, b + f) + op(a, f)`` on party 0 and ``c + op(e, b) + op(a, f)`` on party 1
    (two applications of ``op`` instead of three; the same ring values).
    Exact in the ring (no fixed-point rescaling: the result has the sum of the inputs' scales).
    An elementwise product of two same-shape tensors with more than ``slice_elements`` elements
    (default :data:`PRODUCT_SLICE`) draws one triple per slice — still one round.
    """
    from dpfunc.mpc.context import apply_bilinear

    limit = PRODUCT_SLICE if slice_elements is None else slice_elements
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"beaver: slice_elements must be an int >= 1, got {slice_elements!r}")
    if op is Bilinear.MUL and x.shape == y.shape and x.numel() > limit:
        return _beaver_mul_sliced(ctx, x, y, limit)
    req = Request(Kind.TRIPLE, tuple(x.shape), tuple(y.shape), op, params)
    a, b, c = ctx.draw(req)
    if ctx.is_dealer:
        return _dealer_zeros(req)
    e, f = open_masked(ctx, [(x, a), (y, b)])
    if op is Bilinear.MUL and x.shape == y.shape:
        return _beaver_mul_local(ctx.rank, a, b, c, e, f)
    if op is Bilinear.MUL:  # broadcasting (GroupNorm's x·rsqrt per channel): numpy int64, same values
        bn = np.add(_np(b), _np(f)) if ctx.rank == 0 else _np(b)
        out = np.multiply(_np(e), bn)
        out += np.multiply(_np(a), _np(f))
        out += _np(c)
        return torch.from_numpy(out)
    if ctx.rank == 0:
        b = b + f
    out = apply_bilinear(op, e, b, params)
    out += apply_bilinear(op, a, f, params)
    return out.add_(c)


class MaskedOperand(NamedTuple):
    """A secret ``y`` that stays fixed across many products (a weight tensor), masked once.

    Attributes:
        share: this party's additive share of ``y``.
        mask: this party's share of the dealer's mask ``b`` (uniform, drawn once for this operand).
        opened: ``f = y − b``, public to both parties (opened once).
        mask_id: the public index under which the dealer keeps ``b``.
        fused: convolution weights only (``mask_operands(..., fuse=True)``): this party's two
            weights of a product, ``[b (+ f on party 0), f]`` concatenated along the input channels,
            so that :func:`beaver_fixed` makes ``conv(e, b (+ f)) + conv(a, f)`` as one convolution
            of ``[e, a]`` (no per-product weight sum, one call).
        fused_t: the same as a ``(2·Cin·kh·kw, Cout)`` matrix, for wide convolutions
            (:func:`~dpfunc.mpc.context.ring_conv2d`'s matmul path; then ``fused`` is ``None``).
        mask_plus_opened: party 0's ``b + f`` for elementwise products (:func:`mul_chain_operand`:
            made once per chain, not once per product).
    """

    share: torch.Tensor
    mask: torch.Tensor
    opened: torch.Tensor
    mask_id: int
    fused: torch.Tensor | None = None
    fused_t: torch.Tensor | None = None
    mask_plus_opened: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.share.shape


def _fuse(rank: int, mask: torch.Tensor, opened: torch.Tensor) -> dict:
    """This party's fused weights of a masked convolution weight (see :class:`MaskedOperand`)."""
    from dpfunc.mpc.context import CONV_MATMUL_MIN_K

    w_e = mask + opened if rank == 0 else mask
    cout, cin, kh, kw = mask.shape
    if cin * kh * kw >= CONV_MATMUL_MIN_K:
        return {"fused_t": torch.cat([w_e.reshape(cout, -1), opened.reshape(cout, -1)], dim=1).t().contiguous()}
    return {"fused": torch.cat([w_e, opened], dim=1)}


def mask_operands(ctx: Context, ys: list[torch.Tensor], first_id: int = 0, fuse: bool = False) -> list[MaskedOperand]:
    """Mask fixed secrets once for reuse in many Beaver products; one round for all of them.

    For each ``y``, the dealer draws a uniform mask ``b`` (kept under the public id ``first_id + i``)
    and ``f = y − b`` is opened. Every later product with ``y`` (:func:`beaver_fixed`) uses a *fresh*
    half-triple ``(a, c = op(a, b))``: only ``e = x − a`` is opened per product; ``f`` is not sent
    again.

    Security (the idea of SecureML, Mohassel & Zhang 2017, §4.2, where the masked data matrix is
    opened once for all training iterations): ``f`` is a one-time-pad encryption of ``y`` under the
    uniform ``b``, opened *once*; reusing the same ``f`` in many products reveals nothing beyond that
    one opening, because nothing else that depends on ``b`` is ever opened — each product opens only
    ``e = x − a`` with a fresh uniform ``a``, and each party's shares of ``a`` and ``c`` are fresh
    uniform values from the dealer. This is sound only because ``y`` is *fixed*: masking a different
    value with the same ``b`` would open ``y − y'`` — so a mask belongs to one shared tensor, made
    once, and the shares of ``y`` are never re-made under it. Triples are never reused: ``a`` and
    ``c`` are fresh in every product.
    """
    if not ys:
        return []
    reqs = [Request(Kind.MASK, (), tuple(y.shape), mask_id=first_id + i) for i, y in enumerate(ys)]
    masks = [ctx.draw(r)[0] for r in reqs]
    if ctx.is_dealer:
        return [MaskedOperand(y, b, torch.zeros_like(y), r.mask_id) for y, b, r in zip(ys, masks, reqs)]
    opened = open_shares(ctx, *[y - b for y, b in zip(ys, masks)])
    return [MaskedOperand(y, b, f, r.mask_id, **(_fuse(ctx.rank, b, f) if fuse and y.dim() == 4 else {}))
            for y, b, f, r in zip(ys, masks, opened, reqs)]


def mul_chain_operand(ctx: Context, v: torch.Tensor) -> MaskedOperand:
    """Mask a value that will be multiplied several times *within* one run (Horner's rule multiplies
    by the same ``v`` at every step): one round opens ``f = v − b``, then each
    :func:`mul_fixed` opens only ``e = y − a`` with a fresh ``(a, a·b)`` — the argument of
    :func:`mask_operands` (a one-time pad on a fixed value, opened once; triples never reused). The
    last product passes ``release=True`` so the dealer forgets ``b``.

    Example (``v³`` by two products with the same masked ``v``; :func:`mul_fixed`):
        >>> from dpfunc.mpc import decode, encode, mul_chain_operand, mul_fixed, reveal_to, share_from, simulate
        >>> def program(ctx):
        ...     v = share_from(ctx, 1, encode(torch.tensor([0.5, -2.0])) if ctx.rank == 1 else None, (2,), Key(1))
        ...     vm = mul_chain_operand(ctx, v)            # one round: f = v − b opened once
        ...     y = mul_fixed(ctx, v, vm)                 # v·v, opens only v − a
        ...     y = mul_fixed(ctx, y, vm, release=True)   # v²·v; the dealer forgets b
        ...     return reveal_to(ctx, 1, y)
        >>> decode(simulate(program, dealer_key=Key(2)).outputs[1]).round(decimals=3).tolist()  # ± 2^-15
        [0.125, -8.0]
    """
    m = mask_operands(ctx, [v], first_id=ctx.new_mask_id())[0]
    if local_rank(ctx) == 0 and not ctx.is_dealer:
        m = m._replace(mask_plus_opened=m.mask + m.opened)
    return m


def mul_fixed(ctx: Context, y: torch.Tensor, v: MaskedOperand, release: bool = False) -> torch.Tensor:
    """Fixed-point elementwise ``y·v`` (same shapes) with a masked ``v`` (:func:`mul_chain_operand`),
    truncated; one round, ``|y|`` words sent. Elementwise products over :data:`PRODUCT_SLICE`
    elements take one half-triple per slice (still one round).

    Example (``y·v`` for two values ``y`` with the same masked ``v``):
        >>> from dpfunc.mpc import decode, encode, mul_chain_operand, mul_fixed, reveal_to, share_from, simulate
        >>> def program(ctx):
        ...     own = lambda t: encode(torch.tensor(t)) if ctx.rank == 1 else None
        ...     v = mul_chain_operand(ctx, share_from(ctx, 1, own([3.0, 0.25]), (2,), Key(1)))
        ...     y1 = mul_fixed(ctx, share_from(ctx, 1, own([2.0, 4.0]), (2,), Key(2)), v)
        ...     y2 = mul_fixed(ctx, share_from(ctx, 1, own([-1.0, 8.0]), (2,), Key(3)), v, release=True)
        ...     return reveal_to(ctx, 1, torch.stack([y1, y2]))
        >>> decode(simulate(program, dealer_key=Key(4)).outputs[1]).round(decimals=3).tolist()  # ± 2^-16
        [[6.0, 1.0], [-3.0, 2.0]]
    """
    if tuple(y.shape) != tuple(v.shape):
        raise ValueError(f"mul_fixed: y and v must have the same shape, got {tuple(y.shape)} and {tuple(v.shape)}")
    n = y.numel()
    cuts = [(i, min(i + PRODUCT_SLICE, n)) for i in range(0, n, PRODUCT_SLICE)]
    params = (lambda i, j: (i, j)) if len(cuts) > 1 else (lambda i, j: ())
    mats = [ctx.draw(Request(Kind.FIXED_TRIPLE, (j - i,) if len(cuts) > 1 else tuple(y.shape),
                             (j - i,) if len(cuts) > 1 else tuple(v.shape), Bilinear.MUL, params(i, j),
                             mask_id=v.mask_id, release=release and k == len(cuts) - 1))
            for k, (i, j) in enumerate(cuts)]
    if ctx.is_dealer:
        return torch.zeros(y.shape, dtype=torch.int64)
    yf = y.reshape(-1)
    es = open_masked(ctx, [(yf[i:j], a.reshape(-1)) for (i, j), (a, _) in zip(cuts, mats)])
    b, f = v.mask.reshape(-1), v.opened.reshape(-1)
    bf = v.mask_plus_opened.reshape(-1) if v.mask_plus_opened is not None else None
    if len(cuts) == 1:  # no slices: no copy into an output buffer
        (a, c), e = mats[0], es[0]
        out = _beaver_mul_local(ctx.rank, a.reshape(-1), b, c.reshape(-1), e, f, bf)
        return truncate(ctx, out.view(y.shape))
    out = torch.empty(n, dtype=torch.int64)
    for (i, j), (a, c), e in zip(cuts, mats, es):
        out[i:j] = _beaver_mul_local(ctx.rank, a.reshape(-1), b[i:j], c.reshape(-1), e, f[i:j],
                                     None if bf is None else bf[i:j])
    return truncate(ctx, out.view(y.shape))


def beaver_fixed(ctx: Context, x: torch.Tensor, y: MaskedOperand, op: Bilinear, params: tuple = ()) -> torch.Tensor:
    """Share of ``op(x, y)`` for a fixed operand masked by :func:`mask_operands`; one round, and only
    ``e = x − a`` is sent (``|x|`` words instead of ``|x| + |y|``). Exact in the ring.

    ``op(x, y) = c + op(e, b) + op(a, f) + op(e, f)`` with ``c = op(a, b)``; party 0 computes
    ``c + op(e, b + f) + op(a, f)`` and party 1 ``c + op(e, b) + op(a, f)``; with fused weights
    (:class:`MaskedOperand`) the two convolutions are one, of ``[e, a]`` with ``[b (+ f), f]``.
    """
    from dpfunc.mpc.context import apply_bilinear, ring_conv2d

    req = Request(Kind.FIXED_TRIPLE, tuple(x.shape), tuple(y.shape), op, params, mask_id=y.mask_id)
    a, c = ctx.draw(req)
    if ctx.is_dealer:
        return _dealer_zeros(req)
    (e,) = open_masked(ctx, [(x, a)])
    if (op is Bilinear.CONV2D and (y.fused is not None or y.fused_t is not None) and params[3] == 1
            and (y.fused is not None or tuple(params[2]) == (1, 1))):
        ea = torch.cat([e, a], dim=1)
        return ring_conv2d(ea, y.fused, params, w_t=y.fused_t, kernel=tuple(y.shape[2:])).add_(c)
    b = y.mask + y.opened if ctx.rank == 0 else y.mask
    out = apply_bilinear(op, e, b, params)
    out += apply_bilinear(op, a, y.opened, params)
    return out.add_(c)


def mul(ctx: Context, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fixed-point elementwise product (broadcasting), truncated back to ``f`` fractional bits."""
    return truncate(ctx, beaver(ctx, x, y, Bilinear.MUL))


def mul_batch(ctx: Context, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Fixed-point elementwise products of several same-shape pairs in **one** round (independent
    products of different shapes, e.g. GroupNorm's ``v·y`` per group and ``γ·y`` per channel), each
    with its own triple, truncated.

    Example:
        >>> from dpfunc.mpc import decode, encode, mul_batch, reveal_to, share_from, simulate
        >>> def program(ctx):
        ...     own = lambda t: encode(torch.tensor(t)) if ctx.rank == 1 else None
        ...     x, y = share_from(ctx, 1, own([1.5, 2.0]), (2,), Key(1)), share_from(ctx, 1, own([4.0]), (1,), Key(2))
        ...     p, q = mul_batch(ctx, [(x, x), (y, y)])
        ...     return reveal_to(ctx, 1, torch.cat([p, q])), ctx.stats.rounds
        >>> out, rounds = simulate(program, dealer_key=Key(3)).outputs[1]
        >>> decode(out).round(decimals=3).tolist(), rounds  # 2 input shares + 1 product round + reveal
        ([2.25, 4.0, 16.0], 4)
    """
    for x, y in pairs:
        if tuple(x.shape) != tuple(y.shape):
            raise ValueError(f"mul_batch: each pair must have one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    mats = [ctx.draw(Request(Kind.TRIPLE, tuple(x.shape), tuple(y.shape), Bilinear.MUL)) for x, y in pairs]
    if ctx.is_dealer:
        return [torch.zeros(x.shape, dtype=torch.int64) for x, _ in pairs]
    opened = open_masked(ctx, [(x, m[0]) for (x, _), m in zip(pairs, mats)] + [(y, m[1]) for (_, y), m in zip(pairs, mats)])
    k = len(pairs)
    return [truncate(ctx, _beaver_mul_local(ctx.rank, a, b, c, e, f))
            for (a, b, c), e, f in zip(mats, opened[:k], opened[k:])]


def mul_int(ctx: Context, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``x · b`` where ``b`` holds shared integers (e.g. comparison bits); no truncation, exact."""
    return beaver(ctx, x, bits, Bilinear.MUL)


def square(ctx: Context, x: torch.Tensor) -> torch.Tensor:
    """Fixed-point ``x²`` with a square pair ``(a, a²)``: one round, one opened word per element."""
    a, c = ctx.draw(Request(Kind.SQUARE, tuple(x.shape)))
    if ctx.is_dealer:
        return torch.zeros_like(x)
    (e,) = open_masked(ctx, [(x, a)])
    en = _np(e)
    z = np.multiply(en, _np(a))
    z += z  # 2·e·a
    if local_rank(ctx) == 0:
        z += np.multiply(en, en)
    z += _np(c)
    return truncate(ctx, torch.from_numpy(z))


def matmul(ctx: Context, x: torch.Tensor, y: torch.Tensor | MaskedOperand) -> torch.Tensor:
    """Fixed-point ``x @ y``, truncated (``y`` may be a :class:`MaskedOperand`)."""
    if isinstance(y, MaskedOperand):
        return truncate(ctx, beaver_fixed(ctx, x, y, Bilinear.MATMUL))
    return truncate(ctx, beaver(ctx, x, y, Bilinear.MATMUL))


def conv2d(ctx: Context, x: torch.Tensor, weight: torch.Tensor | MaskedOperand, stride=1, padding=0, dilation=1,
           groups=1) -> torch.Tensor:
    """Fixed-point ``conv2d(x, weight)`` (no bias), truncated; int64 convolution wraps mod 2^64.
    ``weight`` may be a :class:`MaskedOperand` (masked once, reused across batches)."""
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    params = (pair(stride), pair(padding), pair(dilation), int(groups))
    if isinstance(weight, MaskedOperand):
        return truncate(ctx, beaver_fixed(ctx, x, weight, Bilinear.CONV2D, params))
    return truncate(ctx, beaver(ctx, x, weight, Bilinear.CONV2D, params))


def and_words(ctx: Context, xs: list[torch.Tensor], ys: list[torch.Tensor], bits: int = 64) -> list[torch.Tensor]:
    """Bitwise AND of XOR-shared words, several pairs in one round (dealer AND triples).

    The words are held in the narrowest dtype that has ``bits`` bits (uint8/int16/int32/int64,
    :func:`~dpfunc.mpc.context.word_dtype`; the inputs must already be in it), and the openings go
    over the wire in it; only the low ``bits`` bits of the result are kept (for ``bits < 8`` the
    high bits of a uint8 are cleared).
    """
    from dpfunc.mpc.context import word_dtype

    dtype = word_dtype(bits)
    for t in (*xs, *ys):
        if t.dtype != dtype:
            raise TypeError(f"and_words: {bits}-bit words must be {dtype}, got {t.dtype}")
    sizes = [t.numel() for t in xs]
    n = sum(sizes)
    if [t.numel() for t in ys] != sizes:
        raise ValueError(f"and_words: xs and ys must pair up, got sizes {sizes} and {[t.numel() for t in ys]}")
    a, b, c = ctx.draw(Request(Kind.AND, (n,), params=(bits,)))
    if ctx.is_dealer:
        return [torch.zeros_like(t) for t in xs]
    # the masked words written straight into the message buffer (no concatenation copies)
    flat = torch.empty(2 * n, dtype=dtype)
    i = 0
    for tx, ty, k in zip(xs, ys, sizes):
        torch.bitwise_xor(tx.reshape(-1), a[i : i + k], out=flat[i : i + k])
        torch.bitwise_xor(ty.reshape(-1), b[i : i + k], out=flat[n + i : n + i + k])
        i += k
    opened = flat ^ ctx.exchange(flat)
    z = _beaver_and(ctx, opened[:n], opened[n:], a, b, c, bits)
    out, i = [], 0
    for t, k in zip(xs, sizes):
        out.append(z[i : i + k].view(t.shape))
        i += k
    return out


def and_shared(ctx: Context, x: torch.Tensor, y1: torch.Tensor, y2: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """XOR shares of ``x & y1`` and ``x & y2`` (XOR-shared words, one operand shared by both gates);
    one round, **three** masked words opened per element instead of four.

    The dealer's pair (:attr:`~dpfunc.mpc.context.Kind.AND2`) is ``(a, b1, b2, a & b1, a & b2)``:
    ``e = x ^ a`` is opened once for both gates, ``f_k = y_k ^ b_k`` each; then as in Beaver's AND,
    ``x & y_k = (e & b_k) ^ (f_k & a) ^ (a & b_k) ^ (e & f_k)``. Each opening is a one-time pad under
    its own fresh uniform mask (``a`` masks ``x`` once; ``b1``, ``b2`` are independent), so a party's
    view is uniform words as with two separate triples; only the material and the traffic shrink
    (the "AND gates with two outputs sharing an operand" of the carry tree, where ``P_hi`` meets both
    ``G_lo`` and ``P_lo``).

    Example:
        >>> from dpfunc.mpc import and_shared, simulate
        >>> def program(ctx):  # XOR shares: party 0 holds the words, party 1 zeros
        ...     w = lambda v: torch.tensor([v if ctx.rank == 0 else 0], dtype=torch.uint8)
        ...     return and_shared(ctx, w(0b1100), w(0b1010), w(0b0110), bits=8)
        >>> (s0, t0), (s1, t1) = simulate(program, dealer_key=Key(0)).outputs
        >>> (s0 ^ s1).tolist(), (t0 ^ t1).tolist()
        ([8], [4])
    """
    from dpfunc.mpc.context import word_dtype

    dtype = word_dtype(bits)
    for t in (x, y1, y2):
        if t.dtype != dtype:
            raise TypeError(f"and_shared: {bits}-bit words must be {dtype}, got {t.dtype}")
    if not (x.shape == y1.shape == y2.shape):
        raise ValueError(f"and_shared: x, y1, y2 must have one shape, got {tuple(x.shape)}, {tuple(y1.shape)}, {tuple(y2.shape)}")
    n = x.numel()
    a, b1, b2, c1, c2 = ctx.draw(Request(Kind.AND2, (n,), params=(bits,)))
    if ctx.is_dealer:
        return torch.zeros_like(x), torch.zeros_like(x)
    flat = torch.empty(3 * n, dtype=dtype)
    torch.bitwise_xor(x.reshape(-1), a, out=flat[:n])
    torch.bitwise_xor(y1.reshape(-1), b1, out=flat[n : 2 * n])
    torch.bitwise_xor(y2.reshape(-1), b2, out=flat[2 * n :])
    opened = flat ^ ctx.exchange(flat)
    e, f1, f2 = opened[:n], opened[n : 2 * n], opened[2 * n :]
    return (_beaver_and(ctx, e, f1, a, b1, c1, bits).view(x.shape),
            _beaver_and(ctx, e, f2, a, b2, c2, bits).view(x.shape))


def _beaver_and(ctx: Context, e: torch.Tensor, f: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                bits: int) -> torch.Tensor:
    """This party's XOR share of ``x & y`` from the opened ``e = x ^ a``, ``f = y ^ b`` and its shares of the
    dealer's AND triple ``(a, b, c = a & b)``: ``(e & b) ^ (f & a) ^ c``, plus ``e & f`` at local rank 0
    (Beaver's identity over GF(2)); words of fewer than 8 bits are masked to ``bits``."""
    z = torch.bitwise_and(e, b)
    z ^= torch.bitwise_and(f, a)
    z ^= c
    if local_rank(ctx) == 0:
        z ^= e & f
    if bits < 8:
        z &= (1 << bits) - 1
    return z


def cross_and(ctx: Context, mine: torch.Tensor, bits: int) -> torch.Tensor:
    """XOR shares of ``x0 & x1`` where party 0 holds the word ``x0`` and party 1 the word ``x1`` in
    the clear (each its own share); one round, one word sent per element and party.

    The dealer gives party 0 a uniform mask ``A``, party 1 a uniform ``B`` and each an XOR share of
    ``A & B`` (:attr:`~dpfunc.mpc.context.Kind.CROSS_AND`). Party 0 sends ``e = x0 ^ A``, party 1
    ``f = x1 ^ B`` — one-time pads under masks the receiver never sees. Then
    ``x0 & x1 = (e & f) ^ (e & B) ^ (A & f) ^ (A & B)``: party 0 keeps ``(A & f) ^ c0``, party 1
    ``(e & f) ^ (e & B) ^ c1``. A general AND triple would open two masked words per party (one of
    them a share of zero); this is the first level of :func:`msb_xor`, where each party's addend is
    its own.

    Example:
        >>> from dpfunc.mpc import cross_and, simulate
        >>> def program(ctx):  # party 0 holds 0b1100, 0b1010; party 1 holds 0b1010, 0b0110
        ...     mine = [0b1100, 0b1010] if ctx.rank == 0 else [0b1010, 0b0110]
        ...     return cross_and(ctx, torch.tensor(mine, dtype=torch.uint8), bits=8)
        >>> s0, s1 = simulate(program, dealer_key=Key(0)).outputs
        >>> (s0 ^ s1).tolist()  # XOR shares of 0b1000, 0b0010
        [8, 2]
    """
    from dpfunc.mpc.context import word_dtype

    dtype = word_dtype(bits)
    if mine.dtype != dtype:
        raise TypeError(f"cross_and: {bits}-bit words must be {dtype}, got {mine.dtype}")
    mask, c = ctx.draw(Request(Kind.CROSS_AND, tuple(mine.shape), params=(bits,)))
    if ctx.is_dealer:
        return torch.zeros_like(mine)
    other = ctx.exchange(mine ^ mask)  # party 0 receives f, party 1 receives e
    if local_rank(ctx) == 0:
        return (mask & other) ^ c
    return (other & (mine ^ mask)) ^ (other & mask) ^ c


def _index_swaps(bits: int) -> list[tuple[int, int]]:
    """Delta swaps (distance, mask) reversing the ``log2(bits)``-bit index of every bit position."""
    k = bits.bit_length() - 1
    out = []
    for lo in range(k // 2):
        hi = k - 1 - lo
        mask = sum(1 << p for p in range(bits) if (p >> lo) & 1 and not (p >> hi) & 1)
        out.append(((1 << hi) - (1 << lo), mask))
    return out


_SWAPS = {w: _index_swaps(w) for w in (8, 16, 32, 64)}


def bit_reverse(x: torch.Tensor, bits: int = 64) -> torch.Tensor:
    """Permute the ``bits`` bits of each word (in the dtype ``word_dtype(bits)``) by reversing their
    ``log2(bits)``-bit index (bit i ↦ bit rev(i)); linear over XOR. Then bits 2j and 2j+1 sit
    ``bits/2`` apart, pairs of pairs ``bits/4`` apart, …; the top bit stays in place."""
    for d, mask in _SWAPS[bits]:  # a mask never has the top bit (its index has all bits set)
        t = (x ^ (x >> d)) & mask
        x = x ^ t ^ (t << d)
    return x


_UNSIGNED = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}
_SIGNED = {8: np.uint8, 16: np.int16, 32: np.int32, 64: np.int64}  # numpy's word_dtype (uint8 up to 8 bits)


def _bit_reverse_np(x: np.ndarray, bits: int) -> np.ndarray:
    """:func:`bit_reverse` in place on an unsigned numpy array of ``bits``-bit words (the same bits:
    a swap moves bit ``p + d`` to ``p`` only where ``p + d < bits``, so logical and arithmetic right
    shifts agree); numpy's shifts and XORs on 16/32-bit words run ~2× faster than torch's here."""
    t = np.empty_like(x)
    for d, mask in _SWAPS[bits]:
        np.right_shift(x, d, out=t)
        t ^= x
        t &= x.dtype.type(mask)
        x ^= t
        t <<= d
        x ^= t
    return x


COMPARISON_BITS = (8, 16, 32, 64)
"""Word widths :func:`msb_xor` and :func:`ltz` accept."""


def msb_xor(ctx: Context, x: torch.Tensor, bits: int = 64) -> torch.Tensor:
    """XOR shares (0/1 in each party's int64) of the sign bit of the shared ``x``; ``log2(bits) + 1``
    rounds (7 for 64 bits, 6 for 32).

    CrypTen's A2B idea with a carry tree instead of a full adder: the low ``bits`` bits of the two
    additive shares are the addends ``x0`` (party 0's) and ``x1`` (party 1's); the sign is
    ``P_top ^ c_top`` with ``P = x0 ^ x1`` and ``c_top`` the carry into the top bit, i.e. the group
    generate of the bits below (Brent–Kung style reduction of ``(G, P)`` pairs,
    ``(G, P) ∘ (G', P') = (G ^ P·G', P·P')``; the top bit is made neutral with ``(G, P) = (0, 1)``).
    The bit generates ``G = x0 & x1`` come from one :func:`cross_and` (each addend is one party's own
    word). The words are bit-reversed first so that every level pairs the high half of a word with
    its low half: level widths ``bits/2``, ``bits/4``, …, 1, each in its narrowest dtype.

    ``bits < 64`` compares on fewer bits: the result is the sign of ``x`` **if the signed ring value
    satisfies** ``−2^(bits−1) ≤ x < 2^(bits−1)`` (then ``x mod 2^bits`` read as a signed word is
    ``x``); outside that range it is the sign of the wrapped value — wrong with certainty, not with a
    probability. For fixed point with ``f`` fractional bits: ``|v| < 2^(bits − 1 − f)``, i.e.
    ``|v| < 32768`` for 32 bits and f = 16.

    The sub-byte levels (4, 2 and 1 bits) run **packed**: the lanes of several elements share a byte
    (2, then 4, then 8 elements; the second half of the elements shifted into the free lanes, see
    :func:`_pack_lanes`), so their ANDs are ordinary 8-bit ANDs on ``⌈n/2⌉``, ``⌈n/4⌉``, ``⌈n/8⌉``
    bytes (bitwise ANDs act lane by lane; padding lanes are zeros under uniform masks like the rest).

    Bytes sent per element and party: ``bits/8`` (the generates, one cross AND) + three masked words
    per level (``P_hi`` meets ``G_lo`` and ``P_lo``: one shared-operand pair, :func:`and_shared`) —
    3/2, 3/4 bytes at 4 and 2 bits — + the last level's single AND, 2/8: 8 + 12 + 6 + 3 + 1.5 + 0.75 +
    0.25 = 31.5 for 64 bits, 4 + 6 + 3 + 1.5 + 0.75 + 0.25 = 15.5 for 32 bits (tested; with the
    sub-byte words as whole bytes 37 and 21, and with two separate ANDs per level 46 and 26). The
    dealer's material for the three packed levels: 2.5 + 1.25 + 0.375 bytes per element and party
    (13 unpacked).
    """
    if bits not in COMPARISON_BITS:
        raise ValueError(f"msb_xor: bits must be one of {COMPARISON_BITS}, got {bits!r}")
    if ctx.is_dealer:  # the same requests, no arithmetic (see the loop below)
        n = x.numel()
        ctx.draw(Request(Kind.CROSS_AND, (n,), params=(bits,)))
        width = bits
        while width > 8:
            width //= 2
            ctx.draw(Request(Kind.AND2, (n,), params=(width,)))
        for half in (4, 2, 1):  # the packed levels: 8-bit ANDs on ⌈n/2⌉, ⌈n/4⌉, ⌈n/8⌉ bytes
            n = (n + 1) // 2
            ctx.draw(Request(Kind.AND2 if half > 1 else Kind.AND, (n,), params=(8,)))
        return torch.zeros(x.shape, dtype=torch.int64)
    # the local bit arithmetic on unsigned numpy words (logical shifts; the same bits as torch's signed
    # words, which only the protocol calls see, as views): ~2× faster than torch's narrow-int kernels here
    xr = _bit_reverse_np(_np(x).astype(_UNSIGNED[bits]), bits)  # the low `bits` bits of this party's share
    word = lambda a, w: torch.from_numpy(a.view(_SIGNED[max(w, 8)]))  # noqa: E731 (the protocols' dtype, no copy)
    g = _np(cross_and(ctx, word(xr, bits), bits)).view(_UNSIGNED[bits])
    top = bits - 1
    sign_p = xr >> top  # this party's XOR share of P_top (rev(top) = top), 0/1 (logical shift)
    not_top = xr.dtype.type((1 << top) - 1)
    g &= not_top
    p = xr
    p &= not_top
    if local_rank(ctx) == 0:
        p |= xr.dtype.type(1 << top)  # the neutral (G, P) = (0, 1) at the top
    width = bits
    while width > 8:
        # split each width-bit word into halves, then narrow to half bits (the cast keeps the low bits)
        half = width // 2
        dt = _UNSIGNED[half]
        g_hi, g_lo = np.right_shift(g, half).astype(dt), g.astype(dt)
        p_hi, p_lo = np.right_shift(p, half).astype(dt), p.astype(dt)
        # P_hi meets both G_lo and P_lo: one shared-operand AND pair
        gg, pp = and_shared(ctx, word(p_hi, half), word(g_lo, half), word(p_lo, half), bits=half)
        p = _np(pp).view(dt)
        g = g_hi
        g ^= _np(gg).view(dt)
        width = half
    # the sub-byte levels, packed: lanes of 4, 2, 1 bits of 2, 4, 8 elements per byte
    g, p = g.reshape(-1), p.reshape(-1)
    sizes = []
    for half, lanes in ((4, 0x0F), (2, 0x33), (1, 0x55)):
        sizes.append(g.shape[0])
        g_hi, g_lo = np.right_shift(g, half), g & lanes
        g_hi &= lanes
        p_hi = np.right_shift(p, half)
        p_hi &= lanes
        if half > 1:
            p_lo = p & lanes
            gg, pp = and_shared(ctx, word(_pack_lanes(p_hi, half), 8), word(_pack_lanes(g_lo, half), 8),
                                word(_pack_lanes(p_lo, half), 8), bits=8)
            p = _np(pp)
        else:
            (gg,) = and_words(ctx, [word(_pack_lanes(p_hi, half), 8)], [word(_pack_lanes(g_lo, half), 8)], bits=8)
        g = _pack_lanes(g_hi, half)
        g ^= _np(gg)
    # each result bit sits at its lane's lowest bit: unpack 8 → 4 → 2 → 1 elements per byte
    for (half, low), k in zip(((1, 0x55), (2, 0x11), (4, 0x01)), reversed(sizes)):
        g = _unpack_lanes(g, half, low, k)
    out = sign_p.reshape(-1).astype(np.int64)
    out ^= g
    out &= 1
    return torch.from_numpy(out).view(x.shape)


def _pack_lanes(a: np.ndarray, shift: int) -> np.ndarray:
    """Two elements' lanes in one byte: ``a[:m] | (a[m:] << shift)`` with ``m = ⌈k/2⌉`` (uint8, the
    lanes of ``a`` clear at the target positions; an odd ``k`` leaves the last byte's upper lanes 0)."""
    k = a.shape[0]
    m = (k + 1) // 2
    out = a[:m].copy()
    out[: k - m] |= np.left_shift(a[m:], shift)
    return out


def _unpack_lanes(a: np.ndarray, shift: int, low: int, k: int) -> np.ndarray:
    """The inverse of :func:`_pack_lanes` for the result bits (at the bits ``low`` of each lane):
    the first ``k`` of ``a & low`` then ``(a >> shift) & low``."""
    m = a.shape[0]
    out = np.empty(2 * m, dtype=np.uint8)
    np.bitwise_and(a, low, out=out[:m])
    np.right_shift(a, shift, out=out[m:])
    out[m:] &= low
    return out[:k]


def b2a_bit(ctx: Context, bit: torch.Tensor) -> torch.Tensor:
    """XOR-shared bit → additive share of the integer 0/1, with a dealer bit ``r``; one round.

    Open ``c = b ^ r`` (one byte per element); then ``b = c + r − 2cr`` with ``c`` public.
    """
    r_xor, r_add = ctx.draw(Request(Kind.BIT, tuple(bit.shape)))
    if ctx.is_dealer:
        return torch.zeros(bit.shape, dtype=torch.int64)
    flat = (bit.to(torch.uint8) ^ r_xor).reshape(-1)
    c = (flat.numpy() ^ ctx.exchange(flat).numpy()).astype(np.int64)
    # (1 − 2c)·r (+ c on party 0), branch-free: with m = −c, (1 − 2c)·r = (r ^ m) − m = (r ^ m) + c
    out = np.bitwise_xor(_np(r_add.reshape(-1)), np.negative(c))
    out += c
    if local_rank(ctx) == 0:
        out += c
    return torch.from_numpy(out).view(bit.shape)


COMPARISON_SLICE = 1 << 20
"""Comparisons of more elements than this run in consecutive slices of this many elements."""


def mul_bit(ctx: Context, x: torch.Tensor, bit: torch.Tensor) -> torch.Tensor:
    """Additive share of ``x · β`` for an additively shared ``x`` and an **XOR-shared** bit ``β``
    (e.g. from :func:`msb_xor`) in **one** round: the conversion of ``β`` and the product together
    (B2A then a Beaver product took two rounds and 17 bytes per element; this one 9).

    The dealer's material (:attr:`~dpfunc.mpc.context.Kind.BIT_MUL`) is a random bit ``r`` (XOR- and
    additively shared), a uniform ``a`` and additive shares of ``a·r``. One message opens
    ``c = β ⊕ r`` (a byte) and ``e = x − a`` (a word) — one-time pads under ``r`` and ``a``. Then
    ``β = c + r − 2cr`` with ``c`` public, and ``x·r = e·r + a·r`` (Beaver's product with ``r`` as the
    unopened operand), so ``x·β = c·x + (1 − 2c)(e·r + a·r)``: linear in each party's shares. Exact.
    More than :data:`COMPARISON_SLICE` elements take one dealer request per slice (still one round).

    Example:
        >>> from dpfunc.mpc import decode, encode, mul_bit, reveal_to, share_from, simulate
        >>> def program(ctx):  # β = [1, 0, 1] XOR-shared: party 0 holds it, party 1 zeros
        ...     x = share_from(ctx, 1, encode(torch.tensor([2.5, -1.0, -3.0])) if ctx.rank == 1 else None, (3,), Key(1))
        ...     beta = torch.tensor([1, 0, 1], dtype=torch.uint8) if ctx.rank == 0 else torch.zeros(3, dtype=torch.uint8)
        ...     return reveal_to(ctx, 1, mul_bit(ctx, x, beta))
        >>> decode(simulate(program, dealer_key=Key(2)).outputs[1]).tolist()
        [2.5, 0.0, -3.0]
    """
    if tuple(bit.shape) != tuple(x.shape):
        raise ValueError(f"mul_bit: x and bit must have one shape, got {tuple(x.shape)} and {tuple(bit.shape)}")
    n = x.numel()
    cuts = [(i, min(i + COMPARISON_SLICE, n)) for i in range(0, n, COMPARISON_SLICE)] or [(0, 0)]
    mats = [ctx.draw(Request(Kind.BIT_MUL, (j - i,))) for i, j in cuts]
    if ctx.is_dealer:
        return torch.zeros(x.shape, dtype=torch.int64)
    # one message: the n masked words e = x − a, then the n masked bits c = β ⊕ r
    flat = torch.empty(9 * n, dtype=torch.uint8)
    words, bytes_ = flat[: 8 * n].view(torch.int64), flat[8 * n :]
    xf, bf = x.reshape(-1), bit.reshape(-1).to(torch.uint8)
    for (i, j), (r_xor, a, _, _) in zip(cuts, mats):
        torch.sub(xf[i:j], a, out=words[i:j])
        torch.bitwise_xor(bf[i:j], r_xor, out=bytes_[i:j])
    other = ctx.exchange(flat)
    e = np.add(_np(words), _np(other[: 8 * n].view(torch.int64)))
    cm = np.negative((bytes_.numpy() ^ other[8 * n :].numpy()).astype(np.int64))  # −c for the public c ∈ {0, 1}
    out = torch.empty(n, dtype=torch.int64)
    for (i, j), (_, _, r_add, ar) in zip(cuts, mats):
        t = np.multiply(e[i:j], _np(r_add))
        t += _np(ar)  # this party's share of x·r
        # c·x + (1 − 2c)·x·r = t + ((x − 2t) & m) with m = −c (all ones where c = 1): branch-free
        # (a select on the random c costs ~4.5 ns an element here, these bit ops ~0.5)
        d = np.subtract(_np(xf[i:j]), t)
        d -= t
        d &= cm[i:j]
        np.add(d, t, out=out[i:j].numpy())
    return out.view(x.shape)


def sign_bits(ctx: Context, x: torch.Tensor, bits: int = 64, slice_elements: int | None = None) -> torch.Tensor:
    """XOR shares of ``[x < 0]`` (:func:`msb_xor`), slice by slice above :data:`COMPARISON_SLICE`
    elements (as :func:`ltz`); for :func:`mul_bit`."""
    limit = COMPARISON_SLICE if slice_elements is None else slice_elements
    n = x.numel()
    if n <= limit:
        return msb_xor(ctx, x, bits)
    flat = x.reshape(-1)
    return torch.cat([msb_xor(ctx, flat[i : i + limit], bits) for i in range(0, n, limit)]).view(x.shape)


def ltz(ctx: Context, x: torch.Tensor, slice_elements: int | None = None, bits: int = 64) -> torch.Tensor:
    """Additive share of the integer ``[x < 0]`` (0/1); ``log2(bits) + 2`` rounds (8 for 64 bits).
    Exact for every ring element with ``bits = 64``; with fewer bits exact when
    ``−2^(bits−1) ≤ x < 2^(bits−1)`` (see :func:`msb_xor`).

    More than ``slice_elements`` elements (default :data:`COMPARISON_SLICE`, about a million) are
    compared in consecutive slices (8 rounds each), so that the working set of the comparison
    circuit — a few dozen temporaries of the input's size — and the dealer's AND triples for it stay
    bounded whatever the batch size and the layer width.
    """
    limit = COMPARISON_SLICE if slice_elements is None else slice_elements
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"ltz: slice_elements must be an int >= 1, got {slice_elements!r}")
    n = x.numel()
    if n <= limit:
        return b2a_bit(ctx, msb_xor(ctx, x, bits))
    flat = x.reshape(-1)
    out = [b2a_bit(ctx, msb_xor(ctx, flat[i : i + limit], bits)) for i in range(0, n, limit)]
    return torch.cat(out).view(x.shape)


def ge_public(ctx: Context, x: torch.Tensor, threshold_ring: int) -> torch.Tensor:
    """Additive share of the integer ``[x ≥ t]`` for a public ring value ``t``."""
    return add_public(ctx, -ltz(ctx, add_public(ctx, x, -threshold_ring)), 1)


def relu(ctx: Context, x: torch.Tensor, bits: int = 64) -> torch.Tensor:
    """``max(x, 0) = x − x·[x < 0]``; exact (no truncation); 8 rounds (7 on 32-bit words: the sign's
    carry tree, then :func:`mul_bit` — conversion and product in one round; ``bits``: see :func:`ltz`)."""
    return x - mul_bit(ctx, x, sign_bits(ctx, x, bits))


def maximum(ctx: Context, x: torch.Tensor, y: torch.Tensor, bits: int = 64) -> torch.Tensor:
    """Elementwise ``max(x, y) = y + relu(x − y)``; exact (with ``bits < 64``: when ``|x − y|`` is
    within the range of :func:`ltz`)."""
    return y + relu(ctx, x - y, bits)


def max_last(ctx: Context, x: torch.Tensor, bits: int = 64) -> torch.Tensor:
    """Max over the last dimension by a pairwise tree (``⌈log2 n⌉`` comparison layers); exact."""
    while x.shape[-1] > 1:
        n = x.shape[-1]
        half = n // 2
        m = maximum(ctx, x[..., :half], x[..., half : 2 * half], bits)
        x = torch.cat([m, x[..., 2 * half :]], dim=-1) if n % 2 else m
    return x[..., 0]


def argmax_onehot(ctx: Context, x: torch.Tensor) -> torch.Tensor:
    """Additive shares of the one-hot integer vector of ``argmax(x, dim=-1)`` (first max on ties).

    A tournament: for each pair (earlier ``u``, later ``w``), ``s = [u ≥ w]``, the winner's value
    ``w + s(u − w)`` and its one-hot ``h_w + s(h_u − h_w)`` go on. No softmax, exact.
    """
    n = x.shape[-1]
    eye = torch.eye(n, dtype=torch.int64, device=x.device)
    onehot = (eye if local_rank(ctx) == 0 else torch.zeros_like(eye)).expand(*x.shape[:-1], n, n).clone()
    vals = x  # (..., n); onehot (..., n, n): one row per candidate
    while vals.shape[-1] > 1:
        m = vals.shape[-1]
        half = m // 2
        u, w = vals[..., :half], vals[..., half : 2 * half]
        hu, hw = onehot[..., :half, :], onehot[..., half : 2 * half, :]
        # s = [u ≥ w] = 1 − β with β = [u − w < 0] XOR-shared: X·s = X − X·β (mul_bit: one round)
        beta = sign_bits(ctx, u - w)
        both = torch.cat([(u - w).unsqueeze(-1), hu - hw], dim=-1)
        prod = both - mul_bit(ctx, both, beta.unsqueeze(-1).expand(both.shape).contiguous())
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


def max_pool2d(ctx: Context, x: torch.Tensor, kernel: int, stride: int, padding: int, bits: int = 64) -> torch.Tensor:
    """Max pooling, separably: the max over each window's columns, then over its rows (exact: the
    max of a rectangle is the max of its column maxima). For overlapping windows this needs fewer
    comparisons than a tournament over each ``k × k`` window (3×3, stride 2: ``(H + 2p)·Wo·2 +
    Ho·Wo·2`` instead of ``Ho·Wo·8``, 22 % fewer at 32² → 16²), in the same ``2·⌈log2 k⌉``
    comparison layers. Padding uses a public very negative value: −2^40 in the ring for 64-bit
    comparisons, ``−2^(bits−2)`` for ``bits < 64`` (then exact when ``|x| < 2^(bits−2)``, e.g.
    ``|v| < 16384`` for 32 bits and f = 16, so that every difference stays within :func:`ltz`'s range).
    """
    if padding:
        low = -(1 << 40) if bits == 64 else -(1 << (bits - 2))
        pad = low if local_rank(ctx) == 0 else 0
        x = torch.nn.functional.pad(x, (padding,) * 4, value=pad)
    cols = max_last(ctx, x.unfold(3, kernel, stride), bits)  # (B, C, H + 2p, Wo)
    return max_last(ctx, cols.unfold(2, kernel, stride), bits)  # (B, C, Ho, Wo)
