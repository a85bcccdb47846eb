"""Distributed DP on top of secure aggregation: each site adds only a *share* of the noise.

**Option, with trust assumptions — read them.** In central DP-SGD (Abadi et al. 2016) a trusted server
adds ``N(0, σ²C²)`` to the sum of clipped per-example gradients. Here no one is trusted with the noise:
in a round where the sites together take one DP-SGD step over the union of their data (each site
Poisson-samples its own records with rate ``q``, clips each example's gradient to norm ``C`` and sums),
each site adds ``N(0, σ²C²/h · I)`` to its clipped sum before secure aggregation, with
``h = threshold − colluding_sites``. The server only ever sees the sum (:mod:`dpfunc.secagg`), which holds
at least ``threshold`` sites' inputs; at most ``colluding_sites`` of them know (and could subtract) their
own shares; so the sum carries at least ``h · σ²C²/h = σ²C²`` of noise nobody can remove — the noise of
central DP-SGD — and each record's guarantee is that of central DP-SGD with noise multiplier ``σ``,
sampling rate ``q`` and the number of steps (:meth:`DistributedGaussian.epsilon`).

Assumptions under which that guarantee holds (otherwise it does not):
    * at most ``colluding_sites`` sites collude with the server (share their noise), the server is
      semi-honest, and every applied sum has ≥ ``threshold`` sites (secure aggregation enforces this);
    * each site samples, clips and adds its share faithfully (a site that adds no noise lowers the
      noise of the sum: count it among the colluding sites);
    * the released quantity is the real-valued noisy sum. **Not covered by** :class:`DistributedGaussian`
      / :func:`distributed_noisy_sum` (a variance model, kept for experiments): the fixed-point encoding
      rounds each site's noisy vector to the grid and clips it to the encoding range before summation,
      outside the accounting. **Covered by** :class:`DistributedDiscreteGaussian` /
      :func:`distributed_round`, what ``dpfunc federated --distributed-noise`` uses: the clipped sum is
      rounded first (sensitivity ``C + √d·2^-k``), the noise is the exact discrete Gaussian on that grid,
      nothing is clipped (the ring wraps: post-processing of the exact integer sum), and the sum of the
      honest shares is accounted with Kairouz, Liu & Steinke (ICML 2021, Prop. 14).

Noise cost: with ``n ≥ threshold`` sites in the sum, the sum carries ``n/h`` times the central variance
(more noise than central DP-SGD when more sites take part than the guarantee assumes);
:meth:`DistributedGaussian.noise_multiplier_in_sum` says how much.

Example:
    >>> dn = DistributedGaussian(noise_multiplier=1.0, max_grad_norm=1.0, threshold=4, colluding_sites=1)
    >>> round(dn.share_std, 4), round(dn.noise_multiplier_in_sum(included=5), 4)
    (0.5774, 1.1547)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch

from dpfunc._validate import check_int_range, check_nonnegative, check_positive_finite
from dpfunc.keys import Key
from dpfunc.noise import gaussian_noise
from dpfunc.secagg.ring import FixedPoint, Ring, check_sum_fits
from dpfunc.secagg.round import run_round
from dpfunc.secagg.types import RoundFailedError, SecAggConfig, Stage

__all__ = ["DistributedGaussian", "DistributedSum", "distributed_noisy_sum", "DistributedDiscreteGaussian",
           "DistributedRound", "distributed_round"]


@dataclass(frozen=True)
class DistributedGaussian:
    """How much noise each site adds so that every accepted sum carries central DP-SGD's noise.

    Args:
        noise_multiplier: ``σ`` of the central mechanism the sum must carry (≥ 0).
        max_grad_norm: ``C``, the per-example clipping bound.
        threshold: ``t`` of secure aggregation: no sum of fewer than ``t`` sites is ever applied.
        colluding_sites: ``c``, the most sites assumed to collude with the server; ``0 ≤ c < t``.
    """

    noise_multiplier: float
    max_grad_norm: float
    threshold: int
    colluding_sites: int = 0

    def __post_init__(self) -> None:
        fn = "DistributedGaussian"
        object.__setattr__(self, "noise_multiplier", check_nonnegative(fn, "noise_multiplier", self.noise_multiplier))
        object.__setattr__(self, "max_grad_norm", check_positive_finite(fn, "max_grad_norm", self.max_grad_norm))
        t = check_int_range(fn, "threshold", self.threshold, low=2)
        check_int_range(fn, "colluding_sites", self.colluding_sites, low=0, high=t - 1)

    @property
    def honest_sites(self) -> int:
        """``h = threshold − colluding_sites``: honest sites guaranteed in every accepted sum."""
        return self.threshold - self.colluding_sites

    @property
    def share_std(self) -> float:
        """Per-coordinate standard deviation of one site's noise share, ``σC/√h``."""
        return self.noise_multiplier * self.max_grad_norm / math.sqrt(self.honest_sites)

    def noise_multiplier_in_sum(self, included: int, colluding: Optional[int] = None) -> float:
        """The noise multiplier that ``included`` sites' shares leave once ``colluding`` of them (default:
        the assumed ``colluding_sites``) are subtracted: ``σ·√((included − colluding)/h)``."""
        fn = "DistributedGaussian.noise_multiplier_in_sum"
        n = check_int_range(fn, "included", included, low=0)
        c = self.colluding_sites if colluding is None else check_int_range(fn, "colluding", colluding, low=0, high=n)
        return self.noise_multiplier * math.sqrt(max(n - c, 0) / self.honest_sites)

    def epsilon(self, sampling_rate: float, steps: int, delta: float, method: str = "pld") -> float:
        """Each record's ε under the assumptions above: central DP-SGD at ``σ`` (Poisson rate ``q``)."""
        from dpfunc.accounting import dpsgd_epsilon

        return dpsgd_epsilon(self.noise_multiplier, sampling_rate, steps, delta, method)

    def add_share(self, clipped_sum: Mapping[str, torch.Tensor], key: Key) -> dict:
        """A site's clipped gradient sum plus its noise share (its own key: shares must be independent)."""
        noise = gaussian_noise(key, clipped_sum, self.share_std)
        return {k: v + noise[k] for k, v in clipped_sum.items()}


