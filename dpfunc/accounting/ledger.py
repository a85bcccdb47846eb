"""The privacy ledger: an immutable record of the mechanisms a training run has applied.

The ledger travels with the training state; the privacy claim of a run is a pure function of it.
Consecutive steps with the same ``(noise_multiplier, sampling_rate, mechanism)`` are stored as one
phase, so a ledger of a million steps is a handful of numbers, and heterogeneous training (σ or q
changing mid run) is recorded exactly. Each phase names its noise :class:`Mechanism` (the continuous
Gaussian by default; the discrete Gaussian in secure mode), so that ``epsilon(ledger)`` accounts for
what was actually released.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dpfunc._validate import check_enum, check_int_range, check_nonnegative, check_probability
from dpfunc.accounting.events import Mechanism

__all__ = ["Mechanism", "Phase", "PrivacyLedger", "ledger_to_event", "phase_event"]


@dataclass(frozen=True)
class Phase:
    """``steps`` applications of a Poisson-subsampled (discrete) Gaussian mechanism.

    Attributes:
        noise_multiplier: σ, the noise standard deviation divided by the sensitivity (≥ 0).
        sampling_rate: q, the probability that an example is in a batch, in (0, 1].
        steps: how many times the mechanism was applied (≥ 0).
        mechanism: the noise distribution, a :class:`Mechanism` (or its string value); default
            ``Mechanism.GAUSSIAN``.
    """

    noise_multiplier: float
    sampling_rate: float
    steps: int
    mechanism: Mechanism = Mechanism.GAUSSIAN

    def __post_init__(self) -> None:
        check_nonnegative("Phase", "noise_multiplier", self.noise_multiplier)
        check_probability("Phase", "sampling_rate", self.sampling_rate)
        check_int_range("Phase", "steps", self.steps, low=0)
        object.__setattr__(self, "mechanism", check_enum("Phase", "mechanism", self.mechanism, Mechanism))

    def __repr__(self) -> str:  # the default mechanism is left out, as in the constructor call
        extra = "" if self.mechanism is Mechanism.GAUSSIAN else f", mechanism={self.mechanism}"
        return (f"Phase(noise_multiplier={self.noise_multiplier!r}, sampling_rate={self.sampling_rate!r}, "
                f"steps={self.steps!r}{extra})")


@dataclass(frozen=True)
class PrivacyLedger:
    """An immutable sequence of :class:`Phase` records.

    Example:
        >>> ledger = PrivacyLedger().step(1.1, 0.01).step(1.1, 0.01)
        >>> ledger.phases
        (Phase(noise_multiplier=1.1, sampling_rate=0.01, steps=2),)
        >>> ledger.total_steps
        2
    """

    phases: tuple[Phase, ...] = field(default_factory=tuple)

    def step(self, noise_multiplier: float, sampling_rate: float, steps: int = 1, *,
             mechanism: Mechanism = Mechanism.GAUSSIAN) -> PrivacyLedger:
        """Return a new ledger with ``steps`` more steps at ``(noise_multiplier, sampling_rate)`` of
        ``mechanism`` (default the continuous Gaussian; secure mode records ``DISCRETE_GAUSSIAN``)."""
        fn = "PrivacyLedger.step"
        check_nonnegative(fn, "noise_multiplier", noise_multiplier)  # finite: a ledger records real steps
        check_probability(fn, "sampling_rate", sampling_rate)
        steps = check_int_range(fn, "steps", steps, low=0)
        mechanism = check_enum(fn, "mechanism", mechanism, Mechanism)
        if steps == 0:
            return self
        sigma, q = float(noise_multiplier), float(sampling_rate)
        if self.phases:
            last = self.phases[-1]
            if (last.noise_multiplier, last.sampling_rate, last.mechanism) == (sigma, q, mechanism):
                return PrivacyLedger(self.phases[:-1] + (Phase(sigma, q, last.steps + steps, mechanism),))
        return PrivacyLedger(self.phases + (Phase(sigma, q, steps, mechanism),))

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)

    def to_event(self):
        """The composed privacy event of this ledger (see :func:`ledger_to_event`)."""
        return ledger_to_event(self)

    def to_dict(self) -> dict:
        """A JSON-friendly form (for checkpoints and run folders): ``[σ, q, steps]`` per Gaussian phase
        (the format of earlier versions), ``[σ, q, steps, mechanism]`` for any other mechanism — which an
        older dpfunc refuses to read rather than account as a Gaussian."""
        return {"phases": [[p.noise_multiplier, p.sampling_rate, p.steps]
                           + ([] if p.mechanism is Mechanism.GAUSSIAN else [p.mechanism.value]) for p in self.phases]}

    @classmethod
    def from_dict(cls, data: dict) -> PrivacyLedger:
        """Inverse of :meth:`to_dict` (a three-element phase is a Gaussian phase)."""
        try:
            phases = []
            for entry in data["phases"]:
                if len(entry) not in (3, 4):
                    raise ValueError(f"a phase is [σ, q, steps] or [σ, q, steps, mechanism], got {entry!r}")
                mechanism = Mechanism(entry[3]) if len(entry) == 4 else Mechanism.GAUSSIAN
                phases.append(Phase(float(entry[0]), float(entry[1]), _as_int(entry[2]), mechanism))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"PrivacyLedger.from_dict: malformed ledger {data!r}: {e}") from e
        return cls(tuple(phases))

    def with_mechanism(self, mechanism: Mechanism) -> PrivacyLedger:
        """The same phases, all recorded as ``mechanism``.

        For ledgers written before phases recorded their mechanism: a secure-mode run's old checkpoint
        holds discrete-Gaussian steps tagged as Gaussian; ``ledger.with_mechanism(DISCRETE_GAUSSIAN)``
        restores what was released (``dpfunc train`` does this when it reads a secure run).

        Example:
            >>> PrivacyLedger().step(1.1, 0.01, 3).with_mechanism("discrete_gaussian").phases[0].mechanism
            <Mechanism.DISCRETE_GAUSSIAN: 'discrete_gaussian'>
        """
        mechanism = check_enum("PrivacyLedger.with_mechanism", "mechanism", mechanism, Mechanism)
        out = PrivacyLedger()
        for p in self.phases:
            out = out.step(p.noise_multiplier, p.sampling_rate, p.steps, mechanism=mechanism)
        return out


def _as_int(value) -> int:
    """An integral step count from JSON (``3`` or ``3.0``); anything else is refused, never truncated."""
    if isinstance(value, bool) or float(value) != int(value):
        raise ValueError(f"steps must be an integer, got {value!r}")
    return int(value)


def phase_event(phase: Phase):
    """``SelfComposedEvent(PoissonSampledEvent(q, GaussianEvent(σ) or DiscreteGaussianEvent(σ)), steps)``
    (a phase with q = 1 is the unsampled mechanism, sampled with probability 1)."""
    from dpfunc.accounting.events import DiscreteGaussianEvent, GaussianEvent, PoissonSampledEvent, SelfComposedEvent

    inner = (DiscreteGaussianEvent if phase.mechanism is Mechanism.DISCRETE_GAUSSIAN else GaussianEvent)(phase.noise_multiplier)
    return SelfComposedEvent(PoissonSampledEvent(phase.sampling_rate, inner), phase.steps)


def ledger_to_event(ledger: PrivacyLedger):
    """``ComposedEvent`` of :func:`phase_event` of every phase."""
    from dpfunc.accounting.events import ComposedEvent

    return ComposedEvent(tuple(phase_event(p) for p in ledger.phases))
