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
    * the released quantity is the real-valued noisy sum. **Not covered:** the fixed-point encoding rounds
      each site's noisy vector to the grid (error ≤ ``scale/2`` per coordinate — 1.5e-8 at the default
      encoding, many orders below σC) and clips it to the encoding range before summation; this per-site
      rounding is not part of the accounting. The rigorous treatment of quantised distributed noise is the
      distributed discrete Gaussian (Kairouz, Liu, Steinke, ICML 2021), not implemented here.

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
from typing import Optional

import numpy as np
import torch

from dpfunc._validate import check_int_range, check_nonnegative, check_positive_finite
from dpfunc.keys import Key
from dpfunc.noise import gaussian_noise
from dpfunc.secagg.ring import FixedPoint, Ring, check_sum_fits
from dpfunc.secagg.round import run_round
from dpfunc.secagg.types import RoundFailedError, SecAggConfig, Stage

__all__ = ["DistributedGaussian", "DistributedSum", "distributed_noisy_sum"]


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
