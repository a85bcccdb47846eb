"""The ``dpfunc`` command line: ``train``, ``evaluate``, ``account`` (and the subcommands registered below).

Examples::

    dpfunc train                                   # DP-SGD, ε = 3, δ = 1e-5, CNN -> runs/cnn-eps3.0-seed0/
    dpfunc train --no-dp                           # the non-private baseline
    dpfunc train --resume                          # continue the newest run with these flags
    dpfunc evaluate runs/cnn-eps3.0-seed0          # test metrics and ε from the checkpoint
    dpfunc account --noise-multiplier 1.1 --sampling-rate 0.0042667 --steps 14062 --delta 1e-5

The data file is found with --data-dir, else $DPFUNC_DATA, else ../shared/data beside a source
checkout, else ~/.cache/dpfunc (--download fetches it there).

Adding a subcommand: write ``add_parser(subparsers) -> ArgumentParser`` and ``run(args) -> int`` (in
their own module when they are more than a few lines) and add one line to :data:`COMMANDS`. ``run``
raises :class:`CommandError` (or ``ValueError``/``OSError``) for user errors: :func:`main` prints
them as ``dpfunc <command>: error: …`` without a traceback and exits 2 (``DPFUNC_DEBUG=1`` re-raises).
A ``--quiet`` flag on a subcommand turns every :mod:`dpfunc._progress` bar off for that command.
A subcommand that computes with a model declares ``--device``/``--threads`` with
:func:`add_compute_arguments` and calls :func:`compute_device` first thing in ``run``.
``$DPFUNC_<COMMAND>_ARGS`` (``-`` read as ``_``; e.g. ``DPFUNC_TRAIN_ARGS="--epochs 1"``) is appended to that subcommand's
command line, as ``PYTEST_ADDOPTS`` is for pytest: later flags win, so it shrinks any documented
command to a smoke test (the README test does this), and a note on stderr says it happened.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from dpfunc._argtypes import device_spec as _device_spec, int_at_least as _int_at_least, positive_float as _positive_float, unit_interval as _unit_interval

__all__ = ["main", "build_parser", "Command", "CommandError", "COMMANDS",
           "add_compute_arguments", "compute_device", "add_device_argument", "check_device_available"]


class CommandError(Exception):
    """A user error whose message is already phrased in the command line's terms (flags, not APIs)."""


class Command(NamedTuple):
    """One subcommand: ``add_parser(subparsers)`` declares it, ``run(args)`` executes it (exit code)."""

    add_parser: Callable[[argparse._SubParsersAction], argparse.ArgumentParser]
    run: Callable[[argparse.Namespace], int]

    @classmethod
    def from_module(cls, module: str) -> Command:
        """A subcommand whose ``add_parser`` and ``run`` live in ``module`` (imported when used)."""
        return cls(lambda sub: importlib.import_module(module).add_parser(sub),
                   lambda args: importlib.import_module(module).run(args))


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only where X says something: not for None/False defaults, and not when
    the help text already states its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False) or "default" in text or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


_DATA_HELP = ("folder holding pneumoniamnist.npz (default: $DPFUNC_DATA, else ../shared/data beside a source "
              "checkout, else ~/.cache/dpfunc)")


# --------------------------------------------------------------------------- train

#: DP-only flags: refused with --no-dp instead of being silently ignored. name -> TrainConfig default.
_DP_FLAGS = {"epsilon": 3.0, "noise_multiplier": None, "delta": 1e-5, "max_grad_norm": 1.0, "engine": "fast",
             "augment_views": 0, "clipping": "flat", "target_quantile": 0.5, "clip_learning_rate": 0.2,
             "count_noise_multiplier": None, "clip_normalize": True}
#: Flags that only mean something with --clipping adaptive.
_ADAPTIVE_FLAGS = {"target_quantile": "--target-quantile", "clip_learning_rate": "--clip-lr",
                   "count_noise_multiplier": "--count-noise-multiplier", "clip_normalize": "--no-clip-normalize"}