@dataclass(frozen=True)
class DistributedSum:
    """The server's view: the noisy sum, who is in it, and how much noise it carries."""

    total: dict
    included: tuple
    noise_multiplier_in_sum: float
    sites_clipped: int
    error_bound: float


def distributed_noisy_sum(clipped_sums: Mapping[int, Mapping[str, torch.Tensor]], noise: DistributedGaussian,
                          keys: Mapping[int, Key], *, value_clip: float, precision_bits: int = 40,
                          ring_bits: int = 64, dropouts=None, round_id: int = 0,
                          secrets: Optional[Mapping[int, bytes]] = None) -> DistributedSum:
    """One round in process: every site adds its share and the server learns only the noisy sum.

    Args:
        clipped_sums: ``{site: Σ_i clip(g_i, C)}`` over the site's Poisson batch.
        noise: the :class:`DistributedGaussian`; its ``threshold`` is secure aggregation's.
        keys: ``{site: Key}``, each site's own noise key for this round.
        value_clip: the encoding range of each coordinate of a site's noisy sum (entries beyond it are
            clipped and counted in ``sites_clipped`` — choose it so that this stays 0).
        precision_bits, ring_bits: the fixed-point encoding (checked not to overflow).

    The caller divides the sum by the expected batch size ``q·N`` and steps its optimizer, as in
    :func:`dpfunc.dpsgd`.
    """
    fn = "distributed_noisy_sum"
    if not isinstance(noise, DistributedGaussian):
        raise TypeError(f"{fn}: noise must be a DistributedGaussian, got {type(noise).__name__}")
    sites = sorted(clipped_sums)
    if set(keys) != set(sites):
        raise ValueError(f"{fn}: keys must name exactly the sites {sites}, got {sorted(keys)}")
    if len(sites) < noise.threshold:
        raise RoundFailedError(f"{fn}: {len(sites)} sites, threshold is {noise.threshold}",
                               stage=Stage.ADVERTISE_KEYS, available=len(sites), needed=noise.threshold)
    fp = FixedPoint(clip=check_positive_finite(fn, "value_clip", value_clip), bits=precision_bits)
    flag = FixedPoint.integer(1)
    ring = Ring(ring_bits)
    check_sum_fits([fp, flag], max_sites=len(sites), ring=ring)
    names = list(clipped_sums[sites[0]])
    shapes = {k: tuple(clipped_sums[sites[0]][k].shape) for k in names}
    inputs = {}
    for s in sites:
        noisy = noise.add_share(clipped_sums[s], keys[s])
        flat = np.concatenate([noisy[k].detach().to(torch.float64).reshape(-1).numpy() for k in names])
        q, clipped = fp.encode(flat)
        inputs[s] = ring.from_signed(np.concatenate([q, [1 if clipped else 0]]))
    length = int(sum(math.prod(v) for v in shapes.values()))
    cfg = SecAggConfig(threshold=noise.threshold, vector_length=length + 1, ring_bits=ring_bits)
    result, _ = run_round(cfg, inputs, round_id=round_id, dropouts=dropouts, secrets=secrets,
                          graph_seed=None if secrets is None else bytes(32))
    signed = ring.to_signed(result.total)
    values = fp.decode(signed[:length])
    total, off = {}, 0
    for k in names:
        size = int(math.prod(shapes[k]))
        total[k] = torch.from_numpy(values[off:off + size].reshape(shapes[k]))
        off += size
    return DistributedSum(total, result.included, noise.noise_multiplier_in_sum(len(result.included)),
                          int(signed[length]), len(result.included) * fp.scale / 2)


