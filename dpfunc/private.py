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

The transform takes a :class:`~dpfunc.ClippedSum` only: clipping belongs to the engine, so there
is one data path (engine → ``ClippedSum`` → noise) whichever engine computed the gradients.

Edge cases:

    ==========================  ==============================================================
    ``max_grad_norm = inf``,    plain (non-private) mean gradient over the expected batch size;
    ``noise_multiplier = 0``    with ``sampling_rate = 1`` this is exactly full-batch SGD
    empty batch                 pure noise ``N(0, σ²C²) / (q·n)``
    budget exhausted            :class:`~dpfunc.accounting.PrivacyBudgetExceededError` before noise
    ==========================  ==============================================================
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional


from dpfunc.accounting.ledger import Mechanism, PrivacyLedger
from dpfunc.clipping import ClippedSum, Clipping, FlatClipping, _check_bound
from dpfunc.keys import Key
from dpfunc.noise import check_noise_multiplier, privatize
from dpfunc.sampling import check_sampling_rate
from dpfunc.transforms import GradientTransformation, Schedule, adam, chain, sgd

__all__ = ["DPConfig", "DPAggregateState", "BudgetGuard", "check_budget", "dp_aggregate", "noise_key", "dpsgd", "dpadam", "find_dp_state", "privacy_ledger", "with_discrete_gaussian_ledger"]


def _validated(fn: str, clipping: Any, noise_multiplier: Any, sampling_rate: Any, num_examples: Any) -> tuple[Clipping, float, float, int]:
    """The one check of a DP configuration; errors name ``fn`` (the user's entry point)."""
    if isinstance(clipping, (bool, int, float)):  # _check_bound refuses bools
        clipping = FlatClipping(_check_bound(fn, "max_grad_norm", clipping))
    if not hasattr(clipping, "group_bounds"):
        raise TypeError(f"{fn}: clipping must be FlatClipping or PerLayerClipping, got {clipping!r}")
    sigma = check_noise_multiplier(fn, noise_multiplier)
    q = check_sampling_rate(fn, sampling_rate)
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"{fn}: num_examples must be an int >= 1, got {num_examples!r}")
    bounds = clipping.max_grad_norm
    bounds = [b for _, b in bounds] if isinstance(bounds, tuple) else [bounds]
    if sigma > 0 and not all(math.isfinite(b) for b in bounds):
        raise ValueError(f"{fn}: noise_multiplier > 0 needs a finite max_grad_norm (the noise scale is σ·C), got {clipping!r}")
    return clipping, sigma, q, num_examples


@dataclass(frozen=True)
class DPConfig:
    """What a DP-SGD step needs to know.

    Attributes:
        clipping: :class:`~dpfunc.FlatClipping` or :class:`~dpfunc.PerLayerClipping` (a float is read
            as ``FlatClipping(max_grad_norm)``).
        noise_multiplier: σ ≥ 0; the noise std is ``σ × sensitivity``.
        sampling_rate: q ∈ (0, 1], the Poisson sampling probability of each example.
        num_examples: n, the size of the private data set; ``q·n`` is the expected batch size.

    Example:
        >>> DPConfig(1.0, noise_multiplier=1.1, sampling_rate=0.01, num_examples=5000).expected_batch_size
        50.0
    """

    clipping: Clipping
    noise_multiplier: float
    sampling_rate: float
    num_examples: int

    def __post_init__(self) -> None:
        values = _validated("DPConfig", self.clipping, self.noise_multiplier, self.sampling_rate, self.num_examples)
        for name, value in zip(("clipping", "noise_multiplier", "sampling_rate", "num_examples"), values):
            object.__setattr__(self, name, value)

    @property
    def expected_batch_size(self) -> float:
        return self.sampling_rate * self.num_examples


def _make_config(fn: str, max_grad_norm: Any, noise_multiplier: float, sampling_rate: float, num_examples: int) -> DPConfig:
    """A :class:`DPConfig` whose validation errors name ``fn`` (the user's entry point)."""
    return DPConfig(*_validated(fn, max_grad_norm, noise_multiplier, sampling_rate, num_examples))


@dataclass(frozen=True)
class BudgetGuard:
    """A privacy budget bound to the mechanism it guards (σ and q of one :func:`dp_aggregate`).

    ``check(ledger)`` raises (the budget's own error) if one more step of this mechanism after
    ``ledger`` would exceed the budget.
    """

    budget: Any
    noise_multiplier: float
    sampling_rate: float
    mechanism: Mechanism = Mechanism.GAUSSIAN

    def check(self, ledger: PrivacyLedger) -> None:
        self.budget.check(ledger.step(self.noise_multiplier, self.sampling_rate, mechanism=self.mechanism))


