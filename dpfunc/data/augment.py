"""Keyed, per-example data augmentation and augmentation multiplicity for DP-SGD.

Augmentation is compatible with DP-SGD as long as each augmented example is a function of that one
example and of randomness independent of the data: then the per-example gradient still depends on
one example only and the clipped-sum sensitivity stays ``C``. Everything here is pure: the same key
and images give the same output, and the input is never modified.

**Which augmentations, for chest X-rays.** Small translations (patient positioning) and small
rotations (patient rotation, a few degrees) are realistic and are on by default. Horizontal flips
are *not* offered: chest radiographs have a fixed laterality (heart, aortic arch and gastric bubble
on the left), so a flipped film shows situs inversus / dextrocardia, a rare finding, not a plausible
variant of the same patient. Vertical flips and large rotations are less plausible still.
Out-of-frame pixels replicate the border (``padding_mode="border"``), so no constant depending on
the normalisation is introduced.

**Augmentation multiplicity** (De et al. 2022): draw ``K`` views of each example, average the loss
(hence the gradient) over the views of one example, *then* clip. The views of one example together
count as one example, so the privacy analysis is unchanged, while the averaged gradient has less
augmentation variance. Treating the views as ``K`` separate examples would multiply the
sensitivity by ``K``.

References:
    S. De, L. Berrada, J. Hayes, S. L. Smith, B. Balle, "Unlocking High-Accuracy Differentially
    Private Image Classification through Scale", arXiv:2204.13650 (2022), section 3.2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from dpfunc.keys import Key

__all__ = ["augment", "augment_views", "multiplicity_loss"]


def _check(fn: str, key: Any, images: Any, max_shift: Any, max_rotation: Any) -> None:
    if not isinstance(key, Key):
        raise TypeError(f"{fn}: key must be a dpfunc.keys.Key, got {type(key).__name__}")
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        desc = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{fn}: images must be a floating tensor (B, C, H, W), got {desc}")
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
        raise ValueError(f"{fn}: max_shift must be an int >= 0 (pixels), got {max_shift!r}")
    if not (isinstance(max_rotation, (int, float)) and 0 <= max_rotation <= 180):
        raise ValueError(
            f"{fn}: max_rotation must be a number in [0, 180] (degrees), got {max_rotation!r}"
        )


def _affine_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``F.affine_grid(theta, (B, C, h, w), align_corners=False)``, ``theta`` ``(B, 2, 3)``.

    Written with broadcasting instead of a batched matmul: for small images the matmul path is
    dominated by BLAS thread start-up (tens of ms on a busy 2-core machine), this is microseconds.
    Pixel centres are ``(2i + 1)/n - 1``.
    """
    opts = {"dtype": theta.dtype, "device": theta.device}
    xs = ((2 * torch.arange(w, **opts) + 1) / w - 1)[None, None, :]  # (1, 1, w)
    ys = ((2 * torch.arange(h, **opts) + 1) / h - 1)[None, :, None]  # (1, h, 1)
    t = theta[:, :, :, None, None]  # (B, 2, 3, 1, 1)
    gx = t[:, 0, 0] * xs + t[:, 0, 1] * ys + t[:, 0, 2]  # (B, h, w)
    gy = t[:, 1, 0] * xs + t[:, 1, 1] * ys + t[:, 1, 2]
    return torch.stack([gx, gy], dim=-1)