def _add_train(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    t = sub.add_parser("train", help="train a classifier with DP-SGD (or --no-dp) and write a run folder",
                       description="Train with DP-SGD (or the non-private baseline) and write a run folder "
                                   "(config.json, checkpoint.pt, metrics.json, plots).",
                       formatter_class=HelpFormatter)
    t.add_argument("--task", choices=list(TRAIN_TASKS), default="pneumonia",
                   help="pneumonia: classification with the flags below; liver: CT liver segmentation, handed whole "
                        "to `dpfunc segment` (its flags and defaults: dpfunc segment --help)")
    t.add_argument("--dataset", choices=["pneumoniamnist"], default="pneumoniamnist", help="the data set")
    t.add_argument("--data-dir", default=None, help=_DATA_HELP)
    t.add_argument("--download", action="store_true",
                   help="if the file is nowhere to be found, download the official MedMNIST file (needs internet) "
                        "into --data-dir, $DPFUNC_DATA or ~/.cache/dpfunc")
    t.add_argument("--model", choices=["cnn", "resnet18"], default="cnn", help="GroupNorm CNN or ResNet-18-GN")
    t.add_argument("--epsilon", type=_positive_float("--epsilon"), default=None,
                   help="target ε (default: 3); σ is calibrated with the PLD accountant so that ε ≤ target")
    t.add_argument("--delta", type=_unit_interval("--delta"), default=None, help="target δ (default: 1e-5)")
    t.add_argument("--noise-multiplier", type=_positive_float("--noise-multiplier"), default=None,
                   help="train at this σ instead of calibrating to --epsilon")
    t.add_argument("--epochs", type=_int_at_least("--epochs", 1), default=15, help="passes over the data (in expectation)")
    t.add_argument("--batch-size", type=_int_at_least("--batch-size", 1), default=256,
                   help="EXPECTED Poisson batch size (sampling rate = batch size / n; at most n)")
    t.add_argument("--lr", type=_positive_float("--lr"), default=None,
                   help="SGD learning rate (default: 1.0 with DP, 0.05 with --no-dp)")
    t.add_argument("--momentum", type=float, default=0.9, help="SGD momentum in [0, 1)")
    t.add_argument("--ema-decay", type=float, default=0.9,
                   help="evaluate an exponential moving average of the iterates (free post-processing); 0 = last iterate")
    t.add_argument("--max-grad-norm", type=_positive_float("--max-grad-norm"), default=None,
                   help="per-example clipping bound C (default: 1.0)")
    t.add_argument("--clipping", choices=["flat", "adaptive"], default=None,
                   help="flat (default: clip at --max-grad-norm) or adaptive (Andrew et al. 2021: --max-grad-norm is "
                        "the initial bound, which follows a private quantile of the gradient norms; README 'Adaptive clipping')")
    t.add_argument("--target-quantile", type=_unit_interval("--target-quantile", closed_right=True), default=None,
                   help="adaptive: fraction of examples left unclipped (default: 0.5)")
    t.add_argument("--clip-lr", dest="clip_learning_rate", type=_positive_float("--clip-lr"), default=None,
                   help="adaptive: step size of log C per step (default: 0.2)")
    t.add_argument("--count-noise-multiplier", type=_positive_float("--count-noise-multiplier"), default=None,
                   help="adaptive: noise std of each step's count, in examples (default: batch size / 20)")
    t.add_argument("--no-clip-normalize", dest="clip_normalize", action="store_const", const=False, default=None,
                   help="adaptive: the paper's plain update (by default each released mean is divided by the current "
                        "C, so that --lr means what it means at flat C = 1)")
    t.add_argument("--augment-views", type=_int_at_least("--augment-views", 0), default=None,
                   help="augmentation multiplicity K (default: 0 = off): K views per example, clipped as one")
    t.add_argument("--image-size", type=int, choices=[28, 64, 224], default=28,
                   help="input side length (64, 224 = bilinear upsampling; 224 is for GPUs: 0.9 GB of training images)")
    t.add_argument("--engine", choices=["fast", "vmap"], default=None,
                   help="per-example clipping (default: fast): fast (ghost norms / book-keeping) or vmap (oracle)")
    t.add_argument("--no-dp", action="store_true", help="train the non-private baseline (same model and data)")
    t.add_argument("--secure-noise", action="store_true",
                   help="secure mode: grid-rounded sums + exact discrete Gaussian noise from OS entropy (ChaCha20); "
                        "the noise is NOT reproducible from --seed; ε from the discrete-Gaussian bound (README 'Secure mode')")
    t.add_argument("--seed", type=int, default=0, help="root of all keys (init, sampling, noise)")
    t.add_argument("--train-subset", type=_int_at_least("--train-subset", 2), default=None, metavar="N",
                   help="train on a fixed random subset of N training examples (quick experiments; ε is accounted "
                        "for n = N)")
    t.add_argument("--run-dir", default=None,
                   help="run folder (default: runs/<model>-eps<ε>-seed<seed>, or runs/<model>-nodp-seed<seed>; "
                        "when that holds a run already, the next free runs/<name>-2, -3, …)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir (default: the newest default run folder of these flags) "
                        "from its last checkpoint; a finished run is re-evaluated, not retrained")
    t.add_argument("--overwrite", action="store_true", help="replace the run in --run-dir instead of refusing")
    t.add_argument("--bootstrap", type=_int_at_least("--bootstrap", 1), default=1000, help="bootstrap resamples for the CIs")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--dry-run", action="store_true",
                   help="print the plan (run folder, data file, n, q, steps, σ) and exit: nothing is trained or written")
    t.add_argument("--nproc", type=_int_at_least("--nproc", 1), default=1,
                   help="data-parallel DP-SGD on N local processes (same result as one; see README 'Scaling out'); "
                        "for several machines use torchrun -m dpfunc train --run-dir DIR ...")
    add_compute_arguments(t)
    t.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="arithmetic of the model's forward/backward; bf16 = autocast, while clipping, the clipped sum, "
                        "the noise and the update stay float32 (README 'GPUs')")
    t.add_argument("--deterministic", action="store_true",
                   help="torch's deterministic algorithms (CUDA: slower; an op without one stops the run with its name); "
                        "the privacy guarantee does not depend on it")
    return t


