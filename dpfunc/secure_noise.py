"""Secure noise: an exact discrete Gaussian on a grid, from a CSPRNG keyed by OS entropy.

Why: the default noise (:func:`dpfunc.noise.gaussian_noise`) is reproducible from a seed and sampled in
floating point. Neither is acceptable against an attacker who sees the noisy values: a Mersenne Twister
or Philox stream keyed by a 64-bit seed is predictable, and the low-order bits of a floating-point
Gaussian sample can reveal the unnoised value (Mironov, CCS 2012; Jin et al., S&P 2022).

What this module does instead (``secure=True`` in :func:`dpfunc.dp_aggregate` / :func:`dpfunc.dpsgd`):

1. **Bits**: a ChaCha20 keystream (``cryptography``, i.e. OpenSSL) under a 256-bit key and nonce
   from ``os.urandom``. Nothing derives from the run's seed; two runs with the same seed differ, and
   a secure run is **not reproducible** by design.
2. **Grid**: the clipped sum ``S`` (float) is rounded coordinate-wise to the grid ``h·Z``, ``h = 2^-k``
   (round half to even, per tensor in its float32 / float64 dtype, where ``S/h`` is exact for a
   power-of-two ``h``: the same integer as in float64).
3. **Noise**: i.i.d. discrete Gaussian ``N_Z(0, v)`` on the integers, drawn exactly in integer
   arithmetic only: for ≥ 4096 coordinates by the slot-table rejection sampler of
   :mod:`dpfunc.secure_noise_table` (≈ 2e7 samples/s), otherwise by the rejection sampler of Canonne,
   Kamath & Steinke (NeurIPS 2020, Algorithms 1–3; :func:`sample_discrete_gaussian_cks`, vectorised
   with numpy int64, a Python-int path for values that could overflow int64; ≈ 5e5 samples/s);
   :func:`discrete_gaussian_oracle` is the scalar reference both are tested against. The released gradient is ``h·(round(S/h) + Y) / (q·n)``: a function of an
   integer, so its floating-point bits carry nothing but that integer.

Sensitivity after rounding (the slack, and how it is accounted):
    Rounding the SUM (the engines return sums, not per-example gradients) is a deterministic function
    ``f(D) = round(S(D)/h)``. For neighbours ``D' = D ∪ {x}`` with ``‖g_x‖₂ ≤ C`` each coordinate of
    ``f(D') − f(D)`` is ``(g_j + e'_j − e_j)/h`` with rounding errors ``|e_j|, |e'_j| ≤ h/2``, so
    ``‖f(D') − f(D)‖₂ · h ≤ C + √d·h =: Δ``. The noise variance is set from Δ, not C
    (``v ≥ (σΔ/h)²``), so the noise multiplier σ holds for the rounded query and the ledger stays
    correct. ``k`` defaults to the smallest value with ``√d·h ≤ 0.01·C`` (at most 1 % more noise).

Privacy of the discrete Gaussian:
    CKS 2020, Theorem 14: for an integer-valued query with ``‖f(D) − f(D')‖₂ ≤ Δ/h`` (grid units) and
    i.i.d. ``N_Z(0, (σΔ/h)²)`` noise, the mechanism is ``1/(2σ²)``-zCDP, i.e. Rényi-DP ``α/(2σ²)``
    at every order α — the continuous Gaussian's curve, as an upper bound. Poisson subsampling of that
    RDP curve is bounded with the general theorem of Zhu & Wang (ICML 2019, Thm. 6); see
    :mod:`dpfunc.accounting.discrete_gaussian`. That bound is looser than the exact subsampled
    continuous Gaussian, so secure runs report a somewhat larger ε (the factor is in the README).

Edge cases:

    ======================  =============================================================
    σ = 0                   refused: secure mode exists to add noise
    integers beyond 2^62    refused (ValueError) before any noise is drawn
    same inputs, two calls  different noise (fresh CSPRNG output), by design
    ======================  =============================================================
"""

from __future__ import annotations

import enum
import math
import os
import secrets
from collections.abc import Mapping
from fractions import Fraction
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "SecureRandom",
    "DiscreteGaussianParams",
    "discrete_gaussian_params",
    "DiscreteGaussianSampler",
    "sample_discrete_gaussian",
    "sample_discrete_gaussian_cks",
    "discrete_gaussian_oracle",
    "grid_exponent_for",
    "rounded_sensitivity",
    "SecureNoiseInfo",
    "secure_privatize",
]

