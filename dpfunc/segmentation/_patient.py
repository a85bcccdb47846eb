"""Patient-level DP: the patient is the unit of privacy, all of their slices are one example.

Adjacency and guarantee:
    Two training sets are *neighbours* when one is the other with **one patient added or removed —
    with all of their slices** (add/remove-one adjacency over patients). At every step each patient
    is included independently with probability ``q = expected patients per step / number of
    patients`` (Poisson sampling over patients). An included patient ``i`` contributes ONE gradient,

        g_i = ∇θ (1/s_i) Σ_{k ∈ S_i} ℓ(x_ik, y_ik),

    the mean over ``S_i``, the ``s_i`` slices of that patient used at this step (all of them, or
    ``slices_per_patient`` drawn uniformly without replacement when the patient has more), clipped
    once: ``clip(g_i) = g_i · min(1, C/‖g_i‖)``. So ‖clip(g_i)‖ ≤ C however many slices the patient
    has, the clipped sum moves by at most C when a patient is added or removed, and the Gaussian
    noise ``N(0, σ²C²)`` with the accountant run on ``(σ, q, steps)`` gives (ε, δ)-DP **per patient**:
    the guarantee covers everything a patient contributes. Drawing the slices (a function of the
    patient's own data and a key) is part of that patient's contribution and needs no accounting.

    With ``PrivacyUnit.SLICE`` (deepee's setting) each slice is an example, Poisson-sampled and
    clipped alone, and the accountant runs over slices: the guarantee then covers ONE SLICE; a patient
    with ``s`` slices is protected only at group-privacy level ``s`` (ε grows roughly ``s``-fold).
    It is offered to compare with published slice-level results, not as a patient guarantee.

How it runs:
    A batch is one tensor ``x`` of shape ``(B, K, 3, H, W)`` (patient unit; ``K = slices_per_patient``)
    or ``(B, 3, H, W)`` (slice unit). Channel 0 is the image, channel 1 the label, channel 2 the
    slice's loss weight: ``K / s_i`` for the patient's real slices, 0 for padding slices (a padding
    slice has zero loss, hence zero gradient, and changes nothing). The per-patient loss is the mean
    over the K rows of ``weight · ℓ``, i.e. the mean over the real slices. The fast engine treats the
    K slices like augmentation views (``views_per_example=K``: their gradients summed per example
    before the norm); the vmap oracle differentiates the same per-patient loss directly.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dpfunc._validate import check_enum, check_int_range
from dpfunc.clipping import Clipping
from dpfunc.keys import Key
from dpfunc.segmentation._msd import PatientVolume
from dpfunc.step import GradEngine, vmap_engine

__all__ = ["PrivacyUnit", "Engine", "PackedSegmenter", "slice_losses", "packed_losses", "patient_batch", "slice_batch",
           "segmentation_engine", "patient_loss"]


class PrivacyUnit(enum.Enum):
    """What one example (the unit of sampling, clipping and the guarantee) is."""

    PATIENT = "patient"
    SLICE = "slice"


class Engine(enum.Enum):
    """Per-example clipping: ``FAST`` (``dpfunc.bridge.fast.fast_engine``) or ``VMAP`` (the oracle)."""

    FAST = "fast"
    VMAP = "vmap"


def slice_losses(logits: torch.Tensor, labels: torch.Tensor, *, smooth: float = 1.0) -> torch.Tensor:
    """Per-slice loss: pixel-mean cross-entropy + soft Dice loss of the foreground class.

    ``soft_dice = 1 − (2 Σ p·t + s) / (Σ p + Σ t + s)`` with ``p`` the softmax probability of class 1,
    ``t`` the binary label and smoothing ``s`` (so a slice without organ asks for ``p → 0``)
    (Milletari et al. 2016).

    Args:
        logits: ``(N, 2, H, W)``; labels: ``(N, H, W)`` int64 in {0, 1}.

    Returns:
        ``(N,)``: row ``i`` depends on slice ``i`` only.
    """
    ce = F.cross_entropy(logits, labels, reduction="none").mean(dim=(1, 2))
    p = logits.softmax(1)[:, 1]
    t = labels.to(p.dtype)
    inter = (p * t).sum(dim=(1, 2))
    dice = (2 * inter + smooth) / (p.sum(dim=(1, 2)) + t.sum(dim=(1, 2)) + smooth)
    return ce + (1 - dice)


class PackedSegmenter(nn.Module):
    """Wraps a segmentation net for packed inputs ``(N, c + 2, H, W)`` = image (``c`` channels), label, loss weight.

    ``forward`` returns ``(logits, labels, weights)``: the net sees the first ``image_channels``
    channels only (1 for a CT slice; the number of fixed features when the input pipeline precomputes
    them, see :class:`~dpfunc.models.FixedFeatures`); labels and weights ride along so that a per-row
    loss needs no separate target tensors (which the fast engine would copy to every slice of a patient).
    """

    def __init__(self, net: nn.Module, image_channels: int = 1):
        super().__init__()
        self.net = net
        self.image_channels = check_int_range("PackedSegmenter", "image_channels", image_channels, low=1)

    def forward(self, x: torch.Tensor):
        c = self.image_channels
        return self.net(x[:, :c]), x[:, c].round().to(torch.int64), x[:, c + 1, 0, 0]


def packed_losses(out) -> torch.Tensor:
    """``weight · slice_loss`` per row of a :class:`PackedSegmenter` output, ``(N,)``."""
    logits, labels, weights = out
    return weights.to(logits.dtype) * slice_losses(logits, labels)


def _pack(images: torch.Tensor, labels: torch.Tensor, weight: float | torch.Tensor) -> torch.Tensor:
    w = torch.as_tensor(weight, dtype=images.dtype).reshape(-1, 1, 1, 1).expand(images.shape[0], 1, *images.shape[-2:])
    return torch.cat([images, labels[:, None].to(images.dtype), w], dim=1)


def patient_batch(patients: Sequence[PatientVolume], indices: torch.Tensor | Sequence[int], slices_per_patient: int,
                  key: Key) -> torch.Tensor:
    """Packed patient-unit batch ``(B, K, 3, H, W)`` for the sampled ``indices``.

    A patient with more than ``K`` slices gets ``K`` of them drawn uniformly without replacement
    from ``key.fold_in(patient index)``; one with fewer gets zero padding slices of weight 0. Real
    slices get weight ``K / s_i`` so that the mean over the K rows is the mean over the real slices.
    """
    fn = "patient_batch"
    k = check_int_range(fn, "slices_per_patient", slices_per_patient, low=1)
    idx = [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
    if not patients:
        raise ValueError(f"{fn}: patients is empty")
    h, w = patients[0].images.shape[-2:]
    rows = []
    for i in idx:
        if not 0 <= i < len(patients):
            raise ValueError(f"{fn}: index {i} out of range for {len(patients)} patients")
        p = patients[i]
        s = p.images.shape[0]
        if s == 0:
            raise ValueError(f"{fn}: patient {p.name} has no slices")
        take = torch.arange(s) if s <= k else torch.randperm(s, generator=key.fold_in(i).generator())[:k].sort().values
        used = int(take.numel())
        packed = _pack(p.images[take], p.labels[take], k / used)
        if used < k:
            packed = torch.cat([packed, packed.new_zeros((k - used, *packed.shape[1:]))])
        rows.append(packed)
    if not rows:
        return torch.zeros((0, k, patients[0].images.shape[1] + 2, h, w))
    return torch.stack(rows)


def slice_batch(slices_images: torch.Tensor, slices_labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Packed slice-unit batch ``(B, 3, H, W)``, weight 1 per slice."""
    return _pack(slices_images[indices], slices_labels[indices], 1.0)


