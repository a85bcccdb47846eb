"""Gaussian-DP (μ-GDP) accounting by the central limit theorem — an APPROXIMATION, not a bound.

Formal guarantees:
    None for subsampled mechanisms. The CLT of Dong, Roth, Su 2019 (Thm. 3.5 / Cor. 5.4) says the
    composition of T subsampled Gaussian steps converges to μ-GDP as T → ∞ with q√T fixed; at finite T
    the true tradeoff curve can be *worse*, so ε from μ can under-estimate the real ε (see Gopi et al.
    2021, Fig. 1). Every ε stated from GDP therefore emits a ``UserWarning``. For the plain Gaussian
    (q = 1) the result is exact: T steps of σ are ``√T/σ``-GDP.

* Poisson sampling:  ``μ = q·sqrt(T·(e^{1/σ²} - 1))`` (Bu, Dong, Long, Su 2020, Eq. 6).
* Uniform (fixed-size) sampling:
  ``μ = √2·q·sqrt(T·(e^{1/σ²}·Φ(1.5/σ) + 3·Φ(-0.5/σ) - 2))`` (ibid., Eq. 5; as in TF Privacy's
  ``compute_mu_uniform``), with σ halved under replace-one (sensitivity 2C, see ``events``).

Published values: Bu et al. 2020, Fig. 4 report μ_CLT = 1.78, ε = 8.68 (δ = 1e-5) at epoch 70 for
q = 256/60000. That μ is for their *CLT-equivalent* noise σ̃ = 0.638, not σ = 0.7 (σ = 0.7 gives
μ = 1.41, ε ≈ 6.57): they matched σ̃ so that the CLT and the moments accountant at σ = 0.7 agree.
* Composition: ``μ = sqrt(Σ μ_i²)``. μ-GDP ⇒ (ε, δ(ε))-DP with
  ``δ(ε) = Φ(-ε/μ + μ/2) - e^ε·Φ(-ε/μ - μ/2)`` (Dong, Roth, Su 2019, Cor. 2.13); ε(δ) by bisection.

References:
    J. Dong, A. Roth, W. Su. Gaussian Differential Privacy, JRSS-B 2022 (arXiv:1905.02383, 2019).
    Z. Bu, J. Dong, Q. Long, W. Su. Deep Learning with Gaussian Differential Privacy, HDSR 2020.
"""

from __future__ import annotations

import math
import warnings

from dpfunc.accounting._special import log_ndtr_scalar
from dpfunc.accounting.events import DiscreteGaussianAtom, Neighboring, PoissonAtom, as_atom, check_sampling_neighboring

__all__ = ["gdp_mu", "gdp_delta", "gdp_epsilon", "GDP_WARNING"]

GDP_WARNING = (
    "GDP (central limit theorem) is an approximation, not an upper bound: it can under-estimate ε. "
    "Use method='pld' (default) or 'rdp' to state a guarantee."
)


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def gdp_mu(atoms: tuple, neighboring: Neighboring = Neighboring.ADD_OR_REMOVE_ONE) -> float:
    """The (CLT) μ of a composition given as canonical atoms; ``math.inf`` if some σ = 0."""
    total = 0.0
    for atom in map(as_atom, atoms):
        if isinstance(atom, DiscreteGaussianAtom):
            raise ValueError("gdp: the discrete Gaussian (secure mode) is not accounted by the GDP approximation; "
                             "use method='rdp' (dpfunc.accounting.discrete_gaussian)")
        count, sigma = atom.count, atom.noise_multiplier
        if count == 0 or math.isinf(sigma):
            continue
        if neighboring is Neighboring.REPLACE_ONE:
            sigma = sigma / 2.0
        if sigma == 0:
            return math.inf
        if isinstance(atom, PoissonAtom):
            q = atom.sampling_rate
            if q == 1.0:
                total += count / sigma**2
                continue
            check_sampling_neighboring("gdp", "poisson", neighboring, q)
            inner = math.expm1(min(1 / sigma**2, 700.0))
        else:
            check_sampling_neighboring("gdp", "wor", neighboring)
            q = atom.sample_size / atom.population_size
            inner = 2 * (math.exp(min(1 / sigma**2, 700.0)) * _phi(1.5 / sigma) + 3 * _phi(-0.5 / sigma) - 2)
        total += q * q * count * inner
    return math.sqrt(total)


def gdp_delta(mu: float, epsilon: float, *, warn: bool = True) -> float:
    """δ(ε) of μ-GDP: ``Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2)`` (warns: approximate for subsampling)."""
    if warn:
        warnings.warn(GDP_WARNING, UserWarning, stacklevel=2)
    if mu == 0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    a = log_ndtr_scalar(-epsilon / mu + mu / 2)
    b = epsilon + log_ndtr_scalar(-epsilon / mu - mu / 2)
    if b >= a:
        return 0.0
    return min(1.0, math.exp(a) * -math.expm1(b - a))


def gdp_epsilon(mu: float, delta: float, *, warn: bool = True) -> float:
    """Smallest ε ≥ 0 with δ(ε) ≤ ``delta`` for μ-GDP, by bracketing and bisection (warns)."""
    if warn:
        warnings.warn(GDP_WARNING, UserWarning, stacklevel=2)
    if mu == 0:
        return 0.0
    if math.isinf(mu):
        return math.inf
    if gdp_delta(mu, 0.0, warn=False) <= delta:
        return 0.0
    lo, hi = 0.0, max(1.0, mu * mu)
    while gdp_delta(mu, hi, warn=False) > delta:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if gdp_delta(mu, mid, warn=False) > delta:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return hi
