"""Non-linearities the case-study models need: tanh (and sigmoid), reciprocal square root, GroupNorm.

* **tanh**: a piecewise polynomial. By default odd: ``tanh(x) = sign(x)·p(|x|)``, with one
  comparison ``[x < 0]`` and one product for ``|x|``; ``[0, L]`` is cut into ``pieces`` equal
  intervals; on each, a degree-``degree`` Chebyshev least-squares fit of tanh in the local variable
  ``v = (|x| − centre) / h`` (``h`` the half-width, so ``|v| ≤ 1`` and the monomial coefficients
  ``a_i·h^i`` stay small in fixed point); beyond ``L``, 1. The interval is selected without revealing
  it: with steps ``s_k = [|x| ≥ t_k]`` at the breakpoints ``t_1 … t_pieces``, the selected
  interval's centre and coefficients are ``row_0 + Σ_k s_k (row_k − row_{k−1})`` of a public table
  (local: shared integers times public constants; the last row is the constant 1 with zero higher
  coefficients); the polynomial is evaluated by Horner's rule (``degree`` products, each rounding
  error damped by ``|v| ≤ 1``), and a last product applies the sign. Beyond ``L`` the higher
  coefficients are exactly 0 in the ring, so a large (or wrongly truncated) ``v`` contributes
  exactly nothing. Default ``L = 5, pieces = 2, degree = 8``: maximum error of the approximation
  9.1e-5 (the saturation beyond 5: the fit itself is below that from degree 8 on, so degree 9 — the
  default before — cost one product and one round more for the same bound) and about 1e-4 with
  16-bit fixed point (measured in the tests).
  Cost: 3 comparisons (the sign as XOR bits, then 2 batched) + 1 product for ``|x|`` (the sign bit's
  conversion and the product in one round, :func:`~dpfunc.mpc.protocols.mul_bit`) + 1 round masking
  ``v`` + ``degree`` Horner products + 1 for the sign (``mul_bit`` again): with 64-bit comparisons
  7 + 1 + 8 + 1 + 8 + 1 = 26 rounds; with 32-bit comparisons (``bits=32``, what
  :func:`dpfunc.bridge.mpc.encrypted_inference` uses) 6 + 1 + 7 + 1 + 8 + 1 = 24 rounds and
  ≈ 15.5 + 9 + 2·16.5 + 8 + 8·8 + 9 ≈ 139 bytes per element and party (155 before the sub-byte comparison levels were packed). (Before Horner: the powers of ``u`` and a batched coefficient product,
  ``2·degree − 1`` products in 5 rounds, 470 bytes.)
  ``odd=False`` is the earlier form: ``pieces + 1`` comparisons of ``x`` itself on ``[−L, L]`` (one
  batch, 8 rounds; 5 pieces of degree 7 have the same error with 6 comparisons and 12 rounds).
* **rsqrt** (``1/√v``, ``v > 0``): initial guess from comparisons with the powers
  ``[v ≥ 2^(k/s)]`` (``s = steps_per_octave``, 4 by default; all in one batch of 64-bit comparisons
  of the tiny ``(B, G)`` variance tensor), the guess ``2^(−(k + 1/2)/(2s))`` within a factor
  ``2^(±1/(4s))`` of the truth (relative error ≤ 4.4 % for ``s = 4``), then Newton's iteration
  ``y ← y (3 − (v·y)·y) / 2`` (relative error ``e ↦ 1.5 e² + 0.5 e³``: 4.4 % → 3.0e-3 → 1.4e-5 after
  the default 2 iterations, 3 rounds each; the guess's comparisons run on 32-bit words of ``v``
  divided locally by ``2^3``, exact for ``v < 2^(high_exp + 2)``), so fixed-point rounding dominates: the result is within a
  few units of ``2^-f`` of ``1/√v``, i.e. relative error ≈ ``few · 2^-f · √v`` — 1e-4 at v = 1, 4e-3
  at v = 4096. (Before: ``s = 1``, 19 %, 4 iterations: 6 more rounds per GroupNorm for the same
  result.) Valid for ``v ∈ [2^low_exp, 2^(high_exp+1))``.
* **GroupNorm** (Wu & He 2018): mean by a local division, variance from square pairs, rsqrt as
  above, then one product by ``γ·rsqrt`` per element; exact up to truncation errors of a few ulps
  plus the rsqrt error.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from dpfunc._validate import check_int_range, check_number
from dpfunc.mpc.context import Bilinear, Context
from dpfunc.mpc.protocols import (
    add_public,
    local_rank,
    beaver,
    ltz,
    mul,
    mul_batch,
    mul_bit,
    mul_chain_operand,
    mul_fixed,
    mul_public,
    sign_bits,
    square,
    truncate,
)

__all__ = ["TanhApprox", "tanh", "sigmoid", "RsqrtConfig", "rsqrt", "group_norm"]


@dataclass(frozen=True)
class TanhApprox:
    """Piecewise-polynomial tanh of degree ``degree``, ±1 beyond ``±limit``.

    ``odd=True`` (default): ``tanh(x) = sign(x)·p(|x|)`` with ``p`` on ``pieces`` equal intervals of
    ``[0, limit]`` (one comparison for the sign, then ``pieces`` on ``|x|``). ``odd=False``:
    ``pieces`` equal intervals of ``[−limit, limit]`` selected by ``pieces + 1`` comparisons of ``x``.
    """

    limit: float = 5.0
    pieces: int = 2
    degree: int = 8
    odd: bool = True

    def __post_init__(self) -> None:
        check_number("TanhApprox", "limit", self.limit, low=0.5, high=16.0)
        check_int_range("TanhApprox", "pieces", self.pieces, low=1, high=64)
        check_int_range("TanhApprox", "degree", self.degree, low=1, high=15)
        if not isinstance(self.odd, bool):
            raise TypeError(f"TanhApprox: odd must be a bool, got {self.odd!r}")

    @property
    def breakpoints(self) -> tuple[float, ...]:
        low = 0.0 if self.odd else -self.limit
        return tuple(float(t) for t in np.linspace(low, self.limit, self.pieces + 1))

    @property
    def centres(self) -> tuple[float, ...]:
        t = self.breakpoints
        return tuple((t[i] + t[i + 1]) / 2 for i in range(self.pieces))

    @functools.cached_property
    def coefficients(self) -> tuple[tuple[float, ...], ...]:
        """Monomial coefficients in ``u = x − centre`` for each piece (lowest degree first)."""
        t = self.breakpoints
        half = (t[1] - t[0]) / 2
        out = []
        for c in self.centres:
            u = half * np.cos(np.linspace(0, np.pi, 512))  # Chebyshev-distributed samples
            fit = np.polynomial.chebyshev.Chebyshev.fit(u, np.tanh(u + c), self.degree, domain=[-half, half])
            out.append(tuple(float(v) for v in fit.convert(kind=np.polynomial.Polynomial, domain=[-1, 1]).coef))
        return tuple(out)

    def plaintext(self, x: torch.Tensor) -> torch.Tensor:
        """The approximation in float64 (the oracle the MPC protocol is tested against)."""
        x = x.to(torch.float64)
        z = x.abs() if self.odd else x
        out = torch.where(z >= self.limit, 1.0, -1.0).to(torch.float64)
        t = self.breakpoints
        for j, (c, coef) in enumerate(zip(self.centres, self.coefficients)):
            inside = (z >= t[j]) & (z < t[j + 1])
            u = z - c
            val = sum(a * u**i for i, a in enumerate(coef))
            out = torch.where(inside, val, out)
        return torch.where(x < 0, -out, out) if self.odd else out

    def max_error(self) -> float:
        """``max |approx − tanh|`` on a fine grid over ``[−2·limit, 2·limit]`` (float64)."""
        x = torch.linspace(-2 * self.limit, 2 * self.limit, 200001, dtype=torch.float64)
        return float((self.plaintext(x) - torch.tanh(x)).abs().max())


def tanh(ctx: Context, x: torch.Tensor, approx: TanhApprox = TanhApprox(), bits: int = 64) -> torch.Tensor:
    """Shares of ``approx(x) ≈ tanh(x)`` (see the module docstring for the error and cost).

    ``bits < 64`` runs the comparisons on ``bits``-bit words (:func:`~dpfunc.mpc.protocols.ltz`):
    exact when ``|x| < 2^(bits − 1 − f)`` (32768 for 32 bits and f = 16).
    """
    fp = ctx.fp
    enc = lambda v: int(round(v * fp.scale))  # noqa: E731
    d = approx.degree
    if approx.odd:
        neg = sign_bits(ctx, x, bits)  # [x < 0], XOR-shared
        z = _sub_twice(x, mul_bit(ctx, x, neg))  # |x|, exact (conversion and product in one round)
        thresholds = approx.breakpoints[1:]  # [|x| ≥ t_k], k = 1 … pieces
    else:
        z = x
        thresholds = approx.breakpoints
    stacked = torch.stack([add_public(ctx, z, -enc(tk)) for tk in thresholds])
    steps = add_public(ctx, -ltz(ctx, stacked, bits=bits), 1)  # (K, *x): [z >= t_k], shared integers
    steps_np = steps.numpy()  # the local arithmetic below in numpy (int64 add/mul 2–4× faster than torch's)
    # coefficients in v = u / half-width (|v| ≤ 1 inside a piece, so Horner's rounding errors are not
    # amplified from step to step): a_i·h^i
    h = (approx.breakpoints[1] - approx.breakpoints[0]) / 2
    table, deltas = _tanh_table(approx, fp.fractional_bits)  # row 0; (K, d+2): what crossing threshold k adds
    # the selected piece's centre and coefficients: table[0] + Σ_k s_k·deltas[k] (local, exact)
    sel = [steps[0]] * (d + 2) if ctx.is_dealer else []  # the dealer needs only the shapes
    for j in range(0 if ctx.is_dealer else d + 2):  # in place, no (K, *x) temporaries: row_0 + Σ_k s_k·Δ_kj
        acc = np.multiply(steps_np[0], deltas[0][j])
        for k in range(1, len(thresholds)):
            acc += steps_np[k] * deltas[k][j]
        if local_rank(ctx) == 0:
            acc += table[j]
        sel.append(torch.from_numpy(acc))
    # |v| ≤ 1 inside the range (a local multiplication by 1/h); beyond it the coefficients are exactly 0
    v = mul_public(ctx, z - sel[0], 1.0 / h)
    # Horner's rule: d products of the input's size (the powers and a batched coefficient product
    # took 2d − 1), in d rounds. Beyond the range every coefficient but the constant is exactly 0 in
    # the ring, so the sum stays exactly 0 (Beaver products are exact) however large (or, after a
    # failed truncation, wrong) v is.
    # v is the same at every step: masked once (one round), then each product opens only y − a
    vm = mul_chain_operand(ctx, v)
    y = sel[d + 1]
    for k in range(d, 0, -1):
        y = torch.from_numpy(np.add(mul_fixed(ctx, y, vm, release=k == 1).numpy(), sel[k].numpy()))
    if approx.odd:
        y = _sub_twice(y, mul_bit(ctx, y, neg))  # sign(x)·p(|x|), exact (a fresh dealer bit)
    return y


def _sub_twice(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x − 2m`` on int64 shares, in numpy (wraps alike; faster than torch's int64 kernels here)."""
    out = np.subtract(x.numpy(), m.numpy())
    out -= m.numpy()
    return torch.from_numpy(out)