def check_device_available(spec: str):
    """The ``torch.device`` that --device ``spec`` names; :class:`CommandError` (naming --device and what this
    machine offers) for a device it lacks.

    Example:
        >>> check_device_available("cpu")
        device(type='cpu')
    """
    from dpfunc.devices import resolve_device

    try:
        return resolve_device(spec, fn="", name="--device")
    except ValueError as e:
        raise CommandError(str(e).removeprefix(": ")) from None


def add_device_argument(p: argparse.ArgumentParser, help: str = "where to compute: auto = the GPU when CUDA is available, "
                                                                 "else the CPU") -> None:
    """``--device auto|cpu|cuda|cuda:N`` (default auto: CUDA when available), for any subcommand that computes
    with a model. The spelling is checked when parsed; whether this machine has the device, when the command
    runs (:func:`dpfunc.devices.resolve_device`)."""
    p.add_argument("--device", type=_device_spec("--device"), default="auto", metavar="{auto,cpu,cuda,cuda:N}", help=help)


def add_compute_arguments(p: argparse.ArgumentParser, **device_help: str) -> None:
    """``--device`` (:func:`add_device_argument`) and ``--threads N``: the two flags of every command that
    computes with a model (train, evaluate, federated, segment, attack, audit, infer). The command calls
    :func:`compute_device` when it starts.

    Example:
        >>> import argparse
        >>> p = argparse.ArgumentParser(prog="dpfunc mine")
        >>> add_compute_arguments(p)
        >>> p.parse_args(["--threads", "1"]).threads
        1
        >>> args = p.parse_args(["--device", "cpu"])  # no --threads: torch's own thread count is kept
        >>> compute_device(args)  # checks that the device exists (a missing one is a CommandError)
        device(type='cpu')
    """
    add_device_argument(p, **device_help)
    p.add_argument("--threads", type=_int_at_least("--threads", 1), default=None, metavar="N",
                   help="CPU threads of torch (torch.set_num_threads; default: torch's own, one per core). On a "
                        "loaded or small machine 1 is often fastest")


def compute_device(args: argparse.Namespace):
    """Apply ``--threads`` and return the ``torch.device`` of ``--device`` (:func:`check_device_available`:
    a device this machine lacks is refused with a :class:`CommandError` before any work is done).
    ``args`` without those flags mean ``auto`` and torch's own thread count (example:
    :func:`add_compute_arguments`)."""
    from dpfunc.devices import set_threads

    set_threads(getattr(args, "threads", None), fn="", name="--threads")
    return check_device_available(getattr(args, "device", "auto"))


