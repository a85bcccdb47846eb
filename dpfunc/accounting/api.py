"""The pure accounting API: ``epsilon``, ``delta``, ``epsilon_report``, ``dpsgd_epsilon``.

Every function is a pure function of an event (or a :class:`PrivacyLedger`) and numbers. Methods:

=================  ============================================================  =====================
method             what it computes                                              guarantee
=================  ============================================================  =====================
``PLD()``/"pld"    connect-the-dots privacy-loss distribution, FFT (default)     upper bound (tight)
``RDP()``/"rdp"    Rényi DP over an order grid, Balle et al. 2020 conversion     upper bound
``GDP()``/"gdp"    central-limit μ-GDP                                           approximation (warns)
=================  ============================================================  =====================

``method`` is an option object (:mod:`dpfunc.accounting.methods`), a :class:`Method`, or the legacy
string with keyword options (``method="rdp", orders=...``); all resolve to one option object. Left
out (``None``), it is PLD — unless the ledger holds discrete-Gaussian (secure mode) phases, which only
the RDP accountant bounds: then it is ``RDP(orders=DG_ORDERS)`` (see
:mod:`dpfunc.accounting.discrete_gaussian`), and an explicit PLD or GDP is refused.

Formal guarantees:
    For ``pld`` and ``rdp`` the returned ε is an upper bound: the composition is (ε, δ)-DP under
    ``neighboring``. ``epsilon_report(...).lower`` (pld) is a lower bound on the exact ε of the
    dominating pair, so the exact value lies in ``[lower, epsilon]``. ``gdp`` gives no bound and emits
    a ``UserWarning`` each time it states ε or δ.

Example:
    >>> ledger = PrivacyLedger().step(1.1, 256 / 60000, steps=14062)
    >>> round(epsilon(ledger, 1e-5, RDP(orders=TF_PRIVACY_ORDERS, conversion="classic")), 2)
    3.01
    >>> round(epsilon(ledger, 1e-5, method="rdp", conversion="classic", orders=TF_PRIVACY_ORDERS), 2)
    3.01
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Union

from dpfunc._validate import check_delta, check_int_range, check_nonnegative, check_probability
from dpfunc.accounting import gdp as _gdp
from dpfunc.accounting import pld as _pld
from dpfunc.accounting import rdp as _rdp
from dpfunc.accounting.events import (
    _EVENT_TYPES,
    DiscreteGaussianAtom,
    Event,
    GaussianEvent,
    Neighboring,
    PoissonSampledEvent,
    SelfComposedEvent,
    atoms,
)
from dpfunc.accounting.ledger import Phase, PrivacyLedger, ledger_to_event, phase_event
from dpfunc.accounting.methods import GDP, METHODS, PLD, RDP, Accountant, Method, resolve_method
from dpfunc.accounting.rdp import DEFAULT_ORDERS, TF_PRIVACY_ORDERS  # noqa: F401  (doctest)

__all__ = ["EpsilonReport", "METHODS", "as_event", "epsilon", "epsilon_report", "delta", "dpsgd_epsilon"]

MethodLike = Union[None, str, Method, PLD, RDP, GDP]


@dataclass(frozen=True)
class EpsilonReport:
    """The ε of a composition at ``delta`` with its provenance.

    Attributes:
        epsilon: the stated ε (an upper bound for pld/rdp; an approximation for gdp).
        lower: a lower bound on the exact ε (from the PLD accountant: ``None`` for rdp or gdp asked for by
            name).
        delta: the δ it holds at.
        method: "pld", "rdp" or "gdp".
        order: the optimal Rényi order (rdp only).
        discretization_error: ``epsilon - lower`` (pld only).
        value_discretization_interval: the PLD grid step actually used (pld only).
        steps: the number of mechanism applications composed.
    """

    epsilon: float
    lower: Optional[float]
    delta: float
    method: str
    order: Optional[float] = None
    discretization_error: Optional[float] = None
    value_discretization_interval: Optional[float] = None
    steps: int = 0


def as_event(obj: Union[Event, PrivacyLedger, Phase]) -> Event:
    """Accept an event, a :class:`PrivacyLedger` or a :class:`Phase` and return an event."""
    if isinstance(obj, PrivacyLedger):
        return ledger_to_event(obj)
    if isinstance(obj, Phase):
        return phase_event(obj)
    if isinstance(obj, _EVENT_TYPES):
        return obj
    raise ValueError(f"as_event: expected a privacy event or a PrivacyLedger, got {type(obj).__name__}: {obj!r}")


def _check_delta(fn: str, value: float) -> float:
    return check_delta(fn, "delta", value)


def _check_method(fn: str, method: MethodLike, options: dict) -> Accountant:
    return resolve_method(fn, "pld" if method is None else method, options)


def _has_discrete(key: tuple) -> bool:
    return any(isinstance(a, DiscreteGaussianAtom) and a.count > 0 for a in key)


# method=None on a Gaussian ledger: PLD, unless its certified gap (upper − lower) still exceeds this
# fraction of ε after grid refinement and RDP's bound is smaller (then RDP's is reported).
_LOOSE_PLD = 0.05


def _accountant_for(fn: str, method: MethodLike, options: dict, key: tuple) -> Accountant:
    """The accountant for ``key``: ``method`` resolved, or (``None``) PLD / RDP for discrete-Gaussian phases.

    Raises:
        ValueError: PLD or GDP asked for a composition with discrete-Gaussian phases (neither bounds them).
    """
    if not _has_discrete(key):
        return _check_method(fn, method, options)
    if method is None and not options:
        from dpfunc.accounting.discrete_gaussian import DG_ORDERS

        return RDP(orders=DG_ORDERS)
    acc = _check_method(fn, method, options)
    if not isinstance(acc, RDP):
        raise ValueError(
            f"{fn}: method={acc.method.value!r} cannot account the discrete-Gaussian (secure mode) phases of this "
            "ledger: only the RDP accountant has a proven bound for them (dpfunc.accounting.discrete_gaussian); "
            "pass method=RDP() or leave method out"
        )
    return acc


def _check_neighboring(fn: str, neighboring: Neighboring) -> None:
    if not isinstance(neighboring, Neighboring):
        raise ValueError(f"{fn}: neighboring must be a Neighboring, got {neighboring!r}")


def _no_loss(key: tuple) -> bool:
    return all(a.count == 0 or math.isinf(a.noise_multiplier) for a in key)


def epsilon_report(event_or_ledger, delta: float, method: MethodLike = None, *,
                   neighboring: Neighboring = Neighboring.ADD_OR_REMOVE_ONE, **options) -> EpsilonReport:
    """ε at ``delta`` for an event or ledger, with bounds and provenance (see module docstring).

    Args:
        event_or_ledger: a privacy event or a :class:`PrivacyLedger`.
        delta: δ in (0, 1).
        method: ``PLD(...)``, ``RDP(...)``, ``GDP()``, a :class:`Method`, or "pld"/"rdp"/"gdp"; ``None``
            (default): PLD on a grid refined while its certified gap exceeds 5 % (RDP's bound instead
            where that is smaller and the gap is still large), or ``RDP(orders=DG_ORDERS)`` when the ledger
            holds discrete-Gaussian phases.
        neighboring: the neighbouring relation (default add-or-remove-one).
        **options: with a string method only (legacy): pld: ``value_discretization_interval``;
            rdp: ``orders``, ``conversion`` (see :class:`PLD`, :class:`RDP`).

    Raises:
        ValueError: bad δ, unknown method or option, or an event the method cannot account.
    """
    fn = "epsilon_report"
    delta = _check_delta(fn, delta)
    _check_method(fn, method, options)
    _check_neighboring(fn, neighboring)
    key = atoms(as_event(event_or_ledger))
    acc = _accountant_for(fn, method, options, key)
    steps = sum(a.count for a in key)
    name = acc.method.value
    if _no_loss(key):  # nothing was released: no privacy loss
        return EpsilonReport(0.0, 0.0, delta, name, None, 0.0 if name == "pld" else None, None, steps)
    if isinstance(acc, PLD):
        b = _pld.pld_epsilon(key, delta, neighboring=neighboring,
                             value_discretization_interval=acc.value_discretization_interval)
        err = b.upper - b.lower if math.isfinite(b.upper) else math.nan
        if method is None and not options and math.isfinite(b.upper) and err > _LOOSE_PLD * b.upper:
            # the default: where even the refined grid cannot certify PLD's bound within 5 % (very many
            # steps of tiny loss, e.g. q = 1e-6, T = 1e7), RDP can be tighter; both bound ε, keep the smaller
            curve = _rdp.rdp_of_atoms(key, RDP().orders, neighboring)
            conv = _rdp.rdp_to_epsilon(curve, RDP().orders, delta, RDP().conversion.value)
            if conv.epsilon < b.upper:
                return EpsilonReport(conv.epsilon, min(b.lower, conv.epsilon), delta, "rdp", conv.order, None, None, steps)
        return EpsilonReport(b.upper, b.lower, delta, "pld", None, err, b.value_discretization_interval, steps)
    if isinstance(acc, RDP):
        curve = _rdp.rdp_of_atoms(key, acc.orders, neighboring)
        conv = _rdp.rdp_to_epsilon(curve, acc.orders, delta, acc.conversion.value)
        return EpsilonReport(conv.epsilon, None, delta, "rdp", conv.order, None, None, steps)
    mu = _gdp.gdp_mu(key, neighboring)
    warnings.warn(_gdp.GDP_WARNING, UserWarning, stacklevel=2)
    return EpsilonReport(_gdp.gdp_epsilon(mu, delta, warn=False), None, delta, "gdp", None, None, None, steps)


def epsilon(event_or_ledger, delta: float, method: MethodLike = None, *,
            neighboring: Neighboring = Neighboring.ADD_OR_REMOVE_ONE, **options) -> float:
    """ε at ``delta`` (a float; ``math.inf`` when no finite ε exists). See :func:`epsilon_report`.

    Example:
        >>> ledger = PrivacyLedger().step(1.0, 1.0).step(1.0, 0.5)   # q = 1 and q < 1 phases mixed
        >>> round(epsilon(ledger, 1e-5), 3), round(epsilon(ledger, 1e-5, PLD(1e-3)), 2)
        (5.713, 5.71)
    """
    if isinstance(method, GDP) or method in ("gdp", Method.GDP):  # warn from the caller's frame
        warnings.warn(_gdp.GDP_WARNING, UserWarning, stacklevel=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return epsilon_report(event_or_ledger, delta, method, neighboring=neighboring, **options).epsilon
    return epsilon_report(event_or_ledger, delta, method, neighboring=neighboring, **options).epsilon


def delta(event_or_ledger, epsilon: float, method: MethodLike = None, *,
          neighboring: Neighboring = Neighboring.ADD_OR_REMOVE_ONE, **options) -> float:
    """Smallest δ (an upper bound for pld/rdp) such that the composition is (ε, δ)-DP.

    The default (``method=None``) is treated like :func:`epsilon_report`'s: PLD, its grid refined by the
    same criterion (the certified ε gap at the δ found), RDP's δ where that is smaller and the gap is
    still large; so ``delta(ledger, epsilon(ledger, δ)) ≤ δ·(1 + 1e-3)`` (a tested property).
    ``rdp`` uses the same conversion as :func:`epsilon` (Balle et al. 2020, Thm. 21, by default),
    inverted exactly, so ``epsilon(e, delta(e, ε)) ≈ ε`` for every method.

    Raises:
        ValueError: ``epsilon`` not a number ≥ 0 (``math.inf`` allowed), unknown method or option.
    """
    fn = "delta"
    eps = check_nonnegative(fn, "epsilon", epsilon, allow_inf=True)
    _check_method(fn, method, options)
    _check_neighboring(fn, neighboring)
    key = atoms(as_event(event_or_ledger))
    acc = _accountant_for(fn, method, options, key)
    if math.isinf(eps) or _no_loss(key):
        return 0.0
    if isinstance(acc, PLD):
        b, loose = _pld._pld_delta_refined(key, eps, neighboring, acc.value_discretization_interval)
        if method is None and not options and loose and b.upper > 0:
            # as epsilon_report: where the refined grid still cannot certify ε within 5 %, RDP can be
            # tighter; both bound δ, keep the smaller (so delta(epsilon(δ)) ≤ δ where ε came from RDP)
            curve = _rdp.rdp_of_atoms(key, RDP().orders, neighboring)
            return min(b.upper, _rdp.rdp_to_delta(curve, RDP().orders, eps, RDP().conversion.value).epsilon)
        return b.upper
    if isinstance(acc, RDP):
        curve = _rdp.rdp_of_atoms(key, acc.orders, neighboring)
        return _rdp.rdp_to_delta(curve, acc.orders, eps, acc.conversion.value).epsilon
    warnings.warn(_gdp.GDP_WARNING, UserWarning, stacklevel=2)
    return _gdp.gdp_delta(_gdp.gdp_mu(key, neighboring), eps, warn=False)


def dpsgd_epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
                  method: MethodLike = "pld", **options) -> float:
    """ε of ``steps`` DP-SGD steps with Poisson sampling (add-or-remove-one adjacency).

    Example:
        >>> round(dpsgd_epsilon(1.0, 0.01, 300, 1e-5, method="rdp", orders=[2, 5, 10, 20, 100]), 2)
        2.39
        >>> round(dpsgd_epsilon(1.1, 256 / 60000, 14062, 1e-8), 3)   # small δ, many steps: finite, tight
        3.251
    """
    fn = "dpsgd_epsilon"
    steps = check_int_range(fn, "steps", steps, low=0)
    sigma = check_nonnegative(fn, "noise_multiplier", noise_multiplier, allow_inf=True)
    q = check_probability(fn, "sampling_rate", sampling_rate)
    event = SelfComposedEvent(PoissonSampledEvent(q, GaussianEvent(sigma)), steps)
    return epsilon(event, delta, method, **options)
