"""The privacy ledger: an immutable record of the mechanisms a training run has applied.

The ledger travels with the training state; the privacy claim of a run is a pure function of it.
Consecutive steps with the same ``(noise_multiplier, sampling_rate)`` are stored as one phase, so a
ledger of a million steps is a handful of numbers, and heterogeneous training (σ or q changing mid
run) is recorded exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dpfunc._validate import check_int_range, check_nonnegative, check_probability

__all__ = ["Phase", "PrivacyLedger", "ledger_to_event"]


@dataclass(frozen=True)
class Phase:
    """``steps`` applications of the Poisson-subsampled Gaussian mechanism.

    Attributes:
        noise_multiplier: σ, the noise standard deviation divided by the sensitivity (≥ 0).
        sampling_rate: q, the probability that an example is in a batch, in (0, 1].
        steps: how many times the mechanism was applied (≥ 0).
    """

    noise_multiplier: float
    sampling_rate: float
    steps: int

    def __post_init__(self) -> None:
        check_nonnegative("Phase", "noise_multiplier", self.noise_multiplier)
        check_probability("Phase", "sampling_rate", self.sampling_rate)
        check_int_range("Phase", "steps", self.steps, low=0)


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

    def step(self, noise_multiplier: float, sampling_rate: float, steps: int = 1) -> PrivacyLedger:
        """Return a new ledger with ``steps`` more steps at ``(noise_multiplier, sampling_rate)``."""
        fn = "PrivacyLedger.step"
        check_nonnegative(fn, "noise_multiplier", noise_multiplier)  # finite: a ledger records real steps
        check_probability(fn, "sampling_rate", sampling_rate)
        steps = check_int_range(fn, "steps", steps, low=0)
        if steps == 0:
            return self
        sigma, q = float(noise_multiplier), float(sampling_rate)
        if self.phases and (self.phases[-1].noise_multiplier, self.phases[-1].sampling_rate) == (sigma, q):
            last = self.phases[-1]
            return PrivacyLedger(self.phases[:-1] + (Phase(sigma, q, last.steps + steps),))
        return PrivacyLedger(self.phases + (Phase(sigma, q, steps),))

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)

    def to_event(self):
        """The composed privacy event of this ledger (see :func:`ledger_to_event`)."""
        return ledger_to_event(self)

    def to_dict(self) -> dict:
        """A JSON-friendly form (for checkpoints and run folders)."""
        return {"phases": [[p.noise_multiplier, p.sampling_rate, p.steps] for p in self.phases]}

    @classmethod
    def from_dict(cls, data: dict) -> PrivacyLedger:
        try:
            phases = tuple(Phase(float(s), float(q), _as_int(t)) for s, q, t in data["phases"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"PrivacyLedger.from_dict: malformed ledger {data!r}: {e}") from e
        return cls(phases)


def _as_int(value) -> int:
    """An integral step count from JSON (``3`` or ``3.0``); anything else is refused, never truncated."""
    if isinstance(value, bool) or float(value) != int(value):
        raise ValueError(f"steps must be an integer, got {value!r}")
    return int(value)


def ledger_to_event(ledger: PrivacyLedger):
    """``ComposedEvent`` of one ``SelfComposedEvent(PoissonSampledEvent(q, GaussianEvent(σ)), steps)``
    per phase (a phase with q = 1 is the plain Gaussian mechanism, sampled with probability 1)."""
    from dpfunc.accounting.events import ComposedEvent, GaussianEvent, PoissonSampledEvent, SelfComposedEvent

    return ComposedEvent(
        tuple(
            SelfComposedEvent(PoissonSampledEvent(p.sampling_rate, GaussianEvent(p.noise_multiplier)), p.steps)
            for p in ledger.phases
        )
    )