# ------------------------------------------------------------------------------------------------------
# The rigorous version used by ``dpfunc federated --distributed-noise``: integer noise on a grid, in the ring


def _tau(summands: int, variance: float) -> float:
    """``τ = 10 Σ_{k=1}^{n−1} exp(−2π²σ² k/(k+1))`` of Kairouz, Liu & Steinke (2021, Prop. 14), ``σ² = variance``."""
    return 10.0 * sum(math.exp(-2.0 * math.pi ** 2 * variance * k / (k + 1)) for k in range(1, summands))


@dataclass(frozen=True)
class DistributedDiscreteGaussian:
    """Distributed discrete Gaussian on a ``2^-k`` grid (Kairouz, Liu & Steinke, ICML 2021), in the ring.

    What each site does with its clipped gradient sum ``S_s`` (``d`` coordinates, each example's gradient
    clipped to norm ``C``)::

        x_s = round(S_s · 2^k) + Y_s   mod 2^ring_bits,    Y_s ~ N_Z(0, v)^d  (exact sampler, CSPRNG)
        v   ≥ (σ·Δ·2^k)² / h,   Δ = C + √d·2^-k,   h = threshold − colluding_sites

    and secure aggregation reveals only ``Σ_{s ∈ U} x_s mod 2^ring_bits`` for a set ``U`` of at least
    ``threshold`` sites (:mod:`dpfunc.secagg`).

    Formal guarantee (add/remove one record of one site), under the trust assumptions below: the
    released sum is post-processing (reduction mod 2^k, decoding) of the integer vector
    ``Σ_U round(S_s·2^k) + Σ_U Y_s``. Rounding is a deterministic function of the site's data whose l2
    sensitivity is ``Δ·2^k`` in grid units (the slack ``√d·2^-k`` of :func:`dpfunc.secure_noise.rounded_sensitivity`;
    no per-site rounding is left outside the accounting, and no noisy value is clipped: values wrap, which
    is post-processing of the exact sum). Subtracting the shares the ``c`` colluders know leaves a sum of
    ``h' = |U| − c ≥ h`` independent ``N_Z(0, v)``; by Proposition 14 of Kairouz et al. its Rényi divergence
    of order ``α ≥ 1`` is at most ``α/2 · ε²`` with ``ε² = (Δ·2^k)²/(h'·v) + 2τd`` (``τ`` of that
    proposition, which underflows to 0 at the grid noise levels used here) — the Rényi curve of a Gaussian
    with noise multiplier ``1/ε`` (:meth:`noise_multiplier_in_sum`, what each site's ledger records as a
    ``DISCRETE_GAUSSIAN`` step; Poisson subsampling is then bounded by
    :mod:`dpfunc.accounting.discrete_gaussian`). With ``h' ≥ h`` that multiplier is ≥ ``σ`` up to ``τ``.

    Trust assumptions (the guarantee does not hold otherwise):
        * at most ``colluding_sites`` sites share their noise with the server (semi-honest server; no
          sum of fewer than ``threshold`` sites is unmasked — secure aggregation enforces this);
        * every site samples, clips and adds its share faithfully (a site that skips its noise counts as
          colluding) and keeps its noise secret (drawn from ``os.urandom``, never from the run seed).

    Args:
        noise_multiplier: ``σ > 0``, relative to ``Δ`` (so the ledger's σ is that of the rounded query).
        max_grad_norm: ``C``.
        threshold: ``t ≥ 2`` of secure aggregation.
        colluding_sites: ``c`` with ``0 ≤ c < t`` (``h = t − c ≥ 1`` honest sites in every sum).
        num_coordinates: ``d`` (≥ 1).
        grid_bits: ``k``; None picks :func:`dpfunc.secure_noise.grid_exponent_for` (slack ≤ 1 % of C).

    Example:
        >>> ddg = DistributedDiscreteGaussian(1.0, 1.0, threshold=3, colluding_sites=1, num_coordinates=100)
        >>> ddg.grid_bits, ddg.honest_sites, round(ddg.noise_multiplier_in_sum(3), 4)
        (10, 2, 1.0005)
    """

    noise_multiplier: float
    max_grad_norm: float
    threshold: int
    colluding_sites: int
    num_coordinates: int
    grid_bits: Optional[int] = None

    def __post_init__(self) -> None:
        from dpfunc.secure_noise import grid_exponent_for

        fn = "DistributedDiscreteGaussian"
        sigma = check_positive_finite(fn, "noise_multiplier", self.noise_multiplier)
        object.__setattr__(self, "noise_multiplier", sigma)
        object.__setattr__(self, "max_grad_norm", check_positive_finite(fn, "max_grad_norm", self.max_grad_norm))
        t = check_int_range(fn, "threshold", self.threshold, low=2)
        c = check_int_range(fn, "colluding_sites", self.colluding_sites, low=0)
        if c >= t:
            raise ValueError(f"{fn}: colluding_sites={c} leaves threshold − colluding_sites = {t - c} honest sites in a "
                             f"sum of threshold={t}: no noise would be guaranteed. Need colluding_sites < threshold "
                             f"(raise the threshold or assume fewer colluders)")
        d = check_int_range(fn, "num_coordinates", self.num_coordinates, low=1)
        k = grid_exponent_for(d, self.max_grad_norm) if self.grid_bits is None else self.grid_bits
        object.__setattr__(self, "grid_bits", check_int_range(fn, "grid_bits", k, low=0, high=60))
        if self.tau(self.honest_sites) * d > 1e-12:
            raise ValueError(f"{fn}: the noise on the grid is too coarse (per-site std {math.sqrt(self.share.variance):.3g} "
                             f"grid steps): the sum-of-discrete-Gaussians correction τ·d exceeds 1e-12; raise grid_bits")

    @property
    def honest_sites(self) -> int:
        """``h = threshold − colluding_sites``."""
        return self.threshold - self.colluding_sites

    @property
    def sensitivity(self) -> float:
        """``Δ = C + √d·2^-k``: the l2 sensitivity of the grid-rounded clipped sum (real units)."""
        from dpfunc.secure_noise import rounded_sensitivity

        return rounded_sensitivity(self.max_grad_norm, self.num_coordinates, self.grid_bits)

    @property
    def share(self):
        """The :class:`~dpfunc.secure_noise.DiscreteGaussianParams` of one site's noise (grid units)."""
        from dpfunc.secure_noise import discrete_gaussian_params

        return discrete_gaussian_params(self.noise_multiplier * self.sensitivity * 2.0 ** self.grid_bits
                                        / math.sqrt(self.honest_sites))

    def tau(self, summands: int) -> float:
        return _tau(summands, float(self.share.variance))

    def noise_multiplier_in_sum(self, included: int) -> float:
        """The noise multiplier (relative to Δ) that a sum of ``included`` sites guarantees after the
        ``colluding_sites`` colluders remove their shares: ``1/ε``, ``ε² = (Δ·2^k)²/(h'·v) + 2τd``.

        Raises:
            ValueError: ``included < threshold`` (such a sum is never unmasked).
        """
        fn = "DistributedDiscreteGaussian.noise_multiplier_in_sum"
        n = check_int_range(fn, "included", included, low=0)
        if n < self.threshold:
            raise ValueError(f"{fn}: a sum of {n} sites is never released (threshold={self.threshold})")
        h = n - self.colluding_sites
        v = float(self.share.variance)
        grid_delta = self.sensitivity * 2.0 ** self.grid_bits
        eps2 = grid_delta ** 2 / (h * v) + 2.0 * self.tau(h) * self.num_coordinates
        return 1.0 / math.sqrt(eps2)

    def ring_bits_for(self, max_sites: int, max_abs_value: float) -> int:
        """The smallest ring (≤ 64 bits) in which a sum of ``max_sites`` sites whose clipped sums have
        coordinates ``|S_j| ≤ max_abs_value`` decodes correctly unless some noise exceeds 40 standard
        deviations (probability < 1e-300 per coordinate). Correctness only: privacy never depends on it."""
        fn = "DistributedDiscreteGaussian.ring_bits_for"
        n = check_int_range(fn, "max_sites", max_sites, low=1)
        value = check_positive_finite(fn, "max_abs_value", max_abs_value)
        reach = n * (value * 2.0 ** self.grid_bits + 1) + 40 * math.sqrt(n * self.share.variance)
        bits = int(math.ceil(math.log2(reach))) + 2
        if bits > 64:
            raise ValueError(f"{fn}: the sum of {n} sites needs {bits} ring bits (> 64); use fewer grid_bits")
        return bits

    def encode_share(self, clipped_sum: Mapping[str, torch.Tensor], ring: Ring, rng=None) -> np.ndarray:
        """At the site: ``round(S·2^k) + N_Z(0, v)`` as ring elements (entries in name order).

        ``rng``: a :class:`dpfunc.secure_noise.SecureRandom` (None: a fresh one from ``os.urandom``)."""
        from dpfunc.secure_noise import SecureRandom, sample_discrete_gaussian

        fn = "DistributedDiscreteGaussian.encode_share"
        flat = torch.cat([v.detach().reshape(-1).to("cpu", torch.float64) for v in clipped_sum.values()])
        if flat.numel() != self.num_coordinates:
            raise ValueError(f"{fn}: clipped_sum has {flat.numel()} coordinates, expected {self.num_coordinates}")
        if not bool(torch.isfinite(flat).all()):
            raise ValueError(f"{fn}: clipped_sum holds non-finite values")
        scaled = torch.ldexp(flat, torch.tensor(self.grid_bits, dtype=torch.int64))   # exact: a power-of-two scale
        if scaled.abs().max().item() >= 2.0 ** 61:
            raise ValueError(f"{fn}: |clipped_sum| · 2^{self.grid_bits} reaches 2^61; use fewer grid_bits")
        grid = torch.round(scaled).to(torch.int64).numpy()
        noise = sample_discrete_gaussian(self.num_coordinates, self.share, SecureRandom() if rng is None else rng)
        return ring.from_signed(grid + noise)

    def decode_sum(self, total: np.ndarray, ring: Ring) -> np.ndarray:
        """The released sum in real units: ``to_signed(total) · 2^-k`` (float64, exact for |sum| < 2^53)."""
        return np.ldexp(ring.to_signed(total).astype(np.float64), -self.grid_bits)