@functools.lru_cache(maxsize=64)
def _tanh_table(approx: TanhApprox, fractional_bits: int) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """:func:`tanh`'s public table as Python ints, made once per approximation: the first row
    (centre, then the coefficients ``a_i·h^i``) and the differences of consecutive rows."""
    enc = lambda v: int(round(v * (1 << fractional_bits)))  # noqa: E731
    d = approx.degree
    rows = [(c, tuple(coef)) for c, coef in zip(approx.centres, approx.coefficients)] + [(0.0, (1.0,) + (0.0,) * d)]
    if not approx.odd:
        rows = [(0.0, (-1.0,) + (0.0,) * d)] + rows
    h = (approx.breakpoints[1] - approx.breakpoints[0]) / 2
    table = [[enc(c)] + [enc(a * h**i) for i, a in enumerate(coef)] for c, coef in rows]
    deltas = tuple(tuple(hi - lo for hi, lo in zip(table[k + 1], table[k])) for k in range(len(table) - 1))
    return tuple(table[0]), deltas


def sigmoid(ctx: Context, x: torch.Tensor, approx: TanhApprox = TanhApprox(), bits: int = 64) -> torch.Tensor:
    """``σ(x) = (tanh(x/2) + 1) / 2`` with the tanh approximation (error ≤ half of tanh's)."""
    th = tanh(ctx, truncate(ctx, x, 2), approx, bits)
    return truncate(ctx, add_public(ctx, th, ctx.fp.scale), 2)


