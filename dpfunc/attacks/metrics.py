"""Image similarity for judging reconstructions: MSE, PSNR, SSIM, and optimal matching to originals.

All functions take image batches ``(B, C, H, W)`` and return one value per image ``(B,)`` in float64.
``data_range`` is the width of the pixel range (2 for dpfunc's default ``FIXED`` normalisation, whose
pixels live in [-1, 1]; 1 for images in [0, 1]); PSNR and SSIM are invariant to shifting both images.

Example:
    >>> x = torch.zeros(2, 1, 16, 16); y = x + 0.1
    >>> psnr(x, y, data_range=1.0).round(decimals=4)   # 10·log10(1 / 0.1²), up to float32 rounding of 0.1
    tensor([20., 20.], dtype=torch.float64)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from dpfunc._gaussian import gaussian_window
from dpfunc._validate import check_positive_finite
from dpfunc.attacks._hungarian import linear_sum_assignment

__all__ = ["mse", "psnr", "ssim", "match_reconstructions", "ReconstructionScores", "score_reconstructions"]


def _pair(fn: str, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise TypeError(f"{fn}: images must be tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.ndim != 4 or x.shape != y.shape:
        raise ValueError(f"{fn}: images must be two (B, C, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.detach().to(torch.float64), y.detach().to(torch.float64)
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError(f"{fn}: images must be finite (got NaN or inf pixels)")
    return x, y


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image, ``(B,)``."""
    return _mse("mse", x, y)