class DPAggregateState(NamedTuple):
    """State of :func:`dp_aggregate`. Hyper-parameters (σ, q, C, n, the key) live in the transform's
    closure, not here.

    Attributes:
        count: steps taken (a Python int: step ``t``'s noise key is derived from it without reading
            a tensor back from the device).
        ledger: the :class:`~dpfunc.PrivacyLedger` of the steps taken.
        clipping: the clipping this transform's update expects, so that a step driver without an
            explicit engine (``make_step(loss_fn, tx)``) clips the same way; the transform itself
            checks against its own configuration.
        budget: an opt-in :class:`BudgetGuard`, or None.
    """

    count: int
    ledger: PrivacyLedger
    clipping: Optional[Clipping] = None
    budget: Optional[BudgetGuard] = None


def check_budget(state: DPAggregateState) -> None:
    """THE budget check: raise if one more step would exceed the state's budget (no-op without one).

    :func:`dp_aggregate`'s update enforces it before drawing noise; :func:`~dpfunc.make_step` and the
    bridge's optimizer call the same function first, so that a refused step never runs the model.
    """
    if state.budget is not None:
        state.budget.check(state.ledger)


_NOISE_DOMAIN = 0x6E6F697365  # "noise": separates noise streams from any other use of the key


def noise_key(key: Key, step: int) -> Key:
    """The key of step ``step``'s noise in :func:`dp_aggregate` (a domain of its own under ``key``)."""
    return key.fold_in(_NOISE_DOMAIN).fold_in(step)


def dp_aggregate(config: DPConfig, key: Key, *, budget: Any = None, secure: bool = False,
                 secure_entropy: Callable[[], bytes] | None = None) -> GradientTransformation:
    """Add Gaussian noise to a clipped sum and divide by the expected batch size.

    ``update(clipped, state, params)`` takes the :class:`~dpfunc.ClippedSum` that an engine
    (:func:`~dpfunc.vmap_engine`, ``fast_engine``) or :func:`~dpfunc.clip_and_sum` computed with
    the same clipping, and returns the privatised mean gradient ``(Σ_i clip(g_i) + N(0, σ²C²)) / (q·n)``.
    Noise of step ``t`` is drawn from ``noise_key(key, t)``: fresh at every step, reproducible from
    ``(key, t)``, and in a domain of its own, so passing the same key to
    :func:`~dpfunc.poisson_batches` cannot correlate the noise with the batch selection. The update
    reads nothing back from the device.

    Args:
        config: the :class:`DPConfig` (kept in the closure with the key).
        key: the noise key of the run.
        budget: optional :class:`~dpfunc.accounting.PrivacyBudget`; a step that would exceed it raises
            before any noise is drawn.
        secure: True draws the noise with :func:`dpfunc.secure_noise.secure_privatize` instead: the sum
            rounded to a grid 2^-k, exact discrete Gaussian noise from a CSPRNG keyed by OS entropy
            (``key`` is then unused for noise; NOT reproducible). The ledger records these steps as
            ``Mechanism.DISCRETE_GAUSSIAN``, so ``epsilon(ledger, δ)`` gives the discrete Gaussian's
            bound (:mod:`dpfunc.accounting.discrete_gaussian`), never the smaller continuous ε.
        secure_entropy: with ``secure``, a function returning 48 secret bytes per step that key the
            step's ChaCha20 stream instead of this process's ``os.urandom`` — so that data-parallel ranks
            draw the same secure noise (:func:`dpfunc.distributed.shared_entropy`). None: fresh OS entropy.

    Example:
        >>> tx = dp_aggregate(DPConfig(1.0, 0.0, 0.5, 4), Key(0))
        >>> clipped = clip_and_sum({"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}, FlatClipping(1.0))
        >>> noisy, state = tx.update(clipped, tx.init({"w": torch.zeros(2)}))
        >>> noisy["w"], state.count                   # σ = 0: the clipped sum over q·n = 2
        (tensor([0.4500, 0.6000]), 1)
    """
    if not isinstance(config, DPConfig):
        raise TypeError(f"dp_aggregate: config must be a DPConfig, got {type(config).__name__}")
    if not isinstance(key, Key):
        raise TypeError(f"dp_aggregate: key must be a dpfunc.Key, got {type(key).__name__}")
    sigma, q = config.noise_multiplier, config.sampling_rate
    if not isinstance(secure, bool) or (secure and sigma == 0):
        raise ValueError(f"dp_aggregate: secure must be a bool, and secure=True needs noise_multiplier > 0; got secure={secure!r}, σ={sigma}")
    if secure_entropy is not None and not (secure and callable(secure_entropy)):
        raise ValueError(f"dp_aggregate: secure_entropy must be a callable returning 48 bytes and needs secure=True; "
                         f"got secure_entropy={secure_entropy!r}, secure={secure!r}")
    mechanism = Mechanism.DISCRETE_GAUSSIAN if secure else Mechanism.GAUSSIAN
    guard = BudgetGuard(budget, sigma, q, mechanism) if budget is not None else None

    def init(params):
        return DPAggregateState(0, PrivacyLedger(), config.clipping, guard)

    def update(updates, state, params=None):
        if not isinstance(updates, ClippedSum):
            raise TypeError(
                f"dp_aggregate: updates must be a ClippedSum (from an engine or clip_and_sum(per_example_grads, clipping)), "
                f"got {type(updates).__name__}"
            )
        check_budget(state)
        expected = config.clipping.sensitivity(list(updates.grads))
        if not math.isclose(updates.sensitivity, expected, rel_tol=1e-12):
            raise ValueError(
                f"dp_aggregate: the ClippedSum was clipped to sensitivity {updates.sensitivity}, but this transform's "
                f"clipping {config.clipping} has sensitivity {expected}; build the engine with the same clipping"
            )
        count = int(state.count)  # a Python int (an old checkpoint may hold a 0-d CPU tensor)
        if secure:
            from dpfunc.secure_noise import SecureRandom, secure_privatize  # needs `cryptography` (dpfunc[secure])

            rng = SecureRandom.from_key(secure_entropy()) if secure_entropy is not None else None
            noisy, _ = secure_privatize(updates.grads, noise_multiplier=sigma, sensitivity=updates.sensitivity,
                                        expected_batch_size=config.expected_batch_size, rng=rng)
            return noisy, state._replace(count=count + 1, ledger=state.ledger.step(sigma, q, mechanism=mechanism))
        noisy = privatize(
            updates.grads,
            noise_key(key, count),
            noise_multiplier=sigma,
            sensitivity=updates.sensitivity,
            expected_batch_size=config.expected_batch_size,
        )
        return noisy, state._replace(count=count + 1, ledger=state.ledger.step(sigma, q))

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
    secure: bool = False,
    secure_entropy: Callable[[], bytes] | None = None,
) -> GradientTransformation:
    """DP-SGD (Abadi et al. 2016): ``chain(dp_aggregate(...), sgd(...))`` (``secure``/``secure_entropy``: see
    :func:`dp_aggregate`).

    Example:
        >>> tx = dpsgd(0.5, noise_multiplier=1.1, max_grad_norm=1.0, sampling_rate=0.01, num_examples=5000, key=Key(0))
        >>> privacy_ledger(tx.init({"w": torch.zeros(3)})).total_steps
        0
    """
    cfg = _make_config("dpsgd", max_grad_norm, noise_multiplier, sampling_rate, num_examples)
    return chain(dp_aggregate(cfg, key, budget=budget, secure=secure, secure_entropy=secure_entropy),
                 sgd(learning_rate, momentum, nesterov=nesterov, weight_decay=weight_decay))


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
    secure: bool = False,
    secure_entropy: Callable[[], bytes] | None = None,
) -> GradientTransformation:
    """DP-Adam: ``chain(dp_aggregate(...), adam(...))``; Adam only post-processes the private mean."""
    cfg = _make_config("dpadam", max_grad_norm, noise_multiplier, sampling_rate, num_examples)
    return chain(dp_aggregate(cfg, key, budget=budget, secure=secure, secure_entropy=secure_entropy),
                 adam(learning_rate, b1, b2, eps))


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