def _train_config(args: argparse.Namespace):
    from dpfunc.train import TrainConfig

    compute_device(args)  # --threads; refuse a device this machine lacks, first
    given = {name for name in _DP_FLAGS if getattr(args, name) is not None}
    if args.no_dp and given:
        flags = ", ".join("--" + n.replace("_", "-") for n in sorted(given))
        raise CommandError(f"--no-dp trains without privacy, so {flags} would be ignored; drop {flags} or drop --no-dp")
    if args.secure_noise and args.no_dp:
        raise CommandError("--secure-noise is a way of adding DP noise; drop it or drop --no-dp")
    if args.epsilon is not None and args.noise_multiplier is not None:
        raise CommandError("give --epsilon (σ calibrated to that ε) or --noise-multiplier (a fixed σ), not both")
    for flag, value in (("--momentum", args.momentum), ("--ema-decay", args.ema_decay)):
        if not 0 <= value < 1:
            raise CommandError(f"{flag} must be in [0, 1), got {value}")
    dp = {name: _DP_FLAGS[name] if getattr(args, name) is None else getattr(args, name) for name in _DP_FLAGS}
    stray = [n for n in _ADAPTIVE_FLAGS if getattr(args, n) is not None]
    if stray and dp["clipping"] != "adaptive":
        flags = ", ".join(_ADAPTIVE_FLAGS[n] for n in stray)
        raise CommandError(f"{flags} only apply with --clipping adaptive; add --clipping adaptive or drop {flags}")
    if dp["noise_multiplier"] is not None or args.no_dp:
        dp["epsilon"] = None if dp["noise_multiplier"] is not None else dp["epsilon"]
    return TrainConfig(model=args.model, epsilon=dp["epsilon"], delta=dp["delta"], noise_multiplier=dp["noise_multiplier"],
                       epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, momentum=args.momentum,
                       ema_decay=args.ema_decay, max_grad_norm=dp["max_grad_norm"], augment_views=dp["augment_views"],
                       image_size=args.image_size, engine=dp["engine"], private=not args.no_dp, seed=args.seed,
                       train_subset=args.train_subset, secure_noise=args.secure_noise, device=args.device,
                       precision=args.precision, deterministic=args.deterministic, clipping=dp["clipping"],
                       target_quantile=dp["target_quantile"], clip_learning_rate=dp["clip_learning_rate"],
                       count_noise_multiplier=dp["count_noise_multiplier"], clip_normalize=dp["clip_normalize"])


def default_run_name(cfg) -> str:
    """``<model>-eps<ε>-seed<seed>``, ``<model>-sigma<σ>-seed<seed>`` or ``<model>-nodp-seed<seed>``."""
    if not cfg.private:
        tag = "nodp"
    elif cfg.epsilon is not None:
        tag = f"eps{cfg.epsilon}"
    else:
        tag = f"sigma{cfg.noise_multiplier}"
    return f"{cfg.model}-{tag}-seed{cfg.seed}"


def _holds_run(folder: Path) -> bool:
    return (folder / "checkpoint.pt").exists() or (folder / "config.json").exists()


def _check_writable_folder(path: Path) -> None:
    """Refuse, with a message, a run folder that is a file, lies under a file, or cannot be written."""
    if path.exists() and not path.is_dir():
        raise CommandError(f"--run-dir {path} is an existing file, not a folder; choose another --run-dir")
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CommandError(f"--run-dir {path}: {existing} is a file, so no folder can be made under it; "
                           f"choose another --run-dir")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".dpfunc-write-test-"):
            pass
    except OSError as err:
        raise CommandError(f"--run-dir {path}: cannot write in {existing} ({err.strerror or err}); "
                           f"choose a writable folder with --run-dir") from None


