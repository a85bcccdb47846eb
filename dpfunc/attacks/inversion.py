"""Gradient inversion: reconstruct training images from a shared gradient update.

The server of a federated round holds the model ``(apply_fn, params, buffers)`` and receives an
update. These attacks search for images whose gradient looks like that update:

* :func:`invert_gradients` — "Inverting Gradients" (Geiping, Bauermeister, Dröge, Moeller, NeurIPS
  2020): minimise ``1 − cos(∇θ L(x̂), g) + λ_TV · TV(x̂)`` over the images with Adam on the *signs* of the
  gradients, a step schedule, pixels kept in the data box, several random restarts (the one with the
  lowest objective wins). ``breaching``'s ``invertinggradients`` configuration runs 24,000 iterations
  with TV 0.2; the default here is the same, scale ``iterations`` down on a CPU.
* :func:`dlg` — "Deep Leakage from Gradients" (Zhu, Liu, Han, NeurIPS 2019): L-BFGS on the squared
  distance ``‖∇θ L(x̂) − g‖²``.
* :func:`recover_label` — iDLG (Zhao, Mopuri, Bilen 2020): for one image under cross-entropy the
  last layer's bias gradient is ``softmax(z) − onehot(y)``, negative only at the true label.
* :func:`infer_label_counts` — label counts for ``B > 1`` from the same bias gradient, given an estimate
  of the model's mean prediction (exact when that estimate is exact).

The attacker's model of the update (:func:`model_update`) follows the threat: a plain mean gradient,
or DP-SGD's ``Σ_i clip(g_i, C) / normaliser`` when the update was clipped (``C`` and the expected batch
size are public in DP-SGD, so a strong attacker models them). Noise cannot be modelled; it is what the
attack has to fight.

All functions are pure: inputs are not modified; randomness (the initial images) comes from ``key``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from dpfunc._tree import Params
from dpfunc._validate import check_int_range, check_nonnegative, check_positive_finite
from dpfunc.keys import Key

__all__ = [
    "SharedUpdate",
    "InvertingGradientsConfig",
    "DLGConfig",
    "InversionResult",
    "model_update",
    "total_variation",
    "invert_gradients",
    "dlg",
    "recover_label",
    "infer_label_counts",
]

Callback = Callable[[int, float], None]


class SharedUpdate(NamedTuple):
    """What the attacker observes, and what it knows about how it was made.

    Attributes:
        grads: the observed update, ``dict`` keyed like the model's params.
        batch_size: how many images are behind it (``B``; ``3B`` for a sum over three sites).
        normalizer: the update is ``Σ_i g̃_i / normalizer`` (``B`` for a mean gradient, the expected
            batch size ``q·n`` for DP-SGD).
        max_grad_norm: per-example clipping bound ``C`` if each ``g̃_i = clip(g_i, C)``; None if unclipped.
    """

    grads: Params
    batch_size: int
    normalizer: float
    max_grad_norm: Optional[float] = None


@dataclass(frozen=True)
class InvertingGradientsConfig:
    """Hyper-parameters of :func:`invert_gradients` (defaults: ``breaching``'s ``invertinggradients``).

    Attributes:
        iterations: Adam steps per restart (24,000 in breaching; a few hundred to a few thousand on a CPU).
        learning_rate: Adam step size (on signed gradients each pixel moves by about this much).
        tv_weight: weight of the total-variation prior.
        restarts: independent random initialisations; the lowest final objective is returned.
        signed: step on ``sign(∇)`` (Geiping et al.'s choice) instead of ``∇``.
        box: ``(low, high)`` pixel range; pixels are projected into it after every step.
        decay_milestones: fractions of ``iterations`` at which the step size is multiplied by 0.1.
    """

    iterations: int = 24_000
    learning_rate: float = 0.1
    tv_weight: float = 0.2
    restarts: int = 1
    signed: bool = True
    box: tuple[float, float] = (-1.0, 1.0)
    decay_milestones: tuple[float, ...] = (3 / 8, 5 / 8, 7 / 8)

    def __post_init__(self) -> None:
        fn = "InvertingGradientsConfig"
        check_int_range(fn, "iterations", self.iterations, low=1)
        check_positive_finite(fn, "learning_rate", self.learning_rate)
        check_nonnegative(fn, "tv_weight", self.tv_weight)
        check_int_range(fn, "restarts", self.restarts, low=1)
        _check_box(fn, self.box)


@dataclass(frozen=True)
class DLGConfig:
    """Hyper-parameters of :func:`dlg` (Zhu et al.: L-BFGS, learning rate 1, 300 iterations).

    Attributes:
        iterations: L-BFGS steps per restart.
        learning_rate: L-BFGS step size.
        history_size: L-BFGS memory.
        restarts: random initialisations; the lowest final distance wins.
        box: pixels are clipped into ``(low, high)`` once at the end (L-BFGS itself is unconstrained).
    """

    iterations: int = 300
    learning_rate: float = 1.0
    history_size: int = 100
    restarts: int = 1
    box: tuple[float, float] = (-1.0, 1.0)

    def __post_init__(self) -> None:
        fn = "DLGConfig"
        check_int_range(fn, "iterations", self.iterations, low=1)
        check_positive_finite(fn, "learning_rate", self.learning_rate)
        check_int_range(fn, "history_size", self.history_size, low=1)
        check_int_range(fn, "restarts", self.restarts, low=1)
        _check_box(fn, self.box)


class InversionResult(NamedTuple):
    """``images``: ``(B, C, H, W)`` best reconstruction; ``objective``: its final matching loss;
    ``objectives``: final loss of every restart."""

    images: torch.Tensor
    objective: float
    objectives: tuple[float, ...]


def _check_box(fn: str, box) -> None:
    ok = isinstance(box, tuple) and len(box) == 2 and all(isinstance(b, (int, float)) and math.isfinite(b) for b in box)
    if not ok or not box[0] < box[1]:
        raise ValueError(f"{fn}: box must be a (low, high) tuple of finite numbers with low < high, got {box!r}")


def _check_update(fn: str, update: SharedUpdate, params: Mapping[str, torch.Tensor]) -> None:
    if not isinstance(update, SharedUpdate):
        raise TypeError(f"{fn}: update must be a SharedUpdate, got {type(update).__name__}")
    if set(update.grads) != set(params):
        raise ValueError(f"{fn}: update.grads and params must have the same keys; they differ in {sorted(set(update.grads) ^ set(params))}")
    check_int_range(fn, "update.batch_size", update.batch_size, low=1)
    check_positive_finite(fn, "update.normalizer", update.normalizer)
    if update.max_grad_norm is not None:
        check_positive_finite(fn, "update.max_grad_norm", update.max_grad_norm)


def _check_labels(fn: str, labels: torch.Tensor, batch_size: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.shape != (batch_size,) or labels.dtype != torch.int64:
        got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{fn}: labels must be an int64 tensor of shape ({batch_size},) (update.batch_size), got {got}")
    return labels


def model_update(
    apply_fn: Callable,
    params: Params,
    buffers: Params,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    normalizer: float,
    max_grad_norm: float | None = None,
    create_graph: bool = False,
) -> Params:
    """The update that ``images`` with ``labels`` would produce: ``Σ_i g̃_i / normalizer``.

    ``g_i`` is the cross-entropy gradient of example ``i`` w.r.t. ``params``; ``g̃_i = g_i`` or, with
    ``max_grad_norm = C``, ``g_i · min(1, C/‖g_i‖)`` (DP-SGD's flat clipping). With
    ``create_graph=True`` the result is differentiable w.r.t. ``images`` (what the attacks need).

    Shapes: ``images (B, C, H, W)``, ``labels (B,)`` → ``dict`` like ``params``.
    """
    names = list(params)
    detached = {k: v.detach() for k, v in params.items()}
    if max_grad_norm is None or images.shape[0] == 1:  # one image: its gradient is the batch gradient
        p = {k: v.requires_grad_() for k, v in ((k, v.clone()) for k, v in detached.items())}
        loss = F.cross_entropy(apply_fn(p, buffers, images), labels, reduction="sum")
        g = torch.autograd.grad(loss, [p[k] for k in names], create_graph=create_graph)
        scale = 1.0 / normalizer
        if max_grad_norm is not None:
            norm = torch.sqrt(sum(gi.pow(2).sum() for gi in g))
            scale = torch.clamp(max_grad_norm / norm.clamp_min(torch.finfo(norm.dtype).tiny), max=1.0) / normalizer
        return {k: gi * scale for k, gi in zip(names, g)}

    def one(p, x, y):
        return F.cross_entropy(apply_fn(p, buffers, x[None]), y[None])

    per = vmap(grad(one), in_dims=(None, 0, 0))(detached, images, labels)
    norms = torch.sqrt(sum(per[k].flatten(1).pow(2).sum(1) for k in names))
    factor = torch.clamp(max_grad_norm / norms.clamp_min(torch.finfo(norms.dtype).tiny), max=1.0)
    out = {k: torch.einsum("b,b...->...", factor, per[k]) / normalizer for k in names}
    if not create_graph:
        out = {k: v.detach() for k, v in out.items()}
    return out


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation: mean ``|Δx|`` plus mean ``|Δy|`` over the batch (a 0-d tensor)."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    return dx + dy


def _device_of(params: Mapping[str, torch.Tensor]) -> torch.device:
    """Where the model lives: the reconstruction is optimised there (the initial guess is drawn on the host)."""
    return next(iter(params.values())).device if params else torch.device("cpu")


def _flat(g: Mapping[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([g[k].reshape(-1) for k in names])


def _cosine_objective(apply_fn, params, buffers, update: SharedUpdate, labels, tv_weight: float):
    names = list(params)
    target = _flat(update.grads, names).detach()
    tnorm = target.norm().clamp_min(1e-30)

    def objective(x: torch.Tensor) -> torch.Tensor:
        g = _flat(model_update(apply_fn, params, buffers, x, labels, normalizer=update.normalizer,
                               max_grad_norm=update.max_grad_norm, create_graph=True), names)
        cos = (g @ target) / (g.norm().clamp_min(1e-30) * tnorm)
        return 1.0 - cos + tv_weight * total_variation(x)

    return objective


def invert_gradients(
    apply_fn: Callable,
    params: Params,
    buffers: Params,
    update: SharedUpdate,
    labels: torch.Tensor,
    image_shape: tuple[int, ...],
    *,
    key: Key,
    config: InvertingGradientsConfig = InvertingGradientsConfig(),
    callback: Callback | None = None,
) -> InversionResult:
    """Reconstruct ``update.batch_size`` images by cosine gradient matching (Inverting Gradients).

    Args:
        apply_fn: ``apply_fn(params, buffers, x) -> logits``; params: the model the update was taken at.
        update: the observed :class:`SharedUpdate`.
        labels: ``(B,)`` int64 labels (recovered with :func:`recover_label`, or known).
        image_shape: ``(C, H, W)`` of one image.
        key: randomness of the initial images (restart ``r`` uses ``key.fold_in(r)``).
        config: :class:`InvertingGradientsConfig`.
        callback: called as ``callback(iteration, objective)`` after every step (progress bars).

    Returns:
        :class:`InversionResult` with images in ``config.box``.

    Example:
        >>> res = invert_gradients(apply_fn, params, {}, update, torch.tensor([1]), (1, 28, 28),
        ...                        key=Key(0), config=InvertingGradientsConfig(iterations=500))  # doctest: +SKIP
    """
    fn = "invert_gradients"
    _check_update(fn, update, params)
    labels = _check_labels(fn, labels, update.batch_size)
    if not isinstance(key, Key):
        raise TypeError(f"{fn}: key must be a dpfunc.Key, got {type(key).__name__}")
    lo, hi = config.box
    objective = _cosine_objective(apply_fn, params, buffers, update, labels, config.tv_weight)
    milestones = sorted({max(1, int(round(m * config.iterations))) for m in config.decay_milestones})
    best, results = None, []
    done = 0
    for r in range(config.restarts):
        x0 = torch.randn((update.batch_size, *image_shape), generator=key.fold_in(r).generator())  # same guess on any device
        x = x0.to(_device_of(params)).clamp(lo, hi).requires_grad_()
        opt = torch.optim.Adam([x], lr=config.learning_rate)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
        for _ in range(config.iterations):
            opt.zero_grad(set_to_none=True)
            loss = objective(x)
            (gx,) = torch.autograd.grad(loss, [x])
            x.grad = gx.sign() if config.signed else gx
            opt.step()
            sched.step()
            with torch.no_grad():
                x.clamp_(lo, hi)
            done += 1
            if callback is not None:
                callback(done, float(loss.detach()))
        final = float(objective(x).detach())
        results.append(final)
        if best is None or final < best[0]:
            best = (final, x.detach().clone())
    return InversionResult(best[1], best[0], tuple(results))


def dlg(
    apply_fn: Callable,
    params: Params,
    buffers: Params,
    update: SharedUpdate,
    labels: torch.Tensor,
    image_shape: tuple[int, ...],
    *,
    key: Key,
    config: DLGConfig = DLGConfig(),
    callback: Callback | None = None,
) -> InversionResult:
    """Reconstruct images by L-BFGS on the squared gradient distance (DLG, with iDLG's labels).

    Same arguments as :func:`invert_gradients`. The objective ``Σ_params ‖model_update(x̂) − g‖²`` is
    sensitive to the update's scale, so ``update.normalizer`` and ``max_grad_norm`` must be right.
    """
    fn = "dlg"
    _check_update(fn, update, params)
    labels = _check_labels(fn, labels, update.batch_size)
    if not isinstance(key, Key):
        raise TypeError(f"{fn}: key must be a dpfunc.Key, got {type(key).__name__}")
    names = list(params)
    target = _flat(update.grads, names).detach()

    def objective(x):
        g = _flat(model_update(apply_fn, params, buffers, x, labels, normalizer=update.normalizer,
                               max_grad_norm=update.max_grad_norm, create_graph=True), names)
        return ((g - target) ** 2).sum()

    lo, hi = config.box
    best, results, done = None, [], 0
    for r in range(config.restarts):
        x = (torch.randn((update.batch_size, *image_shape), generator=key.fold_in(r).generator()).to(_device_of(params))
             .clamp(lo, hi).requires_grad_())
        opt = torch.optim.LBFGS([x], lr=config.learning_rate, max_iter=1, history_size=config.history_size,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = objective(x)
            (gx,) = torch.autograd.grad(loss, [x])
            x.grad = gx
            return loss

        for _ in range(config.iterations):
            loss = opt.step(closure)
            done += 1
            if callback is not None:
                callback(done, float(loss))
            if not torch.isfinite(x).all():
                break
        with torch.no_grad():
            xr = torch.nan_to_num(x.detach(), nan=0.0).clamp(lo, hi)
        final = float(objective(xr.clone().requires_grad_()).detach())
        results.append(final)
        if best is None or final < best[0]:
            best = (final, xr)
    return InversionResult(best[1], best[0], tuple(results))


def _bias(fn: str, update: SharedUpdate, bias_name: str) -> torch.Tensor:
    if bias_name not in update.grads:
        raise ValueError(f"{fn}: bias_name {bias_name!r} is not in the update (keys: {sorted(update.grads)}); name the last layer's bias")
    b = update.grads[bias_name].detach()
    if b.ndim != 1 or b.numel() < 2:
        raise ValueError(f"{fn}: {bias_name!r} must be a bias vector over >= 2 classes, got shape {tuple(b.shape)}")
    return b


def recover_label(update: SharedUpdate, bias_name: str = "head.bias") -> int:
    """iDLG label recovery for one image: the class whose last-layer bias gradient is smallest.

    For cross-entropy, ``∂L/∂b = softmax(z) − onehot(y)``: the true class's entry is ``p_y − 1 < 0`` and
    every other entry is ``p_c > 0``, so the argmin is exact for an unclipped (or clipped: clipping is a
    positive scaling) single-image update. Noise can flip it; the DP scenarios report how often.
    """
    return int(torch.argmin(_bias("recover_label", update, bias_name)))


def infer_label_counts(update: SharedUpdate, mean_probs: torch.Tensor, bias_name: str = "head.bias") -> torch.Tensor:
    """How many images of each class are behind an unclipped update (B > 1).

    The bias gradient of the batch is ``(Σ_i p_i − counts) / normalizer``, so
    ``counts = B · p̄ − normalizer · ∂L/∂b`` where ``p̄`` is the mean softmax over the batch. The attacker
    does not know ``p̄``; ``mean_probs`` is its estimate (e.g. the model's mean prediction on public
    images). Counts are rounded by largest remainder to non-negative integers summing to ``B``; they are
    exact when ``mean_probs`` is exact (the tests check this identity).

    Returns:
        ``(K,)`` int64 counts.
    """
    fn = "infer_label_counts"
    b = _bias(fn, update, bias_name)
    if update.max_grad_norm is not None:
        raise ValueError(f"{fn}: the update was clipped (max_grad_norm={update.max_grad_norm}); per-example scales are unknown, counts cannot be inferred")
    if mean_probs.shape != b.shape:
        raise ValueError(f"{fn}: mean_probs must have shape {tuple(b.shape)}, got {tuple(mean_probs.shape)}")
    n = update.batch_size
    raw = (n * mean_probs.to(torch.float64) - update.normalizer * b.to(torch.float64)).clamp_min(0)
    if raw.sum() > 0:
        raw = raw * (n / raw.sum())
    counts = raw.floor().to(torch.int64)
    short = n - int(counts.sum())
    if short > 0:
        order = torch.argsort(raw - counts.to(torch.float64), descending=True)
        counts[order[:short]] += 1
    return counts
