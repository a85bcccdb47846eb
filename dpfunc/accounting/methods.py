"""Accountant choices as typed option objects: ``PLD(...)``, ``RDP(...)``, ``GDP()``.

Every accounting entry point takes ``method=`` as one of these objects, a :class:`Method` member, or
(kept for existing code) the strings ``"pld"``, ``"rdp"``, ``"gdp"`` with the options as keyword
arguments. All three spellings resolve here, once, to one frozen option object:

    >>> resolve_method("epsilon", "rdp", {"orders": (2, 4, 8)})
    RDP(orders=(2.0, 4.0, 8.0), conversion=<Conversion.BALLE2020: 'balle2020'>)
    >>> resolve_method("epsilon", PLD(value_discretization_interval=1e-3), {})
    PLD(value_discretization_interval=0.001)

Migration: ``epsilon(ledger, δ, method="rdp", orders=o)`` → ``epsilon(ledger, δ, RDP(orders=o))``. The
string form stays supported; passing keyword options together with an option object is an error (one
place for each setting).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Optional, Union

from dpfunc._validate import check_enum, check_number, is_number
from dpfunc.accounting.rdp import DEFAULT_ORDERS

__all__ = ["Method", "Conversion", "PLD", "RDP", "GDP", "Accountant", "resolve_method", "METHODS"]


class Method(enum.Enum):
    """The accountant families; the values are the legacy ``method=`` strings."""

    PLD = "pld"
    RDP = "rdp"
    GDP = "gdp"


METHODS = tuple(m.value for m in Method)


class Conversion(enum.Enum):
    """RDP → (ε, δ) conversion: Balle et al. 2020, Thm. 21 (default, tighter) or Mironov 2017 (classic)."""

    BALLE2020 = "balle2020"
    CLASSIC = "classic"


@dataclass(frozen=True)
class PLD:
    """Privacy-loss-distribution accountant (upper bound, tight; the default).

    Attributes:
        value_discretization_interval: grid step h of the loss axis in (0, 1]; ``None`` (default) means
            1e-4, refined automatically for tiny per-step losses and coarsened when the composed window
            would exceed ~2^20 points (both keep an upper bound).
    """

    value_discretization_interval: Optional[float] = None

    method = Method.PLD

    def __post_init__(self) -> None:
        if self.value_discretization_interval is not None:
            v = check_number("PLD", "value_discretization_interval", self.value_discretization_interval,
                             low=0.0, high=1.0, low_open=True)
            object.__setattr__(self, "value_discretization_interval", v)


@dataclass(frozen=True)
class RDP:
    """Rényi-DP accountant (upper bound).

    Attributes:
        orders: Rényi orders α > 1 (default :data:`DEFAULT_ORDERS`, 92 orders 1.05…1024).
        conversion: :class:`Conversion` (or its string value) used to state (ε, δ).
    """

    orders: tuple = DEFAULT_ORDERS
    conversion: Conversion = Conversion.BALLE2020

    method = Method.RDP

    def __post_init__(self) -> None:
        raw = self.orders
        try:
            orders = tuple(raw)
        except TypeError:
            orders = ()
        if not orders or not all(is_number(a) and not math.isnan(float(a)) and 1 < float(a) < math.inf for a in orders):
            raise ValueError(f"RDP: orders must be a non-empty sequence of finite numbers > 1, got {raw!r}")
        object.__setattr__(self, "orders", tuple(float(a) for a in orders))
        if not isinstance(self.conversion, Conversion):
            if not isinstance(self.conversion, str) or self.conversion not in {c.value for c in Conversion}:
                raise ValueError(f"RDP: conversion must be 'balle2020' or 'classic', got {self.conversion!r}")
            object.__setattr__(self, "conversion", Conversion(self.conversion))


@dataclass(frozen=True)
class GDP:
    """Gaussian-DP central-limit approximation. Not a bound: every ε/δ it states warns."""

    method = Method.GDP


Accountant = Union[PLD, RDP, GDP]
_CLASSES = {Method.PLD: PLD, Method.RDP: RDP, Method.GDP: GDP}
_OPTIONS = {Method.PLD: ("value_discretization_interval",), Method.RDP: ("orders", "conversion"), Method.GDP: ()}


def resolve_method(fn: str, method: object, options: dict) -> Accountant:
    """One option object from ``method`` (object, :class:`Method` or string) and keyword ``options``.

    Raises:
        ValueError: unknown method, unknown option for it, bad option value, or options given twice.
    """
    if isinstance(method, (PLD, RDP, GDP)):
        if options:
            raise ValueError(
                f"{fn}: unknown option(s) {sorted(options)} next to method={method!r}; "
                "set them in the option object instead"
            )
        return method
    if not isinstance(method, (str, Method)):
        raise ValueError(f"{fn}: method must be one of {METHODS}, a Method, or PLD(...)/RDP(...)/GDP(), got {method!r}")
    try:
        kind = check_enum(fn, "method", method, Method)
    except ValueError:
        raise ValueError(
            f"{fn}: method must be one of {METHODS}, a Method, or PLD(...)/RDP(...)/GDP(), got {method!r}"
        ) from None
    unknown = set(options) - set(_OPTIONS[kind])
    if unknown:
        raise ValueError(
            f"{fn}: unknown option(s) {sorted(unknown)} for method={kind.value!r}; allowed: {sorted(_OPTIONS[kind])}"
        )
    try:
        return _CLASSES[kind](**options)
    except ValueError as e:
        raise ValueError(f"{fn}: {e}") from None
