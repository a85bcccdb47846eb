"""ResNet-18 with GroupNorm and a stem for small images (28×28 or 64×64 inputs).

BatchNorm mixes the examples of a batch, which breaks per-example gradients (and DP); GroupNorm
normalises each example on its own (Wu & He 2018) and is the standard replacement in DP image
classification (De et al. 2022) and transfer learning (Kolesnikov et al. 2020).

The ImageNet stem (7×7 stride-2 conv + 3×3 stride-2 max-pool) would shrink a 28×28 image to 7×7
before the first block; here the stem is a 3×3 stride-1 conv, without max-pool for inputs up to 32
pixels and with a 3×3 stride-2 max-pool above (so 64×64 enters the blocks at 32×32). Blocks: four
stages of two BasicBlocks, widths ``w, 2w, 4w, 8w`` (``w = 64``), stride 2 at stages 2–4, global
average pooling, linear head.
"""

from __future__ import annotations

import torch
from torch import nn

from dpfunc.keys import Key
from dpfunc.models._cnn import _check_positive_int
from dpfunc.models._init import kaiming_fan_out_init, keyed_init

__all__ = ["BasicBlockGN", "ResNetGN", "resnet18_gn"]


class BasicBlockGN(nn.Module):
    """``relu(GN(conv(relu(GN(conv(x))))) + shortcut(x))``; the shortcut is 1×1 conv + GN when the
    shape changes. Built on the meta device by :class:`ResNetGN` (initialised there)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, out_channels)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.act2 = nn.ReLU()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.GroupNorm(groups, out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNetGN(nn.Module):
    """A GroupNorm ResNet of BasicBlocks; see :func:`resnet18_gn`.

    Shapes: ``(B, in_channels, H, W) -> (B, num_classes)`` logits.
    """

    def __init__(
        self,
        blocks_per_stage: tuple[int, ...],
        *,
        key: Key,
        num_classes: int = 2,
        in_channels: int = 1,
        input_size: int = 28,
        groups: int = 32,
        width: int = 64,
    ):
        super().__init__()
        fn = "ResNetGN"
        for name, value in [
            ("num_classes", num_classes),
            ("in_channels", in_channels),
            ("input_size", input_size),
            ("groups", groups),
            ("width", width),
        ]:
            _check_positive_int(fn, name, value)
        if width % groups:
            raise ValueError(
                f"{fn}: groups must divide width={width} (every stage width is a multiple of it), "
                f"got groups={groups}; e.g. groups=32 (Wu & He 2018) or 16 with width=64"
            )
        if input_size < 8:
            raise ValueError(f"{fn}: input_size must be >= 8 pixels, got {input_size}")
        self.input_size = input_size

        def build() -> None:
            stem: list[nn.Module] = [
                nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                nn.GroupNorm(groups, width),
                nn.ReLU(),
            ]
            if input_size > 32:
                stem.append(nn.MaxPool2d(3, stride=2, padding=1))
            self.stem = nn.Sequential(*stem)
            stages, channels = [], width
            for i, count in enumerate(blocks_per_stage):
                out = width * 2**i
                blocks = [BasicBlockGN(channels, out, 1 if i == 0 else 2, groups)]
                blocks += [BasicBlockGN(out, out, 1, groups) for _ in range(count - 1)]
                stages.append(nn.Sequential(*blocks))
                channels = out
            self.stages = nn.Sequential(*stages)
            self.head = nn.Linear(channels, num_classes)

        keyed_init(fn, key, build, self, kaiming_fan_out_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean(dim=(2, 3)))


def resnet18_gn(
    num_classes: int = 2,
    in_channels: int = 1,
    input_size: int = 28,
    groups: int = 32,
    *,
    key: Key,
    width: int = 64,
) -> ResNetGN:
    """ResNet-18 (He et al. 2016) with GroupNorm and a small-image stem.

    Args:
        num_classes: output logits.
        in_channels: image channels (1 for X-rays).
        input_size: the side of the images it will see; <= 32 → no stem max-pool (28×28 reaches
            the last stage at 4×4), > 32 → stem max-pool (64×64 reaches it at 4×4 too).
        groups: GroupNorm groups in every layer (must divide ``width``); 32 as in Wu & He (2018).
        key: randomness of the initial weights (keyword-only, required).
        width: channels of the first stage (64 in ResNet-18); smaller widths give smaller models.

    Returns:
        A :class:`ResNetGN` with 11,168,706 parameters for the defaults (1 channel in, 2 classes).

    Example:
        >>> model = resnet18_gn(key=Key(0))
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 2])

    References:
        K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition", CVPR 2016.
        Y. Wu, K. He, "Group Normalization", ECCV 2018. A. Kolesnikov et al., "Big Transfer (BiT)",
        ECCV 2020. S. De et al., "Unlocking High-Accuracy Differentially Private Image
        Classification through Scale", arXiv:2204.13650 (2022).
    """
    return ResNetGN(
        (2, 2, 2, 2),
        key=key,
        num_classes=num_classes,
        in_channels=in_channels,
        input_size=input_size,
        groups=groups,
        width=width,
    )
