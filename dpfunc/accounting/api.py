"""The pure accounting API: ``epsilon``, ``delta``, ``epsilon_report``, ``dpsgd_epsilon``.

Every function is a pure function of an event (or a :class:`PrivacyLedger`) and numbers. Methods:

=========  ====================================================================  =================
method     what it computes                                                       guarantee
=========  ====================================================================  =================
``pld``    connect-the-dots privacy-loss distribution, FFT composition (default)  upper bound (tight)
``rdp``    Rényi DP over an order grid, Balle et al. 2020 conversion               upper bound
``gdp``    central-limit μ-GDP                                                    approximation (warns)
=========  ====================================================================  =================

Formal guarantees:
    For ``pld`` and ``rdp`` the returned ε is an upper bound: the composition is (ε, δ)-DP under
    ``neighboring``. ``epsilon_report(...).lower`` (pld) is a lower bound on the exact ε of the
    dominating pair, so the exact value lies in ``[lower, epsilon]``. ``gdp`` gives no bound and emits
    a ``UserWarning`` each time it states ε or δ.

Example:
    >>> ledger = PrivacyLedger().step(1.1, 256 / 60000, steps=14062)
    >>> round(epsilon(ledger, 1e-5, method="rdp", conversion="classic",
    ...               orders=TF_PRIVACY_ORDERS), 2)
    3.01
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Union

from dpfunc.accounting import gdp as _gdp
from dpfunc.accounting import pld as _pld
from dpfunc.accounting import rdp as _rdp
from dpfunc.accounting.events import (
    _EVENT_TYPES,
    Event,
    GaussianEvent,
    Neighboring,
    PoissonSampledEvent,
    SelfComposedEvent,
    atoms,
)
from dpfunc.accounting.ledger import Phase, PrivacyLedger, ledger_to_event
from dpfunc.accounting.rdp import DEFAULT_ORDERS, TF_PRIVACY_ORDERS  # noqa: F401  (doctest)

__all__ = ["EpsilonReport", "METHODS", "as_event", "epsilon", "epsilon_report", "delta", "dpsgd_epsilon"]

METHODS = ("pld", "rdp", "gdp")
_OPTIONS = {"pld": {"value_discretization_interval"}, "rdp": {"orders", "conversion"}, "gdp": set()}


@dataclass(frozen=True)
class EpsilonReport:
    """The ε of a composition at ``delta`` with its provenance.

    Attributes:
        epsilon: the stated ε (an upper bound for pld/rdp; an approximation for gdp).
        lower: a lower bound on the exact ε (pld only, else ``None``).
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
        return SelfComposedEvent(PoissonSampledEvent(obj.sampling_rate, GaussianEvent(obj.noise_multiplier)), obj.steps)
    if isinstance(obj, _EVENT_TYPES):
        return obj
    raise ValueError(f"as_event: expected a privacy event or a PrivacyLedger, got {type(obj).__name__}: {obj!r}")


