"""What the server sees in each threat scenario, built with dpfunc's own DP-SGD pieces.

=============  =====================================================================================
scenario       the update the server receives from a batch of ``B`` images
=============  =====================================================================================
NONPRIVATE     the plain mean gradient ``Σ_i g_i / B`` of one site (FedSGD without protection)
CLIP           DP-SGD with σ = 0: ``Σ_i clip(g_i, C) / (q·n)`` — clipping only, to separate its effect
DP             the site's DP-SGD update ``(Σ_i clip(g_i, C) + N(0, σ²C² I)) / (q·n)``
SECAGG         the sum of ``sites`` sites' DP-SGD updates (each its own batch, key and noise)
=============  =====================================================================================

Under secure aggregation the server learns only the sum of the sites' (masked, then unmasked)
updates, so SECAGG here *is* that sum, computed directly from each site's
:func:`dpfunc.dp_aggregate` update: masking is exact in the fixed-point ring and adds nothing the
attacker could use beyond the sum, so an attack on the sum is an attack on secure aggregation. Each
site update is one :func:`dpfunc.dp_aggregate` step (the exact transform ``dpsgd`` runs), with noise
from ``noise_key(site_key, 0)``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpfunc._tree import Params
from dpfunc._validate import check_int_range, check_nonnegative, check_positive_finite, check_probability, check_enum
from dpfunc.attacks.inversion import SharedUpdate, model_update
from dpfunc.clipping import FlatClipping, clip_and_sum
from dpfunc.keys import Key
from dpfunc.per_example import per_example_grads
from dpfunc.private import DPConfig, dp_aggregate

__all__ = ["Scenario", "ThreatModel", "shared_update"]


class Scenario(enum.Enum):
    """The threat scenarios of the audit (values are the command line's names)."""

    NONPRIVATE = "nonprivate"
    CLIP = "clip"
    DP = "dp"
    SECAGG = "secagg"


@dataclass(frozen=True)
class ThreatModel:
    """The DP-SGD settings of the sites (public knowledge in DP-SGD, so the attacker knows them).

    Attributes:
        noise_multiplier: σ of the DP scenarios (the case study's σ for ε = 3 is about 1.50).
        max_grad_norm: the clipping bound C.
        sampling_rate: q; the update is normalised by the expected batch size ``q·n``.
        num_examples: n, a site's data set size.
        sites: how many sites' updates the securely aggregated sum holds.
    """

    noise_multiplier: float
    max_grad_norm: float = 1.0
    sampling_rate: float = 256 / 4708
    num_examples: int = 4708
    sites: int = 3

    def __post_init__(self) -> None:
        fn = "ThreatModel"
        check_nonnegative(fn, "noise_multiplier", self.noise_multiplier)
        check_positive_finite(fn, "max_grad_norm", self.max_grad_norm)
        check_probability(fn, "sampling_rate", self.sampling_rate)
        check_int_range(fn, "num_examples", self.num_examples, low=1)
        check_int_range(fn, "sites", self.sites, low=1)

    @property
    def expected_batch_size(self) -> float:
        return self.sampling_rate * self.num_examples


def _site_dp_update(apply_fn, params, buffers, x, y, threat: ThreatModel, sigma: float, key: Key) -> Params:
    def loss(p, b, xi, yi):
        return F.cross_entropy(apply_fn(p, b, xi[None]), yi[None])

    per = per_example_grads(loss, {k: v.detach() for k, v in params.items()}, buffers, x, y, in_dims=(None, 0, 0))
    clipping = FlatClipping(threat.max_grad_norm)
    tx = dp_aggregate(DPConfig(clipping, sigma, threat.sampling_rate, threat.num_examples), key)
    noisy, _ = tx.update(clip_and_sum(per, clipping), tx.init(params), params)
    return {k: v.detach() for k, v in noisy.items()}


def shared_update(
    scenario: Scenario | str,
    apply_fn: Callable,
    params: Params,
    buffers: Params,
    site_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    threat: ThreatModel,
    key: Key,
) -> SharedUpdate:
    """The update the server observes in ``scenario`` for the given private batches.

    Args:
        scenario: a :class:`Scenario` (or its value, e.g. ``"dp"``).
        apply_fn, params, buffers: the model at the round being attacked.
        site_batches: ``[(images (B, C, H, W), labels (B,)), ...]``; one batch for NONPRIVATE/CLIP/DP,
            ``threat.sites`` batches for SECAGG.
        threat: the sites' DP-SGD settings.
        key: the noise key; site ``s`` uses ``key.fold_in(s)``.

    Returns:
        A :class:`~dpfunc.attacks.SharedUpdate` with what the attacker knows (``B``, the normaliser,
        and ``C`` for the clipped scenarios).
    """
    fn = "shared_update"
    scenario = check_enum(fn, "scenario", scenario, Scenario)
    if not isinstance(threat, ThreatModel):
        raise TypeError(f"{fn}: threat must be a ThreatModel, got {type(threat).__name__}")
    want = threat.sites if scenario is Scenario.SECAGG else 1
    if len(site_batches) != want:
        raise ValueError(f"{fn}: scenario {scenario.value!r} needs {want} site batch(es), got {len(site_batches)}")
    total = sum(int(x.shape[0]) for x, _ in site_batches)
    if scenario is Scenario.NONPRIVATE:
        x, y = site_batches[0]
        g = model_update(apply_fn, params, buffers, x, y, normalizer=float(x.shape[0]))
        return SharedUpdate(g, total, float(x.shape[0]), None)
    sigma = 0.0 if scenario is Scenario.CLIP else threat.noise_multiplier
    summed: Params | None = None
    for s, (x, y) in enumerate(site_batches):
        u = _site_dp_update(apply_fn, params, buffers, x, y, threat, sigma, key.fold_in(s))
        summed = u if summed is None else {k: summed[k] + u[k] for k in summed}
    return SharedUpdate(summed, total, threat.expected_batch_size, threat.max_grad_norm)
