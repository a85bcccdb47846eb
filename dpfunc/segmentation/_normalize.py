"""Per-volume intensity normalisation: a function of ONE patient's own volume, so it costs no privacy.

The organ's intensity varies between patients (on the phantoms the liver lies anywhere in +50 … +90 HU; in
real CT the contrast phase moves it more). A head that reads fixed intensity bands learns each band only
from the training patients whose organ falls in it; under patient-level DP the bands that few training
patients populate are dominated by noise, and a test patient whose organ lies there is missed (README
'Segmentation under DP', the diagnosis of the fifth round). :func:`rank_normalize` replaces every in-window
pixel by its rank in the patient's OWN volume — per-volume histogram equalisation — so an organ that is
brighter than most of the patient's soft tissue lands at the same rank band whatever its Hounsfield value.

Privacy:
    The normalised volume of patient ``i`` is a deterministic function of patient ``i``'s (windowed) image
    volume alone — no other patient, no label, no statistic pooled over the training set enters it. So a
    patient's per-step gradient is still a function of that patient's data only, the clipping bound
    ``‖clip(g_i)‖ ≤ C`` and the sensitivity ``C`` under adding/removing a patient are unchanged
    (``tests/test_segmentation_normalize.py`` pins both as properties), and a test patient is normalised from
    their own unlabelled volume, as any preprocessing of the input.

Example:
    >>> x = torch.tensor([0.0, 0.2, 0.4, 0.4, 1.0]).view(1, 1, 1, 5)
    >>> rank_normalize(x).flatten().tolist()     # 0 and 1 (outside the window) kept; 3 in-window pixels
    [0.0, 0.3333333432674408, 1.0, 1.0, 1.0]
"""

from __future__ import annotations

import enum

import torch

__all__ = ["VolumeNorm", "rank_normalize", "normalize_volume"]


class VolumeNorm(enum.Enum):
    """Per-volume intensity normalisation of the windowed slices (``SegmentationConfig.volume_norm``).

    ``NONE``: the windowed intensities in [0, 1] as read (default). ``RANK``: :func:`rank_normalize`.
    """

    NONE = "none"
    RANK = "rank"


def rank_normalize(images: torch.Tensor) -> torch.Tensor:
    """Per-volume histogram equalisation of windowed slices.

    Every pixel strictly inside the window (``0 < x < 1``) becomes the share of the volume's in-window pixels
    that are ``≤ x`` (its empirical CDF value, in ``(0, 1]``); pixels at 0 (below the window: air, fat) and at
    1 (above it: bone) are kept. Ties get the same value.

    Guarantees: a function of this one volume (patients are normalised independently); invariant to any
    strictly increasing map of the in-window intensities that keeps them inside the window (a per-patient
    brightness or contrast change); output in [0, 1]; a volume without in-window pixels is returned unchanged.

    Args:
        images: ``(S, 1, H, W)`` floating windowed slices of ONE patient, values in [0, 1].

    Returns:
        ``(S, 1, H, W)``, same dtype.

    Raises:
        TypeError: not a floating tensor. ValueError: wrong shape, non-finite values or values outside [0, 1].
    """
    fn = "rank_normalize"
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError(f"{fn}: images must be a floating tensor of windowed slices, got "
                        f"{type(images).__name__ if not isinstance(images, torch.Tensor) else images.dtype}")
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"{fn}: images must be (S, 1, H, W) slices of one patient, got {tuple(images.shape)}")
    if images.numel() and not (torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1):
        raise ValueError(f"{fn}: images must be windowed intensities in [0, 1] (read_msd's output), got values in "
                         f"[{float(images.min())}, {float(images.max())}]")
    inside = (images > 0) & (images < 1)
    values = images[inside]
    if values.numel() == 0:
        return images.clone()
    ordered = values.sort().values
    out = images.clone()
    out[inside] = torch.searchsorted(ordered, values, right=True).to(images.dtype) / values.numel()
    return out


def normalize_volume(images: torch.Tensor, kind: VolumeNorm) -> torch.Tensor:
    """Apply the :class:`VolumeNorm` ``kind`` to one patient's ``(S, 1, H, W)`` windowed slices."""
    if kind is VolumeNorm.NONE:
        return images
    if kind is VolumeNorm.RANK:
        return rank_normalize(images)
    raise ValueError(f"normalize_volume: kind must be a VolumeNorm, got {kind!r}")
