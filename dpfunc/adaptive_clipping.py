"""Adaptive clipping: the clip norm follows a private quantile of the per-example gradient norms.

After Andrew, Thakkar, McMahan & Ramaswamy, "Differentially Private Learning with Adaptive Clipping"
(NeurIPS 2021). One step, as data (``m = q·n`` the expected batch size, ``γ`` the target quantile,
``η`` the clip-norm learning rate)::

    ḡ      = Σ_i clip(g_i, C_t)                                  sensitivity C_t (add/remove-one)
    s      = Σ_i (1[‖g_i‖ ≤ C_t] − ½)                            centred count, sensitivity ½
    ĝ      = (ḡ + N(0, σ_grad² C_t² I)) / m                      released
    b̃      = (s + N(0, σ_b²)) / m + ½                           released: noisy fraction unclipped
    C_t+1  = C_t · exp(−η (b̃ − γ))                              post-processing of b̃
    ledger = ledger.step(σ, q)                                   ONE Gaussian phase at the advertised σ

Formal guarantees:
    The two releases of a step are one Gaussian mechanism. Scale the query to
    ``(ḡ / (σ_grad·C_t), s / σ_b)``: both coordinates then get unit-variance noise, and adding or
    removing one example moves the first by at most ``1/σ_grad`` (l2) and the second by exactly
    ``½/σ_b`` (the centred term of one example is ±½). The joint l2 sensitivity is
    ``sqrt(σ_grad⁻² + (2σ_b)⁻²)``, i.e. the pair is the Gaussian mechanism with noise multiplier

        σ = (σ_grad⁻² + (2σ_b)⁻²)^(-1/2),   so   σ_grad = (σ⁻² − (2σ_b)⁻²)^(-1/2)

    (Andrew et al., Theorem 1). The transform adds gradient noise at ``σ_grad`` (slightly above σ)
    and records ONE step at the advertised σ and q in the ledger: ``epsilon(ledger)`` is exact for
    what was released, and ``noise_multiplier_for`` calibrates σ exactly as for flat clipping.
    Centring is what makes the count's sensitivity ½ rather than 1 (the raw count of an added
    example moves by 1 or 0); the ``+ ½`` back is done with the public ``m``, not the realised batch
    size, which would not be private under add/remove. With ``G`` groups (per-layer) the count is a
    ``G``-vector of sensitivity ``√G / 2`` and ``σ_grad = (σ⁻² − G (2σ_b)⁻²)^(-1/2)``. The adjustment
    needs ``σ_b > σ√G / 2`` (else the counts alone would spend more than the whole budget): a smaller
    ``count_noise_multiplier`` is refused when the transform is built. The new clip norm is a function
    of released values only, so the next step's sensitivity ``C_t+1`` is public.

Edge cases:

    ===============================  ============================================================
    σ = 0 (non-private)              σ_grad = 0; ``count_noise_multiplier`` may be 0 (exact count)
    σ > 0, σ_b ≤ σ√G/2               ValueError naming the smallest allowed σ_b
    ``learning_rate = 0``            C stays at its initial value: flat clipping with noise σ_grad
    empty batch                      s = 0: b̃ = ½ + noise/m; pure-noise gradient as with flat
    padding rows (mask)              norm 0, excluded from the count (``num_real_rows`` is the real rows)
    b̃ outside [0, 1] (noise)         allowed (unbiased); the geometric update keeps C > 0
    C overflows / underflows         ValueError (only with absurd η); never a 0 or inf bound
    ===============================  ============================================================

The clip norm lives in the transform state (:class:`AdaptiveClippingState`, a NamedTuple whose
``dp`` field is the ordinary :class:`~dpfunc.DPAggregateState` with ``clipping`` = the CURRENT
``FlatClipping(C_t)``), so it is checkpointed with the ledger and restored on resume, and
:func:`~dpfunc.privacy_ledger` / budgets work unchanged. Engines are told the current clipping at
each call (``engine(..., clipping=...)``; :func:`~dpfunc.make_step` does it). The clip norm is a
Python float: each step reads the ``G`` counts back from the device once.

References:
    Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive Clipping",
    NeurIPS 2021 (arXiv:1905.03871): geometric update, centred count, the σ adjustment, and the
    defaults γ = 0.5, η = 0.2, σ_b = m/20.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Union

import torch

from dpfunc._validate import check_nonnegative, check_number, check_positive_finite
from dpfunc.accounting.ledger import PrivacyLedger
from dpfunc.clipping import ClippedSum, FlatClipping, PerLayerClipping, layer_of
from dpfunc.keys import Key
from dpfunc.noise import check_noise_multiplier, privatize
from dpfunc.private import BudgetGuard, DPAggregateState, check_budget, noise_key
from dpfunc.sampling import check_sampling_rate
from dpfunc.transforms import GradientTransformation, Schedule, adam, chain, sgd

__all__ = [
    "AdaptiveClipping",
    "AdaptiveClippingState",
    "AdaptiveDPConfig",
    "adaptive_dp_aggregate",
    "adaptive_dpsgd",
    "adaptive_dpadam",
    "gradient_noise_multiplier",
    "find_adaptive_state",
    "count_key",
]

_COUNT_DOMAIN = 0x636F756E74  # "count": the count noise has a stream of its own under the run's key
_FN = "AdaptiveClipping"


@dataclass(frozen=True)
class AdaptiveClipping:
    """Clip at a bound that moves geometrically toward the ``target_quantile`` of the gradient norms.

    Args:
        initial_max_grad_norm: C₀ > 0 (finite). Per-layer: the overall bound, split equally over the
            ``G`` groups (``C₀/√G`` each), as :class:`~dpfunc.PerLayerClipping` does.
        target_quantile: γ ∈ [0, 1], the fraction of examples that should be left unclipped (the paper
            uses 0.5: the median norm).
        learning_rate: η ≥ 0, the step size of ``log C`` (paper: 0.2). 0 keeps C fixed.
        count_noise_multiplier: σ_b ≥ 0, the std of the Gaussian noise on each step's count of unclipped
            examples, in examples (the raw count has sensitivity 1). The paper uses ``m/20`` for an
            expected batch size m (noise 0.05 on the fraction). Must exceed ``σ·√G/2`` for a
            private run (see the module docstring).
        per_layer: one bound (and one quantile) per parameter group (layer), like
            :class:`~dpfunc.PerLayerClipping`; each group's bound follows the target quantile of that
            group's norms.
        per_parameter: with ``per_layer``, group by parameter tensor instead of by layer.

    Example:
        >>> AdaptiveClipping(1.0, target_quantile=0.5, learning_rate=0.2, count_noise_multiplier=12.8).initial_clipping(["w"])
        FlatClipping(max_grad_norm=1.0)
    """

    initial_max_grad_norm: float
    target_quantile: float
    learning_rate: float
    count_noise_multiplier: float
    per_layer: bool = False
    per_parameter: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "initial_max_grad_norm", check_positive_finite(_FN, "initial_max_grad_norm", self.initial_max_grad_norm))
        object.__setattr__(self, "target_quantile", check_number(_FN, "target_quantile", self.target_quantile, low=0.0, high=1.0))
        object.__setattr__(self, "learning_rate", check_nonnegative(_FN, "learning_rate", self.learning_rate))
        object.__setattr__(self, "count_noise_multiplier", check_nonnegative(_FN, "count_noise_multiplier", self.count_noise_multiplier))
        for name in ("per_layer", "per_parameter"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{_FN}: {name} must be a bool, got {getattr(self, name)!r}")
        if self.per_parameter and not self.per_layer:
            raise ValueError(f"{_FN}: per_parameter=True groups per-layer clipping by parameter; it needs per_layer=True")

    def group_of(self, name: str) -> str:
        """The clipping group of a parameter (``""`` for flat clipping)."""
        if not self.per_layer:
            return ""
        return name if self.per_parameter else layer_of(name)

    def initial_clipping(self, names) -> Union[FlatClipping, PerLayerClipping]:
        """The clipping of step 0 for parameters ``names``: ``FlatClipping(C₀)``, or per-layer
        ``PerLayerClipping({g: C₀/√G})`` (one explicit bound per group, so each can move)."""
        if not self.per_layer:
            return FlatClipping(self.initial_max_grad_norm)
        split = PerLayerClipping(self.initial_max_grad_norm, per_parameter=self.per_parameter).group_bounds(list(names))
        return PerLayerClipping(split, per_parameter=self.per_parameter)

    def accepts(self, clipping: Any) -> bool:
        """Whether ``clipping`` is a current bound of this rule (same kind and grouping)."""
        if not self.per_layer:
            return isinstance(clipping, FlatClipping)
        return (isinstance(clipping, PerLayerClipping) and isinstance(clipping.max_grad_norm, tuple)
                and clipping.per_parameter == self.per_parameter)


def gradient_noise_multiplier(noise_multiplier: float, count_noise_multiplier: float, num_groups: int = 1) -> float:
    """σ_grad = (σ⁻² − G·(2σ_b)⁻²)^(-1/2): the gradient noise that, with G counts at σ_b, composes to σ.

    Args:
        noise_multiplier: σ ≥ 0, the advertised (accounted) noise multiplier.
        count_noise_multiplier: σ_b ≥ 0, the std of each count's noise (in examples).
        num_groups: G ≥ 1, the number of counts released per step (1 for flat clipping).

    Raises:
        ValueError: σ > 0 and σ_b ≤ σ·√G/2 (the counts alone would cost at least the whole budget).

    Example:
        >>> round(gradient_noise_multiplier(1.0, 5.0), 6)   # (1 − 1/100)^(-1/2)
        1.005038
    """
    fn = "gradient_noise_multiplier"
    sigma = check_noise_multiplier(fn, noise_multiplier)
    sigma_b = check_nonnegative(fn, "count_noise_multiplier", count_noise_multiplier)
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"{fn}: num_groups must be an int >= 1, got {num_groups!r}")
    if sigma == 0:
        return 0.0
    floor = sigma * math.sqrt(num_groups) / 2
    if not sigma_b > floor:
        raise ValueError(
            f"{fn}: count_noise_multiplier σ_b = {sigma_b!r} is too small for noise_multiplier σ = {sigma!r} with "
            f"{num_groups} count(s) per step: the pair composes to σ only if σ_b > σ·√G/2 = {floor:.6g} "
            f"(the paper uses σ_b = expected_batch_size / 20); raise count_noise_multiplier"
        )
    rest = sigma ** -2 - num_groups * (2 * sigma_b) ** -2
    return rest ** -0.5


@dataclass(frozen=True)
class AdaptiveDPConfig:
    """What an adaptive DP step needs: the rule, the advertised σ, q and n (validated here).

    Attributes:
        clipping: the :class:`AdaptiveClipping` rule.
        noise_multiplier: σ ≥ 0, the ADVERTISED noise multiplier (what the ledger records); the gradient
            noise is :func:`gradient_noise_multiplier` of it.
        sampling_rate: q ∈ (0, 1].
        num_examples: n ≥ 1; ``q·n`` is the expected batch size.
    """

    clipping: AdaptiveClipping
    noise_multiplier: float
    sampling_rate: float
    num_examples: int

    def __post_init__(self) -> None:
        fn = "AdaptiveDPConfig"
        if not isinstance(self.clipping, AdaptiveClipping):
            raise TypeError(f"{fn}: clipping must be an AdaptiveClipping, got {self.clipping!r}")
        object.__setattr__(self, "noise_multiplier", check_noise_multiplier(fn, self.noise_multiplier))
        object.__setattr__(self, "sampling_rate", check_sampling_rate(fn, self.sampling_rate))
        n = self.num_examples
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{fn}: num_examples must be an int >= 1, got {n!r}")
        if not self.clipping.per_layer:  # flat: check the σ_b floor now (per-layer: when G is known, at init)
            gradient_noise_multiplier(self.noise_multiplier, self.clipping.count_noise_multiplier, 1)

    @property
    def expected_batch_size(self) -> float:
        return self.sampling_rate * self.num_examples


class AdaptiveClippingState(NamedTuple):
    """State of :func:`adaptive_dp_aggregate`.

    Attributes:
        dp: a :class:`~dpfunc.DPAggregateState` (step count, ledger at the advertised σ, budget) whose
            ``clipping`` is the CURRENT bound: ``FlatClipping(C_t)`` or ``PerLayerClipping({g: C_g,t})``.
            :func:`~dpfunc.privacy_ledger`, :func:`~dpfunc.find_dp_state` and budgets find it here.
        rule: the :class:`AdaptiveClipping` (so that a step driver can build an engine for it).
        unclipped_fraction: the last step's released noisy fractions b̃ per group (sorted group
            order; empty before the first step). Public: computed from released values only.
    """

    dp: DPAggregateState
    rule: AdaptiveClipping
    unclipped_fraction: tuple = ()

    @property
    def max_grad_norm(self) -> Union[float, dict[str, float]]:
        """The current clip norm: a float (flat) or group → bound (per-layer)."""
        bound = self.dp.clipping.max_grad_norm
        return dict(bound) if isinstance(bound, tuple) else bound


def count_key(key: Key, step: int) -> Key:
    """The key of step ``step``'s count noise (a domain of its own, apart from :func:`~dpfunc.noise_key`)."""
    return key.fold_in(_COUNT_DOMAIN).fold_in(step)


