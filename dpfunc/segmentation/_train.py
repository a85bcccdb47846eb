"""Training a GroupNorm U-Net on an MSD folder with patient-level DP (or slice-level, or non-private).

``train_segmentation(cfg, data_dir=..., run_dir=...)`` follows the run-folder conventions of
``dpfunc train`` (``config.json``, ``checkpoint.pt`` written atomically every epoch, ``--resume``,
``metrics.json`` with the same top-level schema, figures) with ``test.dice`` = mean Dice over the test
patients. The privacy unit and its guarantee are described in :mod:`dpfunc.segmentation._patient`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

import torch
from torch.func import grad_and_value

from dpfunc import accounting
from dpfunc._progress import progress as progress_bar
from dpfunc._validate import check_delta, check_enum, check_int_range, check_number, check_positive_finite, warn_vacuous_delta
from dpfunc.accounting.methods import Method
from dpfunc.clipping import FlatClipping
from dpfunc.devices import describe_device, resolve_device, to_device, tree_to_device
from dpfunc.keys import Key
from dpfunc.models import unet_gn
from dpfunc.private import dpadam, privacy_ledger
from dpfunc.sampling import poisson_sample
from dpfunc.segmentation._metrics import dice_score, hausdorff95, iou_score, largest_component, mean_ci, predict_volume
from dpfunc.segmentation._msd import HUWindow, PatientVolume, SliceSelection, read_msd, split_patients
from dpfunc.segmentation._normalize import VolumeNorm, normalize_volume
from dpfunc.segmentation._patient import Engine, PackedSegmenter, PrivacyUnit, packed_losses, patient_batch, segmentation_engine, slice_batch
from dpfunc.step import make_step
from dpfunc.train import RunResult, _check_finite_losses, _mean_loss
from dpfunc.transforms import adam, apply_updates

__all__ = ["SegmentationConfig", "SegModel", "SegmentationResult", "train_segmentation", "evaluate_segmentation_run", "evaluate_patients",
           "PatientScores", "summarize_hd95", "is_segmentation_run", "ema_update"]

TASKS = ("liver",)


class LRSchedule(enum.Enum):
    """The learning rate over the run's steps: ``CONSTANT`` or ``COSINE`` (from ``learning_rate`` down to 0 at the
    last step; Loshchilov & Hutter 2017). A function of the step count only: no privacy cost."""

    CONSTANT = "constant"
    COSINE = "cosine"


class SegModel(enum.Enum):
    """The segmentation network: ``UNET`` (:func:`~dpfunc.models.unet_gn`, learned end to end; the default) or
    ``FEATURES`` (:func:`~dpfunc.segmentation.feature_segmenter`: a fixed, data-independent filter bank and a
    small learned per-pixel head — Tramèr & Boneh 2021 — a few hundred trained parameters instead of 34k)."""

    UNET = "unet"
    FEATURES = "features"


def _schedule(kind: "LRSchedule", lr: float, total_steps: int):
    if kind is LRSchedule.CONSTANT:
        return lr
    return lambda t: lr * 0.5 * (1 + math.cos(math.pi * min(int(t), total_steps) / total_steps))


@dataclass(frozen=True)
class SegmentationConfig:
    """Everything that defines a segmentation run (stored in its checkpoint and ``config.json``).

    Args:
        task: ``"liver"`` (MSD Task03 layout; also the phantoms).
        image_size: side of the square slices (64, 128, 256 …).
        epsilon, delta, noise_multiplier: target ε (σ calibrated with the PLD accountant) or a given σ.
        epochs: passes over the training patients (in expectation).
        batch_size: EXPECTED examples per step — patients (unit ``PATIENT``) or slices (``SLICE``).
        slices_per_patient: K, slices of a patient per step (drawn without replacement if more).
        learning_rate: Adam step size.
        max_grad_norm: the clipping bound C of one example (one patient, or one slice).
        unit: :class:`PrivacyUnit` (``PATIENT`` default; ``SLICE`` = deepee's slice-level DP).
        engine: :class:`Engine` (``FAST`` or ``VMAP``).
        private: False trains the non-private baseline (same model, data and optimiser; no clip/noise).
        seed: root of every key (split, init, sampling, slices, noise); 0 is valid.
        width, depth, groups: U-Net size (see :class:`~dpfunc.models.UNetGN`); width 4 (34,066 parameters)
            by default: on the phantom benchmark it beat width 8 both without DP and at ε = 8 (DP noise
            grows with the parameter count; README 'Segmentation under DP').
        window_low, window_high: HU window; selection, margin: slice selection (see :func:`read_msd`).
        val_fraction, test_fraction: patient-level split.
        ema_decay, ema_warmup: evaluate (and select on validation, and report) an average of the iterates instead
            of the last one: after step t (0-based) ``average = d·average + (1 − d)·params`` with
            ``d = min(ema_decay, (1 + t)/(ema_warmup + t))``, starting from the initial parameters (:func:`ema_update`).
            ``ema_decay = 0`` evaluates the last iterate. The warm-up makes the early average a polynomial-decay
            average (Shamir & Zhang 2013): the iterate of step s enters the average of step T with a weight
            ∝ ((s + ema_warmup)/(T + ema_warmup))^(ema_warmup − 2) roughly, so ``ema_warmup = 10`` (default) weights
            about the last T/9 steps, 3 a linearly growing weight over the whole run, 2 the uniform mean; the decay
            caps it (a window of about 1/(1 − ema_decay) steps) once (1 + t)/(ema_warmup + t) exceeds it — with
            ``ema_warmup = 10`` and ``ema_decay = 0.9`` only after step 80. A function of the released iterates only
            (post-processing): no privacy cost. Kept in the checkpoint; a resumed run continues the same average
            (De et al. 2022 evaluate an EMA of DP-SGD's iterates; Polyak & Juditsky 1992).
        foreground_prior: the head's bias starts at log(1 − p, p) (``class_prior`` of
            :class:`~dpfunc.models.UNetGN`), so the untrained net predicts organ with probability ≈ p
            instead of 1/2; None keeps the default initialisation. A fixed PUBLIC constant (0.05 ≈ the
            liver's share of the pixels of its slices), never counted from the training labels. Without
            it, runs could collapse to "no organ anywhere" (Dice 0; see the README's segmentation section).
        accountant: ``Method.PLD`` (default, tight) or ``Method.RDP`` (an upper bound, much faster at
            large sampling rates such as the few-patient runs of the tests) for calibration and ε.
        pretrain_steps: 0 (default) starts from the keyed random initialisation; N > 0 starts from a
            U-Net pretrained for N steps on PUBLIC synthetic shape scenes (:func:`pretrain_unet`: ellipses
            vs rectangles and lines, not CT, not the phantom generator, nothing of the private patients;
            one fixed public key for every run seed), with the output bias reset to ``foreground_prior``.
            Both arms (non-private and DP) start from the same public weights; pretraining spends no
            privacy budget.
        coord_channels: two input channels with the row and column position (:class:`~dpfunc.models.UNetGN`).
        lr_schedule: :class:`LRSchedule` of the Adam step size (``CONSTANT`` default, ``COSINE`` to 0).
        largest_component: evaluate (validation selection, test metrics, overlays) on the largest 3-D
            connected component of each predicted volume (:func:`largest_component`; post-processing of
            the model's output on that patient, no privacy cost).
        model: :class:`SegModel` (``UNET`` default; ``FEATURES`` = fixed filter bank + small head, where
            ``width``, ``depth``, ``groups``, ``pretrain_steps`` and ``coord_channels`` do not apply: the
            filter bank has its own position channels).
        head_hidden, head_smooth: the ``FEATURES`` head's hidden width (0 = linear, default) and the side of its
            final logit convolution (3 default; 0 = none; odd) (:class:`~dpfunc.models.FeatureSegmenter`): the
            defaults are the README's recipe (with 24 expected patients per step, 60
            epochs, lr 0.02 — the U-Net's batch, epoch and lr defaults are not tuned for it).
        position_products: the ``FEATURES`` filter bank also multiplies its intensity bins by the row and
            column position (:class:`~dpfunc.models.FixedFeatures`; True by default: 114 channels, 268 trained
            parameters with the default head — the best on seed 0's validation patients, README).
        local_histograms: the ``FEATURES`` filter bank also appends local soft histograms (its σ = 1 intensity
            bins blurred at σ = 3 and 6 px, :data:`HISTOGRAM_SCALES`; ``histogram_scales`` of
            :class:`~dpfunc.models.FixedFeatures`): 34 more fixed channels (148 with the products, 336 trained
            parameters with the default head). False by default (the earlier recipe); the README's best recipe.
        volume_norm: :class:`~dpfunc.segmentation.VolumeNorm` applied to each patient's windowed volume before
            anything else (``NONE`` default; ``RANK`` = per-volume histogram equalisation,
            :func:`~dpfunc.segmentation.rank_normalize`): a function of that patient's own image volume only, so
            the patient-level guarantee is unchanged. Refused for a private run with ``unit=SLICE``: every
            slice's input would depend on the other slices of its volume, so neighbouring datasets (one slice
            apart) would differ in many examples and the per-slice guarantee would not hold. (Under ``SLICE``
            the dataset is the slices as selected; ``selection="organ"`` picks them from each patient's labels.) With ``FEATURES`` the soft intensity bins then sit at
            :data:`RANK_BIN_CENTRES` (rank units) instead of the HU-window centres. With ``local_histograms``,
            ``max_grad_norm=0.15``, lr 0.04, 24 patients per step and 60 epochs: the README's best private recipe (C 0.3, lr 0.02 before the sixth round).
    """

    task: str = "liver"
    image_size: int = 64
    epsilon: float | None = 8.0
    delta: float = 1e-5
    noise_multiplier: float | None = None
    epochs: int = 30
    batch_size: int = 8
    slices_per_patient: int = 4
    learning_rate: float = 5e-3
    max_grad_norm: float = 1.0
    unit: PrivacyUnit = PrivacyUnit.PATIENT
    engine: Engine = Engine.FAST
    private: bool = True
    seed: int = 0
    width: int = 4
    depth: int = 3
    groups: int = 4
    window_low: float = -160.0
    window_high: float = 240.0
    selection: SliceSelection = SliceSelection.ORGAN
    margin: int = 2
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    ema_decay: float = 0.9
    ema_warmup: float = 10.0
    accountant: Method = Method.PLD
    foreground_prior: float | None = 0.05
    pretrain_steps: int = 0
    coord_channels: bool = False
    lr_schedule: LRSchedule = LRSchedule.CONSTANT
    largest_component: bool = False
    model: SegModel = SegModel.UNET
    head_hidden: int = 0
    head_smooth: int = 3
    position_products: bool = True
    local_histograms: bool = False
    volume_norm: VolumeNorm = VolumeNorm.NONE

    def __post_init__(self) -> None:
        fn = "SegmentationConfig"
        if self.task not in TASKS:
            raise ValueError(f"{fn}: task must be one of {TASKS}, got {self.task!r}")
        for name, enum_type in (("unit", PrivacyUnit), ("engine", Engine), ("selection", SliceSelection), ("accountant", Method),
                                ("lr_schedule", LRSchedule), ("model", SegModel), ("volume_norm", VolumeNorm)):
            object.__setattr__(self, name, check_enum(fn, name, getattr(self, name), enum_type))
        check_int_range(fn, "image_size", self.image_size, low=8, high=1024)
        if self.model is SegModel.UNET and self.image_size % 2**self.depth:
            raise ValueError(f"{fn}: image_size must be divisible by 2**depth = {2**self.depth}, got {self.image_size}")
        check_delta(fn, "delta", self.delta)
        if self.accountant is Method.GDP:
            raise ValueError(f"{fn}: accountant must be Method.PLD or Method.RDP (GDP is an approximation, not a bound), got {self.accountant!r}")
        if self.private:
            if self.epsilon is None and self.noise_multiplier is None:
                raise ValueError(f"{fn}: a private run needs epsilon (target) or noise_multiplier")
            if self.epsilon is not None:
                check_positive_finite(fn, "epsilon", self.epsilon)
            if self.noise_multiplier is not None:
                check_positive_finite(fn, "noise_multiplier", self.noise_multiplier)
        for name in ("epochs", "batch_size", "slices_per_patient", "width", "depth", "groups"):
            check_int_range(fn, name, getattr(self, name), low=1)
        check_int_range(fn, "margin", self.margin, low=0)
        check_int_range(fn, "pretrain_steps", self.pretrain_steps, low=0)
        check_int_range(fn, "head_hidden", self.head_hidden, low=0)
        check_int_range(fn, "head_smooth", self.head_smooth, low=0)
        if self.head_smooth % 2 == 0 and self.head_smooth:
            raise ValueError(f"{fn}: head_smooth must be 0 or odd, got {self.head_smooth}")
        if self.private and self.unit is PrivacyUnit.SLICE and self.volume_norm is not VolumeNorm.NONE:
            raise ValueError(f"{fn}: volume_norm={self.volume_norm.value!r} needs unit='patient' in a private run: it normalises "
                             f"each slice by its whole volume, so one slice changes the others' inputs and the per-slice "
                             f"guarantee of unit='slice' would not hold; use volume_norm='none' with unit='slice'")
        if self.local_histograms and self.model is not SegModel.FEATURES:
            raise ValueError(f"{fn}: local_histograms applies to model=SegModel.FEATURES only, got model={self.model}")
        if self.model is SegModel.FEATURES and (self.pretrain_steps or self.coord_channels):
            raise ValueError(f"{fn}: pretrain_steps and coord_channels apply to model=SegModel.UNET only, got "
                             f"pretrain_steps={self.pretrain_steps}, coord_channels={self.coord_channels} with model={self.model}")
        check_int_range(fn, "seed", self.seed)
        check_positive_finite(fn, "learning_rate", self.learning_rate)
        check_positive_finite(fn, "max_grad_norm", self.max_grad_norm)
        check_number(fn, "ema_decay", self.ema_decay, low=0, high=1, high_open=True)
        check_number(fn, "ema_warmup", self.ema_warmup, low=1, low_open=True)
        if self.foreground_prior is not None:
            check_number(fn, "foreground_prior", self.foreground_prior, low=0, high=1, low_open=True, high_open=True)
        for name in ("val_fraction", "test_fraction"):
            check_number(fn, name, getattr(self, name), low=0, high=1, low_open=True, high_open=True)
        HUWindow(self.window_low, self.window_high)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: enums as their values."""
        return {k: (v.value if hasattr(v, "value") else v) for k, v in dataclasses.asdict(self).items()}


SegmentationResult = RunResult
"""What a finished segmentation run reports (``metrics.json``): the classification run's
:class:`~dpfunc.train.RunResult`, so both kinds of run folder share one schema (``test.dice`` here)."""


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


def _net_apply(apply_fn: Callable) -> Callable:
    """Bare-net predictions ``(N, 1, H, W) -> logits`` through the packed model (dummy label/weight)."""
    def run(params, buffers, images):
        images = to_device(images, next(iter(params.values())).device)  # slices go where the model is
        zeros = images.new_zeros((images.shape[0], 1, *images.shape[2:]))
        return apply_fn(params, buffers, torch.cat([images, zeros, zeros], 1))[0]
    return run


class PatientScores(NamedTuple):
    """Per-patient test scores, in the order of the patients (see :mod:`dpfunc.segmentation._metrics`).

    Attributes:
        dice, iou: 3-D Dice and IoU per patient.
        hd95: 3-D Hausdorff-95 per patient, in mm when the patient's ``spacing`` is known (NIfTI
            volumes: slice thickness × resized pixel size), else in voxels of the evaluated grid (slice
            index, resized row, resized column); ``inf`` where exactly one of prediction and truth is
            empty, 0 where both are; empty when not computed (``hd95=False``).
    """

    dice: list[float]
    iou: list[float]
    hd95: list[float]


def _predict(apply_fn: Callable, params: dict, buffers: dict, images: torch.Tensor, largest_only: bool) -> torch.Tensor:
    pred = predict_volume(_net_apply(apply_fn), params, buffers, images).cpu()
    return largest_component(pred) if largest_only else pred


def evaluate_patients(apply_fn: Callable, params: dict, buffers: dict, patients: list[PatientVolume], *,
                      hd95: bool = True, largest_only: bool = False) -> PatientScores:
    """Per-patient 3-D Dice, IoU and (``hd95=True``) Hausdorff-95 (``apply_fn`` of a :class:`PackedSegmenter`);
    ``largest_only`` keeps only the largest connected component of each predicted volume first."""
    dice, iou, hd = [], [], []
    for p in patients:
        pred = _predict(apply_fn, params, buffers, p.images, largest_only)
        dice.append(dice_score(pred, p.labels))
        iou.append(iou_score(pred, p.labels))
        if hd95:
            hd.append(hausdorff95(pred, p.labels, spacing=p.spacing))
    return PatientScores(dice, iou, hd)


def summarize_hd95(values: list[float], shape_of: list[tuple[int, ...]],
                   spacing_of: list[tuple[float, ...] | None] | None = None) -> tuple[list[float], int]:
    """HD95 values with every ``inf`` (exactly one mask empty) replaced by the diagonal of that patient's
    grid ``sqrt(Σ ((n_i − 1)·s_i)²)`` (``s_i`` the spacing of axis ``i``, 1 when ``spacing_of`` or the
    patient's entry is None) — the largest distance two voxels of the grid can have, so a patient
    whose organ was missed (or invented) counts as the worst case instead of being dropped — and the
    number of patients replaced."""
    out, replaced = [], 0
    spacing_of = spacing_of if spacing_of is not None else [None] * len(values)
    for v, shape, spacing in zip(values, shape_of, spacing_of):
        if math.isinf(v):
            sp = spacing if spacing is not None else (1.0,) * len(shape)
            out.append(math.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip(shape, sp))))
            replaced += 1
        else:
            out.append(v)
    return out, replaced


def _load(cfg: SegmentationConfig, data_dir: str | Path):
    patients = read_msd(data_dir, image_size=cfg.image_size, window=HUWindow(cfg.window_low, cfg.window_high),
                        selection=cfg.selection, margin=cfg.margin)
    if cfg.volume_norm is not VolumeNorm.NONE:  # per patient, from that patient's own volume only
        patients = [p._replace(images=normalize_volume(p.images, cfg.volume_norm)) for p in patients]
    if cfg.model is SegModel.FEATURES:  # the fixed filter bank, once per slice, in the input pipeline
        patients = [p._replace(images=_fixed_features(cfg, p.images)) for p in patients]
    split_key = Key(cfg.seed).fold_in(0)
    return split_patients(patients, split_key, (1 - cfg.val_fraction - cfg.test_fraction, cfg.val_fraction, cfg.test_fraction))


HISTOGRAM_SCALES = (3.0, 6.0)
"""σ (pixels at 64²) of the local soft histograms of ``SegmentationConfig(local_histograms=True)`` (chosen on the
validation patients of run seeds 0–2 with a closed-form non-private probe, README 'Segmentation under DP')."""


RANK_BIN_CENTRES = tuple(round(0.52 + 0.03 * k, 4) for k in range(17))
"""Soft-bin centres (0.52 … 1.0, 0.03 apart, the same count and spacing as the HU-window default) of the ``FEATURES``
bank on rank-normalised volumes (``volume_norm=VolumeNorm.RANK``): the upper half of a volume's in-window ranks, where
soft tissue, organs and contrast lie (below: fat rim, stomach fluid and gas)."""


def _bank_kwargs(cfg: SegmentationConfig) -> dict:
    """The :class:`~dpfunc.models.FixedFeatures` options of a ``FEATURES`` configuration."""
    kwargs = {"position_products": cfg.position_products, "histogram_scales": HISTOGRAM_SCALES if cfg.local_histograms else ()}
    if cfg.volume_norm is VolumeNorm.RANK:
        kwargs["bin_centres"] = RANK_BIN_CENTRES
    return kwargs


def _fixed_features(cfg: SegmentationConfig, images: torch.Tensor) -> torch.Tensor:
    """``(S, 1, H, W)`` windowed slices -> ``(S, F, H, W)`` fixed features (:class:`~dpfunc.models.FixedFeatures`;
    channel 0 is the slice itself). A fixed function of each slice alone: no parameters, nothing fitted."""
    from dpfunc.models import FixedFeatures

    bank = FixedFeatures(cfg.image_size, **_bank_kwargs(cfg))
    with torch.no_grad():
        return torch.cat([bank(images[i:i + 64]) for i in range(0, images.shape[0], 64)]) if images.shape[0] else \
            images.new_zeros((0, bank.num_features, *images.shape[2:]))


def _build(cfg: SegmentationConfig):
    from dpfunc.bridge import functionalize

    prior = None if cfg.foreground_prior is None else (1 - cfg.foreground_prior, cfg.foreground_prior)
    if cfg.model is SegModel.FEATURES:
        from dpfunc.models import feature_segmenter

        full = feature_segmenter(key=Key(cfg.seed).fold_in(1), image_size=cfg.image_size, hidden=cfg.head_hidden,
                                 smooth_kernel=cfg.head_smooth, class_prior=prior, **_bank_kwargs(cfg))
        # _load already turned every slice into its fixed features: the trained model is the head alone
        model = PackedSegmenter(full.head, image_channels=full.features.num_features)
    else:
        net = unet_gn(key=Key(cfg.seed).fold_in(1), width=cfg.width, depth=cfg.depth, groups=cfg.groups, class_prior=prior,
                      coord_channels=cfg.coord_channels)
        model = PackedSegmenter(net)
    apply_fn, params, buffers = functionalize(model)
    if cfg.pretrain_steps:
        public = _public_weights(cfg.width, cfg.depth, cfg.groups, cfg.image_size, cfg.pretrain_steps, cfg.foreground_prior)
        head_bias = params["net.head.bias"]
        params = {k: public[k].clone() for k in params}
        params["net.head.bias"] = head_bias.detach().clone()  # the public organ prior again, as a fresh net
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(params[name])
    return model, apply_fn, params, buffers


PUBLIC_PRETRAIN_KEY = 20_260_117
"""The key of the public pretraining (the same for every run seed, like one published checkpoint)."""


@functools.lru_cache(maxsize=4)
def _public_weights(width: int, depth: int, groups: int, image_size: int, steps: int, prior: float | None) -> dict:
    from dpfunc.segmentation._public import cached_pretrained_unet

    return cached_pretrained_unet(key=Key(PUBLIC_PRETRAIN_KEY), seed_tag=PUBLIC_PRETRAIN_KEY, width=width, depth=depth,
                                  groups=groups, image_size=image_size, steps=steps, foreground_prior=prior)


def ema_update(average: dict, params: dict, *, decay: float, step: int, warmup: float = 10.0) -> dict:
    """One step of the iterate average of :class:`SegmentationConfig` (``ema_decay``, ``ema_warmup``).

    Args:
        average: the average so far (the initial parameters before step 0), name -> tensor.
        params: the parameters after step ``step`` (0-based), the same names and shapes.
        decay: the cap of the per-step decay, in [0, 1); 0 returns ``params`` (the last iterate).
        step: the 0-based index of the step that produced ``params`` (>= 0).
        warmup: > 1; the decay at step t is ``min(decay, (1 + t)/(warmup + t))`` (polynomial-decay averaging
            while it is below the cap: 2 = the uniform mean of the initial and all later iterates).

    Returns:
        ``{k: d·average[k] + (1 − d)·params[k]}``, a new dict (the inputs are not modified).

    Example:
        >>> import torch
        >>> ema_update({"w": torch.zeros(1)}, {"w": torch.ones(1)}, decay=0.9, step=0, warmup=2.0)["w"]
        tensor([0.5000])
    """
    fn = "ema_update"
    check_number(fn, "decay", decay, low=0, high=1, high_open=True)
    check_number(fn, "warmup", warmup, low=1, low_open=True)
    check_int_range(fn, "step", step, low=0)
    if set(average) != set(params):
        raise ValueError(f"{fn}: average and params must have the same names, got {sorted(average)} and {sorted(params)}")
    if not decay:
        return dict(params)
    d = min(decay, (1 + step) / (warmup + step))
    return {k: d * average[k] + (1 - d) * p for k, p in params.items()}


def train_segmentation(cfg: SegmentationConfig, *, data_dir: str | Path, run_dir: str | Path | None = None, resume: bool = False,
                       progress: bool | None = None, log: Callable[[str], None] = print, bootstrap_resamples: int = 1000,
                       device: str | torch.device = "cpu") -> SegmentationResult:
    """Train, select the epoch on validation Dice, evaluate on the test patients, write the run folder.

    Args:
        cfg: the :class:`SegmentationConfig`.
        data_dir: an MSD task folder (or phantoms from :func:`make_phantoms`).
        run_dir: the run folder (``config.json``, ``checkpoint.pt``, ``metrics.json``, ``overlays.png``,
            ``training.png``); None writes nothing.
        resume: continue from ``run_dir/checkpoint.pt`` (same config required).
        progress: progress bar (None: the project default).
        log: where per-epoch lines go.
        device: where the run computes (``"auto" | "cpu" | "cuda" | "cuda:N"``, ``--device``): the model, its
            optimizer state and every batch (built on the host, sent through pinned memory) go there; the keyed
            noise is drawn there. Not part of the configuration: the checkpoint resumes on any device (same
            ledger and keys; not bit for bit across devices); metrics and plots are computed on the host.

    Raises:
        FileExistsError: ``run_dir`` holds a run and ``resume`` is False.
        ValueError: a checkpoint of another configuration; a diverging non-private run.
    """
    from dpfunc.bridge.checkpoint import load_checkpoint, save_checkpoint

    fn = "train_segmentation"
    if not isinstance(cfg, SegmentationConfig):
        raise TypeError(f"{fn}: cfg must be a SegmentationConfig, got {type(cfg).__name__}")
    where = resolve_device(device, fn=fn, name="device (--device)")  # refused before any data is read
    train_set, val_set, test_set = _load(cfg, data_dir)
    patient_unit = cfg.unit is PrivacyUnit.PATIENT
    if patient_unit:
        n = len(train_set)
    else:
        slice_images = to_device(torch.cat([p.images for p in train_set]), where)  # resident on the device
        slice_labels = to_device(torch.cat([p.labels for p in train_set]), where)
        n = slice_images.shape[0]
    q = min(1.0, cfg.batch_size / n)
    steps_per_epoch = max(1, round(n / cfg.batch_size))
    total_steps = steps_per_epoch * cfg.epochs
    sigma = None
    if cfg.private:
        warn_vacuous_delta(fn, cfg.delta, n, unit="patients" if patient_unit else "slices")
        sigma = cfg.noise_multiplier if cfg.epsilon is None else accounting.noise_multiplier_for(cfg.epsilon, cfg.delta, q, total_steps, method=cfg.accountant.value)
    model, apply_fn, params, buffers = _build(cfg)
    model.to(where)
    params, buffers = tree_to_device(params, where), tree_to_device(buffers, where)
    sample_key, slice_key, noise_key = Key(cfg.seed).fold_in(2).split(3)
    if cfg.private:
        tx = dpadam(_schedule(cfg.lr_schedule, cfg.learning_rate, total_steps), noise_multiplier=sigma, max_grad_norm=cfg.max_grad_norm, sampling_rate=q, num_examples=n, key=noise_key)
        engine = segmentation_engine(model, FlatClipping(cfg.max_grad_norm), unit=cfg.unit,
                                     slices_per_patient=cfg.slices_per_patient if patient_unit else None, engine=cfg.engine)
        step_fn = make_step(None, tx, engine=engine)
    else:
        tx = adam(_schedule(cfg.lr_schedule, cfg.learning_rate, total_steps))

        def mean_loss(p, b, x):
            losses = packed_losses(apply_fn(p, b, x.flatten(0, 1) if patient_unit else x))
            return losses.view(x.shape[0], -1).mean(1).mean() if patient_unit else losses.mean()

        grad_fn = grad_and_value(mean_loss)
    opt_state = tx.init(params)

    run_path = Path(run_dir) if run_dir is not None else None
    history: list[dict] = []
    best = {"epoch": 0, "val_dice": -math.inf, "params": params}
    average = dict(params)
    start_epoch, elapsed = 0, 0.0
    if run_path is not None:
        run_path.mkdir(parents=True, exist_ok=True)
        ckpt = run_path / "checkpoint.pt"
        if resume and ckpt.exists():
            state = load_checkpoint(ckpt, map_location=where)  # written on any device
            if state["config"] != cfg:
                raise ValueError(f"{fn}: {ckpt} was written by another configuration; start a new run folder or resume "
                                 f"with the same flags.\n saved: {state['config']}\n given: {cfg}")
            params, opt_state, average = state["params"], state["opt_state"], state["average"]
            history, start_epoch, elapsed = state["history"], state["epoch"], state["elapsed"]
            best = {"epoch": state["best_epoch"], "val_dice": state["best_val_dice"], "params": state["best_params"]}
            log(f"resumed {ckpt} at epoch {start_epoch}/{cfg.epochs}")
        elif ckpt.exists():
            raise FileExistsError(f"{fn}: {run_path} already holds a run; pass --resume to continue it, or choose a new --run-dir")
        _write_json(run_path / "config.json", {**cfg.to_dict(), "data_dir": str(data_dir)})

    unit_word = "patients" if patient_unit else "slices"
    if cfg.private:
        log(f"DP (unit = {cfg.unit.value}): n={n} {unit_word} q={q:.4f} (expected {cfg.batch_size} per step) steps={total_steps} "
            f"σ={sigma:.4f} C={cfg.max_grad_norm} target ε={cfg.epsilon} δ={cfg.delta} engine={cfg.engine.value}")
    else:
        log(f"non-private Adam: n={n} {unit_word}, batch {cfg.batch_size}, steps={total_steps} (ε = ∞)")

    def eps_now(state) -> float | None:
        return accounting.epsilon(privacy_ledger(state), cfg.delta, method=cfg.accountant.value) if cfg.private else None

    eps_spent = eps_now(opt_state)
    bar = progress_bar(total=total_steps, initial=start_epoch * steps_per_epoch, desc=f"{cfg.task} ({'DP' if cfg.private else 'non-private'})",
                       unit="step", enabled=progress)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            losses = []  # (mean loss, batch size) per step, read once per epoch (no host read per step), as dpfunc.train
            perm = torch.randperm(n, generator=sample_key.fold_in(10**9 + epoch).generator())
            for i in range(steps_per_epoch):
                t = epoch * steps_per_epoch + i
                idx = (poisson_sample(sample_key.fold_in(t), n, q) if cfg.private
                       else perm[(i * cfg.batch_size) % n:][: cfg.batch_size])
                x = (to_device(patient_batch(train_set, idx, cfg.slices_per_patient, slice_key.fold_in(t)), where)
                     if patient_unit else slice_batch(slice_images, slice_labels, to_device(idx, where)))
                if cfg.private:
                    params, opt_state, m = step_fn(params, opt_state, (x,), buffers=buffers)
                    losses.append((m.loss, m.batch_size))
                else:
                    g, loss = grad_fn(params, buffers, x)
                    updates, opt_state = tx.update(g, opt_state, params)
                    params = apply_updates(params, updates)
                    losses.append((loss.detach(), len(idx)))
                average = ema_update(average, params, decay=cfg.ema_decay, step=t, warmup=cfg.ema_warmup)
                bar.update(1)
            if not cfg.private:  # before anything of this epoch is saved
                _check_finite_losses(losses, epoch * steps_per_epoch, cfg.learning_rate, fn=fn)
            train_loss = _mean_loss(losses)
            bar.set_postfix_str(f"loss {train_loss:.3f}")
            elapsed += time.perf_counter() - t0
            eps_spent = eps_now(opt_state)
            val_dice = evaluate_patients(apply_fn, average, buffers, val_set, hd95=False, largest_only=cfg.largest_component).dice
            record = {"epoch": epoch + 1, "train_loss": train_loss, "val_dice": sum(val_dice) / len(val_dice),
                      "epsilon": eps_spent, "seconds": elapsed}
            history.append(record)
            if record["val_dice"] > best["val_dice"]:
                best = {"epoch": epoch + 1, "val_dice": record["val_dice"], "params": average}
            if run_path is not None:
                save_checkpoint(run_path / "checkpoint.pt", {
                    "config": cfg, "params": params, "average": average, "buffers": buffers, "opt_state": opt_state,
                    "history": history, "epoch": epoch + 1, "elapsed": elapsed, "best_epoch": best["epoch"],
                    "best_val_dice": best["val_dice"], "best_params": best["params"], "noise_multiplier": sigma,
                    "sampling_rate": q, "steps_done": (epoch + 1) * steps_per_epoch, "data_dir": str(data_dir),
                })
            with bar.external_write_mode():
                eps_text = "∞" if eps_spent is None else f"{eps_spent:.3f}"
                log(f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {record['train_loss']:.4f}  val Dice {record['val_dice']:.4f}  "
                    f"ε {eps_text}{'' if eps_spent is None else ' per ' + cfg.unit.value}  ({elapsed:.0f}s)")
    finally:
        bar.close()

    val_dice, val_iou, _ = evaluate_patients(apply_fn, best["params"], buffers, val_set, hd95=False, largest_only=cfg.largest_component)
    result = _report(cfg, apply_fn, best, buffers, test_set, val_dice, val_iou, sigma, q, total_steps, eps_spent, elapsed,
                     history, bootstrap_resamples)
    result.device = describe_device(where)
    if run_path is not None:
        _write_outputs(run_path, result, apply_fn, best["params"], buffers, test_set)
    return result


def _report(cfg, apply_fn, best, buffers, test_set, val_dice, val_iou, sigma, q, steps, eps, elapsed, history, resamples):
    dice, iou, hd_raw = evaluate_patients(apply_fn, best["params"], buffers, test_set, largest_only=cfg.largest_component)
    hd, hd_missed = summarize_hd95(hd_raw, [tuple(p.labels.shape) for p in test_set], [p.spacing for p in test_set])
    hd_unit = "mm" if all(p.spacing is not None for p in test_set) else "voxel"
    test = {"dice": sum(dice) / len(dice), "iou": sum(iou) / len(iou), "hd95": sum(hd) / len(hd),
            "hd95_median": float(np.median(hd)), "hd95_empty_mismatch": hd_missed, "hd95_unit": hd_unit,
            "dice_per_patient": {p.name: d for p, d in zip(test_set, dice)},
            "hd95_per_patient": {p.name: (None if math.isinf(h) else h) for p, h in zip(test_set, hd_raw)},
            "num_patients": len(test_set)}
    ci = {"dice": mean_ci(dice, seed=cfg.seed, num_resamples=resamples).to_dict(),
          "iou": mean_ci(iou, seed=cfg.seed, num_resamples=resamples).to_dict(),
          "hd95": mean_ci(hd, seed=cfg.seed, num_resamples=resamples).to_dict()}
    return SegmentationResult(
        config=cfg.to_dict(), noise_multiplier=sigma, sampling_rate=q, steps=steps, epsilon=eps, delta=cfg.delta,
        best_epoch=best["epoch"], val={"dice": sum(val_dice) / len(val_dice), "iou": sum(val_iou) / len(val_iou)},
        test=test, test_ci=ci, train_seconds=elapsed, history=history)


def _write_outputs(run_path: Path, result: SegmentationResult, apply_fn, params, buffers, test_set) -> None:
    from dpfunc.plots import plot_training_curves
    from dpfunc.segmentation._figures import plot_overlays

    _write_json(run_path / "metrics.json", dataclasses.asdict(result))
    largest_only = bool(result.config.get("largest_component", False))
    plot_overlays(test_set[:4], [_predict(apply_fn, params, buffers, p.images, largest_only) for p in test_set[:4]],
                  run_path / "overlays.png")
    private = result.config["private"]
    plot_training_curves(result.history, run_path / "training.png", metric="val_dice",
                         epsilon="epsilon" if private else "__none__",
                         title=f"ε per {result.config['unit']} (δ = {result.delta:g})" if private else None)


def evaluate_segmentation_run(run_dir: str | Path, *, data_dir: str | Path | None = None, bootstrap_resamples: int = 1000,
                              device: str | torch.device = "cpu") -> SegmentationResult:
    """Recompute the test metrics of a segmentation run folder from its checkpoint (``dpfunc evaluate``), with the
    model on ``device`` (whatever device wrote the checkpoint)."""
    from dpfunc.bridge.checkpoint import load_checkpoint

    ckpt = Path(run_dir) / "checkpoint.pt"
    if not ckpt.exists():
        raise FileNotFoundError(f"evaluate_segmentation_run: no checkpoint at {ckpt}")
    where = resolve_device(device, fn="evaluate_segmentation_run", name="device (--device)")
    state = load_checkpoint(ckpt, map_location=where)
    cfg = state["config"]
    _, val_set, test_set = _load(cfg, data_dir if data_dir is not None else state["data_dir"])
    _, apply_fn, _, _ = _build(cfg)
    val_dice, val_iou, _ = evaluate_patients(apply_fn, state["best_params"], state["buffers"], val_set, hd95=False,
                                             largest_only=cfg.largest_component)
    eps = accounting.epsilon(privacy_ledger(state["opt_state"]), cfg.delta, method=cfg.accountant.value) if cfg.private else None
    best = {"epoch": state["best_epoch"], "params": state["best_params"]}
    result = _report(cfg, apply_fn, best, state["buffers"], test_set, val_dice, val_iou, state["noise_multiplier"],
                     state["sampling_rate"], state["steps_done"], eps, state["elapsed"], state["history"], bootstrap_resamples)
    result.device = describe_device(where)
    return result


def is_segmentation_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir/config.json`` was written by :func:`train_segmentation` (its ``task`` is a segmentation task)."""
    path = Path(run_dir) / "config.json"
    try:
        return json.loads(path.read_text()).get("task") in TASKS
    except (OSError, ValueError, AttributeError):
        return False