@dataclass(frozen=True)
class RsqrtConfig:
    """Range ``[2^low_exp, 2^(high_exp+1))`` of the initial guess, its comparisons per octave, and
    the Newton iterations (see the module docstring for the error after each)."""

    low_exp: int = -10
    high_exp: int = 16
    iterations: int = 2
    steps_per_octave: int = 4

    def __post_init__(self) -> None:
        check_int_range("RsqrtConfig", "low_exp", self.low_exp, low=-14, high=0)
        check_int_range("RsqrtConfig", "high_exp", self.high_exp, low=0, high=28)
        check_int_range("RsqrtConfig", "iterations", self.iterations, low=0, high=10)
        check_int_range("RsqrtConfig", "steps_per_octave", self.steps_per_octave, low=1, high=16)

    def guess_error(self) -> float:
        """Worst relative error of the initial guess, ``2^(1/(4s)) − 1``."""
        return 2.0 ** (1.0 / (4 * self.steps_per_octave)) - 1.0

    def error_bound(self) -> float:
        """Worst relative error after the Newton iterations in exact arithmetic (fixed point adds a
        few units of ``2^-f``): ``e ↦ 1.5 e² + 0.5 e³`` applied ``iterations`` times."""
        e = self.guess_error()
        for _ in range(self.iterations):
            e = 1.5 * e * e + 0.5 * e**3
        return e