def find_adaptive_state(opt_state: Any) -> Optional[AdaptiveClippingState]:
    """The (first) :class:`AdaptiveClippingState` inside a nested optimizer state, or None."""
    if isinstance(opt_state, AdaptiveClippingState):
        return opt_state
    if isinstance(opt_state, (tuple, list)) and not isinstance(opt_state, DPAggregateState):
        for s in opt_state:
            found = find_adaptive_state(s)
            if found is not None:
                return found
    return None


def call_clipping(fn: str, own: Any, given: Any) -> Union[FlatClipping, PerLayerClipping]:
    """The clipping an engine uses for one call: ``given`` (the per-call ``clipping=``) or its own.

    An engine built with an :class:`AdaptiveClipping` has no fixed bound: it needs the current one
    per call, of the rule's kind (flat, or per-layer with the same grouping). An engine built with a
    fixed clipping accepts any fixed clipping per call (the call's then decides groups and bounds).
    """
    if given is None:
        if isinstance(own, AdaptiveClipping):
            raise TypeError(f"{fn}: built with AdaptiveClipping, so each call needs the current bound: "
                            "engine(params, buffers, batch, mask, clipping=state.dp.clipping) (make_step passes it)")
        return own
    if not (isinstance(given, (FlatClipping, PerLayerClipping))):
        raise TypeError(f"{fn}: clipping= must be a FlatClipping or PerLayerClipping (the current bound), got {given!r}")
    if isinstance(own, AdaptiveClipping) and not own.accepts(given):
        raise ValueError(f"{fn}: clipping={given!r} is not a bound of this engine's {own!r} (flat vs per-layer, or "
                         "another grouping)")
    return given