def resolve_run_dir(run_dir: str | None, default_name: str, *, resume: bool, overwrite: bool,
                    root: Path = Path("runs"), matches: Callable[[Path], bool] = lambda folder: True) -> Path:
    """The run folder a ``dpfunc train`` invocation uses.

    - ``--run-dir`` given: that folder. ``--resume`` needs a checkpoint there; a folder that holds a
      run is refused unless ``--resume`` or ``--overwrite``.
    - not given: ``runs/<name>`` when free, else the next free ``runs/<name>-2``, ``-3``, …; with
      ``--resume`` the newest of those that holds a checkpoint and ``matches`` (same configuration);
      with ``--overwrite``, ``runs/<name>``.
    """
    if resume and overwrite:
        raise CommandError("--resume continues a run and --overwrite replaces it; give one of them")
    if run_dir is not None:
        path = Path(run_dir)
        _check_writable_folder(path)
        if resume and not (path / "checkpoint.pt").is_file():
            why = ("it does not exist" if not path.exists() else
                   "it holds no checkpoint.pt (the run stopped before its first epoch ended, or it is not a run folder)")
            raise CommandError(f"--resume: nothing to resume in --run-dir {path}: {why}. Check the path, or drop "
                               f"--resume to start a new run there{' (with --overwrite)' if _holds_run(path) else ''}")
        if _holds_run(path) and not (resume or overwrite):
            raise CommandError(f"--run-dir {path} already holds a run; pass --resume to continue it, --overwrite to "
                               f"replace it, or choose another --run-dir")
        return path
    candidates = [root / default_name] + [root / f"{default_name}-{k}" for k in range(2, 10_000)]
    if resume:
        held = [c for c in candidates[: _first_free(candidates) + 1] if (c / "checkpoint.pt").is_file() and matches(c)]
        if not held:
            raise CommandError(f"--resume: no run folder {root / default_name}[-k] holds a checkpoint of a run with these "
                               f"flags; pass --run-dir, or drop --resume to start a run")
        path = held[-1]
    elif overwrite:
        path = candidates[0]
    else:
        path = candidates[_first_free(candidates)]
    _check_writable_folder(path)
    return path