def with_discrete_gaussian_ledger(opt_state: Any) -> Any:
    """``opt_state`` with every :class:`DPAggregateState`'s ledger (and budget guard) marked as discrete Gaussian.

    For optimizer states of secure-mode runs saved before ledger phases recorded their mechanism: their
    phases say "Gaussian", and ``epsilon`` would account them with the continuous Gaussian's smaller ε.
    A secure transform only ever records discrete-Gaussian steps, so re-marking all phases is exact.
    """
    if isinstance(opt_state, DPAggregateState):
        guard = opt_state.budget
        if guard is not None:
            guard = dataclasses.replace(guard, mechanism=Mechanism.DISCRETE_GAUSSIAN)
        return opt_state._replace(ledger=opt_state.ledger.with_mechanism(Mechanism.DISCRETE_GAUSSIAN), budget=guard)
    if isinstance(opt_state, tuple):
        items = [with_discrete_gaussian_ledger(s) for s in opt_state]
        return type(opt_state)(*items) if hasattr(opt_state, "_fields") else tuple(items)
    if isinstance(opt_state, list):
        return [with_discrete_gaussian_ledger(s) for s in opt_state]
    return opt_state


def privacy_ledger(opt_state: Any) -> PrivacyLedger:
    """The privacy ledger carried by an optimizer state built with :func:`dp_aggregate`."""
    s = find_dp_state(opt_state)
    if s is None:
        raise ValueError("privacy_ledger: opt_state holds no DPAggregateState; was the optimizer built with dp_aggregate/dpsgd/dpadam?")
    return s.ledger