def _unclipped_counts(clipped: ClippedSum, bounds: dict[str, float]) -> torch.Tensor:
    """Per group (sorted), the centred count ``Σ_real (1[‖g_i‖_g ≤ C_g] − ½)`` as float64 on the CPU.

    ``num_real_rows/2 − #{‖g_i‖_g > C_g}``: padding rows have norm 0, which is never above ``C_g > 0``,
    so they drop out without the mask; ``num_real_rows`` counts the real rows only.
    """
    groups = sorted(bounds)
    above = torch.stack([(clipped.group_norms[g] > bounds[g]).sum() for g in groups]) if clipped.norms.numel() else \
        torch.zeros(len(groups), dtype=torch.int64)
    real = clipped.num_real_rows.to(torch.float64).cpu() if isinstance(clipped.num_real_rows, torch.Tensor) else \
        torch.tensor(float(clipped.num_real_rows), dtype=torch.float64)
    return real / 2 - above.to(torch.float64).cpu()


def adaptive_dp_aggregate(config: AdaptiveDPConfig, key: Key, *, budget: Any = None, normalize: bool = False) -> GradientTransformation:
    """:func:`~dpfunc.dp_aggregate` with adaptive clipping (Andrew et al. 2021; see the module docstring).

    ``update(clipped, state, params)`` takes the :class:`~dpfunc.ClippedSum` that an engine computed
    with the state's CURRENT clipping (``state.dp.clipping``; :func:`~dpfunc.make_step` passes it to
    the engine), returns ``(Σ_i clip(g_i, C_t) + N(0, σ_grad²C_t²)) / (q·n)``, and moves the clip norm
    with the noisy count. Gradient noise of step ``t`` comes from ``noise_key(key, t)`` (as in
    ``dp_aggregate``), count noise from :func:`count_key`.

    Args:
        config: :class:`AdaptiveDPConfig`.
        key: the noise key of the run.
        budget: optional :class:`~dpfunc.accounting.PrivacyBudget`, checked at the advertised σ.
        normalize: divide the released mean by the current sensitivity ``C_t`` (per-layer ``√Σ C_g²``):
            ``(Σ_i clip(g_i, C_t)/C_t + N(0, σ_grad²)) / m``. The optimizer's learning rate then means
            what it means with flat clipping at C = 1, whatever bound the rule reaches (with a fixed C,
            DP-SGD's step scales with ``lr·C``; with a moving C the same lr would not). Post-processing
            of released values (C_t is public): no privacy cost.

    Example:
        >>> rule = AdaptiveClipping(1.0, target_quantile=0.5, learning_rate=0.2, count_noise_multiplier=0.0)
        >>> tx = adaptive_dp_aggregate(AdaptiveDPConfig(rule, 0.0, 0.5, 4), Key(0))
        >>> state = tx.init({"w": torch.zeros(2)})
        >>> clipped = clip_and_sum({"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}, state.dp.clipping)
        >>> noisy, state = tx.update(clipped, state)
        >>> state.unclipped_fraction, round(state.max_grad_norm, 4)   # b̃ = (2/2 − 1)/2 + ½ = 0.5 = γ: C stays
        ((0.5,), 1.0)
    """
    fn = "adaptive_dp_aggregate"
    if not isinstance(config, AdaptiveDPConfig):
        raise TypeError(f"{fn}: config must be an AdaptiveDPConfig, got {type(config).__name__}")
    if not isinstance(key, Key):
        raise TypeError(f"{fn}: key must be a dpfunc.Key, got {type(key).__name__}")
    rule, sigma, q, m = config.clipping, config.noise_multiplier, config.sampling_rate, config.expected_batch_size
    if not isinstance(normalize, bool):
        raise TypeError(f"{fn}: normalize must be a bool, got {normalize!r}")
    guard = BudgetGuard(budget, sigma, q) if budget is not None else None

    def init(params):
        clipping = rule.initial_clipping(list(params))
        groups = len(clipping.group_bounds(list(params)))
        gradient_noise_multiplier(sigma, rule.count_noise_multiplier, groups)  # refuse a too-small σ_b before training
        return AdaptiveClippingState(DPAggregateState(0, PrivacyLedger(), clipping, guard), rule, ())

    def update(updates, state, params=None):
        if not isinstance(state, AdaptiveClippingState):
            raise TypeError(
                f"{fn}: state must be an AdaptiveClippingState (from this transform's init), got {type(state).__name__}; "
                "a DPAggregateState comes from flat clipping (or a checkpoint without a clip norm): start the adaptive "
                "run from tx.init(params)"
            )
        if not isinstance(updates, ClippedSum):
            raise TypeError(f"{fn}: updates must be a ClippedSum (from an engine called with clipping=state.dp.clipping), "
                            f"got {type(updates).__name__}")
        check_budget(state.dp)
        current = state.dp.clipping
        names = list(updates.grads)
        bounds = current.group_bounds(names)
        expected = current.sensitivity(names)
        if not math.isclose(updates.sensitivity, expected, rel_tol=1e-12) or set(updates.group_norms) != set(bounds):
            raise ValueError(
                f"{fn}: the ClippedSum was clipped to sensitivity {updates.sensitivity} over groups {sorted(updates.group_norms)}, "
                f"but the current clipping {current} has sensitivity {expected} over {sorted(bounds)}; call the engine with "
                "clipping=state.dp.clipping (make_step does)"
            )
        groups = sorted(bounds)
        sigma_grad = gradient_noise_multiplier(sigma, rule.count_noise_multiplier, len(groups))
        count = int(state.dp.count)
        centred = _unclipped_counts(updates, bounds)
        if rule.count_noise_multiplier > 0:
            noise = torch.randn(len(groups), generator=count_key(key, count).generator(), dtype=torch.float64)
            centred = centred + rule.count_noise_multiplier * noise
        fractions = (centred / m + 0.5).tolist()  # the one host read of the step
        new = {g: bounds[g] * math.exp(-rule.learning_rate * (b - rule.target_quantile)) for g, b in zip(groups, fractions)}
        bad = {g: c for g, c in new.items() if not (0 < c < math.inf)}
        if bad:
            raise ValueError(f"{fn}: the clip norm left (0, inf) at step {count}: {bad}; lower AdaptiveClipping.learning_rate "
                             f"(now {rule.learning_rate})")
        noisy = privatize(updates.grads, noise_key(key, count), noise_multiplier=sigma_grad,
                          sensitivity=updates.sensitivity, expected_batch_size=m)
        if normalize:
            noisy = {k: v / updates.sensitivity for k, v in noisy.items()}
        clipping = FlatClipping(new[""]) if not rule.per_layer else PerLayerClipping(new, per_parameter=rule.per_parameter)
        dp = state.dp._replace(count=count + 1, ledger=state.dp.ledger.step(sigma, q), clipping=clipping)
        return noisy, AdaptiveClippingState(dp, rule, tuple(fractions))

    return GradientTransformation(init, update)


