"""Keyed parameter initialisation: build a module on the meta device, then fill it from a Key.

``nn.Module`` constructors normally draw initial weights from torch's global generator. Library
code never touches global RNG state, so the models here are built on the ``meta`` device (no
numbers drawn), moved to CPU storage with ``to_empty``, and initialised from ``key.generator()``.
The same key gives the same weights; the global generator is neither read nor advanced.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from dpfunc.keys import Key

__all__ = ["torch_default_init", "kaiming_fan_out_init", "keyed_init"]


def _check_key(fn: str, key: object) -> None:
    if not isinstance(key, Key):
        raise TypeError(
            f"{fn}: key must be a dpfunc.keys.Key (e.g. key=Key(0)) so that initial weights are "
            f"reproducible without global RNG state, got {type(key).__name__} {key!r}"
        )


def torch_default_init(module: nn.Module, g: torch.Generator) -> None:
    """PyTorch's own default for Linear/Conv (``kaiming_uniform_(a=√5)``, bias U(±1/√fan_in)),
    GroupNorm/LayerNorm weight 1 and bias 0 — drawn from ``g``."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=g)
        if module.bias is not None:
            fan_in = module.weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(module.bias, -bound, bound, generator=g)
    elif isinstance(module, (nn.GroupNorm, nn.LayerNorm)) and module.weight is not None:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def kaiming_fan_out_init(module: nn.Module, g: torch.Generator) -> None:
    """He et al. (2015) normal init, ``mode="fan_out"`` for convolutions (as torchvision's ResNets);
    everything else as :func:`torch_default_init`."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu", generator=g)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    else:
        torch_default_init(module, g)


def keyed_init(
    fn: str,
    key: Key,
    build: Callable[[], None],
    owner: nn.Module,
    init: Callable[[nn.Module, torch.Generator], None] = torch_default_init,
) -> None:
    """Run ``build()`` (which creates ``owner``'s layers) on the meta device, then initialise.

    Args:
        fn: caller's name for error messages.
        key: the randomness of the initial weights.
        build: creates the submodules of ``owner``.
        owner: the module being constructed; moved to CPU and initialised in place (this is the
            constructor's own object, never a user's module).
        init: ``init(submodule, generator)`` for each submodule, in ``named_modules`` order.
    """
    _check_key(fn, key)
    with torch.device("meta"):
        build()
    owner.to_empty(device="cpu")
    g = key.generator()
    with torch.no_grad():
        for module in owner.modules():
            init(module, g)
