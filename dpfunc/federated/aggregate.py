"""Aggregation: checking site updates, the pluggable :class:`Aggregator`, weighted FedAvg, server optimizers.

The server's step of round ``r``::

    kept      = [u for u in updates if check_update(u, global, r) is None]      # sorted by site id
    mean      = aggregator.aggregate(kept, global)          # Σ_s w_s·params_s / Σ_s w_s
    Δ         = global − mean                               # the "pseudo-gradient"
    global'   = mean                                        if server_tx is None (plain FedAvg)
              = global + server_tx.update(Δ, ...)           otherwise (FedAvgM, FedAdam; Reddi et al. 2021)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch

from dpfunc._tree import Params
from dpfunc._validate import check_number, check_positive_finite
from dpfunc.federated.site import SiteUpdate
from dpfunc.transforms import GradientTransformation, adam, sgd

__all__ = ["Aggregator", "WeightedFedAvg", "check_update", "fedavgm", "fedadam"]


@runtime_checkable
class Aggregator(Protocol):
    """How the server combines the updates of the sites that answered a round.

    ``aggregate(updates, reference)`` receives the validated :class:`~dpfunc.federated.SiteUpdate` s of
    one round, **sorted by site id** (at least ``min_sites`` of them), and the current global model
    ``reference`` (same keys/shapes/dtypes as every ``update.params``). It returns the weighted mean
    ``Σ_s w_s·params_s / Σ_s w_s`` as a new ``dict`` name → tensor with the reference's dtypes, or
    raises :class:`AggregationError` (the round then fails and nothing is applied).

    A secure-aggregation implementation computes the same quantity without seeing any single
    ``params_s``: encode ``w_s·(params_s − reference)`` in fixed point, mask, sum, unmask, decode,
    divide by ``Σ w_s`` and add ``reference`` back. It must be deterministic given its inputs for the
    engines to agree bit for bit.
    """

    def aggregate(self, updates: Sequence[SiteUpdate], reference: Params) -> Params: ...


class AggregationError(RuntimeError):
    """An aggregator could not produce a result for this round (nothing is applied)."""


class WeightedFedAvg:
    """Plain FedAvg (McMahan et al. 2017): the mean of the sites' models weighted by ``update.weight``.

    Sums in float64, in the order given (sites sorted by id), then casts to each parameter's dtype, so
    any engine gives bit-identical results and one site of any weight returns its params exactly.

    Args:
        weights: optional fixed weights ``{site: w}`` replacing the updates' own (example counts).

    Example:
        >>> import torch
        >>> from dpfunc.federated import SiteUpdate, WeightedFedAvg
        >>> u = [SiteUpdate(0, 0, {"w": torch.tensor([0.0])}, 1.0, 1, 0.0),
        ...      SiteUpdate(1, 0, {"w": torch.tensor([3.0])}, 3.0, 1, 0.0)]
        >>> WeightedFedAvg().aggregate(u, {"w": torch.tensor([0.0])})["w"]
        tensor([2.2500])
    """

    def __init__(self, weights: Mapping[int, float] | None = None):
        if weights is not None:
            weights = {int(k): check_positive_finite("WeightedFedAvg", f"weights[{k}]", v) for k, v in weights.items()}
        self.weights = weights

    def aggregate(self, updates: Sequence[SiteUpdate], reference: Params) -> Params:
        if not updates:
            raise AggregationError("WeightedFedAvg.aggregate: no updates to average")
        ws = []
        for u in updates:
            if self.weights is not None:
                if u.site not in self.weights:
                    raise AggregationError(f"WeightedFedAvg.aggregate: no weight given for site {u.site} (weights: {sorted(self.weights)})")
                ws.append(self.weights[u.site])
            else:
                ws.append(float(u.weight))
        total = math.fsum(ws)
        out = {}
        for name, ref in reference.items():
            acc = torch.zeros(ref.shape, dtype=torch.float64)
            for w, u in zip(ws, updates):
                acc = acc + (w / total) * u.params[name].to(torch.float64)
            out[name] = acc.to(ref.dtype)
        return out

    def __repr__(self) -> str:
        return f"WeightedFedAvg(weights={self.weights!r})"


def check_update(update: object, reference: Params, round: int) -> str | None:
    """Why ``update`` must be excluded from round ``round``, or None when it is well formed.

    Refused: not a :class:`SiteUpdate`; an answer to another round (never applied twice); missing or
    extra parameters; a wrong shape or dtype; a non-finite value; a weight that is not a finite
    number > 0.
    """
    if not isinstance(update, SiteUpdate):
        return f"not a SiteUpdate ({type(update).__name__})"
    if update.round != round:
        return f"answers round {update.round}, not the current round {round}"
    if not isinstance(update.params, Mapping):
        return f"params is a {type(update.params).__name__}, not a dict"
    missing, extra = set(reference) - set(update.params), set(update.params) - set(reference)
    if missing or extra:
        return f"parameter names differ (missing {sorted(missing)}, unexpected {sorted(extra)})"
    for name, ref in reference.items():
        p = update.params[name]
        if not isinstance(p, torch.Tensor):
            return f"{name} is a {type(p).__name__}, not a tensor"
        if p.shape != ref.shape or p.dtype != ref.dtype:
            return f"{name} has shape {tuple(p.shape)} {p.dtype}, expected {tuple(ref.shape)} {ref.dtype}"
        if not bool(torch.isfinite(p).all()):
            return f"{name} holds non-finite values (NaN or inf)"
    w = update.weight
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w > 0):
        return f"weight must be a finite number > 0, got {w!r}"
    return None


def fedavgm(learning_rate: float = 1.0, momentum: float = 0.9) -> GradientTransformation:
    """FedAvgM (Hsu et al. 2019): server SGD with momentum on the pseudo-gradient ``global − mean``.

    ``fedavgm(1.0, 0.0)`` is plain FedAvg (up to float rounding: use ``server_tx=None`` for the exact one).
    """
    check_positive_finite("fedavgm", "learning_rate", learning_rate)
    check_number("fedavgm", "momentum", momentum, low=0.0, high=1.0, high_open=True)
    return sgd(learning_rate, momentum)


def fedadam(learning_rate: float = 1e-2, b1: float = 0.9, b2: float = 0.99, eps: float = 1e-3) -> GradientTransformation:
    """FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization"): server Adam on ``global − mean``.

    ``eps`` (τ in the paper) defaults to 1e-3, the adaptivity the paper found robust.
    """
    check_positive_finite("fedadam", "learning_rate", learning_rate)
    check_number("fedadam", "b1", b1, low=0.0, high=1.0, high_open=True)
    check_number("fedadam", "b2", b2, low=0.0, high=1.0, high_open=True)
    check_positive_finite("fedadam", "eps", eps)
    return adam(learning_rate, b1, b2, eps)
