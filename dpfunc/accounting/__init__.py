"""Privacy accounting: events, RDP, PLD, GDP, calibration, budgets and the ledger.

Pure functions of immutable values: a :class:`PrivacyLedger` (or any privacy event) goes in, an ε or δ
comes out. ``PLD()`` (default) and ``RDP()`` give upper bounds; ``GDP()`` is an approximation and warns.
The legacy strings ``method="pld" | "rdp" | "gdp"`` (with keyword options) still work.

Example:
    >>> from dpfunc.accounting import PrivacyLedger, epsilon
    >>> ledger = PrivacyLedger().step(1.1, 256 / 60000, steps=14062)
    >>> round(epsilon(ledger, 1e-5), 2)  # PLD upper bound
    2.38
    >>> round(epsilon(ledger, 1e-5, RDP()), 2)  # typed options; method="rdp" is the same
    2.6
"""

from dpfunc.accounting.api import EpsilonReport, METHODS, as_event, delta, dpsgd_epsilon, epsilon, epsilon_report
from dpfunc.accounting.budget import PrivacyBudget, PrivacyBudgetExceededError
from dpfunc.accounting.calibration import CalibrationWarning, noise_multiplier_for, sampling_rate_for, steps_for
from dpfunc.accounting.events import (
    ComposedEvent,
    DiscreteGaussianAtom,
    DiscreteGaussianEvent,
    Event,
    GaussianEvent,
    Mechanism,
    Neighboring,
    PoissonSampledEvent,
    SampledWithoutReplacementEvent,
    SelfComposedEvent,
    Atom,
    PoissonAtom,
    WorAtom,
)
from dpfunc.accounting.methods import GDP, PLD, RDP, Conversion, Method
from dpfunc.accounting.gdp import gdp_delta, gdp_epsilon, gdp_mu
from dpfunc.accounting.ledger import Phase, PrivacyLedger, ledger_to_event
from dpfunc.accounting.pld import PldBounds, pld_delta, pld_epsilon
from dpfunc.accounting.rdp import (
    DEFAULT_ORDERS,
    TF_PRIVACY_ORDERS,
    rdp_poisson_gaussian,
    rdp_to_delta,
    rdp_to_epsilon,
    rdp_wor_gaussian,
)

__all__ = [
    # ledger and events
    "Phase",
    "PrivacyLedger",
    "ledger_to_event",
    "Mechanism",
    "Neighboring",
    "Event",
    "GaussianEvent",
    "DiscreteGaussianEvent",
    "PoissonSampledEvent",
    "SampledWithoutReplacementEvent",
    "SelfComposedEvent",
    "ComposedEvent",
    "as_event",
    "Atom",
    "PoissonAtom",
    "DiscreteGaussianAtom",
    "WorAtom",
    # accountant options (typed; the strings "pld"/"rdp"/"gdp" still work)
    "PLD",
    "RDP",
    "GDP",
    "Method",
    "Conversion",
    # the pure API
    "epsilon",
    "epsilon_report",
    "EpsilonReport",
    "delta",
    "dpsgd_epsilon",
    "METHODS",
    # calibration and budgets
    "noise_multiplier_for",
    "steps_for",
    "sampling_rate_for",
    "CalibrationWarning",
    "PrivacyBudget",
    "PrivacyBudgetExceededError",
    # accountants (lower level)
    "DEFAULT_ORDERS",
    "TF_PRIVACY_ORDERS",
    "rdp_poisson_gaussian",
    "rdp_wor_gaussian",
    "rdp_to_epsilon",
    "rdp_to_delta",
    "pld_epsilon",
    "pld_delta",
    "PldBounds",
    "gdp_mu",
    "gdp_epsilon",
    "gdp_delta",
]