_INT63 = (1 << 63) - 1
_SAFE_SQ = 1 << 31  # |c| below this ⇒ c² < 2^62 fits in int64


class SecureRandom:
    """Uniform integers from a ChaCha20 keystream keyed by ``os.urandom`` (never by a seed).

    Each instance draws a fresh 256-bit key and 128-bit nonce (counter + nonce, as ``cryptography``'s
    ChaCha20 takes it) from the operating system. The keystream is produced by OpenSSL; this class
    only turns its bytes into integers (rejection sampling, so every integer in ``[0, m)`` is exactly
    equally likely).
    """

    def __init__(self, _key_nonce: bytes | None = None) -> None:
        try:
            from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
        except ImportError as e:  # an optional dependency: say how to get it
            raise ImportError("SecureRandom: secure mode needs the `cryptography` package: pip install 'dpfunc[secure]'") from e
        key, nonce = (os.urandom(32), os.urandom(16)) if _key_nonce is None else (_key_nonce[:32], _key_nonce[32:48])
        cipher = Cipher(algorithms.ChaCha20(key, nonce), mode=None)
        self._enc = cipher.encryptor()
        self._zeros = b""

    def words(self, n: int) -> np.ndarray:
        """``n`` independent uniform integers in ``[0, 2^63)`` (int64)."""
        raw = np.frombuffer(self._enc.update(bytes(8 * n)), dtype=np.uint64)
        return (raw >> np.uint64(1)).astype(np.int64)

    @classmethod
    def from_key(cls, key_nonce: bytes) -> SecureRandom:
        """A generator keyed by 48 given bytes (a 256-bit key and a 128-bit nonce) instead of fresh OS
        entropy: for ranks that must draw the SAME secure noise (:func:`dpfunc.distributed.shared_entropy`
        hands every rank rank 0's ``os.urandom(48)``). The bytes must be secret and used once."""
        if not isinstance(key_nonce, (bytes, bytearray)) or len(key_nonce) != 48:
            raise ValueError(f"SecureRandom.from_key: key_nonce must be 48 bytes, got {type(key_nonce).__name__} "
                             f"of length {len(key_nonce) if hasattr(key_nonce, '__len__') else '?'}")
        return cls(bytes(key_nonce))

    def spawn(self) -> SecureRandom:
        """An independent generator keyed by the next 48 bytes of this keystream (for worker threads)."""
        return SecureRandom(self._enc.update(bytes(48)))

    def keystream_into(self, out: bytearray) -> None:
        """Overwrite ``out`` with the next ``len(out)`` keystream bytes, without allocating (the hot path)."""
        n = len(out)
        if len(self._zeros) < n:
            self._zeros = bytes(n)
        self._enc.update_into(memoryview(self._zeros)[:n], out)

    def below(self, m) -> np.ndarray:
        """Uniform integers in ``[0, m)``; ``m`` is an int ≥ 1 or an int64 array of them (elementwise)."""
        if isinstance(m, tuple):  # (n, scalar m): n draws below one bound, the common case, without per-element division
            n, bound = m
            if bound < 1:
                raise ValueError(f"SecureRandom.below: m must be >= 1, got {bound}")
            lim = (_INT63 // bound) * bound
            out = self.words(n)
            bad = np.flatnonzero(out >= lim)
            while bad.size:
                w = self.words(bad.size)
                ok = w < lim
                out[bad[ok]] = w[ok]
                bad = bad[~ok]
            return out % bound
        m = np.asarray(m, dtype=np.int64)
        shape = m.shape
        m = m.reshape(-1)
        if m.size and m.min() < 1:
            raise ValueError(f"SecureRandom.below: m must be >= 1, got min {int(m.min())}")
        out = np.empty(m.shape, dtype=np.int64)
        todo = np.arange(m.size)
        while todo.size:
            mm = m[todo]
            w = self.words(todo.size)
            ok = w < (_INT63 // mm) * mm  # accept a whole number of copies of [0, m)
            out[todo[ok]] = w[ok] % mm[ok]
            todo = todo[~ok]
        return out.reshape(shape)

    def below_scalar(self, m: int) -> int:
        """One uniform Python int in ``[0, m)`` for any ``m ≥ 1`` (arbitrary size)."""
        if m < 1:
            raise ValueError(f"SecureRandom.below_scalar: m must be >= 1, got {m}")
        nbytes = (m.bit_length() + 7) // 8 + 8
        top = 1 << (8 * nbytes)
        limit = top - top % m
        while True:
            w = int.from_bytes(self._enc.update(bytes(nbytes)), "little")
            if w < limit:
                return w % m


# ---------------------------------------------------------------- the vectorised sampler (int64)

def _bern_frac(rng: SecureRandom, num: np.ndarray, den) -> np.ndarray:
    """Bernoulli(num/den) elementwise, 0 ≤ num ≤ den (``den`` an int or an array)."""
    if isinstance(den, (int, np.integer)):
        return rng.below((num.size, int(den))).reshape(num.shape) < num
    return rng.below(np.broadcast_to(np.asarray(den, dtype=np.int64), num.shape)) < num


def _bern_exp_minus_one(rng: SecureRandom, n: int) -> np.ndarray:
    """``n`` Bernoulli(e⁻¹): CKS Algorithm 1 at γ = 1, where Bernoulli(γ/K) = Bernoulli(1/K) (K = 1 is certain)."""
    out = np.empty(n, dtype=bool)
    active = np.arange(n)
    k = 2
    while active.size:
        a = rng.below((active.size, k)) == 0
        out[active[~a]] = k % 2 == 1
        active = active[a]
        k += 1
    return out


def _bern_exp_unit(rng: SecureRandom, num: np.ndarray, den, start: int = 1) -> np.ndarray:
    """Bernoulli(exp(−num/den)) elementwise for ``0 ≤ num/den ≤ 1`` (CKS Algorithm 1).

    K ← 1; repeat A ~ Bernoulli(γ/K) until A = 0 (K += 1 otherwise); return [K odd]. Bernoulli(γ/K)
    is drawn as Bernoulli(γ) ∧ Bernoulli(1/K) (independent), so no product ``den·K`` can overflow.
    ``start = 2`` continues a run whose first trial (K = 1) already came out A = 1.
    """
    num = np.asarray(num, dtype=np.int64)
    scalar = isinstance(den, (int, np.integer))
    den = int(den) if scalar else np.broadcast_to(np.asarray(den, dtype=np.int64), num.shape)
    out = np.empty(num.shape, dtype=bool)
    active = np.arange(num.size)
    k = start
    while active.size:
        a = _bern_frac(rng, num[active], den if scalar else den[active])
        if k > 1:
            a &= rng.below((active.size, k)) == 0
        stopped = active[~a]
        out[stopped] = k % 2 == 1
        active = active[a]
        k += 1
    return out


def _bern_exp(rng: SecureRandom, num: np.ndarray, den) -> np.ndarray:
    """Bernoulli(exp(−num/den)) for any ``num/den ≥ 0``: ⌊γ⌋ Bernoulli(e⁻¹) trials, then one of the rest."""
    num = np.asarray(num, dtype=np.int64)
    scalar = isinstance(den, (int, np.integer))
    den = int(den) if scalar else np.broadcast_to(np.asarray(den, dtype=np.int64), num.shape)
    whole = num // den
    frac = num - whole * den
    out = np.ones(num.shape, dtype=bool)
    rem = whole.copy()
    idx = np.flatnonzero(rem > 0)
    while idx.size:
        b = _bern_exp_minus_one(rng, idx.size)
        out[idx[~b]] = False
        rem[idx] -= 1
        idx = idx[b & (rem[idx] > 0)]
    live = np.flatnonzero(out)
    out[live] = _bern_exp_unit(rng, frac[live], den if scalar else den[live])
    return out


def _discrete_laplace(rng: SecureRandom, n: int, t: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` candidates of CKS Algorithm 2 (scale t): ``(values, accepted)``; rejected ones are discarded."""
    u = rng.below((n, t))
    ok = _bern_exp(rng, u, t)
    v = np.zeros(n, dtype=np.int64)
    idx = np.flatnonzero(ok)
    while idx.size:  # V = number of Bernoulli(e⁻¹) successes before the first failure
        a = _bern_exp_minus_one(rng, idx.size)
        v[idx[a]] += 1
        idx = idx[a]
    if t > 1 and v.max(initial=0) > (_INT63 - t) // t:
        raise OverflowError("discrete Laplace: t·V beyond int64")  # probability < e^-(2^62/t), never seen
    x = u + t * v
    sign = rng.below((n, 2))
    ok &= ~((sign == 1) & (x == 0))
    return np.where(sign == 1, -x, x), ok


class DiscreteGaussianParams(NamedTuple):
    """``N_Z(0, t·m)`` sampled with Laplace scale ``t``; ``σ²/t = m`` is an integer by construction."""

    t: int
    m: int

    @property
    def variance(self) -> int:
        return self.t * self.m


def discrete_gaussian_params(sigma: float) -> DiscreteGaussianParams:
    """The smallest variance ``t·m ≥ σ²`` with ``t = ⌊σ⌋ + 1`` (CKS's choice) and integer ``m``.

    Rounding the variance up (by less than ``t ≈ σ``, a relative ``≲ 1/σ``) only adds noise.
    """
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"discrete_gaussian_params: sigma must be a finite number > 0, got {sigma!r}")
    s2 = Fraction(sigma) ** 2
    t = math.floor(sigma) + 1
    m = math.ceil(s2 / t)
    if 2 * t * m >= 1 << 62:
        raise ValueError(f"discrete_gaussian_params: sigma {sigma!r} is too large for the int64 sampler (σ² must be < 2^61)")
    return DiscreteGaussianParams(t, m)


class DiscreteGaussianSampler(enum.Enum):
    """Which exact sampler :func:`sample_discrete_gaussian` uses (all draw the same law, exactly)."""

    AUTO = "auto"  # TABLE from TABLE_MIN_SAMPLES samples on (its table costs 0.1–0.5 s once per variance), else CKS
    TABLE = "table"  # :mod:`dpfunc.secure_noise_table`: slot-table proposal, integer squeezes (≈ 100x faster)
    CKS = "cks"  # :func:`sample_discrete_gaussian_cks`: Canonne–Kamath–Steinke Algorithms 1–3, vectorised


TABLE_MIN_SAMPLES = 4096


def sample_discrete_gaussian(n: int, params: DiscreteGaussianParams, rng: SecureRandom, *,
                             sampler: DiscreteGaussianSampler = DiscreteGaussianSampler.AUTO) -> np.ndarray:
    """``n`` i.i.d. samples of the discrete Gaussian ``N_Z(0, t·m)`` (int64), exactly.

    ``sampler`` picks the algorithm (:class:`DiscreteGaussianSampler`); AUTO takes the slot-table
    sampler (:func:`dpfunc.secure_noise_table.sample_discrete_gaussian_table`) for ``n ≥ 4096`` and the
    CKS sampler below that. Both are exact and use integer arithmetic only.

    Example:
        >>> y = sample_discrete_gaussian(5, discrete_gaussian_params(3.0), SecureRandom())
        >>> y.dtype, y.shape
        (dtype('int64'), (5,))
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"sample_discrete_gaussian: n must be an int >= 0, got {n!r}")
    if not isinstance(sampler, DiscreteGaussianSampler):
        raise TypeError(f"sample_discrete_gaussian: sampler must be a DiscreteGaussianSampler, got {sampler!r}")
    if sampler is DiscreteGaussianSampler.TABLE or (sampler is DiscreteGaussianSampler.AUTO and n >= TABLE_MIN_SAMPLES):
        from dpfunc.secure_noise_table import sample_discrete_gaussian_table

        return sample_discrete_gaussian_table(n, params, rng)
    return sample_discrete_gaussian_cks(n, params, rng)


def sample_discrete_gaussian_cks(n: int, params: DiscreteGaussianParams, rng: SecureRandom) -> np.ndarray:
    """``n`` i.i.d. samples of ``N_Z(0, t·m)`` (int64), exactly, by CKS Algorithm 3 (vectorised).

    Y ~ DLap(t); accept with probability ``exp(−(|Y| − σ²/t)² / (2σ²)) = exp(−(|Y| − m)² / (2tm))``.
    The output pmf is ``∝ exp(−y²/(2tm))`` for every t > 0. Integer arithmetic only; values of
    ``|Y| − m`` at or beyond 2^31 (whose square could overflow int64; probability ≈ e^(−2^31/t))
    are decided with Python integers, so the sampler stays exact. About 5e5 samples/s.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"sample_discrete_gaussian_cks: n must be an int >= 0, got {n!r}")
    t, m = params
    den = 2 * t * m
    chunks, have = [], 0
    while have < n:
        need = n - have
        cand, ok = _discrete_laplace(rng, need + need // 2 + 16, t)
        y = cand[ok]
        c = np.abs(y) - m
        big = np.abs(c) >= _SAFE_SQ
        acc = np.zeros(y.shape, dtype=bool)
        small = np.flatnonzero(~big)
        acc[small] = _bern_exp(rng, c[small] * c[small], den)
        for i in np.flatnonzero(big):  # exact Python-int path for the (never observed) far tail
            acc[i] = _bern_exp_py(int(c[i]) ** 2, den, rng.below_scalar)
        y = y[acc]
        chunks.append(y)
        have += y.size
    return np.concatenate(chunks)[:n] if chunks else np.zeros(0, dtype=np.int64)


# ---------------------------------------------------------------- scalar oracle (Python ints)

def _bern_exp_unit_py(num: int, den: int, below) -> bool:
    """Bernoulli(exp(−num/den)), ``0 ≤ num/den ≤ 1``: CKS Algorithm 1 verbatim with Python ints."""
    k = 1
    while below(den * k) < num:  # A ~ Bernoulli(num/(den·k)) came out 1
        k += 1
    return k % 2 == 1


def _bern_exp_py(num: int, den: int, below) -> bool:
    """Bernoulli(exp(−num/den)) for any ``num/den ≥ 0`` (CKS: peel off Bernoulli(e⁻¹) while γ > 1)."""
    while num > den:
        if not _bern_exp_unit_py(1, 1, below):
            return False
        num -= den
    return _bern_exp_unit_py(num, den, below)


def discrete_gaussian_oracle(params: DiscreteGaussianParams, below=secrets.randbelow) -> int:
    """ONE sample of ``N_Z(0, t·m)``: CKS Algorithms 1–3 written out with Python ints (the test oracle).

    ``below(m)`` returns a uniform int in ``[0, m)``; by default :func:`secrets.randbelow`.
    """
    t, m = params
    while True:
        while True:  # Algorithm 2: discrete Laplace with scale t
            u = below(t)
            if not _bern_exp_py(u, t, below):
                continue
            v = 0
            while _bern_exp_py(1, 1, below):
                v += 1
            x = u + t * v
            neg = below(2) == 1
            if neg and x == 0:
                continue
            y = -x if neg else x
            break
        if _bern_exp_py((abs(y) - m) ** 2, 2 * t * m, below):  # Algorithm 3's acceptance
            return y


# ---------------------------------------------------------------- the grid and the privatised mean

def grid_exponent_for(num_coordinates: int, max_grad_norm: float, slack: float = 0.01) -> int:
    """The smallest ``k ≥ 0`` with ``√d · 2^-k ≤ slack · C`` (the rounding slack, relative to C)."""
    if isinstance(num_coordinates, bool) or not isinstance(num_coordinates, int) or num_coordinates < 1:
        raise ValueError(f"grid_exponent_for: num_coordinates must be an int >= 1, got {num_coordinates!r}")
    if not (0 < slack <= 1) or not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
        raise ValueError(f"grid_exponent_for: need 0 < slack <= 1 and a finite max_grad_norm > 0, got {slack!r}, {max_grad_norm!r}")
    return max(0, math.ceil(math.log2(math.sqrt(num_coordinates) / (slack * max_grad_norm))))


def rounded_sensitivity(max_grad_norm: float, num_coordinates: int, grid_bits: int) -> float:
    """``Δ = C + √d · 2^-k``, rounded up: the l2 sensitivity of the grid-rounded clipped sum (see module doc)."""
    delta = max_grad_norm + math.sqrt(num_coordinates) * 2.0 ** (-grid_bits)
    return math.nextafter(delta, math.inf)


class SecureNoiseInfo(NamedTuple):
    """What one :func:`secure_privatize` call used (all public, fit for a run's config)."""

    grid_bits: int
    sensitivity: float  # Δ = C + √d·2^-k
    variance: int  # of the integer noise, in grid units: ≥ (σΔ/2^-k)²
    num_coordinates: int


def secure_privatize(
    clipped_sum: Mapping[str, torch.Tensor],
    *,
    noise_multiplier: float,
    sensitivity: float,
    expected_batch_size: float,
    grid_bits: int | None = None,
    rng: SecureRandom | None = None,
) -> tuple[dict, SecureNoiseInfo]:
    """``h·(round(S/h) + N_Z(0, v)) / (q·n)`` with ``v ≥ (σΔ/h)²``, ``h = 2^-grid_bits``, ``Δ = C + √d·h``.

    Args:
        clipped_sum: name → summed clipped gradients (sensitivity ``C`` before rounding).
        noise_multiplier: σ > 0 (relative to the rounded query's sensitivity Δ, so the ledger's σ holds).
        sensitivity: C, the l2 sensitivity of ``clipped_sum``.
        expected_batch_size: ``q·n`` (> 0).
        grid_bits: k; None picks :func:`grid_exponent_for` (slack ≤ 1 % of C).
        rng: a :class:`SecureRandom`; None makes a fresh one (new OS entropy).

    Returns:
        ``(noisy mean, SecureNoiseInfo)``; tensors keep their shapes, dtypes and devices.
    """
    from dpfunc.noise import check_expected_batch_size, check_noise_multiplier

    fn = "secure_privatize"
    sigma = check_noise_multiplier(fn, noise_multiplier)
    denom = check_expected_batch_size(fn, expected_batch_size)
    if sigma == 0:
        raise ValueError(f"{fn}: noise_multiplier must be > 0 in secure mode (it exists to add noise), got 0")
    if not (sensitivity > 0 and math.isfinite(sensitivity)):
        raise ValueError(f"{fn}: sensitivity must be a finite number > 0, got {sensitivity!r}")
    d = sum(int(v.numel()) for v in clipped_sum.values())
    if d == 0:
        raise ValueError(f"{fn}: clipped_sum holds no coordinates")
    k = grid_exponent_for(d, sensitivity) if grid_bits is None else grid_bits
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 60:
        raise ValueError(f"{fn}: grid_bits must be an int in [0, 60], got {grid_bits!r}")
    delta = rounded_sensitivity(sensitivity, d, k)
    params = discrete_gaussian_params(sigma * delta * 2.0**k)
    rng = SecureRandom() if rng is None else rng
    # Grid: round(S·2^k) per tensor in its own float32/float64 dtype (S·2^k is exact there, so the integer is
    # the same as in float64), one pass to check the range (NaN and ±inf fail it too), one cast to int64.
    grid = torch.empty(d, dtype=torch.int64)
    scale = 2.0**k
    at = 0
    for v in clipped_sum.values():
        x = v.detach().reshape(-1).to("cpu")
        if x.dtype not in (torch.float32, torch.float64):
            x = x.to(torch.float64)  # float16 / bfloat16 (exact) and anything else
        scaled = x * scale
        if scaled.numel():
            lo, hi = torch.aminmax(scaled)  # NaN and ±inf fail the finiteness check below
            top = max(-lo.item(), hi.item())
            if not math.isfinite(top) and not bool(torch.isfinite(x).all()):
                raise ValueError(f"{fn}: clipped_sum holds non-finite values")
            if not top < 2.0**62:  # also a finite S whose S·2^k overflowed the float dtype
                raise ValueError(f"{fn}: |clipped_sum| · 2^{k} exceeds 2^62; use fewer grid_bits")
        grid[at:at + x.numel()].copy_(scaled.round_())
        at += x.numel()
    noisy = grid.numpy()
    np.add(noisy, sample_discrete_gaussian(d, params, rng), out=noisy)
    out, at = {}, 0
    step = 2.0**-k / denom
    for name, v in clipped_sum.items():
        n = int(v.numel())  # N·(h/(q·n)) in the output's float dtype: a function of the integer N = grid + Y only
        dt = v.dtype if v.dtype in (torch.float32, torch.float64) else torch.float64
        value = torch.mul(grid[at:at + n], torch.tensor(step, dtype=dt))  # one pass: N cast to dt, times step
        out[name] = value.reshape(v.shape).to(device=v.device, dtype=v.dtype)
        at += n
    return out, SecureNoiseInfo(k, delta, params.variance, d)