def rsqrt(ctx: Context, v: torch.Tensor, cfg: RsqrtConfig = RsqrtConfig(),
          times: torch.Tensor | None = None) -> torch.Tensor:
    """Shares of ``1/√v`` for shared ``v > 0`` in ``cfg``'s range (see the module docstring).

    ``times`` (shared, shape ``v.shape + (k,)``): return ``times · 1/√v`` (broadcast over the last
    dimension) instead, at no extra round — the last Newton step ``y (3 − v·y·y)/2`` multiplies
    ``times·y`` (made in the same round as ``v·y``) rather than ``y`` by ``(3 − v·y·y)/2``.
    GroupNorm's affine weight uses it (one round fewer per layer).
    """
    fp = ctx.fp
    sp = cfg.steps_per_octave
    ks = list(range(cfg.low_exp * sp, (cfg.high_exp + 1) * sp))  # thresholds 2^(k/s)
    guess = lambda k: 2.0 ** (-(k + 0.5) / (2 * sp))  # noqa: E731  (geometric middle of [2^(k/s), 2^((k+1)/s)))
    # the guess's comparisons on 32-bit words: v divided locally by 2^shift so that the range
    # [0, 2^(high_exp+2)) fits (one bit of headroom); the thresholds at f − shift fractional bits
    # (2^-13 absolute for f = 16: a quantisation of the guess's breakpoints, which Newton absorbs)
    shift = max(0, cfg.high_exp + 2 + fp.fractional_bits - 31)
    frac = fp.fractional_bits - shift
    bits = 32 if frac >= 8 else 64
    vq = truncate(ctx, v, 1 << shift) if bits == 32 and shift else v
    scale = float(1 << frac) if bits == 32 else float(fp.scale)
    thr, deltas = _rsqrt_tables(cfg, fp.fractional_bits, scale)
    thr, deltas = thr.view((len(ks),) + (1,) * v.dim()), deltas.view((len(ks),) + (1,) * v.dim())
    # the stacked differences v − t_k in one op (party 0 subtracts the public t_k; party 1 copies)
    stacked = vq.unsqueeze(0) - thr if local_rank(ctx) == 0 else vq.unsqueeze(0).expand((len(ks),) + tuple(vq.shape)).contiguous()
    steps = add_public(ctx, -ltz(ctx, stacked, bits=bits), 1)  # [v >= 2^(k/s)], integers
    y = add_public(ctx, (steps * deltas).sum(0), int(round(guess(ks[0] - 1) * fp.scale)))
    three = 3 * fp.scale
    for i in range(cfg.iterations):
        last = i == cfg.iterations - 1
        if last and times is not None:  # v·y and times·y in one round
            vy, ty = mul_batch(ctx, [(v, y), (times, y.unsqueeze(-1).expand(times.shape))])
        else:
            vy, ty = mul(ctx, v, y), None
        vy2 = mul(ctx, vy, y)  # (v·y)·y keeps precision where y² would underflow
        half = add_public(ctx, -vy2, three)
        if ty is not None:
            return truncate(ctx, beaver(ctx, ty, half.unsqueeze(-1).expand(ty.shape).contiguous(), Bilinear.MUL),
                            2 * fp.scale)
        y = truncate(ctx, beaver(ctx, y, half, Bilinear.MUL), 2 * fp.scale)
    if times is not None:  # no iteration to fold into
        return mul(ctx, times, y.unsqueeze(-1).expand(times.shape).contiguous())
    return y


