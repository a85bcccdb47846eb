"""The DP aggregation transform and the ready-made private optimizers ``dpsgd`` / ``dpadam``.

One DP-SGD step, as data::

    g_i  = per-example gradients                          (B, *shape) per parameter
    ḡ    = Σ_i clip(g_i, C)                               sensitivity C (add/remove-one)
    ĝ    = (ḡ + N(0, σ²C² I)) / (q·n)                     expected batch size, never |batch|
    ledger = ledger.step(σ, q)

Formal guarantees:
    Each call of :func:`dp_aggregate`'s update is one application of the Gaussian mechanism with
    noise multiplier σ to a sum of sensitivity ``C``; applied to Poisson batches of rate ``q`` it is
    the Poisson-subsampled Gaussian mechanism that the accountants in :mod:`dpfunc.accounting`
    bound. The state records every application in its :class:`~dpfunc.accounting.PrivacyLedger`.
    Post-processing (the optimizer that follows) does not change the guarantee.

Edge cases:

    ==========================  ==============================================================
    ``max_grad_norm = inf``,    plain (non-private) mean gradient over the expected batch size;
    ``noise_multiplier = 0``    with ``sampling_rate = 1`` this is exactly full-batch SGD
    empty batch                 pure noise ``N(0, σ²C²) / (q·n)``
    budget exhausted            :class:`~dpfunc.accounting.PrivacyBudgetExceededError` before noise
    ==========================  ==============================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch

from dpfunc.accounting.ledger import PrivacyLedger
from dpfunc.clipping import ClippedSum, Clipping, FlatClipping, _check_bound, clip_and_sum
from dpfunc.keys import Key
from dpfunc.noise import check_noise_multiplier, privatize
from dpfunc.sampling import check_sampling_rate
from dpfunc.transforms import GradientTransformation, Schedule, adam, chain, sgd

__all__ = ["DPConfig", "DPAggregateState", "dp_aggregate", "noise_key", "dpsgd", "dpadam", "find_dp_state", "privacy_ledger"]


@dataclass(frozen=True)
class DPConfig:
    """What a DP-SGD step needs to know.

    Attributes:
        clipping: :class:`~dpfunc.FlatClipping` or :class:`~dpfunc.PerLayerClipping` (a float is read
            as ``FlatClipping(max_grad_norm)``).
        noise_multiplier: σ ≥ 0; the noise std is ``σ × sensitivity``.
        sampling_rate: q ∈ (0, 1], the Poisson sampling probability of each example.
        num_examples: n, the size of the private data set; ``q·n`` is the expected batch size.
    """

    clipping: Clipping
    noise_multiplier: float
    sampling_rate: float
    num_examples: int

    def __post_init__(self) -> None:
        fn = "DPConfig"
        if isinstance(self.clipping, bool):
            raise ValueError(f"{fn}: clipping (max_grad_norm) must be a number > 0 or a Clipping, got {self.clipping!r}")
        if isinstance(self.clipping, (int, float)):
            object.__setattr__(self, "clipping", FlatClipping(_check_bound(fn, "max_grad_norm", self.clipping)))
        if not hasattr(self.clipping, "group_bounds"):
            raise TypeError(f"{fn}: clipping must be FlatClipping or PerLayerClipping, got {self.clipping!r}")
        object.__setattr__(self, "noise_multiplier", check_noise_multiplier(fn, self.noise_multiplier))
        object.__setattr__(self, "sampling_rate", check_sampling_rate(fn, self.sampling_rate))
        if isinstance(self.num_examples, bool) or not isinstance(self.num_examples, int) or self.num_examples < 1:
            raise ValueError(f"{fn}: num_examples must be an int >= 1, got {self.num_examples!r}")
        bounds = self.clipping.max_grad_norm
        bounds = [b for _, b in bounds] if isinstance(bounds, tuple) else [bounds]
        if self.noise_multiplier > 0 and not all(math.isfinite(b) for b in bounds):
            raise ValueError(f"{fn}: noise_multiplier > 0 needs a finite max_grad_norm (the noise scale is σ·C), got {self.clipping!r}")

    @property
    def expected_batch_size(self) -> float:
        return self.sampling_rate * self.num_examples


def _make_config(fn: str, max_grad_norm: Any, noise_multiplier: float, sampling_rate: float, num_examples: int) -> DPConfig:
    """Build a :class:`DPConfig`, validating first so that errors name ``fn`` (the user's entry point)."""
    if isinstance(max_grad_norm, (bool, int, float)):
        _check_bound(fn, "max_grad_norm", max_grad_norm)
    check_noise_multiplier(fn, noise_multiplier)
    check_sampling_rate(fn, sampling_rate)
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"{fn}: num_examples must be an int >= 1, got {num_examples!r}")
    return DPConfig(max_grad_norm, noise_multiplier, sampling_rate, num_examples)


class DPAggregateState(NamedTuple):
    """State of :func:`dp_aggregate`: the step count (keys are derived from it) and the ledger."""

    count: torch.Tensor  # 0-d int64
    ledger: PrivacyLedger
    noise_multiplier: float
    sampling_rate: float
    budget: Optional[Any] = None  # a dpfunc.accounting.PrivacyBudget, opt-in


