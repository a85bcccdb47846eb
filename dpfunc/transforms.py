"""Composable, pure gradient transformations (optax's design, on ``dict[str, Tensor]``).

A :class:`GradientTransformation` is a pair of pure functions::

    state            = tx.init(params)
    updates, state   = tx.update(updates, state, params)
    params           = apply_updates(params, updates)

Hyper-parameters live in the factory's closure; each transform has its own small NamedTuple
state of tensors; :func:`chain` composes left to right. Nothing mutates its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol, Union

import torch

from dpfunc._tree import Params, check_same_keys, global_norm, tree_add, tree_mul

__all__ = [
    "GradientTransformation",
    "TransformInitFn",
    "TransformUpdateFn",
    "Schedule",
    "chain",
    "identity",
    "scale",
    "scale_by_learning_rate",
    "add_decayed_weights",
    "clip_by_global_norm",
    "trace",
    "scale_by_adam",
    "sgd",
    "adam",
    "adamw",
    "apply_updates",
    "EmptyState",
    "ScaleByScheduleState",
    "TraceState",
    "ScaleByAdamState",
]


class TransformInitFn(Protocol):
    """``init(params) -> state``: a transformation's initial state for parameters ``params`` (pure)."""

    def __call__(self, params: Params) -> Any: ...


class TransformUpdateFn(Protocol):
    """``update(updates, state, params=None) -> (updates', state')``: one step of a transformation (pure)."""

    def __call__(self, updates: Any, state: Any, params: Params | None = None) -> tuple[Any, Any]: ...


class GradientTransformation(NamedTuple):
    """A pair ``(init, update)`` of pure functions."""

    init: TransformInitFn
    update: TransformUpdateFn


Schedule = Union[float, Callable[[int], float]]


class EmptyState(NamedTuple):
    """State of a stateless transform."""


class ScaleByScheduleState(NamedTuple):
    count: int  # how many updates so far (a Python int: reading it never waits for a device)


class TraceState(NamedTuple):
    trace: Params  # the momentum buffer
    count: int


class ScaleByAdamState(NamedTuple):
    count: int
    mu: Params  # first moment
    nu: Params  # second moment