def _mse(fn: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = _pair(fn, x, y)
    return ((x - y) ** 2).flatten(1).mean(1)


def psnr(x: torch.Tensor, y: torch.Tensor, *, data_range: float) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB: ``10·log10(data_range² / MSE)`` (``inf`` if equal)."""
    r = check_positive_finite("psnr", "data_range", data_range)
    e = _mse("psnr", x, y)
    return 10.0 * torch.log10(r * r / e)


def _gaussian_window(sigma: float, truncate: float) -> torch.Tensor:
    return gaussian_window(sigma, int(truncate * sigma + 0.5))  # scikit-image's radius convention


def ssim(x: torch.Tensor, y: torch.Tensor, *, data_range: float, sigma: float = 1.5, truncate: float = 3.5) -> torch.Tensor:
    """Structural similarity per image (Wang, Bovik, Sheikh, Simoncelli 2004), ``(B,)``.

    Local means, variances and covariance under a Gaussian window of std ``sigma`` (radius
    ``int(truncate·sigma + 0.5)``, so 11×11 for the standard σ = 1.5); constants ``C1 = (0.01 L)²``,
    ``C2 = (0.03 L)²`` with ``L = data_range``; the SSIM map is averaged over the positions where the
    window fits inside the image, and over channels. This is exactly what ``scikit-image``'s
    ``structural_similarity(..., gaussian_weights=True, sigma=sigma, use_sample_covariance=False,
    data_range=L)`` computes (the tests compare against it).

    Raises:
        ValueError: an image side is smaller than the window.
    """
    fn = "ssim"
    r = check_positive_finite(fn, "data_range", data_range)
    check_positive_finite(fn, "sigma", sigma)
    x, y = _pair(fn, x, y)
    w1 = _gaussian_window(sigma, truncate)
    k = w1.numel()
    if min(x.shape[-2:]) < k:
        raise ValueError(f"{fn}: images of {tuple(x.shape[-2:])} pixels are smaller than the {k}×{k} window of sigma={sigma}; lower sigma")
    b, c, h, w = x.shape
    win = (w1[:, None] * w1[None, :]).view(1, 1, k, k)

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t.reshape(b * c, 1, h, w), win).reshape(b, c, h - k + 1, w - k + 1)

    mx, my = filt(x), filt(y)
    vx = filt(x * x) - mx * mx
    vy = filt(y * y) - my * my
    cxy = filt(x * y) - mx * my
    c1, c2 = (0.01 * r) ** 2, (0.03 * r) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def match_reconstructions(reconstructions: torch.Tensor, originals: torch.Tensor) -> torch.Tensor:
    """The order of ``reconstructions`` that best matches ``originals`` (Hungarian on pairwise MSE).

    Args:
        reconstructions: ``(R, C, H, W)``; originals: ``(B, C, H, W)`` with ``R == B``.

    Returns:
        ``perm`` (``(B,)`` int64) such that ``reconstructions[perm[i]]`` is paired with ``originals[i]``
        and ``Σ_i MSE(reconstructions[perm[i]], originals[i])`` is minimal over all pairings.
    """
    fn = "match_reconstructions"
    if reconstructions.ndim != 4 or reconstructions.shape != originals.shape:
        raise ValueError(f"{fn}: need two (B, C, H, W) batches of one shape, got {tuple(reconstructions.shape)} and {tuple(originals.shape)}")
    a = originals.detach().to(torch.float64).flatten(1)
    r = reconstructions.detach().to(torch.float64).flatten(1)
    cost = torch.cdist(a, r).pow(2) / a.shape[1]  # (B, R) MSE
    rows, cols = linear_sum_assignment(cost.numpy())
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm)


class ReconstructionScores(NamedTuple):
    """Per-image scores of matched reconstructions, and of two data-only baselines.

    Each field is a ``(B,)`` float64 tensor. ``baseline_mean_*``: the data set's mean image scored
    against each original (what an attacker knows without any gradient); ``baseline_random_*``: a
    random training image (not in the batch) against each original.
    """

    mse: torch.Tensor
    psnr: torch.Tensor
    ssim: torch.Tensor
    baseline_mean_psnr: torch.Tensor
    baseline_mean_ssim: torch.Tensor
    baseline_random_psnr: torch.Tensor
    baseline_random_ssim: torch.Tensor
    order: torch.Tensor  # reconstructions[order[i]] is matched to originals[i]

    def summary(self) -> dict:
        """JSON-ready per-image lists plus mean and median of every score."""
        out: dict = {}
        for name in self._fields:
            v = getattr(self, name)
            if name == "order":
                out[name] = v.tolist()
                continue
            vals = [float(t) if math.isfinite(float(t)) else None for t in v]
            out[name] = vals
            finite = v[torch.isfinite(v)]
            out[f"{name}_mean"] = float(finite.mean()) if finite.numel() else None
            med = float(v.median()) if v.numel() else math.nan
            out[f"{name}_median"] = med if math.isfinite(med) else None
        return out


def score_reconstructions(
    reconstructions: torch.Tensor,
    originals: torch.Tensor,
    *,
    data_range: float,
    mean_image: torch.Tensor,
    random_images: torch.Tensor,
    ssim_sigma: float = 1.5,
) -> ReconstructionScores:
    """Match reconstructions to originals (Hungarian on MSE), then score each pair and the baselines.

    Args:
        reconstructions, originals: ``(B, C, H, W)``.
        data_range: pixel range width (2 for ``FIXED``-normalised PneumoniaMNIST).
        mean_image: ``(C, H, W)``, the training set's mean image.
        random_images: ``(B, C, H, W)`` training images not in the batch (one per original).
        ssim_sigma: SSIM window std (lower it for images under 11 pixels).
    """
    order = match_reconstructions(reconstructions, originals)
    rec = reconstructions[order]
    mean_b = mean_image.expand_as(originals)
    if random_images.shape != originals.shape:
        raise ValueError(f"score_reconstructions: random_images must have the originals' shape {tuple(originals.shape)}, got {tuple(random_images.shape)}")
    kw = {"data_range": data_range}
    return ReconstructionScores(
        mse=mse(rec, originals),
        psnr=psnr(rec, originals, **kw),
        ssim=ssim(rec, originals, sigma=ssim_sigma, **kw),
        baseline_mean_psnr=psnr(mean_b, originals, **kw),
        baseline_mean_ssim=ssim(mean_b, originals, sigma=ssim_sigma, **kw),
        baseline_random_psnr=psnr(random_images, originals, **kw),
        baseline_random_ssim=ssim(random_images, originals, sigma=ssim_sigma, **kw),
        order=order,
    )
