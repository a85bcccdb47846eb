"""Accounting benchmark: ε by every method on reference cases, and timings (median of several runs).

Run: ``python bench/accounting.py``. Prints a table and writes ``bench/results/accounting.json``.
Targets (issue): PLD ε for q=256/60000, σ=1.1, 14062 steps at δ=1e-5 ≤ 1 s; RDP ≤ 20 ms;
calibration to a target ε with PLD ≤ 10 s. Timings are cold (caches cleared) unless noted.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
import warnings
from pathlib import Path

from dpfunc.accounting import dpsgd_epsilon, epsilon_report, noise_multiplier_for, steps_for, TF_PRIVACY_ORDERS
from dpfunc.accounting import pld as _pld
from dpfunc.accounting import rdp as _rdp
from dpfunc.accounting.events import GaussianEvent, PoissonSampledEvent, SelfComposedEvent

Q = 256 / 60000
CASES = [
    ("tfp-mnist σ1.1", 1.1, Q, 14062, 1e-5),
    ("tfp-mnist σ1.3", 1.3, Q, 3515, 1e-5),
    ("tfp-mnist σ0.7", 0.7, Q, 10546, 1e-5),
    ("opacus-doc", 1.0, 0.01, 300, 1e-5),
    ("drs-gdp σ0.7 70ep", 0.7, Q, 16406, 1e-5),
    ("large-ε (PRV crash)", 0.5, 0.1, 10000, 1e-5),
]


def _clear() -> None:
    _pld._composed.cache_clear()
    _rdp.rdp_poisson_gaussian.cache_clear()
    _rdp._wor_int.cache_clear()


def _timed(fn, repeats: int) -> tuple:
    times, value = [], None
    for _ in range(repeats):
        _clear()
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return value, statistics.median(times)


def main() -> None:
    rows = []
    for name, sigma, q, steps, delta in CASES:
        event = SelfComposedEvent(PoissonSampledEvent(q, GaussianEvent(sigma)), steps)
        pld, t_pld = _timed(lambda: epsilon_report(event, delta), 3)
        rdp, t_rdp = _timed(lambda: epsilon_report(event, delta, "rdp"), 5)
        classic = epsilon_report(event, delta, "rdp", orders=TF_PRIVACY_ORDERS, conversion="classic").epsilon
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            gdp = epsilon_report(event, delta, "gdp").epsilon
        rows.append({
            "case": name, "sigma": sigma, "q": q, "steps": steps, "delta": delta,
            "pld_upper": pld.epsilon, "pld_lower": pld.lower, "pld_h": pld.value_discretization_interval,
            "rdp_balle2020": rdp.epsilon, "rdp_order": rdp.order, "rdp_classic_tfp_orders": classic,
            "gdp_approx": gdp, "pld_seconds": t_pld, "rdp_seconds": t_rdp,
        })
    _clear()
    t0 = time.perf_counter()
    sigma = noise_multiplier_for(2.0, 1e-5, Q, 14062)
    t_cal = time.perf_counter() - t0
    t0 = time.perf_counter()
    t_max = steps_for(2.0, 1e-5, 1.1, Q)
    t_steps = time.perf_counter() - t0
    calibration = {
        "noise_multiplier_for(2.0, 1e-5, q, 14062)": sigma, "its_epsilon": dpsgd_epsilon(sigma, Q, 14062, 1e-5),
        "seconds": t_cal, "steps_for(2.0, 1e-5, 1.1, q)": t_max, "steps_seconds": t_steps,
    }

    head = f"{'case':22s} {'PLD up':>8s} {'PLD low':>8s} {'RDP':>8s} {'(α)':>6s} {'RDPcls':>8s} {'GDP*':>8s} {'t_PLD':>7s} {'t_RDP':>7s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['case']:22s} {r['pld_upper']:8.3f} {r['pld_lower']:8.3f} {r['rdp_balle2020']:8.3f} "
              f"{r['rdp_order']:6.2f} {r['rdp_classic_tfp_orders']:8.3f} {r['gdp_approx']:8.3f} "
              f"{r['pld_seconds']:6.3f}s {1000 * r['rdp_seconds']:5.1f}ms")
    print("* GDP is a CLT approximation, not a bound. RDPcls = classic conversion on TF Privacy's orders.")
    print(f"calibration: σ = {sigma:.4f} (ε = {calibration['its_epsilon']:.4f} ≤ 2.0) in {t_cal:.2f}s; "
          f"steps_for → {t_max} in {t_steps:.2f}s")
    out = Path(__file__).parent / "results" / "accounting.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                               "rows": rows, "calibration": calibration}, indent=2,
                              default=lambda x: None if isinstance(x, float) and math.isnan(x) else x))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