@functools.lru_cache(maxsize=64)
def _rsqrt_tables(cfg: RsqrtConfig, fractional_bits: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The guess's public thresholds ``2^(k/s)`` (at the comparisons' scale) and the guess's steps
    (at ``2^f``), made once per configuration (a few hundred Python ``round`` calls each time before)."""
    sp = cfg.steps_per_octave
    ks = range(cfg.low_exp * sp, (cfg.high_exp + 1) * sp)
    guess = lambda k: 2.0 ** (-(k + 0.5) / (2 * sp))  # noqa: E731
    thr = torch.tensor([int(round(2.0 ** (k / sp) * scale)) for k in ks], dtype=torch.int64)
    deltas = torch.tensor([int(round((guess(k) - guess(k - 1)) * (1 << fractional_bits))) for k in ks], dtype=torch.int64)
    return thr, deltas


def group_norm(
    ctx: Context,
    x: torch.Tensor,
    groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    cfg: RsqrtConfig = RsqrtConfig(),
) -> torch.Tensor:
    """GroupNorm of shared ``x`` ``(B, C, *)`` with shared affine ``weight``/``bias`` ``(C,)``."""
    b, c = x.shape[:2]
    xg = x.reshape(b, groups, -1)
    n = xg.shape[-1]
    mean = truncate(ctx, xg.sum(-1, keepdim=True), n)
    xc = xg - mean
    var = truncate(ctx, square(ctx, xc).sum(-1), n)  # (B, G)
    var = add_public(ctx, var, max(0, int(round(eps * ctx.fp.scale))))
    if weight is not None:  # γ·rsqrt(var) per channel, γ folded into the last Newton step
        g = weight.view(1, groups, c // groups).expand(b, groups, c // groups).contiguous()
        r = rsqrt(ctx, var, cfg, times=g).reshape(b, c)  # (B, C)
    else:
        r = rsqrt(ctx, var, cfg).repeat_interleave(c // groups, dim=1)  # (B, C)
    y = mul(ctx, xc.reshape(b, c, -1), r.unsqueeze(-1)).reshape(x.shape)
    if bias is not None:
        y = y + bias.view((1, c) + (1,) * (x.dim() - 2))
    return y
