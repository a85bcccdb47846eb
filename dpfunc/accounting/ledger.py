"""The privacy ledger: an immutable record of the mechanisms a training run has applied.

The ledger travels with the training state; the privacy claim of a run is a pure function of it.
Consecutive steps with the same ``(noise_multiplier, sampling_rate)`` are stored as one phase, so a
ledger of a million steps is a handful of numbers, and heterogeneous training (σ or q changing mid
run) is recorded exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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
        _check_noise_multiplier("Phase", self.noise_multiplier)
        _check_sampling_rate("Phase", self.sampling_rate)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"Phase: steps must be an int >= 0, got {self.steps!r}")


def _check_noise_multiplier(fn: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{fn}: noise_multiplier must be a finite number >= 0, got {value!r}")


def _check_sampling_rate(fn: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0 < value <= 1):
        raise ValueError(f"{fn}: sampling_rate must be in (0, 1], got {value!r}")


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
        _check_noise_multiplier("PrivacyLedger.step", noise_multiplier)
        _check_sampling_rate("PrivacyLedger.step", sampling_rate)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"PrivacyLedger.step: steps must be an int >= 0, got {steps!r}")
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
            phases = tuple(Phase(float(s), float(q), int(t)) for s, q, t in data["phases"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"PrivacyLedger.from_dict: malformed ledger {data!r}: {e}") from e
        return cls(phases)


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
