"""Application layer of the audit: one-run audit of DP-SGD on the case-study CNN (``dpfunc audit``,
``bench/audit.py``)."""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dpfunc import accounting
from dpfunc._validate import check_delta, check_enum, check_int_range, check_nonnegative, check_number, check_positive_finite
from dpfunc.audit.bound import audit_scores
from dpfunc.audit.canaries import black_box_run, white_box_run
from dpfunc.clipping import FlatClipping
from dpfunc.keys import Key
from dpfunc.private import DPConfig, dp_aggregate

__all__ = ["AuditMode", "AuditJob", "run_audit", "plot_scores"]


class AuditMode(enum.Enum):
    """White box: Dirac gradient canaries, every update observed. Black box: input canaries, final model only."""

    WHITE_BOX = "white-box"
    BLACK_BOX = "black-box"


@dataclass(frozen=True)
class AuditJob:
    """One audit: DP-SGD at ``noise_multiplier`` for ``steps`` steps of rate ``sampling_rate``.

    Attributes:
        noise_multiplier: σ of the audited run (0 audits a broken, noiseless mechanism against ``claimed_sigma``).
        steps, sampling_rate, max_grad_norm, learning_rate: the DP-SGD run (plain SGD on the private mean).
        canaries: m; mode: :class:`AuditMode`; delta, confidence: of the claim and of the bound.
        claimed_sigma: σ the ledger claims (default: ``noise_multiplier``).
        seed: root of every key.
    """

    noise_multiplier: float
    steps: int
    sampling_rate: float
    canaries: int = 1000
    mode: AuditMode = AuditMode.WHITE_BOX
    max_grad_norm: float = 1.0
    learning_rate: float = 1.0
    delta: float = 1e-5
    confidence: float = 0.95
    claimed_sigma: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        fn = "AuditJob"
        check_nonnegative(fn, "noise_multiplier", self.noise_multiplier)
        check_int_range(fn, "steps", self.steps, low=1)
        check_number(fn, "sampling_rate", self.sampling_rate, low=0.0, high=1.0, low_open=True)
        check_int_range(fn, "canaries", self.canaries, low=2)
        object.__setattr__(self, "mode", check_enum(fn, "mode", self.mode, AuditMode))
        check_positive_finite(fn, "max_grad_norm", self.max_grad_norm)
        check_positive_finite(fn, "learning_rate", self.learning_rate)
        check_delta(fn, "delta", self.delta)
        check_number(fn, "confidence", self.confidence, low=0.0, high=1.0, low_open=True, high_open=True)
        if self.claimed_sigma is not None:
            check_positive_finite(fn, "claimed_sigma", self.claimed_sigma)
        elif self.noise_multiplier == 0:
            raise ValueError(f"{fn}: noise_multiplier 0 claims ε = ∞; give claimed_sigma (the σ the broken mechanism claims)")
        check_int_range(fn, "seed", self.seed)


def run_audit(
    apply_fn: Callable,
    params: dict,
    buffers: dict,
    data: tuple[torch.Tensor, torch.Tensor],
    job: AuditJob,
    *,
    canary_pool: tuple[torch.Tensor, torch.Tensor] | None = None,
    engine: Callable | None = None,
    on_step: Callable[[int], None] | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Train once with canaries, then bound ε from below. Returns a JSON-ready dict (``epsilon_claimed``,
    ``epsilon_lower_bound``, ``m``, ``confidence``, …) plus ``"_scores"``/``"_included"`` tensors.

    ``canary_pool`` (black box): images not in ``data`` (e.g. the validation split); the first m
    are the canaries, with flipped labels so that membership moves their loss.

    ``device`` (``"auto" | "cpu" | "cuda" | "cuda:N"``; None: where ``params`` are) is where the model, the
    data, the canaries and the keyed noise live; coins and samples are drawn on the host and the scores
    come back there, so the bound is computed the same way on every device.
    """
    from dpfunc.devices import resolve_device, tree_to_device

    where = (next(iter(params.values())).device if device is None
             else resolve_device(device, fn="run_audit", name="device (--device)"))
    params, buffers, data = tree_to_device(params, where), tree_to_device(buffers, where), tree_to_device(data, where)
    canary_pool = tree_to_device(canary_pool, where)
    key = Key(job.seed)
    run_key, noise_key = key.split(2)
    n = data[0].shape[0]
    agg = dp_aggregate(DPConfig(FlatClipping(job.max_grad_norm), job.noise_multiplier, job.sampling_rate, n), noise_key)
    common = dict(aggregate=agg, max_grad_norm=job.max_grad_norm, sampling_rate=job.sampling_rate, steps=job.steps,
                  learning_rate=job.learning_rate, key=run_key, engine=engine, on_step=on_step)
    t0 = time.perf_counter()
    if job.mode is AuditMode.WHITE_BOX:
        run = white_box_run(apply_fn, params, buffers, data, canaries=job.canaries, **common)
    else:
        if canary_pool is None or canary_pool[0].shape[0] < job.canaries:
            raise ValueError(f"run_audit: the black-box audit needs a canary_pool of >= {job.canaries} images")
        cx, cy = canary_pool[0][: job.canaries], 1 - canary_pool[1][: job.canaries]
        run = black_box_run(apply_fn, params, buffers, data, (cx, cy), **common)
    seconds = time.perf_counter() - t0
    res = audit_scores(run.scores.tolist(), run.included.tolist(), delta=job.delta, confidence=job.confidence)
    claimed_sigma = job.claimed_sigma if job.claimed_sigma is not None else job.noise_multiplier
    claimed = accounting.dpsgd_epsilon(claimed_sigma, job.sampling_rate, job.steps, job.delta)
    d = asdict(job)
    d["mode"] = job.mode.value
    return {
        "job": d,
        "epsilon_claimed": claimed,
        "epsilon_lower_bound": res.epsilon_lower_bound if math.isfinite(res.epsilon_lower_bound) else None,
        "m": res.m,
        "confidence": res.confidence,
        "delta": job.delta,
        "guesses": res.guesses,
        "correct_guesses": res.correct,
        "per_guess_count": {str(k): {"correct": c, "epsilon_lower_bound": e} for k, (c, e) in res.per_guess_count.items()},
        "included": int(run.included.sum()),
        "accountant": "PLD (dpfunc.accounting.dpsgd_epsilon)",
        "train_seconds": seconds,
        "_scores": run.scores,
        "_included": run.included,
    }


def plot_scores(results: list[tuple[str, torch.Tensor, torch.Tensor]], path: Path) -> None:
    """Histograms of canary scores, included vs excluded, one panel per ``(title, scores, included)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.6 * len(results), 2.8), squeeze=False)
    for ax, (title, scores, included) in zip(axes[0], results):
        s = scores.double()
        lo, hi = float(s.min()), float(s.max())
        bins = torch.linspace(lo, hi if hi > lo else lo + 1, 40).numpy()
        ax.hist(s[included].numpy(), bins=bins, alpha=0.6, label="included")
        ax.hist(s[~included].numpy(), bins=bins, alpha=0.6, label="excluded")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("canary score", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