def dp_transform(config: Any, key: Key, *, budget: Any = None, secure: bool = False,
                 secure_entropy: Any = None) -> GradientTransformation:
    """The aggregation transform of a config: :func:`adaptive_dp_aggregate` for an :class:`AdaptiveDPConfig`,
    else :func:`~dpfunc.dp_aggregate` (for drivers such as the bridge's optimizer that take either)."""
    if isinstance(config, AdaptiveDPConfig):
        if secure:
            raise ValueError("adaptive_dp_aggregate: secure (discrete Gaussian) noise is not supported with adaptive "
                             "clipping (the count would need discrete noise too); use flat clipping in secure mode")
        return adaptive_dp_aggregate(config, key, budget=budget)
    from dpfunc.private import dp_aggregate

    return dp_aggregate(config, key, budget=budget, secure=secure, secure_entropy=secure_entropy)


def replace_dp_state(state: Any, **fields: Any) -> Any:
    """``state`` (a :class:`~dpfunc.DPAggregateState` or an :class:`AdaptiveClippingState`) with fields of
    its DPAggregateState replaced (``count``, ``ledger``, ``clipping``)."""
    if isinstance(state, AdaptiveClippingState):
        return state._replace(dp=state.dp._replace(**fields))
    return state._replace(**fields)