def check_budget(state: DPAggregateState) -> None:
    """Raise if one more step would exceed the state's budget (no-op without a budget)."""
    if state.budget is not None:
        state.budget.check(state.ledger.step(state.noise_multiplier, state.sampling_rate))


_NOISE_DOMAIN = 0x6E6F697365  # "noise": separates noise streams from any other use of the key


def noise_key(key: Key, step: int) -> Key:
    """The key of step ``step``'s noise in :func:`dp_aggregate` (a domain of its own under ``key``)."""
    return key.fold_in(_NOISE_DOMAIN).fold_in(step)


def dp_aggregate(config: DPConfig, key: Key, *, budget: Any = None) -> GradientTransformation:
    """Clip per-example gradients, sum, add Gaussian noise, divide by the expected batch size.

    ``update(per_example_grads, state, params)`` takes ``dict`` name → ``(B, *shape)`` (rows of padding
    must be zero), or a :class:`~dpfunc.ClippedSum` already computed by a fast engine with the same
    clipping, and returns the privatised mean gradient. Noise of step ``t`` is drawn from
    ``noise_key(key, t)``: fresh at every step, reproducible from ``(key, t)``, and in a domain of
    its own, so passing the same key to :func:`~dpfunc.poisson_batches` cannot correlate the noise
    with the batch selection.

    Args:
        config: the :class:`DPConfig`.
        key: the noise key of the run.
        budget: optional :class:`~dpfunc.accounting.PrivacyBudget`; a step that would exceed it raises
            before any noise is drawn.
    """
    if not isinstance(config, DPConfig):
        raise TypeError(f"dp_aggregate: config must be a DPConfig, got {type(config).__name__}")
    if not isinstance(key, Key):
        raise TypeError(f"dp_aggregate: key must be a dpfunc.Key, got {type(key).__name__}")

    def init(params):
        return DPAggregateState(torch.zeros((), dtype=torch.int64), PrivacyLedger(), config.noise_multiplier, config.sampling_rate, budget)

    def update(updates, state, params=None):
        check_budget(state)
        if isinstance(updates, ClippedSum):
            clipped = updates
            expected = config.clipping.sensitivity(list(updates.grads))
            if not math.isclose(clipped.sensitivity, expected, rel_tol=1e-12):
                raise ValueError(
                    f"dp_aggregate: the ClippedSum was clipped to sensitivity {clipped.sensitivity}, but this transform's "
                    f"clipping {config.clipping} has sensitivity {expected}; build the engine with the same clipping"
                )
        elif isinstance(updates, Mapping):
            clipped = clip_and_sum(updates, config.clipping)
        else:
            raise TypeError(f"dp_aggregate: updates must be per-example gradients (dict) or a ClippedSum, got {type(updates).__name__}")
        noisy = privatize(
            clipped.grads,
            noise_key(key, int(state.count)),
            noise_multiplier=config.noise_multiplier,
            sensitivity=clipped.sensitivity,
            expected_batch_size=config.expected_batch_size,
        )
        ledger = state.ledger.step(config.noise_multiplier, config.sampling_rate)
        return noisy, state._replace(count=state.count + 1, ledger=ledger)

    return GradientTransformation(init, update)


def dpsgd(
    learning_rate: Schedule,
    *,
    noise_multiplier: float,
    max_grad_norm: float | Clipping,
    sampling_rate: float,
    num_examples: int,
    key: Key,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    budget: Any = None,
) -> GradientTransformation:
    """DP-SGD (Abadi et al. 2016): ``chain(dp_aggregate(...), sgd(...))``.

    Example:
        >>> tx = dpsgd(0.5, noise_multiplier=1.1, max_grad_norm=1.0, sampling_rate=0.01, num_examples=5000, key=Key(0))
    """
    cfg = _make_config("dpsgd", max_grad_norm, noise_multiplier, sampling_rate, num_examples)
    return chain(dp_aggregate(cfg, key, budget=budget), sgd(learning_rate, momentum, nesterov=nesterov, weight_decay=weight_decay))


def dpadam(
    learning_rate: Schedule,
    *,
    noise_multiplier: float,
    max_grad_norm: float | Clipping,
    sampling_rate: float,
    num_examples: int,
    key: Key,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    budget: Any = None,
) -> GradientTransformation:
    """DP-Adam: ``chain(dp_aggregate(...), adam(...))``; Adam only post-processes the private mean."""
    cfg = _make_config("dpadam", max_grad_norm, noise_multiplier, sampling_rate, num_examples)
    return chain(dp_aggregate(cfg, key, budget=budget), adam(learning_rate, b1, b2, eps))


def find_dp_state(opt_state: Any) -> DPAggregateState | None:
    """The (first) :class:`DPAggregateState` inside a nested optimizer state, or None."""
    if isinstance(opt_state, DPAggregateState):
        return opt_state
    if isinstance(opt_state, (tuple, list)):
        for s in opt_state:
            found = find_dp_state(s)
            if found is not None:
                return found
    return None


def privacy_ledger(opt_state: Any) -> PrivacyLedger:
    """The privacy ledger carried by an optimizer state built with :func:`dp_aggregate`."""
    s = find_dp_state(opt_state)
    if s is None:
        raise ValueError("privacy_ledger: opt_state holds no DPAggregateState; was the optimizer built with dp_aggregate/dpsgd/dpadam?")
    return s.ledger
