"""A small GroupNorm CNN for 28×28 images that trains well under DP-SGD.

DP-SGD favours small models (the noise norm grows with the parameter count) and bounded activations
(Papernot et al. 2021: tempered sigmoids such as tanh keep activations, hence per-example gradient
norms, from exploding, so less signal is lost to clipping). The architecture: three 3×3 conv stages
with GroupNorm and the activation, 2×2 average pooling between stages, global average pooling and a
linear head. No BatchNorm (it mixes examples), no in-place ops, no buffers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from dpfunc.keys import Key
from dpfunc.models._init import keyed_init, torch_default_init

__all__ = ["TemperedSigmoid", "SmallCNN"]


class TemperedSigmoid(nn.Module):
    """``φ(x) = scale · sigmoid(temperature · x) − offset`` (Papernot et al. 2021).

    ``scale=2, temperature=2, offset=1`` is ``tanh``, their best choice on MNIST; ``scale=1,
    temperature=1, offset=0`` is the logistic sigmoid.

    Example:
        >>> TemperedSigmoid()(torch.zeros(2))
        tensor([0., 0.])
    """

    def __init__(self, scale: float = 2.0, temperature: float = 2.0, offset: float = 1.0):
        super().__init__()
        if not (scale > 0 and temperature > 0):
            raise ValueError(
                f"TemperedSigmoid: scale and temperature must be > 0, got scale={scale!r}, "
                f"temperature={temperature!r}"
            )
        self.scale, self.temperature, self.offset = float(scale), float(temperature), float(offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.sigmoid(self.temperature * x) - self.offset

    def extra_repr(self) -> str:
        return f"scale={self.scale}, temperature={self.temperature}, offset={self.offset}"


class SmallCNN(nn.Module):
    """Conv(3×3) → GroupNorm → activation stages, average pooling, global average pool, linear.

    Shapes: ``(B, in_channels, H, W) -> (B, num_classes)`` logits, for any ``H, W >= 2**(S-1)``
    with ``S = len(widths)`` stages (28×28 and 64×64 both work).

    With the defaults (widths 16/32/64, 1 input channel, 2 classes) it has 23,650 parameters.

    Args:
        in_channels: image channels (1 for X-rays).
        num_classes: output logits.
        key: randomness of the initial weights (keyword-only, required; see ``_init``).
        widths: channels of each conv stage; each must be divisible by ``groups``.
        groups: GroupNorm groups per stage.
        activation: a zero-argument factory of the activation module, e.g. ``nn.Tanh`` (default),
            ``nn.ReLU``, ``lambda: TemperedSigmoid(2, 2, 1)``.

    Example:
        >>> model = SmallCNN(key=Key(0))
        >>> model(torch.zeros(4, 1, 28, 28)).shape
        torch.Size([4, 2])

    References:
        N. Papernot, A. Thakurta, S. Song, S. Chien, Ú. Erlingsson, "Tempered Sigmoid Activations
        for Deep Learning with Differential Privacy", AAAI 2021. Y. Wu, K. He, "Group
        Normalization", ECCV 2018. F. Tramèr, D. Boneh, "Differentially Private Learning Needs
        Better Features (or Much More Data)", ICLR 2021.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        *,
        key: Key,
        widths: Sequence[int] = (16, 32, 64),
        groups: int = 4,
        activation: Callable[[], nn.Module] = nn.Tanh,
    ):
        super().__init__()
        fn = "SmallCNN"
        _check_positive_int(fn, "in_channels", in_channels)
        _check_positive_int(fn, "num_classes", num_classes)
        _check_positive_int(fn, "groups", groups)
        widths = tuple(widths)
        if not widths or any(
            isinstance(w, bool) or not isinstance(w, int) or w < 1 or w % groups for w in widths
        ):
            raise ValueError(
                f"{fn}: widths must be a non-empty sequence of ints divisible by groups={groups}, "
                f"got {widths!r}"
            )
        try:
            probe = activation()
        except TypeError:
            probe = None
        if not isinstance(probe, nn.Module):
            raise TypeError(
                f"{fn}: activation must be a zero-argument factory returning an nn.Module "
                f"(e.g. nn.Tanh), got {activation!r}"
            )

        def build() -> None:
            layers: list[nn.Module] = []
            channels = in_channels
            for i, width in enumerate(widths):
                if i > 0:
                    layers.append(nn.AvgPool2d(2))
                layers += [
                    nn.Conv2d(channels, width, 3, padding=1),
                    nn.GroupNorm(groups, width),
                    activation(),
                ]
                channels = width
            self.features = nn.Sequential(*layers)
            self.head = nn.Linear(channels, num_classes)

        keyed_init(fn, key, build, self, torch_default_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def _check_positive_int(fn: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{fn}: {name} must be an int >= 1, got {value!r}")
