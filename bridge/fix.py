"""Model surgery: return a NEW module whose layers are compatible with per-example DP.

=========================================  ===================================================================
found                                      replaced by
=========================================  ===================================================================
``BatchNorm{1,2,3}d`` / ``SyncBatchNorm``  ``nn.GroupNorm(G, C, eps=bn.eps, affine=bn.affine)`` with ``G`` from
                                           ``norm`` and ``num_groups``; ``weight``/``bias`` copied over
``InstanceNorm*d(track_running_stats)``    the same InstanceNorm with ``track_running_stats=False`` (affine
                                           weights copied)
=========================================  ===================================================================

``norm`` chooses ``G``: :attr:`Norm.GROUP` (default) the largest of ``(32, 16, 8, 4, 2, 1)`` that
divides ``C`` (or ``num_groups``); :attr:`Norm.LAYER` ``G = 1`` (normalise over all channels and
positions of one example, LayerNorm with a per-channel affine); :attr:`Norm.INSTANCE` ``G = C``
(InstanceNorm with a per-channel affine). All three are ``nn.GroupNorm``, which the fast clipping
path supports.

When is the new model the same function as the old one? Honestly: almost never, and the weights
carried over are a starting point, not an equivalent model.

    ======================================  ===========================================================
    BatchNorm, eval mode (running stats)    NOT equal: BN is a fixed per-channel affine map
                                            ``(x − μ_run)/sqrt(σ²_run + ε)·w + b``; GroupNorm
                                            normalises each example by its own statistics. At
                                            initialisation (μ=0, σ²=1) BN is ≈ the identity, GN is not.
    BatchNorm, train mode, batch of one,    EQUAL (up to float rounding): BN's batch statistics over
    ``Norm.INSTANCE`` (G = C)               ``(N=1, H, W)`` per channel are exactly the per-example
                                            per-channel statistics of GroupNorm(C, C); both use the
                                            biased variance and the same ε.
    BatchNorm, train mode, batch > 1        NOT equal: BN mixes examples (the reason for the fix).
    InstanceNorm running stats → none       EQUAL in train mode (both use instance statistics); in
                                            eval mode the old layer used the running statistics.
    modules not listed above                untouched (deep copies, equal outputs bit for bit)
    ======================================  ===========================================================
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = ["Norm", "fix", "default_num_groups"]

_GROUP_CANDIDATES = (32, 16, 8, 4, 2, 1)


class Norm(enum.Enum):
    """What replaces BatchNorm (always an ``nn.GroupNorm``; the member sets its group count)."""

    GROUP = "group"  # G = num_groups, or the largest of 32, 16, 8, 4, 2, 1 dividing C
    LAYER = "layer"  # G = 1
    INSTANCE = "instance"  # G = C


def default_num_groups(num_channels: int, candidates: tuple[int, ...] = _GROUP_CANDIDATES) -> int:
    """The largest of ``candidates`` that divides ``num_channels`` (32 for 64 channels, 8 for 24, …)."""
    for g in candidates:
        if num_channels % g == 0:
            return g
    return 1


def _groups(path: str, c: int, norm: Norm, num_groups: int | Callable[[int], int] | None) -> int:
    if norm is Norm.LAYER:
        return 1
    if norm is Norm.INSTANCE:
        return c
    g = default_num_groups(c) if num_groups is None else (num_groups(c) if callable(num_groups) else num_groups)
    if isinstance(g, bool) or not isinstance(g, int) or g < 1 or c % g:
        raise ValueError(
            f"fix: num_groups={g!r} does not divide the {c} channels of {path or '<root>'}; "
            "pass num_groups=None (largest of 32, 16, 8, … dividing C) or a callable channels -> groups"
        )
    return g


def _replacement(path: str, m: nn.Module, norm: Norm, num_groups) -> nn.Module | None:
    if isinstance(m, _LazyNormBase) and m.has_uninitialized_params():
        raise ValueError(f"fix: {path or '<root>'} is an uninitialised lazy norm; run one forward pass before fix()")
    if isinstance(m, _BatchNorm):
        c = m.num_features
        new = nn.GroupNorm(_groups(path, c, norm, num_groups), c, eps=m.eps, affine=m.affine)
    elif isinstance(m, _InstanceNorm) and m.track_running_stats:
        new = type(m)(m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine, track_running_stats=False)
    else:
        return None
    if m.affine:
        with torch.no_grad():
            new.weight.copy_(m.weight)
            new.bias.copy_(m.bias)
        new.weight.requires_grad_(m.weight.requires_grad)
        new.bias.requires_grad_(m.bias.requires_grad)
    ref = m.weight if m.affine else next(iter(m.buffers()), None)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    new.train(m.training)
    return new


def fix(module: nn.Module, *, norm: Norm = Norm.GROUP, num_groups: int | Callable[[int], int] | None = None) -> nn.Module:
    """A deep copy of ``module`` with BatchNorm replaced and InstanceNorm running statistics removed.

    The input is not modified. See the module docstring for what changes and when the new model
    computes the same function (rarely: plan to train after fixing).

    Args:
        module: any ``nn.Module`` (the root may itself be a BatchNorm).
        norm: :class:`Norm` — ``GROUP`` (default), ``LAYER`` (G=1) or ``INSTANCE`` (G=C).
        num_groups: with ``Norm.GROUP``: None (the largest of 32, 16, 8, 4, 2, 1 dividing ``C``), an int
            that must divide every replaced layer's channels, or a callable ``channels -> groups``.

    Returns:
        The new module; ``validate(fix(m))`` reports no errors for BatchNorm/InstanceNorm.

    Example:
        >>> net = fix(nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64)))
        >>> type(net[1]).__name__, net[1].num_groups, net[1].num_channels
        ('GroupNorm', 32, 64)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"fix: module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(norm, Norm):
        raise TypeError(f"fix: norm must be a dpfunc.bridge.Norm (Norm.GROUP, Norm.LAYER, Norm.INSTANCE), got {norm!r}")
    if num_groups is not None and norm is not Norm.GROUP:
        raise ValueError(f"fix: num_groups is only used with Norm.GROUP, got norm={norm} and num_groups={num_groups!r}")
    new = copy.deepcopy(module)
    root = _replacement("", new, norm, num_groups)
    if root is not None:
        return root
    done: dict[int, nn.Module | None] = {}  # a layer shared at several places stays shared
    for path, m in list(new.named_modules()):
        for name, child in list(m._modules.items()):  # not named_children: it hides repeats
            if child is None:
                continue
            if id(child) not in done:
                done[id(child)] = _replacement(f"{path}.{name}" if path else name, child, norm, num_groups)
            if done[id(child)] is not None:
                setattr(m, name, done[id(child)])
    return new
