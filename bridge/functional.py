"""Module → pure functions: ``(apply_fn, params, buffers)`` via ``torch.func.functional_call``."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["functionalize", "ApplyFn"]


class ApplyFn(Protocol):
    def __call__(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any: ...


def functionalize(module: nn.Module) -> tuple[ApplyFn, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a module into a pure apply function and detached copies of its parameters and buffers.

    The module is never mutated: ``params`` and ``buffers`` are fresh tensors (``detach().clone()``),
    keyed like ``module.state_dict()``; training them leaves the module's own tensors untouched.

    Returns:
        ``(apply_fn, params, buffers)`` with ``apply_fn(params, buffers, *args, **kwargs)`` equal to
        ``module(*args, **kwargs)`` evaluated at those tensors.

    Example:
        >>> apply_fn, params, buffers = functionalize(nn.Linear(3, 2))
        >>> apply_fn(params, buffers, torch.ones(1, 3)).shape
        torch.Size([1, 2])
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"functionalize: module must be an nn.Module, got {type(module).__name__}")
    params = {k: v.detach().clone() for k, v in module.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in module.named_buffers()}

    def apply_fn(params, buffers, *args, **kwargs):
        return functional_call(module, (params, buffers), args, kwargs, tie_weights=True, strict=False)

    apply_fn.module = module  # for engines that need the module structure (fast clipping)
    return apply_fn, params, buffers