def _check_number(fn: str, arg: str, value: float, *, low: float, low_inclusive: bool = True, high: float = math.inf, high_inclusive: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (value >= low if low_inclusive else value > low) and (value <= high if high_inclusive else value < high)
    if not ok:
        lo = "[" if low_inclusive else "("
        hi = "]" if high_inclusive else ")"
        raise ValueError(f"{fn}: {arg} must be in {lo}{low}, {high}{hi}, got {value!r}")
    return float(value)


def _check_schedule(fn: str, lr: Schedule) -> Schedule:
    if callable(lr):
        return lr
    return _check_number(fn, "learning_rate", lr, low=0)


def _lr_at(lr: Schedule, count: int) -> float:
    return float(lr(int(count))) if callable(lr) else lr


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Compose transforms left to right; the state is the tuple of their states."""
    for i, t in enumerate(transforms):
        if not (hasattr(t, "init") and hasattr(t, "update")):
            raise TypeError(f"chain: argument {i} is not a GradientTransformation: {t!r}")

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(updates, state, params=None):
        if len(state) != len(transforms):
            raise ValueError(f"chain: state has {len(state)} entries for {len(transforms)} transforms")
        new_state = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params)
            new_state.append(s)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)


def identity() -> GradientTransformation:
    """Pass updates through unchanged (no state): the neutral element of :func:`chain`.

    Example:
        >>> tx = identity(); u = {"w": torch.ones(2)}
        >>> tx.update(u, tx.init(u))[0]["w"].tolist()
        [1.0, 1.0]
    """
    return GradientTransformation(lambda params: EmptyState(), lambda u, s, p=None: (dict(u), s))


def scale(factor: float) -> GradientTransformation:
    """Multiply updates by a constant ``factor``."""
    factor = _check_number("scale", "factor", factor, low=-math.inf)

    def update(updates, state, params=None):
        return tree_mul(updates, factor), state

    return GradientTransformation(lambda params: EmptyState(), update)


def scale_by_learning_rate(learning_rate: Schedule, *, flip_sign: bool = True) -> GradientTransformation:
    """Multiply updates by ``-learning_rate`` (a number or a schedule ``count -> lr``)."""
    lr = _check_schedule("scale_by_learning_rate", learning_rate)
    sign = -1.0 if flip_sign else 1.0

    def init(params):
        return ScaleByScheduleState(0)

    def update(updates, state, params=None):
        f = sign * _lr_at(lr, state.count)
        return tree_mul(updates, f), ScaleByScheduleState(state.count + 1)

    return GradientTransformation(init, update)


def add_decayed_weights(weight_decay: float) -> GradientTransformation:
    """``updates + weight_decay · params`` (L2 regularisation as in ``torch.optim.SGD(weight_decay=…)``)."""
    wd = _check_number("add_decayed_weights", "weight_decay", weight_decay, low=0)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("add_decayed_weights: update needs params")
        check_same_keys("add_decayed_weights", updates, params, ("updates", "params"))
        return tree_add(updates, tree_mul(params, wd)), state

    return GradientTransformation(lambda params: EmptyState(), update)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale all updates together so that their joint l2 norm is at most ``max_norm``.

    This clips the (already aggregated) update; it is NOT per-example clipping and gives no privacy.
    """
    c = _check_number("clip_by_global_norm", "max_norm", max_norm, low=0, low_inclusive=False, high=math.inf, high_inclusive=True)

    def update(updates, state, params=None):
        n = global_norm(updates)
        f = torch.where(n <= c, torch.ones_like(n), c / n)
        return {k: v * f.to(v.dtype) for k, v in updates.items()}, state

    return GradientTransformation(lambda params: EmptyState(), update)


def trace(momentum: float, *, nesterov: bool = False, dampening: float = 0.0) -> GradientTransformation:
    """Heavy-ball momentum exactly as ``torch.optim.SGD``: ``b ← μ b + (1 − τ) g`` (``b₁ = g``)."""
    mu = _check_number("trace", "momentum", momentum, low=0, high=1)
    tau = _check_number("trace", "dampening", dampening, low=0, high=1)
    if nesterov and (mu == 0 or tau != 0):
        raise ValueError(f"trace: nesterov needs momentum > 0 and dampening = 0, got momentum={mu}, dampening={tau}")

    def init(params):
        return TraceState({k: torch.zeros_like(v) for k, v in params.items()}, 0)

    def update(updates, state, params=None):
        first = int(state.count) == 0
        # Multi-tensor ops (a few dispatches for all leaves), the same arithmetic as the per-leaf
        # ``mu * b + (1 - tau) * g`` and ``g + mu * b``, so bit-identical to it.
        if first:
            new = {k: g.clone() for k, g in updates.items()}
        else:
            new = tree_add(tree_mul({k: state.trace[k] for k in updates}, mu), tree_mul(updates, 1 - tau))
        out = tree_add(updates, tree_mul(new, mu)) if nesterov else new
        return out, TraceState(new, state.count + 1)

    return GradientTransformation(init, update)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adam's rescaling ``m̂ / (sqrt(v̂) + eps)`` (Kingma & Ba 2015), as ``torch.optim.Adam`` computes it."""
    b1 = _check_number("scale_by_adam", "b1", b1, low=0, high=1)  # b = 1 divides by 1 - b**t = 0
    b2 = _check_number("scale_by_adam", "b2", b2, low=0, high=1)
    eps = _check_number("scale_by_adam", "eps", eps, low=0)

    def init(params):
        z = {k: torch.zeros_like(v) for k, v in params.items()}
        return ScaleByAdamState(0, z, dict(z))

    def update(updates, state, params=None):
        t = int(state.count) + 1
        mu = {k: state.mu[k] * b1 + g * (1 - b1) for k, g in updates.items()}
        nu = {k: state.nu[k] * b2 + g * g * (1 - b2) for k, g in updates.items()}
        bc1 = 1 - b1**t
        bc2_sqrt = math.sqrt(1 - b2**t)
        out = {k: (mu[k] / bc1) / (nu[k].sqrt() / bc2_sqrt + eps) for k in updates}
        return out, ScaleByAdamState(state.count + 1, mu, nu)

    return GradientTransformation(init, update)


def sgd(learning_rate: Schedule, momentum: float = 0.0, *, nesterov: bool = False, dampening: float = 0.0, weight_decay: float = 0.0) -> GradientTransformation:
    """Stochastic gradient descent, step for step equal to ``torch.optim.SGD`` with the same arguments."""
    parts = []
    if weight_decay:
        parts.append(add_decayed_weights(weight_decay))
    if momentum or nesterov:
        parts.append(trace(momentum, nesterov=nesterov, dampening=dampening))
    parts.append(scale_by_learning_rate(learning_rate))
    return chain(*parts)


def adam(learning_rate: Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adam, step for step equal to ``torch.optim.Adam``."""
    return chain(scale_by_adam(b1, b2, eps), scale_by_learning_rate(learning_rate))


def adamw(learning_rate: Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 1e-2) -> GradientTransformation:
    """AdamW (Loshchilov & Hutter 2019): decoupled weight decay, as ``torch.optim.AdamW``."""
    return chain(scale_by_adam(b1, b2, eps), add_decayed_weights(weight_decay), scale_by_learning_rate(learning_rate))


def apply_updates(params: Mapping[str, torch.Tensor], updates: Mapping[str, torch.Tensor]) -> Params:
    """``params + updates``, leaf-wise, as a new dict (dtype of ``params`` kept)."""
    check_same_keys("apply_updates", params, updates, ("params", "updates"))
    if all(p.dtype == updates[k].dtype for k, p in params.items()):  # the usual case: one multi-tensor add
        return tree_add(params, updates)
    return {k: (p + updates[k]).to(p.dtype) for k, p in params.items()}