def _check_delta(fn: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{fn}: delta must be a number in (0, 1), got {value!r}")
    return float(value)


def _check_method(fn: str, method: str, options: dict) -> None:
    if method not in METHODS:
        raise ValueError(f"{fn}: method must be one of {METHODS}, got {method!r}")
    unknown = set(options) - _OPTIONS[method]
    if unknown:
        raise ValueError(
            f"{fn}: unknown option(s) {sorted(unknown)} for method={method!r}; allowed: {sorted(_OPTIONS[method])}"
        )


def _check_neighboring(fn: str, neighboring: Neighboring) -> None:
    if not isinstance(neighboring, Neighboring):
        raise ValueError(f"{fn}: neighboring must be a Neighboring, got {neighboring!r}")


def _orders(fn: str, options: dict) -> tuple:
    orders = tuple(float(a) for a in options.get("orders", DEFAULT_ORDERS))
    if not orders or any(not a > 1 for a in orders):
        raise ValueError(f"{fn}: orders must be a non-empty sequence of numbers > 1, got {options.get('orders')!r}")
    return orders


def epsilon_report(event_or_ledger, delta: float, method: str = "pld", *,
                   neighboring: Neighboring = Neighboring.ADD_OR_REMOVE_ONE, **options) -> EpsilonReport:
    """ε at ``delta`` for an event or ledger, with bounds and provenance (see module docstring).

    Args:
        event_or_ledger: a privacy event or a :class:`PrivacyLedger`.
        delta: δ in (0, 1).
        method: "pld" (default), "rdp" or "gdp".
        neighboring: the neighbouring relation (default add-or-remove-one).
        **options: pld: ``value_discretization_interval`` (grid step h, default 1e-4; coarsened
            automatically when the composed window would exceed ~2^20 points). rdp: ``orders``
            (default ``DEFAULT_ORDERS``), ``conversion`` ("balle2020" default, or "classic").

    Raises:
        ValueError: bad δ, unknown method or option, or an event the method cannot account.
    """
    fn = "epsilon_report"
    delta = _check_delta(fn, delta)
    _check_method(fn, method, options)
    _check_neighboring(fn, neighboring)
    key = atoms(as_event(event_or_ledger))
    steps = sum(a[-1] for a in key)
    if all(a[-1] == 0 or math.isinf(a[1]) for a in key):  # nothing was released: no privacy loss
        return EpsilonReport(0.0, 0.0, delta, method, None, 0.0 if method == "pld" else None, None, steps)
    if method == "pld":
        b = _pld.pld_epsilon(key, delta, neighboring=neighboring,
                             value_discretization_interval=options.get("value_discretization_interval"))
        err = b.upper - b.lower if math.isfinite(b.upper) else math.nan
        return EpsilonReport(b.upper, b.lower, delta, "pld", None, err, b.value_discretization_interval, steps)
    if method == "rdp":
        orders = _orders(fn, options)
        curve = _rdp.rdp_of_atoms(key, orders, neighboring)
        conv = _rdp.rdp_to_epsilon(curve, orders, delta, options.get("conversion", "balle2020"))
        return EpsilonReport(conv.epsilon, None, delta, "rdp", conv.order, None, None, steps)
    mu = _gdp.gdp_mu(key, neighboring)
    warnings.warn(_gdp.GDP_WARNING, UserWarning, stacklevel=2)
    return EpsilonReport(_gdp.gdp_epsilon(mu, delta, warn=False), None, delta, "gdp", None, None, None, steps)


def epsilon(event_or_ledger, delta: float, method: str = "pld", *,
            neighboring: Neighboring = Neighboring.ADD_OR_REMOVE_ONE, **options) -> float:
    """ε at ``delta`` (a float; ``math.inf`` when no finite ε exists). See :func:`epsilon_report`."""
    if method == "gdp":  # warn from the caller's frame
        warnings.warn(_gdp.GDP_WARNING, UserWarning, stacklevel=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return epsilon_report(event_or_ledger, delta, method, neighboring=neighboring, **options).epsilon
    return epsilon_report(event_or_ledger, delta, method, neighboring=neighboring, **options).epsilon


def delta(event_or_ledger, epsilon: float, method: str = "pld", *,
          neighboring: Neighboring = Neighboring.ADD_OR_REMOVE_ONE, **options) -> float:
    """Smallest δ (an upper bound for pld/rdp) such that the composition is (ε, δ)-DP.

    Raises:
        ValueError: ``epsilon`` not a number ≥ 0, unknown method or option.
    """
    fn = "delta"
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or math.isnan(epsilon) or epsilon < 0:
        raise ValueError(f"{fn}: epsilon must be a number >= 0, got {epsilon!r}")
    _check_method(fn, method, options)
    _check_neighboring(fn, neighboring)
    key = atoms(as_event(event_or_ledger))
    if math.isinf(epsilon) or all(a[-1] == 0 or math.isinf(a[1]) for a in key):
        return 0.0
    if method == "pld":
        return _pld.pld_delta(key, float(epsilon), neighboring=neighboring,
                              value_discretization_interval=options.get("value_discretization_interval")).upper
    if method == "rdp":
        orders = _orders(fn, options)
        curve = _rdp.rdp_of_atoms(key, orders, neighboring)
        return _rdp.rdp_to_delta(curve, orders, float(epsilon), options.get("conversion", "balle2020")).epsilon
    warnings.warn(_gdp.GDP_WARNING, UserWarning, stacklevel=2)
    return _gdp.gdp_delta(_gdp.gdp_mu(key, neighboring), float(epsilon), warn=False)


def dpsgd_epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
                  method: str = "pld", **options) -> float:
    """ε of ``steps`` DP-SGD steps with Poisson sampling (add-or-remove-one adjacency).

    Example:
        >>> round(dpsgd_epsilon(1.0, 0.01, 300, 1e-5, method="rdp", orders=[2, 5, 10, 20, 100]), 2)
        2.39
    """
    fn = "dpsgd_epsilon"
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{fn}: steps must be an int >= 0, got {steps!r}")
    if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, (int, float)) or not noise_multiplier >= 0:
        raise ValueError(f"{fn}: noise_multiplier must be a number >= 0, got {noise_multiplier!r}")
    if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, (int, float)) or not 0 < sampling_rate <= 1:
        raise ValueError(f"{fn}: sampling_rate must be in (0, 1], got {sampling_rate!r}")
    event = SelfComposedEvent(PoissonSampledEvent(float(sampling_rate), GaussianEvent(float(noise_multiplier))), steps)
    return epsilon(event, delta, method, **options)
