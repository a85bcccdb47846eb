"""Models of the case study: plain ``nn.Module``s without BatchNorm, ready for per-example gradients.

Every model here uses only Linear, Conv2d, GroupNorm (layers the fast ghost-norm path supports) and
parameter-free ops; none has buffers or in-place ops, and initial weights come from an explicit key.

Example:
    >>> from dpfunc.keys import Key
    >>> model = build_model("cnn", key=Key(0))
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType
from typing import Any

from torch import nn

from dpfunc.models._cnn import SmallCNN, TemperedSigmoid
from dpfunc.models._features import FeatureSegmenter, FixedFeatures, feature_segmenter
from dpfunc.models._resnet import BasicBlockGN, ResNetGN, resnet18_gn
from dpfunc.models._unet import UNetGN, unet_gn

__all__ = [
    "MODELS",
    "BasicBlockGN",
    "FeatureSegmenter",
    "FixedFeatures",
    "ResNetGN",
    "SmallCNN",
    "TemperedSigmoid",
    "UNetGN",
    "build_model",
    "feature_segmenter",
    "resnet18_gn",
    "unet_gn",
]

#: Read-only registry: name -> constructor (all take ``key=`` and keyword hyper-parameters).
MODELS: MappingProxyType[str, Callable[..., nn.Module]] = MappingProxyType(
    {"cnn": SmallCNN, "resnet18": resnet18_gn, "unet": unet_gn, "features": feature_segmenter}
)


def build_model(name: str, /, **kwargs: Any) -> nn.Module:
    """Build a registered model by name.

    Args:
        name: ``"cnn"`` (:class:`SmallCNN`), ``"resnet18"`` (:func:`resnet18_gn`), ``"unet"``
            (:func:`unet_gn`, segmentation) or ``"features"`` (:func:`feature_segmenter`: fixed filter bank +
            small learned head, segmentation).
        **kwargs: passed to the constructor; ``key=`` is required.

    Example:
        >>> from dpfunc.keys import Key
        >>> build_model("resnet18", key=Key(0), input_size=64).stem[-1]
        MaxPool2d(kernel_size=3, stride=2, padding=1, dilation=1, ceil_mode=False)
    """
    if name not in MODELS:
        raise ValueError(f"build_model: name must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](**kwargs)
