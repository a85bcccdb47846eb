"""Public pretraining for the segmentation U-Net: a synthetic shape-segmentation set unrelated to any patient.

deepee's DP liver result started from an ImageNet-pretrained encoder; no download is possible here, so
the public data is synthetic and deliberately *not* CT-like: 2-D scenes of random ellipses (the class to
segment) and distractors (rotated rectangles and thick line segments, label 0) of random grey values on a
smooth random background with noise. It is drawn from its own generator and key — no phantom code, no
body outline, no organ, and nothing derived from the private patients — so pretraining on it spends no
privacy budget (it is data-independent with respect to the private training set). It teaches
generic low-level features (edges, homogeneous regions, shape); which region is *the liver* is left to
the (private) fine-tuning.

``pretrain_unet`` trains :func:`~dpfunc.models.unet_gn` on fresh scenes (non-private Adam, the same
per-slice loss as the private runs) and returns its parameters; a run that uses them
(``SegmentationConfig.pretrain``) starts BOTH arms, non-private and DP, from these weights, with the
output bias reset to the public organ prior.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from dpfunc._validate import check_int_range, check_positive_finite
from dpfunc.keys import Key

__all__ = ["public_shapes", "pretrain_unet", "cached_pretrained_unet"]

PUBLIC_VERSION = 1
"""Bumped whenever :func:`public_shapes` or :func:`pretrain_unet` changes, so that no stale cache is read."""


def _rotated_coords(u, v, cu, cv, angle):
    c, s = math.cos(angle), math.sin(angle)
    du, dv = u - cu, v - cv
    return c * du + s * dv, -s * du + c * dv


def public_shapes(key: Key, n: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` synthetic scenes and masks: images ``(n, 1, size, size)`` in [0, 1], labels ``(n, size, size)`` int64.

    Each scene: a smooth background (a few random low-frequency cosines, offset and contrast random) with
    Gaussian noise; 0–3 ellipses (label 1; random centre, axes 6–30 % of the side, rotation, grey
    value); 1–4 distractors (label 0): rotated rectangles or thick line segments of random grey value.
    Shapes are painted in a random order, so a later shape occludes (and relabels) an earlier one.
    Deterministic from ``key``.

    Example:
        >>> x, y = public_shapes(Key(0), 2, size=32)
        >>> x.shape, y.shape, y.dtype
        (torch.Size([2, 1, 32, 32]), torch.Size([2, 32, 32]), torch.int64)
    """
    fn = "public_shapes"
    check_int_range(fn, "n", n, low=1)
    check_int_range(fn, "size", size, low=8, high=1024)
    g = key.generator()

    def uni(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    def randint(lo: int, hi: int) -> int:  # inclusive
        return int(torch.randint(lo, hi + 1, (), generator=g))

    grid = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    v, u = torch.meshgrid(grid, grid, indexing="ij")
    images = torch.empty(n, 1, size, size)
    labels = torch.zeros(n, size, size, dtype=torch.int64)
    for i in range(n):
        img = torch.full((size, size), uni(0.0, 0.5))
        for _ in range(3):
            fu, fv, ph = uni(0.5, 3.0), uni(0.5, 3.0), uni(0, 2 * math.pi)
            img += uni(0.0, 0.12) * torch.cos(2 * math.pi * (fu * u + fv * v) + ph)
        lab = torch.zeros(size, size, dtype=torch.int64)
        shapes = ["ellipse"] * randint(0, 3) + [("rect" if uni(0, 1) < 0.6 else "line") for _ in range(randint(1, 4))]
        order = torch.randperm(len(shapes), generator=g).tolist()
        for j in order:
            kind = shapes[j]
            cu, cv, angle, grey = uni(0.1, 0.9), uni(0.1, 0.9), uni(0, math.pi), uni(0.05, 1.0)
            ru, rv = _rotated_coords(u, v, cu, cv, angle)
            if kind == "ellipse":
                mask = (ru / uni(0.06, 0.3)) ** 2 + (rv / uni(0.06, 0.3)) ** 2 <= 1
            elif kind == "rect":
                mask = (ru.abs() <= uni(0.05, 0.25)) & (rv.abs() <= uni(0.05, 0.25))
            else:
                mask = (ru.abs() <= uni(0.15, 0.45)) & (rv.abs() <= uni(0.01, 0.04))
            img[mask] = grey + uni(-0.05, 0.05) * ru[mask] / 0.3
            lab[mask] = 1 if kind == "ellipse" else 0
        img += uni(0.01, 0.08) * torch.randn((size, size), generator=g)
        images[i, 0] = img.clamp(0, 1)
        labels[i] = lab
    return images, labels


def pretrain_unet(*, key: Key, width: int = 4, depth: int = 3, groups: int = 4, image_size: int = 64, steps: int = 300,
                  batch_size: int = 16, learning_rate: float = 5e-3, foreground_prior: float | None = 0.05,
                  log=None) -> dict[str, torch.Tensor]:
    """Non-private pretraining of ``unet_gn(width, depth, groups)`` on :func:`public_shapes` scenes.

    Every step draws ``batch_size`` fresh scenes (from ``key``), so the public set is as large as the
    steps need and never reused. Loss: :func:`~dpfunc.segmentation.slice_losses` (CE + soft Dice), Adam.

    Returns:
        The parameters as a ``{name: tensor}`` dict with the names of
        ``functionalize(PackedSegmenter(unet_gn(...)))`` (``"net.…"``), ready for ``SegmentationConfig``'s
        pretrained start. Deterministic from ``key`` and the arguments (one torch thread).
    """
    from dpfunc.bridge import functionalize
    from dpfunc.models import unet_gn
    from dpfunc.segmentation._patient import PackedSegmenter, slice_losses

    fn = "pretrain_unet"
    if not isinstance(key, Key):
        raise TypeError(f"{fn}: key must be a dpfunc.Key, got {type(key).__name__}")
    check_int_range(fn, "steps", steps, low=1)
    check_int_range(fn, "batch_size", batch_size, low=1)
    check_positive_finite(fn, "learning_rate", learning_rate)
    prior = None if foreground_prior is None else (1 - foreground_prior, foreground_prior)
    net = unet_gn(key=key.fold_in(0), width=width, depth=depth, groups=groups, class_prior=prior)
    opt = torch.optim.Adam(net.parameters(), lr=learning_rate)
    for t in range(steps):
        x, y = public_shapes(key.fold_in(1).fold_in(t), batch_size, image_size)
        loss = slice_losses(net(x), y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log is not None and (t + 1) % 50 == 0:
            log(f"pretrain step {t + 1}/{steps} loss {loss.item():.4f}")
    _, params, _ = functionalize(PackedSegmenter(net))
    return {k: p.detach().clone() for k, p in params.items()}


def cached_pretrained_unet(*, key: Key, seed_tag: int, width: int, depth: int, groups: int, image_size: int, steps: int,
                           foreground_prior: float | None) -> dict[str, torch.Tensor]:
    """:func:`pretrain_unet` memoised on disk (it is a deterministic function of its arguments).

    The file is ``$DPFUNC_CACHE_DIR`` (default ``~/.cache/dpfunc``) ``/public_unet_v{PUBLIC_VERSION}_…pt``,
    named by every argument (``seed_tag`` names the key), written atomically; a cache that cannot be
    written is skipped, not an error. Only public weights are stored there.
    """
    root = Path(os.environ.get("DPFUNC_CACHE_DIR", Path.home() / ".cache" / "dpfunc"))
    path = root / (f"public_unet_v{PUBLIC_VERSION}_k{seed_tag}_w{width}_d{depth}_g{groups}_s{image_size}_n{steps}"
                   f"_p{foreground_prior}.pt")
    if path.is_file():
        return torch.load(path, weights_only=True)
    params = pretrain_unet(key=key, width=width, depth=depth, groups=groups, image_size=image_size, steps=steps,
                           foreground_prior=foreground_prior)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(params, tmp)
        tmp.replace(path)
    except OSError:
        pass
    return params