class DistributedRound(NamedTuple):
    """What the server learns from one distributed-DP round: the noisy sum and who is in it."""

    total: dict                  # name -> float64 tensor: Σ_U S_s + noise
    included: tuple              # U (sites whose masked input is in the sum)
    noise_multiplier: float      # what the included sites' ledgers record (≥ σ up to τ)
    threshold: int
    stats: object                # dpfunc.secagg.RoundStats (bytes, CPU seconds)


def distributed_round(clipped_sums: Mapping[int, Mapping[str, torch.Tensor]], noise: DistributedDiscreteGaussian, *,
                      ring_bits: int, round_id: int = 0, dropouts=None, secrets: Optional[Mapping[int, bytes]] = None,
                      rngs: Optional[Mapping[int, object]] = None) -> DistributedRound:
    """One round in process: every site encodes its noisy share, secure aggregation sums, the server decodes.

    Raises:
        RoundFailedError: fewer than ``noise.threshold`` sites at some stage (nothing released).
    """
    fn = "distributed_round"
    if not isinstance(noise, DistributedDiscreteGaussian):
        raise TypeError(f"{fn}: noise must be a DistributedDiscreteGaussian, got {type(noise).__name__}")
    sites = sorted(clipped_sums)
    if len(sites) < noise.threshold:
        raise RoundFailedError(f"{fn}: {len(sites)} sites, threshold is {noise.threshold}",
                               stage=Stage.ADVERTISE_KEYS, available=len(sites), needed=noise.threshold)
    ring = Ring(check_int_range(fn, "ring_bits", ring_bits, low=2, high=64))
    names = list(clipped_sums[sites[0]])
    shapes = {k: tuple(clipped_sums[sites[0]][k].shape) for k in names}
    inputs = {s: noise.encode_share(clipped_sums[s], ring, None if rngs is None else rngs[s]) for s in sites}
    cfg = SecAggConfig(threshold=noise.threshold, vector_length=noise.num_coordinates, ring_bits=ring.bits)
    result, stats = run_round(cfg, inputs, round_id=round_id, dropouts=dropouts, secrets=secrets,
                              graph_seed=None if secrets is None else bytes(32))
    values = noise.decode_sum(result.total, ring)
    total, off = {}, 0
    for k in names:
        size = int(math.prod(shapes[k]))
        total[k] = torch.from_numpy(values[off:off + size].reshape(shapes[k]).copy())
        off += size
    return DistributedRound(total, result.included, noise.noise_multiplier_in_sum(len(result.included)),
                            noise.threshold, stats)
