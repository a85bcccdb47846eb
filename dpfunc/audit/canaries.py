"""One DP-SGD run with canaries: the data the one-run audit needs (scores and coin flips).

Two kinds of canaries, as in Steinke, Nasr & Jagielski (2023):

* **white box** (:func:`white_box_run`): gradient canaries. Canary ``i`` is a Dirac gradient ``C·e_{c_i}``
  on a coordinate ``c_i`` of its own; when canary ``i`` is included and Poisson-sampled at a step, it is
  added to the clipped sum like one more example (its norm is ``C``, so clipping leaves it unchanged and
  the sensitivity argument is the mechanism's own). The auditor sees every privatised update
  ``ĝ_t`` and scores ``Σ_t ĝ_t[c_i]``.
* **black box** (:func:`black_box_run`): input canaries (e.g. held-out images with flipped labels) join
  the training data when included; the auditor sees only the final model and scores ``−loss``.

The mechanism under audit is any ``aggregate`` transform that maps a :class:`~dpfunc.ClippedSum` to a
privatised update — normally :func:`dpfunc.dp_aggregate`, the transform ``dpsgd`` runs — so a bug in
it (noise too small, wrong sensitivity) shows up as an ε lower bound above the claim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dpfunc._tree import Params
from dpfunc._validate import check_int_range, check_positive_finite, check_probability
from dpfunc.clipping import FlatClipping
from dpfunc.devices import to_device
from dpfunc.keys import Key
from dpfunc.sampling import poisson_sample
from dpfunc.step import vmap_engine
from dpfunc.transforms import GradientTransformation

__all__ = ["CanaryRun", "white_box_run", "black_box_run", "per_example_cross_entropy"]


class CanaryRun(NamedTuple):
    """``scores`` ``(m,)`` float64 (higher = more likely included), ``included`` ``(m,)`` bool (the coin
    flips), both on the host whatever device the run computed on, and the final ``params`` (on that device)."""

    scores: torch.Tensor
    included: torch.Tensor
    params: Params


def per_example_cross_entropy(apply_fn: Callable) -> Callable:
    """``loss(params, buffers, x, y)`` of ONE example for :func:`dpfunc.vmap_engine`."""

    def loss(p, b, x, y):
        return F.cross_entropy(apply_fn(p, b, x[None]), y[None])

    return loss


def _check(fn: str, m: int, sampling_rate: float, steps: int, learning_rate: float) -> None:
    check_int_range(fn, "canaries", m, low=2)
    check_probability(fn, "sampling_rate", sampling_rate)
    check_int_range(fn, "steps", steps, low=1)
    check_positive_finite(fn, "learning_rate", learning_rate)


def white_box_run(
    apply_fn: Callable,
    params: Params,
    buffers: Params,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    aggregate: GradientTransformation,
    max_grad_norm: float,
    sampling_rate: float,
    steps: int,
    learning_rate: float,
    canaries: int,
    key: Key,
    engine: Callable | None = None,
    on_step: Callable[[int], None] | None = None,
) -> CanaryRun:
    """Train with DP-SGD on ``data`` plus Dirac gradient canaries; score each canary from the updates.

    Args:
        apply_fn, params, buffers: the model.
        data: ``(x (n, ...), y (n,))`` the real training data.
        aggregate: the mechanism under audit (``dp_aggregate(DPConfig(C, σ, q, n), key)``).
        max_grad_norm: C, the norm of each canary gradient (the mechanism's clipping bound).
        sampling_rate: q, for data and canaries alike; steps: T; learning_rate: plain SGD step.
        canaries: m ≤ number of parameters (one coordinate each).
        key: coin flips, canary coordinates and batch sampling (the noise key lives in ``aggregate``).
        engine: gradient engine returning a ClippedSum (default ``vmap_engine`` with flat clipping at C).
        on_step: progress callback, called with 1 after every step.
    """
    fn = "white_box_run"
    _check(fn, canaries, sampling_rate, steps, learning_rate)
    check_positive_finite(fn, "max_grad_norm", max_grad_norm)
    names = list(params)
    sizes = [params[k].numel() for k in names]
    total = sum(sizes)
    if canaries > total:
        raise ValueError(f"{fn}: canaries must be <= the number of parameters ({total}) (one coordinate each), got {canaries}")
    coin_key, coord_key, sample_key, canary_sample_key = key.split(4)
    # coins, coordinates and samples are drawn on the host (the same on every device); the run computes where params are
    where = next(iter(params.values())).device
    included = torch.rand(canaries, generator=coin_key.generator()) < 0.5
    coords = torch.randperm(total, generator=coord_key.generator())[:canaries]
    if engine is None:
        engine = vmap_engine(per_example_cross_entropy(apply_fn), clipping=FlatClipping(max_grad_norm))
    x, y = data
    n = x.shape[0]
    state = aggregate.init(params)
    scores = torch.zeros(canaries, dtype=torch.float64, device=where)
    coords_on = to_device(coords, where)
    for t in range(steps):
        idx = to_device(poisson_sample(sample_key.fold_in(t), n, sampling_rate), x.device)
        out = engine(params, buffers, (x[idx], y[idx]), None)
        clipped = out.grads
        flat = torch.cat([clipped.grads[k].reshape(-1) for k in names])
        drawn = included & (torch.rand(canaries, generator=canary_sample_key.fold_in(t).generator()) < sampling_rate)
        flat = flat.index_add(0, to_device(coords[drawn], where),
                              torch.full((int(drawn.sum()),), float(max_grad_norm), dtype=flat.dtype, device=where))
        grads = dict(zip(names, (c.view_as(params[k]) for c, k in zip(torch.split(flat, sizes), names))))
        noisy, state = aggregate.update(clipped._replace(grads=grads), state, params)
        noisy_flat = torch.cat([noisy[k].reshape(-1) for k in names])
        scores += noisy_flat[coords_on].to(torch.float64)
        params = {k: (params[k] - learning_rate * noisy[k]).detach() for k in names}
        if on_step is not None:
            on_step(1)
    return CanaryRun(scores.cpu(), included, params)


def black_box_run(
    apply_fn: Callable,
    params: Params,
    buffers: Params,
    data: tuple[torch.Tensor, torch.Tensor],
    canary_data: tuple[torch.Tensor, torch.Tensor],
    *,
    aggregate: GradientTransformation,
    max_grad_norm: float,
    sampling_rate: float,
    steps: int,
    learning_rate: float,
    key: Key,
    engine: Callable | None = None,
    on_step: Callable[[int], None] | None = None,
) -> CanaryRun:
    """Train with DP-SGD on ``data`` plus the included input canaries; score ``−loss`` of the final model.

    Args:
        canary_data: ``(x (m, ...), y (m,))`` candidate canaries (not in ``data``), e.g. held-out
            images with flipped labels, so that membership changes their loss.
        Others as in :func:`white_box_run`.
    """
    fn = "black_box_run"
    cx, cy = canary_data
    m = cx.shape[0]
    _check(fn, m, sampling_rate, steps, learning_rate)
    coin_key, sample_key = key.split(2)
    included = torch.rand(m, generator=coin_key.generator()) < 0.5  # on the host; the run computes where the data is
    x = torch.cat([data[0], cx[to_device(included, cx.device)]])
    y = torch.cat([data[1], cy[to_device(included, cy.device)]])
    if engine is None:
        engine = vmap_engine(per_example_cross_entropy(apply_fn), clipping=FlatClipping(max_grad_norm))
    state = aggregate.init(params)
    for t in range(steps):
        idx = to_device(poisson_sample(sample_key.fold_in(t), x.shape[0], sampling_rate), x.device)
        out = engine(params, buffers, (x[idx], y[idx]), None)
        noisy, state = aggregate.update(out.grads, state, params)
        params = {k: (params[k] - learning_rate * noisy[k]).detach() for k in params}
        if on_step is not None:
            on_step(1)
    with torch.no_grad():
        losses = F.cross_entropy(apply_fn(params, buffers, cx), cy, reduction="none")
    return CanaryRun(-losses.to("cpu", torch.float64), included, params)
