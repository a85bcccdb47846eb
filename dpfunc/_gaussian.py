"""Sampled, normalised 1-D Gaussian windows — the one helper behind the segmentation filter bank's blurs
(:class:`dpfunc.models.FixedFeatures`) and SSIM's local statistics (:func:`dpfunc.attacks.ssim`).

Example:
    >>> w = gaussian_window(1.0, 3)
    >>> w.shape, w.dtype, round(float(w.sum()), 12), bool(w[3] == w.max())
    (torch.Size([7]), torch.float64, 1.0, True)
"""

from __future__ import annotations

import torch

from dpfunc._validate import check_int_range, check_positive_finite

__all__ = ["gaussian_window"]


def gaussian_window(sigma: float, radius: int) -> torch.Tensor:
    """``w_t = exp(−t² / (2σ²)) / Σ_u exp(−u² / (2σ²))`` for ``t = −radius … radius``.

    The callers choose the radius by their own convention (the filter bank ``ceil(3σ)``, at least 1; SSIM
    ``int(truncate·σ + 0.5)``, scikit-image's); the window is symmetric and sums to 1.

    Args:
        sigma: standard deviation in samples (> 0, finite).
        radius: half-width in samples (>= 0).

    Returns:
        float64 ``(2·radius + 1,)``.
    """
    fn = "gaussian_window"
    sigma = check_positive_finite(fn, "sigma", sigma)
    radius = check_int_range(fn, "radius", radius, low=0)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (t / sigma) ** 2)
    return w / w.sum()