def bound_to_plain(clipping: Union[FlatClipping, PerLayerClipping]) -> Union[float, list]:
    """The current bound as plain containers (a float, or ``[[group, C_g], ...]``) for state_dicts."""
    bound = clipping.max_grad_norm
    return [list(kv) for kv in bound] if isinstance(bound, tuple) else bound


def bound_from_plain(rule: AdaptiveClipping, bound: Any) -> Union[FlatClipping, PerLayerClipping]:
    """Inverse of :func:`bound_to_plain` for the rule's kind of clipping (validated)."""
    if rule.per_layer:
        return PerLayerClipping({str(g): float(c) for g, c in bound}, per_parameter=rule.per_parameter)
    return FlatClipping(float(bound))


def _config(fn: str, clipping: Any, noise_multiplier: Any, sampling_rate: Any, num_examples: Any) -> AdaptiveDPConfig:
    if not isinstance(clipping, AdaptiveClipping):
        raise TypeError(f"{fn}: clipping must be an AdaptiveClipping, got {clipping!r}")
    try:
        return AdaptiveDPConfig(clipping, noise_multiplier, sampling_rate, num_examples)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{fn}: {e}") from None


def adaptive_dpsgd(
    learning_rate: Schedule,
    *,
    noise_multiplier: float,
    clipping: AdaptiveClipping,
    sampling_rate: float,
    num_examples: int,
    key: Key,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    budget: Any = None,
    normalize: bool = False,
) -> GradientTransformation:
    """DP-SGD with adaptive clipping: ``chain(adaptive_dp_aggregate(...), sgd(...))`` (``normalize``: see
    :func:`adaptive_dp_aggregate`).

    Example:
        >>> rule = AdaptiveClipping(0.1, target_quantile=0.5, learning_rate=0.2, count_noise_multiplier=2.5)
        >>> tx = adaptive_dpsgd(0.5, noise_multiplier=1.1, clipping=rule, sampling_rate=0.01, num_examples=5000, key=Key(0))
        >>> privacy_ledger(tx.init({"w": torch.zeros(3)})).total_steps
        0
    """
    cfg = _config("adaptive_dpsgd", clipping, noise_multiplier, sampling_rate, num_examples)
    return chain(adaptive_dp_aggregate(cfg, key, budget=budget, normalize=normalize),
                 sgd(learning_rate, momentum, nesterov=nesterov, weight_decay=weight_decay))


def adaptive_dpadam(
    learning_rate: Schedule,
    *,
    noise_multiplier: float,
    clipping: AdaptiveClipping,
    sampling_rate: float,
    num_examples: int,
    key: Key,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    budget: Any = None,
    normalize: bool = False,
) -> GradientTransformation:
    """DP-Adam with adaptive clipping: ``chain(adaptive_dp_aggregate(...), adam(...))``."""
    cfg = _config("adaptive_dpadam", clipping, noise_multiplier, sampling_rate, num_examples)
    return chain(adaptive_dp_aggregate(cfg, key, budget=budget, normalize=normalize), adam(learning_rate, b1, b2, eps))
