"""The one-run ε lower bound of Steinke, Nasr & Jagielski (NeurIPS 2023), as pure functions.

The experiment: ``m`` canaries, each included in the training data independently with probability
½ (``S_i ∈ {in, out}``); one training run; a score per canary; the auditor guesses "in" for the ``k``
highest scores and abstains on the rest. Their theorem: if training is (ε, δ)-DP, the number ``W`` of
correct guesses among ``r = k`` guesses satisfies, for every ``v``,

    P[W ≥ v] ≤ β(ε) + 2mδ · max_{1 ≤ i ≤ v} (P[Bin(r, p) ≥ v − i] − β(ε)) / i,
    β(ε) = P[Bin(r, p) ≥ v],  p = e^ε / (1 + e^ε) = sigmoid(ε).

So observing ``v`` correct guesses rejects "(ε, δ)-DP" at confidence ``1 − α`` when that bound is
≤ α; the lower bound is the largest such ε. It is valid for ONE run of training (no retraining),
at the price of being loose: it is a lower bound, never an estimate of the true ε.

Several guess counts may be tried; each is charged ``α / (number tried)`` (Bonferroni), so choosing
the best after seeing the scores keeps the stated confidence.

References:
    T. Steinke, M. Nasr, M. Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023
    (arXiv:2305.08846), their main theorem with its δ correction (the 2mδ term above); jax_privacy's
    ``auditing.py`` (``_one_run_p_value``) implements the same bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from dpfunc._validate import check_delta, check_int_range, check_nonnegative, check_number

__all__ = ["binomial_tail", "one_run_p_value", "epsilon_lower_bound", "OneRunAudit", "audit_scores"]


def _tails(n: int, p: float) -> np.ndarray:
    """``t[k] = P[Bin(n, p) ≥ k]`` for ``k = 0 .. n + 1`` (pmf from log-gamma, summed from the top)."""
    out = np.zeros(n + 2)
    if p <= 0.0:
        out[0] = 1.0
        return out
    if p >= 1.0:
        out[: n + 1] = 1.0
        return out
    j = torch.arange(n + 1, dtype=torch.float64)
    logpmf = (torch.lgamma(torch.tensor(n + 1.0, dtype=torch.float64)) - torch.lgamma(j + 1) - torch.lgamma(n - j + 1)
              + j * math.log(p) + (n - j) * math.log1p(-p))
    pmf = torch.exp(logpmf).numpy()
    out[: n + 1] = np.cumsum(pmf[::-1])[::-1]
    return np.minimum(out, 1.0)


def binomial_tail(k: int, n: int, p: float) -> float:
    """``P[Bin(n, p) ≥ k]`` (float64; the tests compare it with ``scipy.stats.binom.sf``)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    return float(_tails(n, p)[k])


