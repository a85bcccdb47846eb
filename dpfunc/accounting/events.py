"""Privacy events: immutable descriptions of what a mechanism did, in the spirit of dp_accounting.

An event says *which* mechanism ran and how often; an accountant (``rdp``, ``pld``, ``gdp``) turns it
into a guarantee. Events are frozen dataclasses, hashable and comparable, so they can key caches and
travel in checkpoints.

The noise multiplier is always ``σ / C``: the noise standard deviation divided by the clipping norm
``C``, which is the sensitivity of the clipped-gradient sum under ``Neighboring.ADD_OR_REMOVE_ONE``.
Under ``Neighboring.REPLACE_ONE`` the sensitivity of that sum is ``2C``; the accountants account for
it (the effective noise multiplier is ``σ / 2``). This differs from TF Privacy's
``compute_rdp_sample_without_replacement``, whose ``noise_multiplier`` is relative to the
replace-one sensitivity: pass ``2·σ_tfp`` here to reproduce it.

Example:
    >>> step = PoissonSampledEvent(0.01, GaussianEvent(1.1))
    >>> run = SelfComposedEvent(step, 1000)
    >>> ComposedEvent((run, SelfComposedEvent(PoissonSampledEvent(0.02, GaussianEvent(2.0)), 10)))
    ...     # doctest: +ELLIPSIS
    ComposedEvent(events=(...))

References:
    Google differential-privacy team, ``dp_accounting.dp_event`` (2021).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple, Union

from dpfunc._validate import check_int_range, check_nonnegative, check_probability

__all__ = [
    "Neighboring",
    "Mechanism",
    "GaussianEvent",
    "DiscreteGaussianEvent",
    "PoissonSampledEvent",
    "SampledWithoutReplacementEvent",
    "SelfComposedEvent",
    "ComposedEvent",
    "Event",
    "PoissonAtom",
    "DiscreteGaussianAtom",
    "WorAtom",
    "Atom",
    "atoms",
]


class Neighboring(enum.Enum):
    """The neighbouring relation under which a guarantee is stated.

    ``ADD_OR_REMOVE_ONE``: datasets differ by one record added or removed (DP-SGD with Poisson
    sampling). ``REPLACE_ONE``: datasets of equal size differ in one record (fixed batch size,
    sampling without replacement).
    """

    ADD_OR_REMOVE_ONE = "add_or_remove_one"
    REPLACE_ONE = "replace_one"


def check_sampling_neighboring(method: str, scheme: str, neighboring: Neighboring, sampling_rate: float = 1.0) -> None:
    """The one rule every accountant applies: Poisson sampling (``scheme="poisson"``, rate < 1) is
    accounted under ``ADD_OR_REMOVE_ONE`` only, sampling without replacement (``scheme="wor"``) under
    ``REPLACE_ONE`` only. Raises ``ValueError`` naming ``method`` and the relation to pass."""
    if scheme == "poisson" and sampling_rate != 1.0 and neighboring is Neighboring.REPLACE_ONE:
        raise ValueError(
            f"{method}: Poisson sampling is accounted under Neighboring.ADD_OR_REMOVE_ONE only, got "
            f"neighboring={neighboring} with sampling_rate={sampling_rate}; use "
            "neighboring=Neighboring.ADD_OR_REMOVE_ONE (the relation of DP-SGD with Poisson sampling) "
            "or SampledWithoutReplacementEvent for fixed-size batches"
        )
    if scheme == "wor" and neighboring is not Neighboring.REPLACE_ONE:
        raise ValueError(
            f"{method}: SampledWithoutReplacementEvent is accounted under Neighboring.REPLACE_ONE only, "
            f"got neighboring={neighboring}; pass neighboring=Neighboring.REPLACE_ONE"
        )


class Mechanism(enum.Enum):
    """The noise distribution a step used; a ledger phase records it so that ε is computed for it.

    ``GAUSSIAN``: the continuous Gaussian ``N(0, σ²C²)`` (the default path).
    ``DISCRETE_GAUSSIAN``: the discrete Gaussian on a grid (secure mode, :mod:`dpfunc.secure_noise`),
    accounted by :mod:`dpfunc.accounting.discrete_gaussian` (RDP only; never assumed equal to the
    continuous one).
    """

    GAUSSIAN = "gaussian"
    DISCRETE_GAUSSIAN = "discrete_gaussian"


def _check_gaussian_inner(owner: str, event: object, *, discrete_ok: bool = True) -> None:
    allowed = (GaussianEvent, DiscreteGaussianEvent) if discrete_ok else (GaussianEvent,)
    if not isinstance(event, allowed):
        names = " or ".join(c.__name__ for c in allowed)
        raise ValueError(f"{owner}: only a {names} can be sampled, got {type(event).__name__}")


@dataclass(frozen=True)
class GaussianEvent:
    """One application of the Gaussian mechanism with noise multiplier ``σ / C``.

    ``noise_multiplier = 0`` is allowed and means no privacy (ε = ∞); ``math.inf`` means no loss.
    """

    noise_multiplier: float

    def __post_init__(self) -> None:
        check_nonnegative("GaussianEvent", "noise_multiplier", self.noise_multiplier, allow_inf=True)


@dataclass(frozen=True)
class DiscreteGaussianEvent:
    """One application of the discrete Gaussian mechanism: an integer-valued query of l2 sensitivity
    Δ plus i.i.d. ``N_Z(0, σ²Δ²)`` noise per coordinate (``noise_multiplier = σ``).

    It is ``1/(2σ²)``-zCDP (Canonne, Kamath & Steinke 2020, Thm. 14) — the same RDP curve as the
    continuous Gaussian — but its *subsampled* RDP is bounded by Zhu & Wang's generic bound
    (:mod:`dpfunc.accounting.discrete_gaussian`), not by the continuous Gaussian's. Only the RDP
    accountant accounts for it.
    """

    noise_multiplier: float

    def __post_init__(self) -> None:
        check_nonnegative("DiscreteGaussianEvent", "noise_multiplier", self.noise_multiplier, allow_inf=True)


@dataclass(frozen=True)
class PoissonSampledEvent:
    """``event`` applied to a Poisson sample: each record is included independently with
    probability ``sampling_rate`` in (0, 1]."""

    sampling_rate: float
    event: "Event"

    def __post_init__(self) -> None:
        check_probability("PoissonSampledEvent", "sampling_rate", self.sampling_rate)
        _check_gaussian_inner("PoissonSampledEvent", self.event)


@dataclass(frozen=True)
class SampledWithoutReplacementEvent:
    """``event`` applied to a uniformly random subset of exactly ``sample_size`` records out of
    ``population_size`` (fixed batch size). Meaningful under ``Neighboring.REPLACE_ONE``."""

    sample_size: int
    population_size: int
    event: "Event"

    def __post_init__(self) -> None:
        m, n = self.sample_size, self.population_size
        for name, v in (("sample_size", m), ("population_size", n)):
            check_int_range("SampledWithoutReplacementEvent", name, v, low=1)
        if m > n:
            raise ValueError(
                f"SampledWithoutReplacementEvent: sample_size must be <= population_size, got {m!r} > {n!r}"
            )
        _check_gaussian_inner("SampledWithoutReplacementEvent", self.event, discrete_ok=False)


@dataclass(frozen=True)
class SelfComposedEvent:
    """``event`` applied ``count`` times (``count >= 0``; 0 is the empty composition)."""

    event: "Event"
    count: int

    def __post_init__(self) -> None:
        check_int_range("SelfComposedEvent", "count", self.count, low=0)
        if not isinstance(self.event, _EVENT_TYPES):
            raise ValueError(f"SelfComposedEvent: event must be an event, got {type(self.event).__name__}")


@dataclass(frozen=True)
class ComposedEvent:
    """The adaptive composition of ``events`` (heterogeneous phases), in any order."""

    events: tuple

    def __post_init__(self) -> None:
        if not isinstance(self.events, tuple):
            object.__setattr__(self, "events", tuple(self.events))
        for e in self.events:
            if not isinstance(e, _EVENT_TYPES):
                raise ValueError(f"ComposedEvent: every element must be an event, got {type(e).__name__}")


Event = Union[GaussianEvent, DiscreteGaussianEvent, PoissonSampledEvent, SampledWithoutReplacementEvent,
              SelfComposedEvent, ComposedEvent]
_EVENT_TYPES = (GaussianEvent, DiscreteGaussianEvent, PoissonSampledEvent, SampledWithoutReplacementEvent,
                SelfComposedEvent, ComposedEvent)


# --- canonical form used by the accountants -------------------------------------------------------
# Composition is commutative, so atoms are merged and sorted: equal compositions get equal keys.
# Atoms are NamedTuples (read by field name); they still compare and hash as plain tuples.


class PoissonAtom(NamedTuple):
    """``count`` Poisson-subsampled Gaussian steps (a plain Gaussian is ``sampling_rate = 1``)."""

    kind: str  # "poisson"
    noise_multiplier: float
    sampling_rate: float
    count: int


class DiscreteGaussianAtom(NamedTuple):
    """``count`` Poisson-subsampled discrete-Gaussian steps (``sampling_rate = 1``: not subsampled)."""

    kind: str  # "dg_poisson"
    noise_multiplier: float
    sampling_rate: float
    count: int


class WorAtom(NamedTuple):
    """``count`` Gaussian steps on samples of ``sample_size`` out of ``population_size`` without replacement."""

    kind: str  # "wor"
    noise_multiplier: float
    sample_size: int
    population_size: int
    count: int


Atom = Union[PoissonAtom, DiscreteGaussianAtom, WorAtom]
_ATOM_CLASSES = {"poisson": PoissonAtom, "dg_poisson": DiscreteGaussianAtom, "wor": WorAtom}


def atoms(event: Event) -> tuple:
    """The canonical, hashable multiset of mechanisms in ``event`` (merged and sorted :data:`Atom` s)."""
    counts: dict = {}

    def walk(e: Event, mult: int) -> None:
        if mult == 0:
            return
        if isinstance(e, GaussianEvent):
            key = ("poisson", float(e.noise_multiplier), 1.0)
        elif isinstance(e, DiscreteGaussianEvent):
            key = ("dg_poisson", float(e.noise_multiplier), 1.0)
        elif isinstance(e, PoissonSampledEvent):
            kind = "dg_poisson" if isinstance(e.event, DiscreteGaussianEvent) else "poisson"
            key = (kind, float(e.event.noise_multiplier), float(e.sampling_rate))
        elif isinstance(e, SampledWithoutReplacementEvent):
            key = ("wor", float(e.event.noise_multiplier), int(e.sample_size), int(e.population_size))
        elif isinstance(e, SelfComposedEvent):
            walk(e.event, mult * e.count)
            return
        elif isinstance(e, ComposedEvent):
            for sub in e.events:
                walk(sub, mult)
            return
        else:
            raise ValueError(f"atoms: not a privacy event: {e!r}")
        counts[key] = counts.get(key, 0) + mult

    walk(event, 1)
    out = [_ATOM_CLASSES[k[0]](*k, c) for k, c in counts.items()]
    return tuple(sorted(out))


def as_atom(atom: tuple) -> Atom:
    """An :data:`Atom` from a plain tuple ``("poisson", σ, q, count)``, ``("dg_poisson", σ, q, count)`` or
    ``("wor", σ, m, n, count)``."""
    if isinstance(atom, (PoissonAtom, DiscreteGaussianAtom, WorAtom)):
        return atom
    cls = _ATOM_CLASSES.get(atom[0]) if isinstance(atom, tuple) and atom else None
    if cls is not None and len(atom) == len(cls._fields):
        return cls(*atom)
    raise ValueError(f"as_atom: expected ('poisson', σ, q, count), ('dg_poisson', σ, q, count) or "
                     f"('wor', σ, m, n, count), got {atom!r}")