def _saved_config(folder: Path):
    """The TrainConfig in ``folder/config.json``, or None when it is missing or unreadable."""
    from dpfunc.train import TrainConfig

    try:
        return TrainConfig(**json.loads((folder / "config.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _first_free(candidates: list[Path]) -> int:
    for i, c in enumerate(candidates):
        if not _holds_run(c):
            return i
    raise CommandError(f"no free run folder among {candidates[0]}-2 … -{len(candidates)}; pass --run-dir")


def _run_train(args: argparse.Namespace) -> int:
    from dpfunc.data import _files
    from dpfunc.train import plan_run, train

    if getattr(args, "task", "pneumonia") != "pneumonia":  # only an abbreviated --task gets here (see forward_train_task)
        raise CommandError(f"spell the flag out, `--task {args.task}`: that task is trained by `dpfunc {TRAIN_TASKS[args.task]}`, "
                           f"which `dpfunc train --task {args.task}` runs with the same command line")
    cfg = _train_config(args)
    run_dir = resolve_run_dir(args.run_dir, default_run_name(cfg), resume=args.resume, overwrite=args.overwrite,
                              matches=lambda folder: _saved_config(folder) == cfg)
    # Find (or, with --download, fetch) the data before anything is written.
    data_file = _files.locate_pneumoniamnist(args.data_dir, download=args.download, fn="")
    print(f"run folder: {run_dir}   data: {data_file}")
    if args.nproc > 1 and not args.dry_run:
        from dpfunc.distributed import launch_train_ranks

        return launch_train_ranks(args, _add_train, run_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.run_dir is None:
        raise CommandError("under torchrun every rank must use the same run folder: pass --run-dir")
    if args.dry_run:
        plan = plan_run(cfg, data_file)
        sigma = "none (non-private)" if plan.noise_multiplier is None else f"{plan.noise_multiplier:.4f}"
        from dpfunc.devices import describe_device, resolve_device

        print(f"plan: n = {plan.num_examples}, q = {plan.sampling_rate:.5f}, {plan.steps_per_epoch} steps/epoch × "
              f"{cfg.epochs} epochs = {plan.steps} steps, σ = {sigma}, model {cfg.model}, engine {cfg.engine}, "
              f"device {describe_device(resolve_device(cfg.device))} ({cfg.precision})")
        print("dry run: nothing trained, nothing written")
        return 0
    result = train(cfg, data_dir=data_file, run_dir=run_dir, resume=args.resume, overwrite=args.overwrite,
                   progress=False if args.quiet else None, bootstrap_resamples=args.bootstrap)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports (every rank has the same result)
        _print_result(result.test, result.test_ci, result.epsilon, result.delta, result.train_seconds)
        print(f"run folder: {run_dir}  (metrics.json, checkpoint.pt, roc.png, confusion.png, training.png)")
    return 0


def _print_result(test: dict, ci: dict, eps, delta, seconds) -> None:
    print("test metrics (95% bootstrap CI):")
    for name in ("roc_auc", "accuracy", "mcc", "sensitivity", "specificity"):
        c = ci[name]
        print(f"  {name:<12} {test[name]:.4f}  [{c['lower']:.4f}, {c['upper']:.4f}]")
    eps_text = "∞ (non-private)" if eps is None else format_epsilon(eps)
    print(f"privacy: ε = {eps_text} at δ = {delta:g}; training time {seconds:.0f}s")


def format_epsilon(eps: float, digits: int = 3) -> str:
    """ε for people: fixed point below 10⁵, three significant digits above (``'3.36e+44'``), ``'∞'``."""
    if math.isinf(eps):
        return "∞"
    return f"{eps:.{digits}f}" if abs(eps) < 1e5 else f"{eps:.3g}"


# --------------------------------------------------------------------------- evaluate


def _evaluate_federated(path: Path, args: argparse.Namespace) -> int:
    """``dpfunc evaluate`` on a federated run folder: the selected global model's test metrics and each
    site's ε, an in-flight round charged (:func:`dpfunc.federated.job.evaluate_federated_run`)."""
    from dpfunc.federated.job import evaluate_federated_run

    r = evaluate_federated_run(path, args.data_dir, bootstrap_resamples=args.bootstrap)
    planned = r["config"]["rounds"]
    status = f"finished: {r['rounds']} of {planned} rounds" if r["rounds"] >= planned else (
        f"UNFINISHED: checkpoint after round {r['rounds']} of {planned} (continue it with `dpfunc federated "
        f"--run-dir {path} --resume` and the run's flags)")
    print(f"federated run {path}: model {r['config']['model']}, {r['config']['sites']} sites, {status}; "
          f"evaluated the global model of the best validation round, {r['best_round']}")
    if r["in_flight_charged"]:
        print(f"round {r['in_flight_round']} was in flight when the run stopped: site(s) {r['in_flight_charged']} may "
              f"have released it and are charged that round here (a --resume records the charge)")
    _print_result(r["test"], r["test_ci"], r["epsilon"], r["delta"], r["train_seconds"])
    print(f"per-site guarantee at δ={r['delta']:g}: " + ", ".join(
        f"site {s['site']} (n={s['n']}): ε={format_epsilon(s['epsilon'])}" for s in r["sites"]))
    return 0




def _add_evaluate(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    e = sub.add_parser("evaluate", help="recompute the test metrics and ε of a run folder from its checkpoint",
                       formatter_class=HelpFormatter)
    e.add_argument("run_dir", help="a folder written by `dpfunc train`, `dpfunc federated` or `dpfunc segment`")
    e.add_argument("--data-dir", default=None, help=_DATA_HELP)
    e.add_argument("--bootstrap", type=_int_at_least("--bootstrap", 1), default=1000, help="bootstrap resamples")
    add_compute_arguments(e)
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    return e


def _run_evaluate(args: argparse.Namespace) -> int:
    from dpfunc.data import _files
    from dpfunc.train import evaluate_run, load_run

    compute_device(args)  # --threads; refuse a device this machine lacks, first
    path = Path(args.run_dir)
    if path.exists() and not path.is_dir():
        raise CommandError(f"{path} is a file; give the run folder written by `dpfunc train`")
    from dpfunc.federated.job import IN_FLIGHT, is_federated_run

    if not (path / "checkpoint.pt").is_file():
        if is_federated_run(path) and (path / IN_FLIGHT).is_file():
            raise CommandError(f"{path} stopped in its first round, before any checkpoint: the sites asked in it "
                               f"({path / IN_FLIGHT}) may have released one round, which no model came of; "
                               f"`dpfunc federated --run-dir {path} --resume` and the run's flags charges it and goes on")
        raise CommandError(f"no checkpoint.pt in {path}; give a run folder written by `dpfunc train` "
                           f"(the default ones are under runs/)")
    if is_federated_run(path):  # written by `dpfunc federated`
        return _evaluate_federated(path, args)
    from dpfunc.segmentation._train import is_segmentation_run

    if is_segmentation_run(path):  # written by `dpfunc segment`
        return importlib.import_module("dpfunc.segmentation._cli_segment").evaluate(args)
    cfg, state = load_run(path)  # tensors on the CPU, whatever device wrote them; evaluate_run moves them
    data_file = _files.locate_pneumoniamnist(args.data_dir, fn="")
    test, ci, eps = evaluate_run(cfg, state, data_file, bootstrap_resamples=args.bootstrap,
                                 progress=False if args.quiet else None, device=args.device)
    done = state["epoch"]
    if done < cfg.epochs:
        status = (f"UNFINISHED: checkpoint after epoch {done} of {cfg.epochs} (continue it with `dpfunc train "
                  f"--run-dir {path} --resume` and the run's flags)")
    else:
        status = f"finished: {done} of {cfg.epochs} epochs"
    print(f"run {path}: model {cfg.model}, {status}; evaluated the best validation epoch, {state['best_epoch']}")
    _print_result(test, ci, eps, cfg.delta, state["elapsed"])
    return 0


# --------------------------------------------------------------------------- account


def _add_account(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    a = sub.add_parser("account", help="print ε of DP-SGD for every accountant", formatter_class=HelpFormatter)
    a.add_argument("--noise-multiplier", type=_positive_float("--noise-multiplier"), required=True, help="σ")
    a.add_argument("--sampling-rate", type=_unit_interval("--sampling-rate", closed_right=True), required=True, help="q")
    a.add_argument("--steps", type=_int_at_least("--steps", 0), required=True, help="number of steps T")
    a.add_argument("--delta", type=_unit_interval("--delta"), default=1e-5, help="δ")
    a.add_argument("--json", action="store_true", help="print JSON instead of a table (an infinite ε is null)")
    return a


def _run_account(args: argparse.Namespace) -> int:
    import warnings

    from dpfunc import accounting

    rows = []
    for method in ("pld", "rdp", "gdp"):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GDP's approximation warning: stated in the table instead
            eps = accounting.dpsgd_epsilon(args.noise_multiplier, args.sampling_rate, args.steps, args.delta, method=method)
        rows.append({"method": method, "epsilon": eps, "seconds": time.perf_counter() - t0})
    notes = {"pld": "tight numerical upper bound (default)", "rdp": "upper bound (Balle et al. 2020 conversion)",
             "gdp": "CLT approximation, may UNDER-estimate: not a guarantee"}
    if args.json:
        results = [{**r, "epsilon": r["epsilon"] if math.isfinite(r["epsilon"]) else None} for r in rows]
        print(json.dumps({"noise_multiplier": args.noise_multiplier, "sampling_rate": args.sampling_rate,
                          "steps": args.steps, "delta": args.delta, "results": results}, indent=2))
        return 0
    print(f"DP-SGD  σ = {args.noise_multiplier}  q = {args.sampling_rate}  T = {args.steps}  δ = {args.delta:g}")
    print(f"{'method':<8}{'ε':>12}  {'time':>8}  note")
    for r in rows:
        print(f"{r['method']:<8}{format_epsilon(r['epsilon'], 4):>12}  {r['seconds'] * 1000:>6.0f}ms  {notes[r['method']]}")
    return 0


# --------------------------------------------------------------------------- registry and entry point

#: The subcommands, in ``dpfunc --help`` order: name -> Command(add_parser, run). Register new ones here
#: (one line; ``Command.from_module("dpfunc.x.cli")`` for one that lives in its own module).
COMMANDS: dict[str, Command] = {
    "train": Command(_add_train, _run_train),
    "evaluate": Command(_add_evaluate, _run_evaluate),
    "account": Command(_add_account, _run_account),
    "infer": Command.from_module("dpfunc.mpc.cli"),
    "federated": Command.from_module("dpfunc.federated.cli"),
    "make-phantoms": Command.from_module("dpfunc.segmentation._cli_phantoms"),
    "segment": Command.from_module("dpfunc.segmentation._cli_segment"),
    "attack": Command.from_module("dpfunc.attacks.cli"),
    "audit": Command.from_module("dpfunc.audit.cli"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``dpfunc`` parser. Given the command line ``argv``, only the chosen subcommand is declared in
    full (the others by name only), so ``dpfunc train`` does not import every other subcommand's module;
    without it (or for ``dpfunc --help``) every subcommand is declared."""
    from dpfunc._version import __version__

    chosen = next((a for a in (argv or []) if not a.startswith("-")), None)
    chosen = chosen if chosen in COMMANDS else None

    p = argparse.ArgumentParser(
        prog="dpfunc",
        description="Differentially private training, evaluation and accounting (paediatric pneumonia case study).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:" + __doc__.split("Examples::", 1)[1].split("Adding a subcommand", 1)[0].rstrip(),
    )
    p.add_argument("--version", action="version", version=f"dpfunc {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, command in COMMANDS.items():
        if chosen is None or name == chosen:
            command.add_parser(sub)
        else:
            sub.add_parser(name)
    return p


#: ``dpfunc train --task T``: the subcommand that trains task T (None: ``train`` itself). A task whose flags
#: differ (segmentation: --slices-per-patient, --unit, other defaults and ranges) keeps its own parser, and
#: ``train --task T`` hands it the whole command line, so every flag means one thing in one place.
TRAIN_TASKS: dict[str, str | None] = {"pneumonia": None, "liver": "segment"}


def forward_train_task(argv: list[str]) -> list[str]:
    """``train ... --task liver ...`` -> ``segment ... --task liver ...`` (the last ``--task`` wins, as in argparse);
    any other command line unchanged. ``$DPFUNC_SEGMENT_ARGS`` then applies, not ``$DPFUNC_TRAIN_ARGS``.

    Example:
        >>> forward_train_task(["train", "--task", "liver", "--data-dir", "ph"])
        ['segment', '--task', 'liver', '--data-dir', 'ph']
        >>> forward_train_task(["train", "--epochs", "2"])
        ['train', '--epochs', '2']
    """
    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if at is None or argv[at] != "train":
        return argv
    task = None
    for i, a in enumerate(argv[at + 1:], at + 1):
        if a == "--":
            break
        if a == "--task" and i + 1 < len(argv):
            task = argv[i + 1]
        elif a.startswith("--task="):
            task = a.split("=", 1)[1]
    target = TRAIN_TASKS.get(task) if task is not None else None
    if target is None:
        return argv
    return argv[:at] + [target] + argv[at + 1:]


def _describe_os_error(err: OSError) -> str:
    """An OSError as one sentence: its message, or ``strerror: filename`` when the message is bare."""
    text = str(err)
    if err.filename and str(err.filename) not in text:
        text = f"{err.strerror or text}: {err.filename}"
    return text


def main(argv: list[str] | None = None) -> int:
    """Run ``dpfunc <command> …`` (``argv`` without the program name; default ``sys.argv[1:]``) and return the
    exit code: the command's own, 2 for a user error (printed as ``dpfunc <command>: error: …``, no
    traceback unless ``DPFUNC_DEBUG=1``), 130 when interrupted."""
    from dpfunc._progress import progress_enabled
    from dpfunc.data._files import cli_messages

    argv = forward_train_task(sys.argv[1:] if argv is None else list(argv))
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    env_name = f"DPFUNC_{args.command.upper().replace('-', '_')}_ARGS"
    extra = os.environ.get(env_name, "").strip()
    if extra:  # like PYTEST_ADDOPTS: flags appended to this subcommand's command line (later flags win)
        import shlex

        print(f"dpfunc {args.command}: appending ${env_name}: {extra}", file=sys.stderr)
        args = parser.parse_args(argv + shlex.split(extra))
    try:
        with cli_messages(), progress_enabled(False if getattr(args, "quiet", False) else None):
            return COMMANDS[args.command].run(args)
    except (CommandError, ValueError, OSError) as e:
        # Expected user errors: a clear message, no traceback (set DPFUNC_DEBUG=1 for one).
        if os.environ.get("DPFUNC_DEBUG"):
            raise
        text = _describe_os_error(e) if isinstance(e, OSError) else str(e)
        print(f"dpfunc {args.command}: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; continue with the same flags and --resume", file=sys.stderr)
        return 130