def patient_loss(apply_fn, unit: PrivacyUnit):
    """The loss of ONE example for ``vmap_engine``: ``loss(params, buffers, x)`` (x without batch dim)."""
    if unit is PrivacyUnit.PATIENT:
        def loss(params, buffers, x):  # x: (K, 3, H, W), one patient's rows
            return packed_losses(apply_fn(params, buffers, x)).mean()
    else:
        def loss(params, buffers, x):  # x: (3, H, W), one slice
            return packed_losses(apply_fn(params, buffers, x[None]))[0]
    return loss


def segmentation_engine(model: PackedSegmenter, clipping: Clipping, *, unit: PrivacyUnit | str = PrivacyUnit.PATIENT,
                        slices_per_patient: int | None = None, engine: Engine | str = Engine.FAST) -> GradEngine:
    """A :class:`~dpfunc.GradEngine` clipping per patient (or per slice) for a :class:`PackedSegmenter`.

    The batch is ``(x,)`` with ``x`` from :func:`patient_batch` (``(B, K, 3, H, W)``) or
    :func:`slice_batch` (``(B, 3, H, W)``). Both engines return the same
    :class:`~dpfunc.ClippedSum` (norms per patient, clipped sum, sensitivity C).
    """
    fn = "segmentation_engine"
    unit = check_enum(fn, "unit", unit, PrivacyUnit)
    engine = check_enum(fn, "engine", engine, Engine)
    if not isinstance(model, PackedSegmenter):
        raise TypeError(f"{fn}: model must be a PackedSegmenter, got {type(model).__name__}")
    if unit is PrivacyUnit.PATIENT:
        check_int_range(fn, "slices_per_patient", slices_per_patient, low=1)
    if engine is Engine.FAST:
        from dpfunc.bridge.fast import fast_engine

        return fast_engine(model, packed_losses, clipping,
                           views_per_example=slices_per_patient if unit is PrivacyUnit.PATIENT else None)
    from dpfunc.bridge import functionalize

    apply_fn, _, _ = functionalize(model)
    return vmap_engine(patient_loss(apply_fn, unit), clipping=clipping)
