"""A GroupNorm U-Net for 2-D segmentation, built only from layers the fast clipping engine supports.

The U-Net of Ronneberger et al. (2015) with three changes for DP-SGD:

* GroupNorm instead of BatchNorm (BatchNorm mixes the examples of a batch, which breaks per-example
  gradients; Wu & He 2018);
* upsampling by ``nn.Upsample`` (nearest, parameter-free) followed by a 3×3 ``Conv2d`` instead of
  ``ConvTranspose2d``, so every trainable layer is a ``Conv2d`` or a ``GroupNorm`` and
  ``dpfunc.bridge.fast.fast_engine`` clips it without a vmap fallback (Odena et al. 2016 also
  recommend resize-convolution to avoid checkerboard artefacts);
* average pooling for downsampling, and skip connections by ``torch.cat`` (plain tensor ops).

Shapes: ``(B, in_channels, H, W) -> (B, num_classes, H, W)`` logits, ``H`` and ``W`` divisible by
``2**depth``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from dpfunc._validate import check_int_range
from dpfunc.keys import Key
from dpfunc.models._init import keyed_init, torch_default_init

__all__ = ["UNetGN", "unet_gn"]


def _double_conv(c_in: int, c_out: int, groups: int, activation: Callable[[], nn.Module]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.GroupNorm(groups, c_out),
        activation(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.GroupNorm(groups, c_out),
        activation(),
    )


class UNetGN(nn.Module):
    """U-Net with GroupNorm, resize-convolution upsampling and concatenation skips.

    Level ``l`` (``0 <= l <= depth``) has ``width · 2**l`` channels; the encoder halves the resolution
    ``depth`` times, the decoder doubles it back and concatenates the encoder feature map of the same
    level before two 3×3 convolutions. A 1×1 convolution gives the class logits.

    With the defaults (width 8, depth 3, 1 input channel, 2 classes) it has 134,946 parameters.

    Args:
        in_channels: image channels (1 for CT).
        num_classes: output channels (logits per pixel; 2 = background / organ).
        key: randomness of the initial weights (keyword-only, required).
        width: channels at full resolution; every level's width must be divisible by ``groups``.
        depth: number of downsamplings (>= 1); inputs need ``H, W`` divisible by ``2**depth``.
        groups: GroupNorm groups.
        activation: a zero-argument factory of the activation module (default ``nn.ReLU``).
        class_prior: None (the default initialisation) or one probability per class, summing to 1:
            the head's bias starts at ``log(class_prior)``, so the untrained net already predicts
            the class frequencies instead of a uniform guess (the prior initialisation of Lin et al.
            2017). For a rare foreground (the liver is ~5% of the pixels of its slices) this keeps
            the first steps from driving every pixel to background, after which the softmax
            saturates and a run can stay at Dice 0. Use a PUBLIC prior (a constant, not a count of
            the training labels, which would be an unaccounted release under DP).
        coord_channels: True appends two constant channels to the input, the row and column position
            in [-1, 1] (CoordConv, Liu et al. 2018), so that where a pixel lies in the image is a
            feature the first convolution can weigh directly (organs have typical positions).

    Example:
        >>> from dpfunc.keys import Key
        >>> net = UNetGN(key=Key(0))
        >>> net(torch.zeros(2, 1, 64, 64)).shape
        torch.Size([2, 2, 64, 64])

    References:
        O. Ronneberger, P. Fischer, T. Brox, "U-Net: Convolutional Networks for Biomedical Image
        Segmentation", MICCAI 2015. Y. Wu, K. He, "Group Normalization", ECCV 2018. A. Odena,
        V. Dumoulin, C. Olah, "Deconvolution and Checkerboard Artifacts", Distill 2016. T.-Y. Lin,
        P. Goyal, R. Girshick, K. He, P. Dollár, "Focal Loss for Dense Object Detection", ICCV 2017
        (prior initialisation of the output bias).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        *,
        key: Key,
        width: int = 8,
        depth: int = 3,
        groups: int = 4,
        activation: Callable[[], nn.Module] = nn.ReLU,
        class_prior: Sequence[float] | None = None,
        coord_channels: bool = False,
    ):
        super().__init__()
        fn = "UNetGN"
        check_int_range(fn, "in_channels", in_channels, low=1)
        check_int_range(fn, "num_classes", num_classes, low=1)
        check_int_range(fn, "width", width, low=1)
        check_int_range(fn, "depth", depth, low=1, high=8)
        check_int_range(fn, "groups", groups, low=1)
        if width % groups:
            raise ValueError(f"{fn}: width must be divisible by groups={groups}, got width={width!r}")
        try:
            probe = activation()
        except TypeError:
            probe = None
        if not isinstance(probe, nn.Module):
            raise TypeError(f"{fn}: activation must be a zero-argument factory returning an nn.Module (e.g. nn.ReLU), got {activation!r}")
        if class_prior is not None:
            prior = [float(v) for v in class_prior]
            if len(prior) != num_classes or not all(0 < v < 1 for v in prior) or abs(sum(prior) - 1) > 1e-6:
                raise ValueError(f"{fn}: class_prior must give {num_classes} probabilities in (0, 1) summing to 1, "
                                 f"got {tuple(class_prior)!r}")
        if not isinstance(coord_channels, bool):
            raise TypeError(f"{fn}: coord_channels must be a bool, got {coord_channels!r}")
        self.depth = depth
        self.coord_channels = coord_channels
        widths = [width * 2**level for level in range(depth + 1)]

        def build() -> None:
            self.down = nn.ModuleList()
            c = in_channels + (2 if coord_channels else 0)
            for w in widths:
                self.down.append(_double_conv(c, w, groups, activation))
                c = w
            self.pool = nn.AvgPool2d(2)
            self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
            self.up_conv = nn.ModuleList()
            self.up = nn.ModuleList()
            for w in reversed(widths[:-1]):  # from the level below (2w channels) to this level (w)
                self.up_conv.append(nn.Sequential(nn.Conv2d(2 * w, w, 3, padding=1), nn.GroupNorm(groups, w), activation()))
                self.up.append(_double_conv(2 * w, w, groups, activation))
            self.head = nn.Conv2d(widths[0], num_classes, 1)

        keyed_init(fn, key, build, self, torch_default_init)
        if class_prior is not None:
            with torch.no_grad():
                self.head.bias.copy_(torch.tensor([math.log(v) for v in prior]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = 2**self.depth
        if h % m or w % m:
            raise ValueError(f"UNetGN: input height and width must be divisible by 2**depth = {m}, got {h}×{w}")
        if self.coord_channels:
            rows = torch.linspace(-1, 1, h, dtype=x.dtype, device=x.device).view(1, 1, h, 1).expand(x.shape[0], 1, h, w)
            cols = torch.linspace(-1, 1, w, dtype=x.dtype, device=x.device).view(1, 1, 1, w).expand(x.shape[0], 1, h, w)
            x = torch.cat([x, rows, cols], dim=1)
        skips = []
        for level, block in enumerate(self.down):
            if level:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for up_conv, block in zip(self.up_conv, self.up):
            x = up_conv(self.upsample(x))
            x = block(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)


def unet_gn(in_channels: int = 1, num_classes: int = 2, *, key: Key, width: int = 8, depth: int = 3, groups: int = 4,
            activation: Callable[[], nn.Module] = nn.ReLU, class_prior: Sequence[float] | None = None,
            coord_channels: bool = False) -> UNetGN:
    """A :class:`UNetGN` (the registry's ``"unet"``); see there for the arguments.

    Example:
        >>> from dpfunc.keys import Key
        >>> unet_gn(key=Key(0), width=4, depth=2, groups=2)(torch.zeros(1, 1, 16, 16)).shape
        torch.Size([1, 2, 16, 16])
    """
    return UNetGN(in_channels, num_classes, key=key, width=width, depth=depth, groups=groups, activation=activation,
                  class_prior=class_prior, coord_channels=coord_channels)
