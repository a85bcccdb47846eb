"""Application layer of the attacks: attack a case-study model in one threat scenario, score, draw.

Used by ``dpfunc attack`` and by ``bench/attacks.py`` (one implementation for both). The model, its
parameters and the DP settings come from a ``dpfunc train`` run folder when it holds a checkpoint
(the last iterate, what a server holds after training), else from the case study's defaults at
initialisation.
"""

from __future__ import annotations

import enum
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dpfunc._validate import check_enum, check_int_range, check_nonnegative
from dpfunc.attacks.inversion import DLGConfig, InvertingGradientsConfig, dlg, invert_gradients, recover_label
from dpfunc.attacks.metrics import score_reconstructions
from dpfunc.attacks.scenarios import Scenario, ThreatModel, shared_update
from dpfunc.keys import Key

__all__ = ["Attack", "AttackJob", "attack_images", "case_study_threat", "plot_reconstructions", "write_json"]

DATA_RANGE = 2.0  # FIXED normalisation: pixels in [-1, 1]
BOX = (-1.0, 1.0)


class Attack(enum.Enum):
    """Which reconstruction attack."""

    INVERTING_GRADIENTS = "ig"
    DLG = "dlg"


@dataclass(frozen=True)
class AttackJob:
    """One attack experiment.

    Attributes:
        scenario: the :class:`~dpfunc.attacks.Scenario`.
        batch_size: images per site update (B).
        images: images attacked per site in total (``images / batch_size`` independent updates, rounded up).
        iterations: optimiser steps per restart.
        attack: :class:`Attack` (Inverting Gradients by default).
        tv_weight: TV prior weight (Inverting Gradients).
        restarts: random restarts per update.
        seed: root of every key (which images, the noise, the initial guesses).
    """

    scenario: Scenario
    batch_size: int
    images: int
    iterations: int
    attack: Attack = Attack.INVERTING_GRADIENTS
    tv_weight: float = 0.2
    restarts: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        fn = "AttackJob"
        object.__setattr__(self, "scenario", check_enum(fn, "scenario", self.scenario, Scenario))
        object.__setattr__(self, "attack", check_enum(fn, "attack", self.attack, Attack))
        check_int_range(fn, "batch_size", self.batch_size, low=1)
        check_int_range(fn, "images", self.images, low=1)
        check_int_range(fn, "iterations", self.iterations, low=1)
        check_nonnegative(fn, "tv_weight", self.tv_weight)
        check_int_range(fn, "restarts", self.restarts, low=1)
        check_int_range(fn, "seed", self.seed)


def case_study_threat(noise_multiplier: float | None = None, *, num_examples: int = 4708, batch_size: int = 256,
                      epochs: int = 15, epsilon: float = 3.0, delta: float = 1e-5, max_grad_norm: float = 1.0) -> ThreatModel:
    """The case study's DP-SGD settings: q = 256/n and σ calibrated (PLD) to ε = 3 over 15 epochs (σ ≈ 1.50)."""
    from dpfunc import accounting

    q = min(1.0, batch_size / num_examples)
    steps = max(1, round(num_examples / batch_size)) * epochs
    if noise_multiplier is None:
        noise_multiplier = accounting.noise_multiplier_for(epsilon, delta, q, steps, method="pld")
    return ThreatModel(noise_multiplier=float(noise_multiplier), max_grad_norm=max_grad_norm, sampling_rate=q,
                       num_examples=num_examples)


