"""Independent oracles for the PLD accountant (scipy/mpmath are used here only, as oracles).

* q = 1: the exact ε of the (T-fold) Gaussian mechanism, Balle & Wang 2018 (analytic Gaussian).
* q < 1, T = 1, 2, 3: the hockey-stick divergence of the subsampled Gaussian pair by direct numerical
  integration — T = 1 by adaptive quadrature of (P - e^ε Q)_+, T = 2 by quadrature over x_1 of the
  exact one-step δ, T = 3 by a trapezoid rule on the (x_1, x_2) product grid of the exact one-step δ.
"""

import math

import mpmath
import numpy as np
import pytest
from scipy import integrate, special

from dpfunc.accounting import (
    GaussianEvent,
    PoissonSampledEvent,
    SelfComposedEvent,
    delta,
    epsilon_report,
)
from dpfunc.accounting.events import atoms
from dpfunc.accounting.pld import pld_delta


def _analytic_gaussian_delta(eps, s):
    """δ(ε) of the Gaussian mechanism with sensitivity 1 and noise s (Balle & Wang 2018, Thm. 8)."""
    mpmath.mp.dps = 40
    eps, s = mpmath.mpf(eps), mpmath.mpf(s)
    return mpmath.ncdf(1 / (2 * s) - eps * s) - mpmath.exp(eps) * mpmath.ncdf(-1 / (2 * s) - eps * s)


def _analytic_gaussian_epsilon(d, s):
    lo, hi = mpmath.mpf(0), mpmath.mpf(200)
    for _ in range(200):
        mid = (lo + hi) / 2
        if _analytic_gaussian_delta(mid, s) > d:
            lo = mid
        else:
            hi = mid
    return float(hi)


@pytest.mark.parametrize("sigma,steps,d", [(1.0, 1, 1e-5), (0.5, 1, 1e-6), (3.0, 50, 1e-5), (10.0, 1000, 1e-8)])
def test_pld_matches_analytic_gaussian(sigma, steps, d):
    exact = _analytic_gaussian_epsilon(d, sigma / math.sqrt(steps))
    report = epsilon_report(SelfComposedEvent(GaussianEvent(sigma), steps), d)
    assert report.lower <= exact <= report.epsilon
    assert report.epsilon - exact < 1e-3 * max(1.0, exact)


# --- subsampled Gaussian, T = 1, 2, 3 -----------------------------------------------------------


def _loss(x, sigma, q, direction):
    s = (2 * x - 1) / (2 * sigma**2)
    mix = np.logaddexp(math.log1p(-q), math.log(q) + s)
    return mix if direction == "remove" else -mix


def _pdf(x, mean, sigma):
    return np.exp(-0.5 * ((x - mean) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))


def _p_density(x, sigma, q, direction):
    if direction == "remove":
        return (1 - q) * _pdf(x, 0, sigma) + q * _pdf(x, 1, sigma)
    return _pdf(x, 0, sigma)


def _delta1(eps, sigma, q, direction):
    """Exact one-step δ(ε) (vectorised in ε) from normal CDFs: P(L > ε) - e^ε Q(L > ε)."""
    eps = np.asarray(eps, dtype=float)
    if direction == "remove":
        # L > ε  <=>  x > x_ε ; for e^ε <= 1-q every x qualifies
        inner = np.exp(eps) - (1 - q)
        ok = inner > 0
        s = np.log(np.where(ok, inner, 1.0) / q)
        x = sigma**2 * s + 0.5
        p_tail = (1 - q) * special.ndtr(-x / sigma) + q * special.ndtr(-(x - 1) / sigma)
        q_tail = special.ndtr(-x / sigma)
        val = p_tail - np.exp(eps) * q_tail
        return np.where(ok, np.maximum(val, 0.0), -np.expm1(eps))
    inner = np.exp(-eps) - (1 - q)  # add: L > ε  <=>  x < x_ε (needs e^-ε > 1-q)
    ok = inner > 0
    s = np.log(np.where(ok, inner, 1.0) / q)
    x = sigma**2 * s + 0.5
    p_tail = special.ndtr(x / sigma)
    q_tail = (1 - q) * special.ndtr(x / sigma) + q * special.ndtr((x - 1) / sigma)
    val = p_tail - np.exp(eps) * q_tail
    return np.where(ok, np.maximum(val, 0.0), 0.0)


def _oracle_delta(eps, sigma, q, steps, direction):
    lo, hi = -14 * sigma, 1 + 14 * sigma
    if steps == 1:
        f = lambda x: max(0.0, _p_density(x, sigma, q, direction) - math.exp(eps) * _q_density(x, sigma, q, direction))
        return integrate.quad(f, lo, hi, limit=400, epsabs=1e-16, epsrel=1e-11, points=[0.0, 0.5, 1.0])[0]
    if steps == 2:
        g = lambda x: _p_density(x, sigma, q, direction) * float(_delta1(eps - _loss(x, sigma, q, direction), sigma, q, direction))
        return integrate.quad(g, lo, hi, limit=400, epsabs=1e-16, epsrel=1e-11, points=[0.0, 0.5, 1.0])[0]
    x = np.linspace(lo, hi, 1201)
    w = np.full_like(x, x[1] - x[0])
    w[[0, -1]] /= 2
    px = _p_density(x, sigma, q, direction) * w
    lx = _loss(x, sigma, q, direction)
    return float(px @ _delta1(eps - lx[:, None] - lx[None, :], sigma, q, direction) @ px)


def _q_density(x, sigma, q, direction):
    if direction == "add":
        return (1 - q) * _pdf(x, 0, sigma) + q * _pdf(x, 1, sigma)
    return _pdf(x, 0, sigma)


def test_oracle_one_step_closed_form_agrees_with_quadrature():
    for direction in ("remove", "add"):
        for eps in (0.1, 0.5, 1.5):
            quad = _oracle_delta(eps, 1.0, 0.2, 1, direction)
            assert float(_delta1(eps, 1.0, 0.2, direction)) == pytest.approx(quad, rel=1e-8, abs=1e-15)


@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("sigma,q", [(1.0, 0.2), (0.8, 0.5)])
def test_pld_upper_never_below_brute_force(steps, sigma, q):
    event = SelfComposedEvent(PoissonSampledEvent(q, GaussianEvent(sigma)), steps)
    for eps in (0.25, 1.0, 2.5):
        exact = max(_oracle_delta(eps, sigma, q, steps, d) for d in ("remove", "add"))
        if exact < 1e-13:
            continue
        for h in (None, 1e-2):  # default grid and a coarse one: both must stay above the oracle
            bounds = pld_delta(atoms(event), eps, value_discretization_interval=h)
            assert bounds.upper >= exact * (1 - 1e-7), (eps, h, bounds, exact)
            assert bounds.lower <= exact * (1 + 1e-7)
        assert delta(event, eps) == pytest.approx(exact, rel=2e-3)  # and tight on the default grid
