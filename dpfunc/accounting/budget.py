"""Opt-in privacy budget guard, checked before every training step.

``PrivacyBudget(epsilon, delta).check(ledger)`` raises :class:`PrivacyBudgetExceededError` when the
ledger (the one the next step *would* produce) spends more than the budget. It is called once per
step, so it must be cheap: for a ledger ``(phase_1, …, phase_k)`` it caches — keyed on the hashable
previous phases and the last phase's ``(σ, q)`` — the largest step count ``T*`` of the last phase
whose exact ε (by the budget's method) is within budget, found once by an exact integer search
(:func:`steps_for`-style). Every later check is an integer comparison; the exact accountant runs again
only when a step crosses the boundary (to report the spent ε) or when σ or q change.

Formal guarantees:
    ``check`` passes iff the ledger's ε by ``method`` is ≤ ``epsilon`` at ``delta`` (ε is monotone in
    the step count; the boundary itself, ``T*``, was evaluated exactly). For PLD, ledgers within the RDP
    boundary (RDP's ε is above PLD's) pass without running PLD at all; the PLD search runs once, when
    a ledger first passes the RDP boundary. With ``method="gdp"`` the
    guard is only approximate (and warns).

Example:
    >>> budget = PrivacyBudget(epsilon=3.0, delta=1e-5)
    >>> ledger = PrivacyLedger().step(1.1, 256 / 60000, steps=1000)
    >>> budget.check(ledger)  # fine: ε ≈ 0.6
    >>> budget.remaining_steps(ledger, 1.1, 256 / 60000) > 0
    True
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from dpfunc._validate import check_positive_finite
from dpfunc.accounting.api import _check_delta, _check_method, epsilon as _epsilon
from dpfunc.accounting.methods import PLD
from dpfunc.accounting.calibration import largest_feasible
from dpfunc.accounting.events import ComposedEvent, Mechanism, Neighboring
from dpfunc.accounting.ledger import Phase, PrivacyLedger, ledger_to_event, phase_event

__all__ = ["PrivacyBudget", "PrivacyBudgetExceededError"]



class PrivacyBudgetExceededError(RuntimeError):
    """A step would spend more privacy than the budget allows.

    Attributes:
        spent_epsilon: ε of the offending ledger; allowed_epsilon, delta: the budget.
    """

    def __init__(self, spent_epsilon: float, allowed_epsilon: float, delta: float, method: str, steps: int):
        self.spent_epsilon, self.allowed_epsilon, self.delta = spent_epsilon, allowed_epsilon, delta
        super().__init__(
            f"PrivacyBudget.check: the ledger of {steps} steps spends ε={spent_epsilon:.6g} > allowed "
            f"ε={allowed_epsilon:.6g} at δ={delta:g} (method={method!r}); stop training, or raise the noise "
            "multiplier / lower the sampling rate (see dpfunc.accounting.noise_multiplier_for)"
        )


def _uses_pld(method: object, prefix: tuple, mechanism: Mechanism) -> bool:
    """Whether ``method`` accounts this ledger with PLD (a discrete-Gaussian phase makes the default RDP)."""
    discrete = mechanism is Mechanism.DISCRETE_GAUSSIAN or any(p.mechanism is Mechanism.DISCRETE_GAUSSIAN for p in prefix)
    return not discrete and isinstance(_check_method("PrivacyBudget", method, {}), PLD)


@functools.lru_cache(maxsize=256)
def _max_last_steps(eps: float, delta: float, method: object, neighboring: Neighboring, prefix: tuple,
                    sigma: float, q: float, mechanism: Mechanism = Mechanism.GAUSSIAN) -> int:
    """Largest T with ε(prefix + T steps at (σ, q) of ``mechanism``) ≤ eps by ``method``; -1 if even T = 0
    exceeds it.

    For PLD the search starts from the RDP answer (RDP's ε is above PLD's, so it is feasible)."""

    def eps_of(t: int) -> float:
        event = ComposedEvent(tuple(phase_event(p) for p in prefix) + (phase_event(Phase(sigma, q, t, mechanism)),))
        return _epsilon(event, delta, method, neighboring=neighboring)

    if _uses_pld(method, prefix, mechanism):
        lo = _max_last_steps(eps, delta, "rdp", neighboring, prefix, sigma, q, mechanism)
        if lo < 1 or eps_of(lo) > eps:  # defensive: never trust the guess
            lo = 0
    else:
        lo = 0
    if lo == 0:
        if eps_of(0) > eps:
            return -1
        if eps_of(1) > eps:
            return 0
        lo = 1
    return largest_feasible(eps_of, eps, lo, max(lo + 1, int(lo * 1.25)))


@dataclass(frozen=True)
class PrivacyBudget:
    """An (ε, δ) budget and the accountant that enforces it.

    Attributes:
        epsilon: allowed ε (> 0).
        delta: δ in (0, 1).
        method: "pld", "rdp" or "gdp", a :class:`Method`, or an option object; ``None`` (default): PLD, or
            RDP for a ledger with discrete-Gaussian (secure mode) phases (see :func:`dpfunc.epsilon`).
        neighboring: the neighbouring relation (default add-or-remove-one).
    """

    epsilon: float
    delta: float
    method: object = None  # None (auto), "pld"/"rdp"/"gdp", a Method, or PLD(...)/RDP(...)/GDP()
    neighboring: Neighboring = Neighboring.ADD_OR_REMOVE_ONE

    def __post_init__(self) -> None:
        check_positive_finite("PrivacyBudget", "epsilon", self.epsilon)
        _check_delta("PrivacyBudget", self.delta)
        _check_method("PrivacyBudget", self.method, {})  # a string, a Method or an option object
        if not isinstance(self.neighboring, Neighboring):
            raise ValueError(f"PrivacyBudget: neighboring must be a Neighboring, got {self.neighboring!r}")

    def _max_steps(self, prefix: tuple, sigma: float, q: float, method: str = "",
                   mechanism: Mechanism = Mechanism.GAUSSIAN) -> int:
        return _max_last_steps(float(self.epsilon), float(self.delta), method or self.method, self.neighboring,
                               prefix, float(sigma), float(q), mechanism)

    def spent(self, ledger: PrivacyLedger) -> float:
        """ε of ``ledger`` by the budget's method at the budget's δ (exact, not cached)."""
        return _epsilon(ledger_to_event(ledger), self.delta, self.method, neighboring=self.neighboring)

    def check(self, ledger: PrivacyLedger) -> None:
        """Raise :class:`PrivacyBudgetExceededError` if ``ledger`` spends more than the budget.

        Cheap when called every step (an integer comparison after the first call per phase).
        """
        if not isinstance(ledger, PrivacyLedger):
            raise ValueError(f"PrivacyBudget.check: expected a PrivacyLedger, got {type(ledger).__name__}")
        if not ledger.phases:
            return
        last = ledger.phases[-1]
        prefix, sigma, q, mech = ledger.phases[:-1], last.noise_multiplier, last.sampling_rate, last.mechanism
        # Fast path: within the (cheap, cached) RDP boundary, PLD is within budget too.
        if _uses_pld(self.method, prefix, mech) and last.steps <= self._max_steps(prefix, sigma, q, "rdp", mech):
            return
        if last.steps <= self._max_steps(prefix, sigma, q, "", mech):
            return
        raise PrivacyBudgetExceededError(self.spent(ledger), float(self.epsilon), float(self.delta),
                                         self.method, ledger.total_steps)

    def remaining_steps(self, ledger: PrivacyLedger, noise_multiplier: float, sampling_rate: float, *,
                        mechanism: Mechanism = Mechanism.GAUSSIAN) -> int:
        """How many more steps at ``(noise_multiplier, sampling_rate)`` of ``mechanism`` fit in the budget (≥ 0)."""
        probe = ledger.step(noise_multiplier, sampling_rate, 1, mechanism=mechanism)  # validates, merges phases
        last = probe.phases[-1]
        allowed = self._max_steps(probe.phases[:-1], last.noise_multiplier, last.sampling_rate, "", last.mechanism)
        already = last.steps - 1
        return max(0, allowed - already)
