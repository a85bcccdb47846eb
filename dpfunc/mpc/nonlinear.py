"""Non-linearities the case-study models need: tanh (and sigmoid), reciprocal square root, GroupNorm.

* **tanh**: a piecewise polynomial. ``[−L, L]`` is cut into ``pieces`` equal intervals; on each, a
  degree-``degree`` Chebyshev least-squares fit of tanh in the local variable ``u = x − centre``
  (``|u| ≤ half-width``, so monomial coefficients stay small in fixed point); outside, ±1. The
  interval is selected without revealing it: with steps ``s_k = [x ≥ t_k]`` at the ``pieces + 1``
  breakpoints, the selected interval's centre and coefficients are ``row_0 + Σ_k s_k (row_{k+1} −
  row_k)`` of a public table (local: shared integers times public constants; the two outer rows are
  the constants ∓1 with zero higher coefficients), then one set of powers of ``u = x − centre`` and
  one batched product with the shared coefficients. Outside ``[−L, L]`` the higher coefficients are
  exactly 0 in the ring, so overflowing powers of a large ``u`` contribute exactly nothing.
  Default ``L = 5, pieces = 5, degree = 7``: maximum error of the approximation 9.1e-5 (the ±1
  saturation beyond 5) and about 1e-4 with 16-bit fixed point (measured in the tests).
  Cost: ``pieces + 1`` comparisons (batched, 8 rounds) + 3 rounds of powers + 1 product round;
  bytes per element and party ≈ (pieces + 1)·55 + 16·(degree − 1) + 16·degree ≈ 540.
* **rsqrt** (``1/√v``, ``v > 0``): initial guess from comparisons with powers of two
  ``[v ≥ 2^k]`` for ``k = low_exp … high_exp`` (within a factor ``2^±1/4`` of the truth), then
  Newton's iteration ``y ← y (3 − (v·y)·y) / 2`` (relative error ``e ↦ ≈ 1.5 e²``; 4 iterations
  bring 19 % to below 1e-8, so fixed-point rounding dominates: the result is within a few units of
  ``2^-f`` of ``1/√v``, i.e. relative error ≈ ``few · 2^-f · √v`` — 1e-4 at v = 1, 4e-3 at
  v = 4096). Valid for ``v ∈ [2^low_exp, 2^(high_exp+1))``.
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
from dpfunc.mpc.protocols import add_public, beaver, ltz, mul, mul_int, square, truncate

__all__ = ["TanhApprox", "tanh", "sigmoid", "RsqrtConfig", "rsqrt", "group_norm"]


@dataclass(frozen=True)
class TanhApprox:
    """Piecewise-polynomial tanh: ``pieces`` intervals on ``[−limit, limit]``, degree ``degree``."""

    limit: float = 5.0
    pieces: int = 5
    degree: int = 7

    def __post_init__(self) -> None:
        check_number("TanhApprox", "limit", self.limit, low=0.5, high=16.0)
        check_int_range("TanhApprox", "pieces", self.pieces, low=1, high=64)
        check_int_range("TanhApprox", "degree", self.degree, low=1, high=15)

    @property
    def breakpoints(self) -> tuple[float, ...]:
        return tuple(float(t) for t in np.linspace(-self.limit, self.limit, self.pieces + 1))

    @property
    def centres(self) -> tuple[float, ...]:
        t = self.breakpoints
        return tuple((t[i] + t[i + 1]) / 2 for i in range(self.pieces))

    @functools.cached_property
    def coefficients(self) -> tuple[tuple[float, ...], ...]:
        """Monomial coefficients in ``u = x − centre`` for each piece (lowest degree first)."""
        half = self.limit / self.pieces
        out = []
        for c in self.centres:
            u = half * np.cos(np.linspace(0, np.pi, 512))  # Chebyshev-distributed samples
            fit = np.polynomial.chebyshev.Chebyshev.fit(u, np.tanh(u + c), self.degree, domain=[-half, half])
            out.append(tuple(float(v) for v in fit.convert(kind=np.polynomial.Polynomial, domain=[-1, 1]).coef))
        return tuple(out)

    def plaintext(self, x: torch.Tensor) -> torch.Tensor:
        """The approximation in float64 (the oracle the MPC protocol is tested against)."""
        x = x.to(torch.float64)
        out = torch.where(x >= self.limit, 1.0, -1.0).to(torch.float64)
        t = self.breakpoints
        for j, (c, coef) in enumerate(zip(self.centres, self.coefficients)):
            inside = (x >= t[j]) & (x < t[j + 1])
            u = x - c
            val = sum(a * u**i for i, a in enumerate(coef))
            out = torch.where(inside, val, out)
        return out

    def max_error(self) -> float:
        """``max |approx − tanh|`` on a fine grid over ``[−2·limit, 2·limit]`` (float64)."""
        x = torch.linspace(-2 * self.limit, 2 * self.limit, 200001, dtype=torch.float64)
        return float((self.plaintext(x) - torch.tanh(x)).abs().max())


def _powers(ctx: Context, u: torch.Tensor, degree: int) -> list[torch.Tensor]:
    """``[u^1, …, u^degree]`` in ``⌈log2 degree⌉`` rounds (each level batched into one product)."""
    pw = [None, u]
    top = 1
    while top < degree:
        hi = min(2 * top, degree)
        ks = list(range(top + 1, hi + 1))
        left = torch.cat([pw[top].unsqueeze(0)] * len(ks))
        right = torch.cat([pw[k - top].unsqueeze(0) for k in ks])
        prod = mul(ctx, left, right)
        pw.extend(prod.unbind(0))
        top = hi
    return pw[1:]


def tanh(ctx: Context, x: torch.Tensor, approx: TanhApprox = TanhApprox()) -> torch.Tensor:
    """Shares of ``approx(x) ≈ tanh(x)`` (see the module docstring for the error and cost)."""
    fp = ctx.fp
    enc = lambda v: int(round(v * fp.scale))  # noqa: E731
    t = approx.breakpoints
    stacked = torch.stack([add_public(ctx, x, -enc(tk)) for tk in t])
    steps = add_public(ctx, -ltz(ctx, stacked), 1)  # (P+1, *x): [x >= t_k], shared integers
    # piece 0 (x < −L) is the constant −1, pieces 1…P the polynomials, piece P+1 the constant +1
    d = approx.degree
    centres = [0.0] + list(approx.centres) + [0.0]
    coefs = [(-1.0,) + (0.0,) * d] + [tuple(c) for c in approx.coefficients] + [(1.0,) + (0.0,) * d]
    table = torch.tensor([[enc(c)] + [enc(a) for a in row] for c, row in zip(centres, coefs)], dtype=torch.int64)
    deltas = (table[1:] - table[:-1]).to(x.device)  # (P+1, d+2): what crossing breakpoint k adds
    # the selected piece's centre and coefficients: table[0] + Σ_k s_k·deltas[k] (local, exact)
    shape = (len(t),) + (1,) * x.dim()
    sel = [add_public(ctx, (steps * deltas[:, j].view(shape)).sum(0), int(table[0, j])) for j in range(d + 2)]
    u = x - sel[0]  # |u| ≤ half-width inside [−L, L]; outside, the coefficients are exactly 0
    pw = torch.stack(_powers(ctx, u, d))  # (d, *x)
    acc = beaver(ctx, torch.stack(sel[2:]), pw, Bilinear.MUL).sum(0)
    return truncate(ctx, acc) + sel[1]


def sigmoid(ctx: Context, x: torch.Tensor, approx: TanhApprox = TanhApprox()) -> torch.Tensor:
    """``σ(x) = (tanh(x/2) + 1) / 2`` with the tanh approximation (error ≤ half of tanh's)."""
    th = tanh(ctx, truncate(ctx, x, 2), approx)
    return truncate(ctx, add_public(ctx, th, ctx.fp.scale), 2)


@dataclass(frozen=True)
class RsqrtConfig:
    """Range ``[2^low_exp, 2^(high_exp+1))`` of the initial guess and Newton iterations."""

    low_exp: int = -10
    high_exp: int = 16
    iterations: int = 4

    def __post_init__(self) -> None:
        check_int_range("RsqrtConfig", "low_exp", self.low_exp, low=-14, high=0)
        check_int_range("RsqrtConfig", "high_exp", self.high_exp, low=0, high=28)
        check_int_range("RsqrtConfig", "iterations", self.iterations, low=0, high=10)


def rsqrt(ctx: Context, v: torch.Tensor, cfg: RsqrtConfig = RsqrtConfig()) -> torch.Tensor:
    """Shares of ``1/√v`` for shared ``v > 0`` in ``cfg``'s range (see the module docstring)."""
    fp = ctx.fp
    ks = list(range(cfg.low_exp, cfg.high_exp + 1))
    guess = lambda k: 2.0 ** (-(k + 0.5) / 2)  # noqa: E731  (geometric middle of [2^k, 2^(k+1)))
    stacked = torch.stack([add_public(ctx, v, -int(round(2.0**k * fp.scale))) for k in ks])
    steps = add_public(ctx, -ltz(ctx, stacked), 1)  # [v >= 2^k], integers
    deltas = torch.tensor(
        [int(round((guess(k) - guess(k - 1)) * fp.scale)) for k in ks], dtype=torch.int64, device=v.device
    ).view((len(ks),) + (1,) * v.dim())
    y = add_public(ctx, (steps * deltas).sum(0), int(round(guess(cfg.low_exp - 1) * fp.scale)))
    three = 3 * fp.scale
    for _ in range(cfg.iterations):
        vy2 = mul(ctx, mul(ctx, v, y), y)  # (v·y)·y keeps precision where y² would underflow
        y = truncate(ctx, beaver(ctx, y, add_public(ctx, -vy2, three), Bilinear.MUL), 2 * fp.scale)
    return y


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
    r = rsqrt(ctx, var, cfg).repeat_interleave(c // groups, dim=1)  # (B, C)
    if weight is not None:
        r = mul(ctx, r, weight.view(1, c))
    y = mul(ctx, xc.reshape(b, c, -1), r.unsqueeze(-1)).reshape(x.shape)
    if bias is not None:
        y = y + bias.view((1, c) + (1,) * (x.dim() - 2))
    return y
