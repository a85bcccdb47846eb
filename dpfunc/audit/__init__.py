"""Empirical privacy auditing: a one-run ε lower bound (Steinke, Nasr & Jagielski, NeurIPS 2023).

* :func:`white_box_run` / :func:`black_box_run`: one DP-SGD run with gradient (Dirac) or input
  canaries, each included with probability ½; returns scores and the coin flips.
* :func:`audit_scores`: the ε lower bound at a stated confidence from those scores;
  :func:`epsilon_lower_bound` and :func:`one_run_p_value` are the theorem itself.

Formal guarantee: if the audited mechanism is (ε, δ)-DP, ``audit_scores(...).epsilon_lower_bound > ε``
happens with probability at most ``1 − confidence``. A bound above the claimed ε therefore means a
bug (or a 5% event at 95% confidence), never a tighter accountant.

Example:
    >>> from dpfunc.audit import epsilon_lower_bound
    >>> round(epsilon_lower_bound(m=1000, guesses=100, correct=100, delta=0.0), 2)
    3.49
"""

from dpfunc.audit.bound import OneRunAudit, audit_scores, binomial_tail, epsilon_lower_bound, one_run_p_value
from dpfunc.audit.canaries import CanaryRun, black_box_run, per_example_cross_entropy, white_box_run

__all__ = [
    "binomial_tail",
    "one_run_p_value",
    "epsilon_lower_bound",
    "OneRunAudit",
    "audit_scores",
    "CanaryRun",
    "white_box_run",
    "black_box_run",
    "per_example_cross_entropy",
]
