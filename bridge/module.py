"""The wrapped module of :func:`~dpfunc.bridge.make_private`: records each training forward.

In training mode (with autograd enabled) the forward runs under a keyed global RNG (dropout masks
from ``dropout_key.fold_in(forward_count)``) through the optimizer's *recorder*: with the fast engine
that is the engine's tapped forward (:meth:`dpfunc.bridge.fast.FastPass.forward`), kept with its
graph — the step's only forward; otherwise a plain forward without autograd. The output comes back
as a fresh leaf, so ``loss.backward()`` computes only ``∂loss/∂output``; ``optimizer.step()`` runs
the one backward from that output gradient through the recorded graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from dpfunc.keys import Key
from dpfunc.bridge.functional import keyed_global_rng
from dpfunc.bridge.loader import LogicalBatchPlan

__all__ = ["PrivateModule"]


class _MicroBatch(NamedTuple):
    args: tuple[torch.Tensor, ...]  # the forward's positional inputs, detached
    outputs: tuple[torch.Tensor, ...]  # the leaves returned to the user (their .grad is c / s)
    key: Key  # the dropout key of this forward
    recording: Any = None  # what the recorder kept for the step (the fast engine's FastPass), or None


def _plain_forward(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[Any, None]:
    with torch.no_grad():
        return module(*args), None


class _Shared:
    """State shared by the wrapped module and the optimizer (never exposed to the user).

    ``recorder(module, args) -> (output, recording)`` is set by the optimizer: it runs the training
    forward and keeps what the optimizer's step needs.
    """

    def __init__(self, dropout_key: Key, plan: LogicalBatchPlan):
        self.dropout_key = dropout_key
        self.plan = plan
        self.forward_count = 0
        self.pending: list[_MicroBatch] = []
        self.recorder: Callable[[nn.Module, tuple[torch.Tensor, ...]], tuple[Any, Any]] = _plain_forward


def _flatten(out: Any) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], Any]]:
    if isinstance(out, torch.Tensor):
        return [out], lambda xs: xs[0]
    if isinstance(out, (tuple, list)) and not hasattr(out, "_fields") and all(isinstance(t, torch.Tensor) for t in out):
        return list(out), lambda xs: type(out)(xs)
    raise TypeError(
        f"PrivateModule: the model must return a tensor or a tuple/list of tensors in training mode, got {type(out).__name__}"
    )


class PrivateModule(nn.Module):
    """The user's module, recording each training forward for the private optimizer.

    In eval mode or under ``torch.no_grad()`` it is exactly the wrapped module. ``state_dict`` and
    ``load_state_dict`` are the wrapped module's (no ``_module.`` prefix), and unknown attributes are
    looked up on it, so ``model.fc`` keeps working.
    """

    def __init__(self, module: nn.Module, shared: _Shared):
        super().__init__()
        self._module = module
        object.__setattr__(self, "_shared", shared)  # not a submodule, not in state_dict

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["_module"], name)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self._module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return self._module.load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not (self.training and torch.is_grad_enabled()):
            return self._module(*args, **kwargs)
        if kwargs:
            raise TypeError(
                f"PrivateModule: keyword arguments are not supported in training mode (got {sorted(kwargs)}); "
                "pass the batch positionally"
            )
        if not args or not all(isinstance(a, torch.Tensor) for a in args):
            raise TypeError("PrivateModule: in training mode the model takes tensors with a leading batch dimension")
        sizes = {a.shape[0] if a.dim() else None for a in args}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(f"PrivateModule: inputs must share the leading batch dimension, got shapes {[tuple(a.shape) for a in args]}")
        s = self._shared
        key = s.dropout_key.fold_in(s.forward_count)
        s.forward_count += 1
        devices = {p.device for p in self._module.parameters()} | {a.device for a in args}
        args = tuple(a.detach() for a in args)
        with keyed_global_rng(key, devices):
            out, recording = s.recorder(self._module, args)
        flat, rebuild = _flatten(out)
        leaves = [t.detach().requires_grad_() if t.is_floating_point() else t.detach() for t in flat]
        s.pending.append(_MicroBatch(args, tuple(leaves), key, recording))
        return rebuild(leaves)