def one_run_p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The bound above on ``P[W ≥ correct]`` under (ε, δ)-DP (a p-value for rejecting the claim).

    Args:
        m: number of canaries (enters through the ``2mδ`` term).
        guesses: ``r``, guesses made; correct: ``v``, how many were right.
        epsilon: ε ≥ 0 of the claim being tested; delta: δ ∈ [0, 1).
    """
    fn = "one_run_p_value"
    check_int_range(fn, "m", m, low=1)
    check_int_range(fn, "guesses", guesses, low=0, high=m)
    check_int_range(fn, "correct", correct, low=0, high=guesses)
    check_nonnegative(fn, "epsilon", epsilon)
    check_number(fn, "delta", delta, low=0.0, high=1.0, high_open=True)
    if correct == 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-epsilon))
    tails = _tails(guesses, p)
    beta = float(tails[correct])
    if delta == 0.0:
        return beta
    i = np.arange(1, correct + 1)
    alpha = float(np.max((tails[correct - i] - beta) / i))
    return min(1.0, beta + 2.0 * m * delta * max(alpha, 0.0))


def epsilon_lower_bound(m: int, guesses: int, correct: int, *, delta: float, confidence: float = 0.95,
                        tolerance: float = 1e-6) -> float:
    """The largest ε whose (ε, δ)-DP claim ``correct`` out of ``guesses`` rejects at ``confidence``.

    Returns 0 when not even ε = 0 is rejected. The p-value grows with ε, so bisection finds it.

    Example:
        >>> round(epsilon_lower_bound(1000, 100, 100, delta=0.0), 3)   # logit(0.05 ** (1/100))
        3.493
    """
    fn = "epsilon_lower_bound"
    check_number(fn, "confidence", confidence, low=0.0, high=1.0, low_open=True, high_open=True)
    check_number(fn, "delta", delta, low=0.0, high=1.0, high_open=True)
    alpha = 1.0 - confidence
    if one_run_p_value(m, guesses, correct, 0.0, delta) > alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(m, guesses, correct, hi, delta) <= alpha:
        lo, hi = hi, 2.0 * hi
        if hi > 1e4:  # every claim rejected: only possible with all guesses right and tiny δ·m
            return math.inf
    while hi - lo > tolerance:
        mid = 0.5 * (lo + hi)
        if one_run_p_value(m, guesses, correct, mid, delta) <= alpha:
            lo = mid
        else:
            hi = mid
    return lo


class OneRunAudit(NamedTuple):
    """Result of :func:`audit_scores`.

    Attributes:
        epsilon_lower_bound: the best bound over the guess counts tried (each at ``α / len(guess_counts)``).
        guesses: the guess count that gave it; correct: how many of those guesses were right.
        m: canaries; confidence: the stated confidence (after Bonferroni).
        per_guess_count: ``{k: (correct, bound)}`` for every guess count tried.
    """

    epsilon_lower_bound: float
    guesses: int
    correct: int
    m: int
    confidence: float
    per_guess_count: dict


def audit_scores(scores: Sequence[float], included: Sequence[bool], *, delta: float, confidence: float = 0.95,
                 guess_counts: Sequence[int] | None = None) -> OneRunAudit:
    """ε lower bound from canary scores (higher score = more likely included).

    Args:
        scores: ``(m,)`` one score per canary.
        included: ``(m,)`` which canaries were in the training data (the auditor's secret coin flips).
        delta: the δ of the claim being audited.
        confidence: overall confidence, split evenly over ``guess_counts``.
        guess_counts: numbers ``k`` of top-scored canaries to guess "in"; default
            ``{m/50, m/20, m/10, m/5}`` (at least 1 each).
    """
    fn = "audit_scores"
    s = np.asarray(scores, dtype=np.float64)
    inc = np.asarray(included, dtype=bool)
    if s.ndim != 1 or inc.shape != s.shape or s.size == 0:
        raise ValueError(f"{fn}: scores and included must be two non-empty 1-d sequences of one length, got {s.shape} and {inc.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{fn}: scores must be finite (got NaN or inf)")
    check_delta(fn, "delta", delta)
    m = s.size
    if guess_counts is None:
        guess_counts = sorted({max(1, m // d) for d in (50, 20, 10, 5)})
    ks = [check_int_range(fn, "guess_counts[i]", k, low=1, high=m) for k in guess_counts]
    if not ks:
        raise ValueError(f"{fn}: guess_counts must not be empty")
    per_conf = 1.0 - (1.0 - confidence) / len(ks)
    order = np.argsort(-s, kind="stable")
    table, best = {}, (0.0, ks[0], int(inc[order[: ks[0]]].sum()))
    for k in ks:
        correct = int(inc[order[:k]].sum())
        eps = epsilon_lower_bound(m, k, correct, delta=delta, confidence=per_conf)
        table[k] = (correct, eps)
        if eps > best[0]:
            best = (eps, k, correct)
    return OneRunAudit(best[0], best[1], best[2], m, confidence, table)