def augment(
    key: Key, images: torch.Tensor, *, max_shift: int = 2, max_rotation: float = 5.0
) -> torch.Tensor:
    """Randomly shift and rotate every image of a batch, each with its own draw.

    Example ``b`` is translated by integers ``(dx, dy)`` drawn uniformly from
    ``{-max_shift, …, max_shift}`` and rotated about its centre by an angle uniform in
    ``[-max_rotation, max_rotation]`` degrees, with bilinear sampling and border replication
    (equivalent to "pad with edge pixels, random crop" when ``max_rotation == 0``).

    Args:
        key: the randomness; the same key gives the same augmentation.
        images: float tensor ``(B, C, H, W)``; not modified.
        max_shift: largest translation in pixels (>= 0); 2 suits 28×28, 4 suits 64×64.
        max_rotation: largest rotation in degrees, in [0, 180].

    Returns:
        Tensor ``(B, C, H, W)``, same dtype and device. With ``max_shift == 0`` and
        ``max_rotation == 0`` it is an exact copy of ``images``.

    Example:
        >>> x = torch.zeros(8, 1, 28, 28)
        >>> augment(Key(0), x).shape
        torch.Size([8, 1, 28, 28])
    """
    _check("augment", key, images, max_shift, max_rotation)
    if max_shift == 0 and max_rotation == 0:
        return images.clone()
    b, _, h, w = images.shape
    device = images.device
    g = key.generator(device)
    shifts = torch.randint(-max_shift, max_shift + 1, (b, 2), generator=g, device=device)
    angles = (torch.rand(b, generator=g, device=device) * 2 - 1) * math.radians(max_rotation)
    cos, sin = torch.cos(angles), torch.sin(angles)
    # affine_grid maps output coordinates to input coordinates (normalised to [-1, 1]); the
    # rotation is done in pixel units, hence the aspect factors; content moves by +shift.
    theta = torch.stack(
        [
            torch.stack([cos, -sin * h / w, -2.0 * shifts[:, 0] / w], dim=1),
            torch.stack([sin * w / h, cos, -2.0 * shifts[:, 1] / h], dim=1),
        ],
        dim=1,
    ).to(images.dtype)
    grid = _affine_grid(theta, h, w)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment_views(
    key: Key, images: torch.Tensor, num_views: int, *, max_shift: int = 2, max_rotation: float = 5.0
) -> torch.Tensor:
    """``num_views`` independent augmentations of every example (augmentation multiplicity).

    Args:
        key: the randomness; view ``k`` of example ``b`` uses draw ``b * num_views + k``.
        images: float tensor ``(B, C, H, W)``.
        num_views: K >= 1.
        max_shift, max_rotation: as in :func:`augment`.

    Returns:
        Tensor ``(B, K, C, H, W)``.

    Example:
        >>> augment_views(Key(1), torch.zeros(4, 1, 28, 28), 8).shape
        torch.Size([4, 8, 1, 28, 28])
    """
    if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 1:
        raise ValueError(f"augment_views: num_views must be an int >= 1, got {num_views!r}")
    _check("augment_views", key, images, max_shift, max_rotation)
    b, rest = images.shape[0], tuple(images.shape[1:])
    repeated = images.unsqueeze(1).expand(b, num_views, *rest).reshape(b * num_views, *rest)
    views = augment(key, repeated, max_shift=max_shift, max_rotation=max_rotation)
    return views.reshape(b, num_views, *rest)


def multiplicity_loss(per_example_loss: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Turn a one-example loss into the loss of one example's K augmented views.

    Given ``per_example_loss(params, x, y)`` with ``x`` of shape ``(C, H, W)`` and a scalar result,
    returns ``loss(params, views, y) = mean_k per_example_loss(params, views[k], y)`` with ``views``
    of shape ``(K, C, H, W)``. Its gradient is the mean of the K view gradients, so per-example
    gradient code (vmap over examples) clips the *average* gradient of each example, as De et al.
    (2022) prescribe; the sensitivity stays ``C``.

    The K views are evaluated with ``torch.func.vmap``, so the result nests inside an outer vmap.

    Example:
        >>> loss = lambda p, x, y: ((x * p["w"]).sum() - y) ** 2
        >>> views = augment_views(Key(0), torch.ones(2, 1, 4, 4), 3)
        >>> multiplicity_loss(loss)({"w": torch.tensor(0.5)}, views[0], torch.tensor(1.0)).shape
        torch.Size([])
    """
    if not callable(per_example_loss):
        raise TypeError(
            f"multiplicity_loss: per_example_loss must be callable, got {per_example_loss!r}"
        )
    over_views = torch.func.vmap(per_example_loss, in_dims=(None, 0, None))

    def loss(params: Any, views: torch.Tensor, y: Any) -> torch.Tensor:
        return over_views(params, views, y).mean(dim=0)

    return loss
