"""Overlap metrics for segmentation: Dice and IoU per patient (3-D), mean ± patient bootstrap CI.

Conventions:

    ==========================  =====================================================
    Dice(P, T)                  ``2 |P ∩ T| / (|P| + |T|)``
    IoU(P, T) (Jaccard)         ``|P ∩ T| / |P ∪ T|``
    P and T both empty          1.0 for both (nothing to find, nothing found)
    exactly one empty           0.0
    ==========================  =====================================================

A patient's score is computed over their whole (selected) volume at once — voxels of all slices
pooled — not as a mean of slice scores, so slices without organ do not inflate it.
Confidence intervals resample PATIENTS with replacement (percentile bootstrap, Efron & Tibshirani
1993): the patient is the unit of the test set as well as of privacy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from dpfunc._validate import check_int_range, check_number
from dpfunc.metrics import ConfidenceInterval

__all__ = ["dice_score", "iou_score", "mean_ci", "predict_volume"]


def _binary(fn: str, pred, truth) -> tuple[torch.Tensor, torch.Tensor]:
    p, t = torch.as_tensor(pred), torch.as_tensor(truth)
    if p.shape != t.shape:
        raise ValueError(f"{fn}: prediction and truth must have the same shape, got {tuple(p.shape)} and {tuple(t.shape)}")
    for name, x in (("prediction", p), ("truth", t)):
        if x.is_floating_point() or x.is_complex() or (x.numel() and not bool(((x == 0) | (x == 1)).all())):
            raise ValueError(f"{fn}: {name} must be a binary mask of ints/bools in {{0, 1}}, got dtype {x.dtype}"
                             f"{'' if x.is_floating_point() else ' with other values'}")
    return p.to(torch.bool), t.to(torch.bool)


def dice_score(pred, truth) -> float:
    """Dice coefficient of two binary masks of the same shape (any dims; 1.0 when both are empty).

    Example:
        >>> dice_score(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 0, 0]))
        0.6666666666666666
    """
    p, t = _binary("dice_score", pred, truth)
    inter = int((p & t).sum())
    total = int(p.sum()) + int(t.sum())
    return 1.0 if total == 0 else 2.0 * inter / total


def iou_score(pred, truth) -> float:
    """Intersection over union (Jaccard) of two binary masks (1.0 when both are empty).

    Example:
        >>> iou_score(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 0, 0]))
        0.5
    """
    p, t = _binary("iou_score", pred, truth)
    union = int((p | t).sum())
    return 1.0 if union == 0 else int((p & t).sum()) / union


def mean_ci(values: Sequence[float], *, seed: int, num_resamples: int = 1000, confidence: float = 0.95) -> ConfidenceInterval:
    """Mean of per-patient scores with a percentile bootstrap interval (patients resampled).

    Example:
        >>> ci = mean_ci([0.9, 0.8, 0.95, 0.85], seed=0, num_resamples=200)
        >>> ci.lower <= ci.estimate <= ci.upper
        True
    """
    fn = "mean_ci"
    check_int_range(fn, "seed", seed)
    check_int_range(fn, "num_resamples", num_resamples, low=1)
    check_number(fn, "confidence", confidence, low=0, high=1, low_open=True, high_open=True)
    v = np.asarray(list(values), dtype=np.float64)
    if v.ndim != 1 or v.size == 0 or not np.isfinite(v).all():
        raise ValueError(f"{fn}: values must be a non-empty sequence of finite numbers, got {list(values)!r}")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, (num_resamples, v.size))].mean(1)
    alpha = (1 - confidence) / 2
    lo, hi = (float(q) for q in np.quantile(means, [alpha, 1 - alpha]))
    return ConfidenceInterval(estimate=float(v.mean()), lower=lo, upper=hi, confidence=float(confidence),
                              num_resamples=num_resamples, num_valid=num_resamples)


def predict_volume(apply_fn: Callable, params: dict, buffers: dict, images: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """Argmax masks ``(S, H, W)`` int64 for a patient's slices ``images`` ``(S, 1, H, W)``.

    ``apply_fn`` maps ``(N, 1, H, W)`` to ``(N, classes, H, W)`` logits (the bare net, not the
    packed wrapper).
    """
    out = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            out.append(apply_fn(params, buffers, images[i:i + batch_size]).argmax(1))
    return torch.cat(out) if out else torch.zeros((0, *images.shape[-2:]), dtype=torch.int64)
