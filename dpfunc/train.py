"""The case-study training driver: DP-SGD (or the non-private baseline) on an image data set.

This is application code on top of the functional core: the model is an ``nn.Module`` only until
:func:`dpfunc.bridge.functionalize` turns it into ``(apply_fn, params, buffers)``; from then on a
run is pure functions of explicit state, keys and the privacy ledger.

One run::

    σ       = noise_multiplier_for(ε, δ, q, T)            # PLD calibration, ε(σ) ≤ target
    for t in range(T):
        batch = poisson_sample(sample_key.fold_in(t), n, q)
        params, opt_state = step(params, opt_state, batch)   # clip → noise → SGD
    ε_spent = epsilon(privacy_ledger(opt_state), δ)       # a pure function of the state

Model selection uses the validation split only; the test split is read once, at the end.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.func import grad_and_value

from dpfunc import accounting
from dpfunc._progress import progress as progress_bar
from dpfunc._validate import check_device_spec, warn_vacuous_delta
from dpfunc.clipping import FlatClipping
from dpfunc.data import ImageDataset, augment_views, pneumoniamnist
from dpfunc.devices import Precision, check_precision, deterministic_algorithms, describe_device, mixed_precision, resolve_device, to_device
from dpfunc.keys import Key, run_keys
from dpfunc.metrics import binary_metrics, bootstrap_ci, confusion_matrix
from dpfunc.models import build_model
from dpfunc.private import dpsgd, privacy_ledger, with_discrete_gaussian_ledger
from dpfunc.sampling import poisson_sample
from dpfunc.step import make_step, vmap_engine
from dpfunc.transforms import apply_updates, sgd

__all__ = ["TrainConfig", "RunResult", "RunPlan", "train", "plan_run", "load_training_set", "evaluate_scores",
           "load_run", "evaluate_run", "RUN_FILES"]

#: The files a run folder holds (``overwrite=True`` removes exactly these).
RUN_FILES = ("config.json", "checkpoint.pt", "metrics.json", "roc.png", "confusion.png", "training.png")

ENGINES = ("fast", "vmap")
CLIPPINGS = ("flat", "adaptive")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run (saved as ``config.json`` in the run folder).

    Attributes:
        model: ``"cnn"`` or ``"resnet18"`` (see :mod:`dpfunc.models`).
        epsilon: target ε; σ is calibrated with the PLD accountant so that ε(σ) ≤ target.
            ``None`` with ``noise_multiplier`` set trains at that σ instead.
        delta: target δ (0 < δ < 1; well below 1/n).
        noise_multiplier: σ, used when ``epsilon`` is None.
        epochs: passes over the data in expectation (steps = epochs · n / batch_size).
        batch_size: the EXPECTED Poisson batch size q·n.
        learning_rate: SGD step size; None picks 1.0 for DP-SGD (clipped, normalised gradients of norm
            ≤ C) and 0.05 for the non-private baseline (raw gradients, which diverge at 1.0).
        momentum: SGD heavy-ball momentum.
        max_grad_norm: the per-example clipping bound C.
        ema_decay: evaluate an exponential moving average of the iterates (Polyak averaging; free
            post-processing, no privacy cost); 0 evaluates the last iterate.
        augment_views: K > 0 averages the loss over K augmented views of each example before
            clipping (augmentation multiplicity, De et al. 2022); 0 = no augmentation.
        image_size: 28 (native), 64 (upsampled, for ResNet-18) or 224 (upsampled to the ImageNet input
            size, for GPU studies: the training images take n·224²·4 bytes, 0.9 GB for PneumoniaMNIST).
        engine: ``"fast"`` (ghost norms / book-keeping, falls back per layer) or ``"vmap"`` (oracle).
        private: False trains the non-private baseline (same model, data, optimiser; ε = ∞).
        seed: the root of every key of the run (init, sampling, noise); 0 is valid.
        train_subset: train on this many training examples only (a fixed random subset, the same for
            every seed; None = all). For quick experiments and smoke tests; ε is accounted for the
            subset (n = train_subset), whose examples are the only ones the run touches.
        secure_noise: secure mode (:mod:`dpfunc.secure_noise`): the clipped sum rounded to a grid 2^-k,
            exact discrete Gaussian noise from a ChaCha20 stream keyed by OS entropy, ε from the
            discrete-Gaussian bound (:mod:`dpfunc.accounting.discrete_gaussian`). The noise is NOT
            derived from ``seed``: such a run cannot be reproduced.
        noise_reproducible: recorded, not chosen: ``not secure_noise`` (None fills it in; a
            contradicting value is refused), so that config.json says whether the noise can be replayed.
        device: where the run computes: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``,
            ``"cuda"`` or ``"cuda:N"`` (see :mod:`dpfunc.devices`). The spelling is checked here,
            the machine's devices when :func:`train` starts. Not part of the run's identity
            (``compare=False``): a run resumes on another device with the same ledger and keys
            (not bit for bit: the noise generator and the arithmetic differ between devices).
        deterministic: run with torch's deterministic algorithms (``--deterministic``; see
            :func:`dpfunc.devices.deterministic_algorithms`). Not part of the run's identity either;
            the privacy guarantee does not depend on it.
        precision: ``"fp32"`` or ``"bf16"``: the arithmetic of the model's forward/backward
            (autocast). Clipping norms, the clipped sum, the noise and the update are float32 in both
            (see :class:`dpfunc.devices.Precision`).
        clipping: ``"flat"`` (clip at ``max_grad_norm``) or ``"adaptive"`` (Andrew et al. 2021, see
            :mod:`dpfunc.adaptive_clipping`: ``max_grad_norm`` is the initial bound, which then follows
            the ``target_quantile`` of the gradient norms; σ is still calibrated to ``epsilon``).
        target_quantile: adaptive: the fraction of examples left unclipped (γ, default the median).
        clip_learning_rate: adaptive: η, the step size of ``log C`` per step.
        count_noise_multiplier: adaptive: σ_b, the noise std of each step's count (in examples);
            None = ``batch_size / 20`` (the paper's choice).
        clip_normalize: adaptive: divide each released mean by the current clip norm C_t, so that the
            learning rate means what it means at flat C = 1 (``--lr`` tuned for flat clipping carries
            over; free post-processing). False is the paper's plain update, whose step grows with C_t.
    """

    model: str = "cnn"
    epsilon: float | None = 3.0
    delta: float = 1e-5
    noise_multiplier: float | None = None
    epochs: int = 15
    batch_size: int = 256
    learning_rate: float | None = None
    momentum: float = 0.9
    ema_decay: float = 0.9
    max_grad_norm: float = 1.0
    augment_views: int = 0
    image_size: int = 28
    engine: str = "fast"
    private: bool = True
    seed: int = 0
    train_subset: int | None = None
    secure_noise: bool = False
    noise_reproducible: bool | None = None
    device: str = field(default="auto", compare=False)
    deterministic: bool = field(default=False, compare=False)
    precision: str = "fp32"
    clipping: str = "flat"
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    count_noise_multiplier: float | None = None
    clip_normalize: bool = True

    def __post_init__(self) -> None:
        fn = "TrainConfig"
        object.__setattr__(self, "device", check_device_spec(fn, "device", self.device))
        object.__setattr__(self, "precision", check_precision(fn, "precision", self.precision).value)
        if not isinstance(self.deterministic, bool):
            raise ValueError(f"{fn}: deterministic must be a bool, got {self.deterministic!r}")
        if self.model not in ("cnn", "resnet18"):
            raise ValueError(f"{fn}: model must be 'cnn' or 'resnet18', got {self.model!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"{fn}: engine must be one of {ENGINES}, got {self.engine!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"{fn}: delta must be in (0, 1), got {self.delta!r}")
        if self.private:
            if self.epsilon is None and self.noise_multiplier is None:
                raise ValueError(f"{fn}: a private run needs epsilon (target) or noise_multiplier")
            if self.epsilon is not None and not (self.epsilon > 0 and math.isfinite(self.epsilon)):
                raise ValueError(f"{fn}: epsilon must be a finite number > 0, got {self.epsilon!r}")
            if self.noise_multiplier is not None and not self.noise_multiplier > 0:
                raise ValueError(f"{fn}: noise_multiplier must be > 0, got {self.noise_multiplier!r}")
        for name, low in (("epochs", 1), ("batch_size", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{fn}: {name} must be an int >= {low}, got {v!r}")
        if self.learning_rate is None:
            object.__setattr__(self, "learning_rate", 1.0 if self.private else 0.05)
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"{fn}: learning_rate must be a finite number > 0, got {self.learning_rate!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"{fn}: momentum must be in [0, 1), got {self.momentum!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"{fn}: ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(f"{fn}: max_grad_norm must be a finite number > 0, got {self.max_grad_norm!r}")
        if isinstance(self.augment_views, bool) or not isinstance(self.augment_views, int) or self.augment_views < 0:
            raise ValueError(f"{fn}: augment_views must be an int >= 0, got {self.augment_views!r}")
        if self.image_size not in (28, 64, 224):
            raise ValueError(f"{fn}: image_size must be 28, 64 or 224, got {self.image_size!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"{fn}: seed must be an int (0 is valid), got {self.seed!r}")
        if self.train_subset is not None and (isinstance(self.train_subset, bool) or not isinstance(self.train_subset, int)
                                              or self.train_subset < 2):
            raise ValueError(f"{fn}: train_subset must be None or an int >= 2, got {self.train_subset!r}")
        if not isinstance(self.secure_noise, bool) or (self.secure_noise and not self.private):
            raise ValueError(f"{fn}: secure_noise must be a bool and needs private=True, got {self.secure_noise!r}")
        if self.noise_reproducible is None:
            object.__setattr__(self, "noise_reproducible", not self.secure_noise)
        if self.noise_reproducible is not (not self.secure_noise):
            raise ValueError(f"{fn}: noise_reproducible is {not self.secure_noise} when secure_noise={self.secure_noise}, "
                             f"got {self.noise_reproducible!r}")
        if self.clipping not in CLIPPINGS:
            raise ValueError(f"{fn}: clipping must be one of {CLIPPINGS}, got {self.clipping!r}")
        if self.clipping == "adaptive":
            if self.secure_noise:
                raise ValueError(f"{fn}: clipping='adaptive' with secure_noise is not supported (the count would need "
                                 f"discrete noise too); use flat clipping in secure mode")
            if self.count_noise_multiplier is None:
                object.__setattr__(self, "count_noise_multiplier", self.batch_size / 20)
            self.adaptive_rule()  # validates γ, η, σ_b
            if not isinstance(self.clip_normalize, bool):
                raise ValueError(f"{fn}: clip_normalize must be a bool, got {self.clip_normalize!r}")

    def adaptive_rule(self):
        """The :class:`~dpfunc.AdaptiveClipping` of an adaptive run (None for flat clipping)."""
        if self.clipping != "adaptive":
            return None
        from dpfunc.adaptive_clipping import AdaptiveClipping

        return AdaptiveClipping(self.max_grad_norm, self.target_quantile, self.clip_learning_rate, self.count_noise_multiplier)


@dataclass
class RunResult:
    """What a finished run reports (also written as ``metrics.json``)."""

    config: dict
    noise_multiplier: float | None
    sampling_rate: float
    steps: int
    epsilon: float | None
    delta: float
    best_epoch: int
    val: dict
    test: dict
    test_ci: dict
    train_seconds: float
    history: list[dict] = field(default_factory=list)
    device: str = ""  # where the training ran, e.g. "cuda:0 (NVIDIA H100 80GB HBM3)" ("" when not recorded)


def evaluate_scores(apply_fn: Callable, params: dict, buffers: dict, data: ImageDataset, batch_size: int = 1024) -> torch.Tensor:
    """Probabilities of class 1 (pneumonia) for every example of ``data``, shape ``(N,)``, on the CPU.

    The model runs where ``params`` are; chunks of ``data`` are moved there (:func:`dpfunc.devices.to_device`)
    and the scores are read back once, at the end.
    """
    device = next(iter(params.values())).device if params else torch.device("cpu")
    out = []
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            logits = apply_fn(params, buffers, to_device(data.images[i : i + batch_size], device))
            out.append(logits.float().softmax(-1)[:, 1])
    return torch.cat(out).cpu()


def ema_update(average: dict, params: dict, decay: float, step: int) -> dict:
    """One step of the exponential moving average of the iterates, warmed up over the first steps.

    ``average ← d·average + (1 − d)·params`` with ``d = min(decay, (1 + step) / (10 + step))``, so early
    averages are not dominated by the initialisation. Averaging released iterates is post-processing:
    it costs no privacy (De et al. 2022 found it essential for DP-SGD accuracy).
    """
    d = min(decay, (1 + step) / (10 + step))
    return {k: d * average[k] + (1 - d) * p for k, p in params.items()}


def _per_example_loss(apply_fn: Callable, views: int) -> Callable:
    if views:
        def loss(params, buffers, x, y):  # x: (K, C, H, W), one example's K views
            logits = apply_fn(params, buffers, x)
            return F.cross_entropy(logits, y.expand(x.shape[0]))
    else:
        def loss(params, buffers, x, y):
            return F.cross_entropy(apply_fn(params, buffers, x[None]), y[None])
    return loss


def _make_engine(cfg: TrainConfig, module, apply_fn, clipping):
    if cfg.engine == "fast":
        from dpfunc.bridge.fast import fast_engine

        model = apply_fn if Precision(cfg.precision) is Precision.BF16 else module  # apply_fn: the autocast forward
        return fast_engine(model, lambda out, y: F.cross_entropy(out, y, reduction="none"), clipping,
                           views_per_example=cfg.augment_views or None)
    return vmap_engine(_per_example_loss(apply_fn, cfg.augment_views), clipping=clipping)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def _plan(cfg: TrainConfig, n: int) -> tuple[float, int, int]:
    """``(sampling_rate, steps_per_epoch, total_steps)``; a batch size above ``n`` is refused."""
    if cfg.batch_size > n:
        raise ValueError(f"train: batch_size {cfg.batch_size} (--batch-size) is larger than the training set "
                         f"(n = {n}); the expected batch size is q·n with sampling rate q ≤ 1, so use at most {n}")
    q = cfg.batch_size / n
    steps_per_epoch = max(1, round(n / cfg.batch_size))
    if cfg.private:
        warn_vacuous_delta("train", cfg.delta, n)
    return q, steps_per_epoch, steps_per_epoch * cfg.epochs


def _bar_text(epoch: int, epochs: int, last: dict | None, private: bool) -> str:
    """The progress bar's postfix: the epoch under way and the last finished epoch's figures (none
    before the first epoch ends, rather than 'nan')."""
    text = f"epoch {epoch + 1}/{epochs}"
    if last is not None:
        text += f" | epoch {last['epoch']}: loss {last['train_loss']:.3f} val AUC {last['val_auc']:.3f}"
        text += f" acc {last['val_accuracy']:.3f}" + (f" ε {last['epsilon']:.2f}" if private else "")
    return text


def _clip_state(opt_state: Any):
    from dpfunc.adaptive_clipping import find_adaptive_state

    return find_adaptive_state(opt_state)


def _mean_loss(losses: list) -> float:
    """Mean of the per-step mean losses over non-empty batches (floats or 0-d tensors); nan if none.

    The 0-d tensors of an epoch are read back together (one host read, not one per step)."""
    if not losses:
        return math.nan
    pairs = torch.stack([torch.stack([torch.as_tensor(loss, dtype=torch.float64).cpu(), torch.as_tensor(size, dtype=torch.float64).cpu()])
                         for loss, size in losses]).tolist()
    values = [loss for loss, size in pairs if size > 0]
    return sum(values) / len(values) if values else math.nan


def _check_finite_losses(losses: list, first_step: int, learning_rate: float, fn: str = "train") -> None:
    """The non-private baseline's divergence check, once per epoch (no host read in the step loop)."""
    if not losses:
        return
    values = torch.stack([torch.as_tensor(loss, dtype=torch.float64).cpu() for loss, _ in losses])
    bad = torch.nonzero(~torch.isfinite(values)).flatten().tolist()
    if bad:
        raise ValueError(f"{fn}: the loss became {values[bad[0]].item()} at step {first_step + bad[0]} (non-private run "
                         f"diverged); lower --lr (now {learning_rate})")


#: Seed of the fixed training subset of ``train_subset`` (public: which examples are used is not secret).
_SUBSET_SEED = 0x5B5E7


def load_training_set(cfg: TrainConfig, data_dir: str | Path | None = None) -> ImageDataset:
    """The training split, or its fixed random subset of ``cfg.train_subset`` examples."""
    train_set = pneumoniamnist("train", data_dir, size=cfg.image_size)
    if cfg.train_subset is None:
        return train_set
    if cfg.train_subset > len(train_set):
        raise ValueError(f"train: train_subset {cfg.train_subset} (--train-subset) is larger than the training "
                         f"split (n = {len(train_set)})")
    idx = torch.randperm(len(train_set), generator=Key(_SUBSET_SEED).generator())[: cfg.train_subset].sort().values
    return ImageDataset(train_set.images[idx], train_set.labels[idx], train_set.classes)


class RunPlan(NamedTuple):
    """What a run will do, known before it trains (``dpfunc train --dry-run`` prints it)."""

    num_examples: int
    sampling_rate: float
    steps_per_epoch: int
    steps: int
    noise_multiplier: float | None


def plan_run(cfg: TrainConfig, data_dir: str | Path | None = None) -> RunPlan:
    """n, q, steps and σ (calibrated to ``cfg.epsilon`` when that is set) of a run, without training."""
    n = len(load_training_set(cfg, data_dir))
    q, steps_per_epoch, total_steps = _plan(cfg, n)
    return RunPlan(n, q, steps_per_epoch, total_steps, calibrate(cfg, q, total_steps))


def _load_run_checkpoint(path: Path, map_location: Any = None) -> dict:
    """A run's checkpoint; a secure-mode run's ledger is marked discrete Gaussian (checkpoints written before
    ledgers recorded the mechanism would otherwise be accounted as the continuous Gaussian, a smaller ε)."""
    from dpfunc.bridge.checkpoint import load_checkpoint

    state = load_checkpoint(path, map_location=map_location)
    if isinstance(state, dict) and isinstance(state.get("config"), dict) and state["config"].get("secure_noise"):
        state["opt_state"] = with_discrete_gaussian_ledger(state["opt_state"])
    return state


def _epsilon_spent(cfg: TrainConfig, opt_state: Any) -> float:
    """ε spent so far, a pure function of the ledger in ``opt_state``; ∞ for a non-private run."""
    if not cfg.private:
        return math.inf
    # The ledger names each phase's mechanism: PLD for the Gaussian, the discrete Gaussian's RDP bound
    # (dpfunc.accounting.discrete_gaussian) for secure-mode phases.
    return accounting.epsilon(privacy_ledger(opt_state), cfg.delta)


def calibrate(cfg: TrainConfig, sampling_rate: float, steps: int) -> float | None:
    """σ for the run: given, or calibrated to the target ε with the PLD accountant."""
    if not cfg.private:
        return None
    if cfg.epsilon is None:
        return cfg.noise_multiplier
    if cfg.secure_noise:
        from dpfunc.accounting.discrete_gaussian import discrete_gaussian_noise_multiplier_for
        return discrete_gaussian_noise_multiplier_for(cfg.epsilon, cfg.delta, sampling_rate, steps)
    return accounting.noise_multiplier_for(cfg.epsilon, cfg.delta, sampling_rate, steps, method="pld")


def _run_device(cfg: TrainConfig, world: Any) -> torch.device:
    """This process's device for ``cfg.device``.

    One process: :func:`dpfunc.devices.resolve_device`. Several (``world``, or a launcher's ``WORLD_SIZE``):
    one GPU per local rank, ``cuda:LOCAL_RANK``; ``"auto"`` falls back to the CPU when the machine has fewer
    GPUs than local ranks or when the given ``world``'s group is gloo; ``"cuda"`` with too few GPUs and
    ``"cuda:N"`` (every rank would take the same GPU) are refused.
    """
    device = resolve_device(cfg.device, fn="train", name="device (--device)")
    ranks = world.size if world is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if ranks == 1 or device.type != "cuda":
        return device
    if cfg.device.startswith("cuda:"):
        raise ValueError(f"train: device (--device) {cfg.device!r} with {ranks} processes: each rank uses the GPU of its "
                         f"LOCAL_RANK; give 'cuda' or 'auto'")
    if world is not None and world.group is not None and cfg.device == "auto":
        import torch.distributed as dist

        if dist.get_backend(world.group) != "nccl":
            return torch.device("cpu")  # a CPU process group was handed in: keep the tensors where it reduces them
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", ranks))
    gpus = torch.cuda.device_count()
    if gpus < local_ranks:
        if cfg.device == "auto":
            return torch.device("cpu")
        raise ValueError(f"train: device (--device) 'cuda' with {local_ranks} processes on this machine needs one GPU per "
                         f"process; it has {gpus}. Use --device cpu (or auto), or fewer processes")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def train(
    cfg: TrainConfig,
    *,
    data_dir: str | Path | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
    bootstrap_resamples: int = 1000,
    world: Any = None,
) -> RunResult:
    """Train, select on validation, evaluate on test, write the run folder.

    Args:
        cfg: the :class:`TrainConfig`.
        data_dir: where ``pneumoniamnist.npz`` is (else ``$DPFUNC_DATA`` or the cache).
        run_dir: the run folder (config, checkpoint, metrics, plots); None writes nothing.
        resume: continue from ``run_dir/checkpoint.pt`` (same config required; the checkpoint must
            exist). A finished run is not trained further: its result is recomputed, with ε read
            from the checkpoint's ledger.
        overwrite: start afresh in a ``run_dir`` that holds a run (its :data:`RUN_FILES` are removed
            first); without it such a folder is refused.
        progress: show a progress bar (``tqdm.auto``: terminal or notebook); None decides from the
            terminal (see :mod:`dpfunc._progress`).
        log: where per-epoch lines go.
        bootstrap_resamples: resamples for the test metrics' confidence intervals.
        world: a :class:`dpfunc.distributed.World` for data-parallel DP-SGD (each rank computes the
            clipped sum of its slice of the shared Poisson batch; see :mod:`dpfunc.distributed`);
            None joins the group a launcher (``torchrun``, ``dpfunc train --nproc``) set up, if any.
            Only rank 0 logs and writes the run folder; every rank returns the same result.

    Raises:
        ValueError: a batch size above the number of training examples, a checkpoint from another
            configuration, ``resume`` together with ``overwrite``.
        FileExistsError: ``run_dir`` holds a run and neither ``resume`` nor ``overwrite`` is set.
        FileNotFoundError: ``resume`` without a checkpoint in ``run_dir``.
    """
    if resume and overwrite:
        raise ValueError("train: resume continues a run and overwrite replaces it; pass one of them")
    if cfg.deterministic and not torch.are_deterministic_algorithms_enabled():  # set for the run, restored after
        with deterministic_algorithms(True):
            return train(cfg, data_dir=data_dir, run_dir=run_dir, resume=resume, overwrite=overwrite, progress=progress,
                         log=log, bootstrap_resamples=bootstrap_resamples, world=world)
    device = _run_device(cfg, world)
    from dpfunc.bridge import functionalize
    from dpfunc.clipping import flush_nonfinite_checks
    from dpfunc.distributed import init_world, make_distributed_step, rank_slice, save_on_rank0, shared_entropy, slice_bounds, sync

    world = init_world(device) if world is None else world  # gloo on CPU, NCCL on CUDA (cuda:LOCAL_RANK selected)
    if world.size > 1 and not cfg.private:
        raise ValueError(f"train: data-parallel training (world size {world.size}) is for DP-SGD runs; train the "
                         f"non-private baseline in one process")
    if not world.is_main:
        log, progress = (lambda *_: None), False
    train_set = load_training_set(cfg, data_dir)
    val_set = pneumoniamnist("val", data_dir, size=cfg.image_size)
    n = len(train_set)
    q, steps_per_epoch, total_steps = _plan(cfg, n)
    sigma = calibrate(cfg, q, total_steps)

    keys = run_keys(Key(cfg.seed))  # by purpose; the order lives in dpfunc.keys only
    init_key, sample_key, noise_key, aug_key = keys.init, keys.sampling, keys.noise, keys.augment
    module = build_model(cfg.model, key=init_key, **({"input_size": cfg.image_size} if cfg.model == "resnet18" else {}))
    apply_fn, params, buffers = functionalize(module.to(device))  # initialised on the CPU (same init everywhere)
    apply_fn = mixed_precision(apply_fn, device, Precision(cfg.precision))
    # The training images live on the device (one pinned, non-blocking upload); a step sends only its indices.
    train_set = ImageDataset(to_device(train_set.images, device), to_device(train_set.labels, device), train_set.classes)

    if cfg.private and cfg.clipping == "adaptive":
        if world.size > 1:
            raise ValueError(f"train: adaptive clipping runs in one process (the count of unclipped examples is not "
                             f"summed over {world.size} ranks); use --clipping flat for data-parallel training")
        from dpfunc.adaptive_clipping import adaptive_dpsgd

        tx = adaptive_dpsgd(cfg.learning_rate, noise_multiplier=sigma, clipping=cfg.adaptive_rule(), sampling_rate=q,
                            num_examples=n, key=noise_key, momentum=cfg.momentum, normalize=cfg.clip_normalize)
        step_fn = make_step(None, tx, engine=_make_engine(cfg, module, apply_fn, cfg.adaptive_rule()))
    elif cfg.private:
        tx = dpsgd(cfg.learning_rate, noise_multiplier=sigma, max_grad_norm=cfg.max_grad_norm, sampling_rate=q,
                   num_examples=n, key=noise_key, momentum=cfg.momentum, secure=cfg.secure_noise,
                   # several ranks: rank 0's OS entropy keys every rank's secure noise (the same noise, once)
                   secure_entropy=shared_entropy(world) if cfg.secure_noise and world.size > 1 else None)
        engine = _make_engine(cfg, module, apply_fn, FlatClipping(cfg.max_grad_norm))
        step_fn = make_step(None, tx, engine=engine) if world.size == 1 else make_distributed_step(None, tx, world=world, engine=engine)
    else:
        tx = sgd(cfg.learning_rate, cfg.momentum)
        mean_loss = lambda p, b, x, y: F.cross_entropy(apply_fn(p, b, x), y)  # noqa: E731
        grad_fn = grad_and_value(mean_loss)
    opt_state = tx.init(params)

    run_path = Path(run_dir) if run_dir is not None else None
    history: list[dict] = []
    best = {"epoch": 0, "val_auc": -math.inf, "params": params}
    average = dict(params)
    start_epoch, elapsed = 0, 0.0
    if run_path is not None:
        ckpt = run_path / "checkpoint.pt"
        if resume and not ckpt.is_file():
            raise FileNotFoundError(f"train: nothing to resume: no checkpoint at {ckpt} (check run_dir / --run-dir, "
                                    f"or start the run without resume)")
        if not resume and (ckpt.exists() or (run_path / "config.json").exists()):
            if not overwrite:
                raise FileExistsError(f"train: {run_path} already holds a run; pass resume=True (--resume) to continue "
                                      f"it, overwrite=True (--overwrite) to replace it, or choose another run_dir")
            sync(world)  # every rank has checked the folder before rank 0 empties it
            for name in RUN_FILES:
                if world.is_main:
                    (run_path / name).unlink(missing_ok=True)
        run_path.mkdir(parents=True, exist_ok=True)
        if resume:
            state = _load_run_checkpoint(ckpt, map_location=device)
            if TrainConfig(**state["config"]) != cfg:  # fields added later take their defaults
                raise ValueError(f"train: {ckpt} was written by another configuration; start a new run folder "
                                 f"or resume with the same flags.\n saved: {state['config']}\n given: {asdict(cfg)}")
            params, buffers, opt_state = state["params"], state["buffers"], state["opt_state"]
            if cfg.private and (cfg.clipping == "adaptive") != (_clip_state(opt_state) is not None):
                raise ValueError(f"train: {ckpt} holds {'no' if cfg.clipping == 'adaptive' else 'an'} adaptive clip norm, "
                                 f"but the run is configured with clipping={cfg.clipping!r}; start a new run folder")
            average = state["average"]
            history, start_epoch, elapsed = state["history"], state["epoch"], state["elapsed"]
            best = {"epoch": state["best_epoch"], "val_auc": state["best_val_auc"], "params": state["best_params"]}
            if start_epoch >= cfg.epochs:
                log(f"{ckpt}: the run finished all {cfg.epochs} epochs; nothing to train, re-evaluating it")
            else:
                log(f"resumed {ckpt} at epoch {start_epoch}/{cfg.epochs}")
        sync(world)  # every rank has read the folder before rank 0 writes to it
        if world.is_main:
            _write_json(run_path / "config.json", asdict(cfg))

    if cfg.private:
        clip_text = (f"C={cfg.max_grad_norm}" if cfg.clipping == "flat" else
                     f"adaptive C₀={cfg.max_grad_norm} γ={cfg.target_quantile} η={cfg.clip_learning_rate} σ_b={cfg.count_noise_multiplier:g}"
                     f"{' (update / C_t)' if cfg.clip_normalize else ''}")
        log(f"DP-SGD: n={n} q={q:.5f} (expected batch {cfg.batch_size}) steps={total_steps} σ={sigma:.4f} {clip_text} "
            f"target ε={cfg.epsilon} δ={cfg.delta} engine={cfg.engine}")
    else:
        log(f"non-private SGD: n={n} batch={cfg.batch_size} steps={total_steps} (ε = ∞)")

    log(f"device: {describe_device(device)}, precision {cfg.precision}" + (", deterministic algorithms" if cfg.deterministic else ""))
    # ε is only ever read from the ledger (a resumed or finished run starts from what it has spent).
    eps_spent = _epsilon_spent(cfg, opt_state)
    last_val = history[-1] if history else None
    bar = progress_bar(total=total_steps, initial=start_epoch * steps_per_epoch, desc="training", unit="step",
                       enabled=progress)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        bar.set_postfix_str(_bar_text(epoch, cfg.epochs, last_val, cfg.private), refresh=False)
        losses = []  # (mean loss, batch size) per step; read once per epoch (no per-step host sync)
        for i in range(steps_per_epoch):
            t = epoch * steps_per_epoch + i
            if cfg.private:
                idx = to_device(poisson_sample(sample_key.fold_in(t), n, q), device)  # the same batch on every rank and device
                if cfg.augment_views:  # the whole batch's views, then this rank's rows: the one-process views
                    x = augment_views(aug_key.fold_in(t), train_set.images[idx], cfg.augment_views)
                    lo, hi = slice_bounds(len(idx), world.size)[world.rank]
                    x, y = x[lo:hi], train_set.labels[idx[lo:hi]]
                else:
                    idx = rank_slice(idx, world.rank, world.size)  # this rank reads its slice only
                    x, y = train_set.images[idx], train_set.labels[idx]
                params, opt_state, m = step_fn(params, opt_state, (x, y), buffers=buffers)
                losses.append((m.loss, m.batch_size))
            else:
                perm = torch.randperm(n, generator=sample_key.fold_in(epoch).generator())
                idx = to_device(perm[(i * cfg.batch_size) % n:][: cfg.batch_size], device)
                g, batch_loss = grad_fn(params, buffers, train_set.images[idx], train_set.labels[idx])
                updates, opt_state = tx.update(g, opt_state, params)
                params = apply_updates(params, updates)
                losses.append((batch_loss.detach(), len(idx)))  # checked once per epoch: no host read per step
            average = ema_update(average, params, cfg.ema_decay, t) if cfg.ema_decay else params
            bar.update(1)
        if not cfg.private:
            _check_finite_losses(losses, epoch * steps_per_epoch, cfg.learning_rate)
        flush_nonfinite_checks()  # a GPU's non-finite-gradient checks still in flight (CPU: nothing to wait for)
        elapsed += time.perf_counter() - t0
        eps_spent = _epsilon_spent(cfg, opt_state)
        val_scores = evaluate_scores(apply_fn, average, buffers, val_set)
        vm = binary_metrics(val_set.labels, val_scores)
        record = {"epoch": epoch + 1, "train_loss": _mean_loss(losses), "val_auc": vm.roc_auc,
                  "val_accuracy": vm.accuracy, "epsilon": eps_spent if cfg.private else None, "seconds": elapsed}
        if cfg.private and cfg.clipping == "adaptive":
            record["max_grad_norm"] = _clip_state(opt_state).max_grad_norm  # public: a function of released counts
        history.append(record)
        last_val = record
        if vm.roc_auc > best["val_auc"]:
            best = {"epoch": epoch + 1, "val_auc": vm.roc_auc, "params": average}
        if run_path is not None:
            save_on_rank0(run_path / "checkpoint.pt", {
                "config": asdict(cfg), "params": params, "average": average, "buffers": buffers, "opt_state": opt_state,
                "history": history, "epoch": epoch + 1, "elapsed": elapsed, "best_epoch": best["epoch"],
                "best_val_auc": best["val_auc"], "best_params": best["params"], "noise_multiplier": sigma,
                "sampling_rate": q, "steps_done": (epoch + 1) * steps_per_epoch,
            }, world)
        with bar.external_write_mode():
            log(f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {record['train_loss']:.4f}  val AUC {vm.roc_auc:.4f}  "
                f"val acc {vm.accuracy:.4f}  ε {eps_spent:.3f}  ({elapsed:.0f}s)")
    bar.close()

    # The test split is read here, once, with the parameters chosen on validation.
    test_set = pneumoniamnist("test", data_dir, size=cfg.image_size)
    result, test_scores = _final_report(cfg, apply_fn, best, buffers, val_set, test_set, sigma, q, total_steps,
                                        eps_spent, elapsed, history, bootstrap_resamples, progress)
    result.device = describe_device(device)
    if run_path is not None and world.is_main:
        _write_outputs(run_path, result, test_scores, test_set)
    sync(world)
    return result


def _final_report(cfg, apply_fn, best, buffers, val_set, test_set, sigma, q, steps, eps, elapsed, history, resamples,
                  progress=None) -> tuple[RunResult, torch.Tensor]:
    """The run's result and the test scores of the selected parameters (computed once, reused for the plots)."""
    val = binary_metrics(val_set.labels, evaluate_scores(apply_fn, best["params"], buffers, val_set))
    scores = evaluate_scores(apply_fn, best["params"], buffers, test_set)
    test = binary_metrics(test_set.labels, scores)
    ci = bootstrap_ci(test_set.labels, scores, seed=cfg.seed, num_resamples=resamples, progress=progress)
    return RunResult(
        config=asdict(cfg), noise_multiplier=sigma, sampling_rate=q, steps=steps,
        epsilon=eps if cfg.private else None, delta=cfg.delta, best_epoch=best["epoch"],
        val=val.to_dict(), test=test.to_dict(), test_ci={k: v.to_dict() for k, v in ci.items()},
        train_seconds=elapsed, history=history,
    ), scores


def _write_outputs(run_path: Path, result: RunResult, scores: torch.Tensor, test_set) -> None:
    from dpfunc.plots import plot_confusion_matrix, plot_roc, plot_training_curves

    _write_json(run_path / "metrics.json", asdict(result))
    plot_roc(test_set.labels, scores, run_path / "roc.png", name="DP-SGD" if result.config["private"] else "non-private")
    plot_confusion_matrix(confusion_matrix(test_set.labels, (scores >= 0.5).long()), run_path / "confusion.png")
    plot_training_curves(result.history, run_path / "training.png", metric="val_auc",
                         epsilon="epsilon" if result.config["private"] else "__none__")


def evaluate_run(cfg: TrainConfig, state: dict, data_dir: str | Path | None = None, *,
                 bootstrap_resamples: int = 1000, progress: bool | None = None,
                 device: str | torch.device = "auto") -> tuple[dict, dict, float | None]:
    """Test metrics, their bootstrap CIs and ε (from the checkpoint's ledger; None if non-private) of a
    run's best validation parameters, as ``(metrics, ci, epsilon)`` (for ``dpfunc evaluate``).

    The model runs on ``device`` (``"auto" | "cpu" | "cuda" | "cuda:N"``, whatever device trained it),
    in the run's precision; the checkpoint's tensors are moved there."""
    from dpfunc.bridge import functionalize

    where = resolve_device(device, fn="evaluate_run", name="device (--device)")
    init_key = run_keys(Key(cfg.seed)).init
    module = build_model(cfg.model, key=init_key, **({"input_size": cfg.image_size} if cfg.model == "resnet18" else {}))
    apply_fn, _, _ = functionalize(module.to(where))
    apply_fn = mixed_precision(apply_fn, where, Precision(cfg.precision))
    params = {k: to_device(v, where) for k, v in state["best_params"].items()}
    buffers = {k: to_device(v, where) for k, v in state["buffers"].items()}
    test_set = pneumoniamnist("test", data_dir, size=cfg.image_size)
    scores = evaluate_scores(apply_fn, params, buffers, test_set)
    test = binary_metrics(test_set.labels, scores).to_dict()
    ci = bootstrap_ci(test_set.labels, scores, seed=cfg.seed, num_resamples=bootstrap_resamples, progress=progress)
    eps = _epsilon_spent(cfg, state["opt_state"]) if cfg.private else None
    return test, {k: v.to_dict() for k, v in ci.items()}, eps


def load_run(run_dir: str | Path, *, map_location: Any = "cpu") -> tuple[TrainConfig, dict]:
    """The config and checkpoint of a run folder (for ``dpfunc evaluate``, ``infer``, ``attack``).

    ``map_location`` (as for ``torch.load``; default the CPU) decides where the tensors land, so a run
    trained on a GPU loads on a machine without one."""
    run_path = Path(run_dir)
    ckpt = run_path / "checkpoint.pt"
    if not ckpt.exists():
        raise FileNotFoundError(f"load_run: no checkpoint at {ckpt}; is {run_path} a folder written by `dpfunc train --run-dir`?")
    state = _load_run_checkpoint(ckpt, map_location=map_location)
    return TrainConfig(**state["config"]), state