def attack_images(
    apply_fn: Callable,
    params: dict,
    buffers: dict,
    images: torch.Tensor,
    labels: torch.Tensor,
    job: AttackJob,
    threat: ThreatModel,
    *,
    on_step: Callable[[int], None] | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Run ``job`` against private images drawn from ``(images, labels)`` (a training split).

    Per update, ``B`` images per site are drawn without replacement (``threat.sites`` sites for
    SECAGG), the server's view is built with :func:`~dpfunc.attacks.shared_update`, labels are
    recovered with iDLG when one image is behind the update and taken as known otherwise (the
    attacker's best case), and the reconstruction is matched to the originals and scored against the
    mean-image and random-image baselines.

    ``device`` (``"auto" | "cpu" | "cuda" | "cuda:N"``; None: where ``params`` are) is where the model, the
    attacked batches, the keyed noise of the update and the reconstruction live; the images are drawn and
    the reconstructions scored on the host, so the results do not depend on the device (up to arithmetic).

    Returns:
        A JSON-ready dict (``psnr``, ``ssim``, ``mse`` per image and their means/medians, the baselines,
        ``baseline_psnr`` = the mean-image baseline's median PSNR, label accuracy, timings) plus the
        tensors ``"_originals"`` and ``"_reconstructions"`` (matched, same order) for pictures.
    """
    from dpfunc.devices import resolve_device, tree_to_device

    where = (next(iter(params.values())).device if device is None
             else resolve_device(device, fn="attack_images", name="device (--device)"))
    params, buffers = tree_to_device(params, where), tree_to_device(buffers, where)
    key = Key(job.seed)
    pick_key, noise_key, init_key = key.split(3)
    n = images.shape[0]
    sites = threat.sites if job.scenario is Scenario.SECAGG else 1
    updates = math.ceil(job.images / job.batch_size)
    need = updates * sites * job.batch_size
    if need + job.batch_size * sites > n:
        raise ValueError(f"attack_images: {need} private images (+ baselines) requested but the data set has {n}")
    perm = torch.randperm(n, generator=pick_key.generator())
    mean_image = images.mean(0)
    originals, recs, scores, label_ok, seconds = [], [], [], [], 0.0
    for u in range(updates):
        idx = perm[u * sites * job.batch_size:(u + 1) * sites * job.batch_size]
        batches = [(images[idx[s * job.batch_size:(s + 1) * job.batch_size]], labels[idx[s * job.batch_size:(s + 1) * job.batch_size]])
                   for s in range(sites)]
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        batches = [tree_to_device(b, where) for b in batches]  # the private batches go where the model is
        update = shared_update(job.scenario, apply_fn, params, buffers, batches, threat=threat, key=noise_key.fold_in(u))
        if update.batch_size == 1:
            guess = torch.tensor([recover_label(update)])
            label_ok.append(bool(guess[0] == y[0]))
        else:
            guess = y
        guess = guess.to(where)
        t0 = time.perf_counter()
        cb = (lambda i, loss: on_step(1)) if on_step is not None else None
        if job.attack is Attack.INVERTING_GRADIENTS:
            cfg = InvertingGradientsConfig(iterations=job.iterations, tv_weight=job.tv_weight, restarts=job.restarts, box=BOX)
            res = invert_gradients(apply_fn, params, buffers, update, guess, tuple(x.shape[1:]), key=init_key.fold_in(u), config=cfg, callback=cb)
        else:
            cfg = DLGConfig(iterations=job.iterations, restarts=job.restarts, learning_rate=0.1, box=BOX)
            res = dlg(apply_fn, params, buffers, update, guess, tuple(x.shape[1:]), key=init_key.fold_in(u), config=cfg, callback=cb)
        seconds += time.perf_counter() - t0
        rand_idx = perm[-(u + 1) * x.shape[0]:][: x.shape[0]]  # images from the end: never in a batch
        res = res._replace(images=res.images.cpu())  # scored and drawn on the host
        sc = score_reconstructions(res.images, x, data_range=DATA_RANGE, mean_image=mean_image, random_images=images[rand_idx])
        originals.append(x)
        recs.append(res.images[sc.order])
        scores.append(sc)
    cat = {f: torch.cat([getattr(s, f) for s in scores]) for f in scores[0]._fields if f != "order"}
    from dpfunc.attacks.metrics import ReconstructionScores

    summary = ReconstructionScores(**cat, order=torch.arange(cat["psnr"].numel())).summary()
    summary.pop("order", None)
    summary.pop("order_mean", None)
    summary.pop("order_median", None)
    job_dict = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in asdict(job).items()}
    out = {
        "job": job_dict,
        "threat": asdict(threat),
        "updates": updates,
        "images_attacked": int(cat["psnr"].numel()),
        "baseline_psnr": summary["baseline_mean_psnr_median"],
        "label_accuracy": (sum(label_ok) / len(label_ok)) if label_ok else None,
        "labels": "iDLG (recovered from the update)" if label_ok else "known to the attacker",
        "attack_seconds": seconds,
        **summary,
        "_originals": torch.cat(originals),
        "_reconstructions": torch.cat(recs),
    }
    return out


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (``_``-prefixed keys, the tensors, are left out)."""
    clean = {k: v for k, v in obj.items() if not k.startswith("_")} if isinstance(obj, dict) else obj
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(clean, indent=2, allow_nan=False, default=_nan_to_none) + "\n")
    tmp.replace(path)


def _nan_to_none(o):
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def plot_reconstructions(rows: list[tuple[str, torch.Tensor, list[float] | None]], path: Path, *, max_columns: int = 8,
                         title: str | None = None) -> None:
    """A grid: one row per ``(name, images (N, 1, H, W) in [-1, 1], psnr per image or None)``.

    The first row is usually the originals; each later row a reconstruction, PSNR under each image.
    Written atomically (PNG).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(max_columns, max(r[1].shape[0] for r in rows))
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.3 * cols + 1.2, 1.45 * len(rows) + (0.4 if title else 0)), squeeze=False)
    for i, (name, imgs, values) in enumerate(rows):
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if j < imgs.shape[0]:
                ax.imshow(imgs[j, 0].detach().float().numpy(), cmap="gray", vmin=-1, vmax=1)
                if values is not None:
                    ax.set_xlabel(f"{values[j]:.1f} dB", fontsize=7)
            if j == 0:
                ax.set_ylabel(name, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
