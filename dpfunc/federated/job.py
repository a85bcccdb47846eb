"""The federated case-study job: PneumoniaMNIST split across sites, DP-SGD at every site, FedAvg on the server.

This is application code on the pure core (:mod:`dpfunc.federated`), shared by both engines: the
in-process runner calls :func:`run_federated` directly; the Flower ServerApp calls it with an executor
that sends each round to the sites' processes (:mod:`dpfunc.federated.flower`). The run folder follows
``dpfunc train``'s conventions::

    RUN/config.json       the FederatedConfig
    RUN/checkpoint.pt     after every round, atomically: the global model, the server optimizer, EVERY
                          site's state (its privacy ledger included), history, best round
    RUN/round_in_flight.json  written (atomically, fsync-ed) BEFORE a round asks any site, removed once the
                          round is checkpointed: the sites asked and their step counters. A resume charges
                          them that round and re-runs it with fresh keys (:func:`charge_started_round`)
    RUN/metrics.json      dpfunc train's schema (test.roc_auc, test.accuracy, …) + rounds + sites
    RUN/model.pt          the selected global state_dict (torch.load(..., weights_only=True))
    RUN/federated.png     per-round validation AUC and per-site ε; roc.png, confusion.png
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dpfunc import accounting
from dpfunc._validate import warn_vacuous_delta
from dpfunc.clipping import FlatClipping
from dpfunc.data import pneumoniamnist
from dpfunc.federated.aggregate import Aggregator, fedadam, fedavgm
from dpfunc.federated.partition import Partition, partition_indices
from dpfunc.federated.registry import AGGREGATORS, make_aggregator
from dpfunc.federated.rounds import (InProcessSites, RoundStart, ServerState, apply_round, charge_started_round,
                                     init_server_state, select_sites, start_round)
from dpfunc.federated.site import SitePlan, init_site_state, site_key
from dpfunc.keys import Key
from dpfunc.metrics import binary_metrics, bootstrap_ci, confusion_matrix
from dpfunc.models import build_model

__all__ = ["FederatedConfig", "FederatedSetup", "prepare", "run_federated", "site_data", "make_engine",
           "evaluate_federated_run", "is_federated_run", "SERVER_OPTIMIZERS", "ENGINES"]

ENGINES = ("inprocess", "flower")
SERVER_OPTIMIZERS = {"fedavg": None, "fedavgm": fedavgm, "fedadam": fedadam}
GRAD_ENGINES = ("fast", "vmap")


@dataclass(frozen=True)
class FederatedConfig:
    """Everything that defines a federated run (saved as ``config.json``).

    Attributes:
        sites: number of sites S (hospitals).
        rounds: server rounds R.
        local_epochs: E, passes over its own data each site makes per round (in expectation).
        local_steps: if set, each site makes exactly this many local DP-SGD steps per round instead
            (``1``: FedSGD — with plain FedAvg a round is one DP-SGD step on the weighted mean of the sites'
            noisy gradients, momentum kept at the sites; no client drift under label skew).
        epsilon, delta: each site's target (ε, δ); σ_s is calibrated per site (PLD) for the worst
            case of training in all R rounds.
        partition: ``"iid"`` or ``"dirichlet"`` (label skew with concentration ``alpha``).
        alpha: Dirichlet concentration.
        fraction: fraction of sites asked per round (partial participation).
        min_sites: a round needs at least this many usable answers, else the run stops.
        model: ``"cnn"`` (see :mod:`dpfunc.models`).
        batch_size: each site's expected Poisson batch size B (q_s = B / n_s).
        learning_rate, momentum, max_grad_norm: each site's DP-SGD.
        server_optimizer: ``"fedavg"`` (new global = weighted mean), ``"fedavgm"`` or ``"fedadam"``.
        server_learning_rate, server_momentum: of FedAvgM / FedAdam.
        aggregator: name in :data:`~dpfunc.federated.AGGREGATORS` (``"fedavg"``; secure aggregation plugs in here).
        engine: ``"inprocess"`` or ``"flower"``.
        grad_engine: ``"fast"`` or ``"vmap"`` clipping engine at the sites.
        train_subset: use only the first N training examples (quick demos and tests); None = all.
        round_timeout: seconds the server waits for a round's answers (Flower engine).
        accountant: ``"pld"`` (tight, the default) or ``"rdp"`` (faster calibration) for σ_s and the ε reports.
        average_decay: server-side iterate averaging (:func:`~dpfunc.federated.average_rounds`): the job
            evaluates, selects and releases the running mean of the global models, an EMA with this decay
            once the mean's weight exceeds it; 0 evaluates the last global model. Post-processing: no
            privacy cost.
        alone: train site ``alone``'s shard by itself, a federation of one (the baseline a site has
            without federating: same shard, plan and σ as in the federated run; in process only).
        distributed_noise: distributed DP over secure aggregation (:mod:`dpfunc.federated.distributed`):
            each round is ONE DP-SGD step over the union of the sites' data, each site adds only a share of
            the noise; needs ``aggregator="secagg"``, the in-process engine, ``local_epochs=1``, ``fedavg``.
        colluding_sites: ``c``, the most sites assumed to share their noise with the server (distributed
            noise only); ``0 ≤ c < t``, ``t`` a majority of the sites asked per round.
        report_train_loss: each site also sends its raw mean training loss of the round (``train_loss`` in
            the history and log). NOT covered by the sites' (ε, δ): a statistic of raw data sent to the
            (untrusted) server every round — for debugging only. Default False: nothing but the DP model
            (or its masked share) leaves a site, and the server's curve is its own validation metrics. Over
            Flower a site sends it only if its SuperNode's node config also says ``report-train-loss=1``.
        seed: root of every key (init, partition, site selection, each site's sampling and noise).
    """

    sites: int = 3
    rounds: int = 15
    local_epochs: int = 1
    local_steps: int | None = None
    epsilon: float = 3.0
    delta: float = 1e-5
    partition: str = "iid"
    alpha: float = 0.5
    fraction: float = 1.0
    min_sites: int = 1
    model: str = "cnn"
    batch_size: int = 64
    learning_rate: float = 1.0
    momentum: float = 0.9
    max_grad_norm: float = 1.0
    server_optimizer: str = "fedavg"
    server_learning_rate: float = 1.0
    server_momentum: float = 0.9
    aggregator: str = "fedavg"
    engine: str = "inprocess"
    grad_engine: str = "fast"
    train_subset: int | None = None
    round_timeout: float = 600.0
    accountant: str = "pld"
    average_decay: float = 0.5
    alone: int | None = None
    distributed_noise: bool = False
    colluding_sites: int = 0
    report_train_loss: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        from dpfunc._validate import check_delta, check_int_range, check_number, check_positive_finite, check_probability

        fn = "FederatedConfig"
        check_int_range(fn, "sites", self.sites, low=1)
        check_int_range(fn, "rounds", self.rounds, low=1)
        check_int_range(fn, "local_epochs", self.local_epochs, low=1)
        if self.local_steps is not None:
            check_int_range(fn, "local_steps", self.local_steps, low=1)
        check_positive_finite(fn, "epsilon", self.epsilon)
        check_delta(fn, "delta", self.delta)
        if self.partition not in [p.value for p in Partition]:
            raise ValueError(f"{fn}: partition must be one of {[p.value for p in Partition]}, got {self.partition!r}")
        check_positive_finite(fn, "alpha", self.alpha)
        check_probability(fn, "fraction", self.fraction, open_low=True)
        check_int_range(fn, "min_sites", self.min_sites, low=1, high=self.sites)
        if self.model not in ("cnn", "resnet18"):
            raise ValueError(f"{fn}: model must be 'cnn' or 'resnet18', got {self.model!r}")
        check_int_range(fn, "batch_size", self.batch_size, low=1)
        check_positive_finite(fn, "learning_rate", self.learning_rate)
        check_number(fn, "momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        check_positive_finite(fn, "max_grad_norm", self.max_grad_norm)
        if self.server_optimizer not in SERVER_OPTIMIZERS:
            raise ValueError(f"{fn}: server_optimizer must be one of {sorted(SERVER_OPTIMIZERS)}, got {self.server_optimizer!r}")
        check_positive_finite(fn, "server_learning_rate", self.server_learning_rate)
        check_number(fn, "server_momentum", self.server_momentum, low=0.0, high=1.0, high_open=True)
        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"{fn}: aggregator must be one of {sorted(AGGREGATORS)}, got {self.aggregator!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"{fn}: engine must be one of {ENGINES}, got {self.engine!r}")
        if self.grad_engine not in GRAD_ENGINES:
            raise ValueError(f"{fn}: grad_engine must be one of {GRAD_ENGINES}, got {self.grad_engine!r}")
        if self.train_subset is not None:
            check_int_range(fn, "train_subset", self.train_subset, low=self.sites)
        check_positive_finite(fn, "round_timeout", self.round_timeout)
        if self.accountant not in ("pld", "rdp"):
            raise ValueError(f"{fn}: accountant must be 'pld' or 'rdp', got {self.accountant!r}")
        check_number(fn, "average_decay", self.average_decay, low=0.0, high=1.0, high_open=True)
        if not isinstance(self.report_train_loss, bool):
            raise ValueError(f"{fn}: report_train_loss must be a bool, got {self.report_train_loss!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"{fn}: seed must be an int (0 is valid), got {self.seed!r}")
        if self.alone is not None:
            check_int_range(fn, "alone", self.alone, low=0, high=self.sites - 1)
            if self.engine != "inprocess":
                raise ValueError(f"{fn}: alone={self.alone} (one site by itself) runs in process only, got engine={self.engine!r}")
        fraction_sites = max(1, min(self.sites, int(math.floor(self.fraction * self.sites + 0.5))))
        if self.min_sites > fraction_sites:
            raise ValueError(f"{fn}: min_sites={self.min_sites} can never be met when only {fraction_sites} site(s) "
                             f"are asked per round (fraction={self.fraction}, sites={self.sites})")
        _check_distributed(self, fraction_sites)

    def server_tx(self):
        make = SERVER_OPTIMIZERS[self.server_optimizer]
        if make is None:
            return None
        if self.server_optimizer == "fedavgm":
            return make(self.server_learning_rate, self.server_momentum)
        return make(self.server_learning_rate)


def _check_distributed(cfg: FederatedConfig, asked: int) -> None:
    """The distributed-noise option's constraints (:mod:`dpfunc.federated.distributed`), each with its fix."""
    fn = "FederatedConfig"
    if not isinstance(cfg.distributed_noise, bool):
        raise ValueError(f"{fn}: distributed_noise must be a bool, got {cfg.distributed_noise!r}")
    if isinstance(cfg.colluding_sites, bool) or not isinstance(cfg.colluding_sites, int) or cfg.colluding_sites < 0:
        raise ValueError(f"{fn}: colluding_sites must be an int >= 0, got {cfg.colluding_sites!r}")
    if not cfg.distributed_noise:
        if cfg.colluding_sites:
            raise ValueError(f"{fn}: colluding_sites={cfg.colluding_sites} only applies with distributed_noise=True "
                             "(--distributed-noise)")
        return
    why = []
    if cfg.aggregator != "secagg":
        why.append(f"aggregator={cfg.aggregator!r} (the noise shares only add up inside secure aggregation: "
                   "--secure-aggregation)")
    if cfg.engine != "inprocess":
        why.append(f"engine={cfg.engine!r} (each DP-SGD step is its own secure-aggregation run, five round trips "
                   "per step: not implemented over Flower; use --engine inprocess)")
    if cfg.local_epochs != 1:
        why.append(f"local_epochs={cfg.local_epochs} (a round is one DP-SGD step over the union of the sites' data)")
    if cfg.local_steps not in (None, 1):
        why.append(f"local_steps={cfg.local_steps} (a round is one DP-SGD step over the union of the sites' data)")
    if cfg.server_optimizer != "fedavg":
        why.append(f"server_optimizer={cfg.server_optimizer!r} (the server's step is SGD with --lr/--momentum)")
    if cfg.alone is not None:
        why.append(f"alone={cfg.alone}")
    if asked < 2:
        why.append(f"{asked} site(s) asked per round (secure aggregation needs at least 2)")
    if why:
        raise ValueError(f"{fn}: distributed_noise=True cannot run with " + "; ".join(why))
    t = max(2, asked // 2 + 1)
    if cfg.colluding_sites >= t:
        raise ValueError(f"{fn}: colluding_sites={cfg.colluding_sites} with threshold t={t} (a majority of the {asked} "
                         f"site(s) asked per round) leaves t − c = {t - cfg.colluding_sites} honest sites in a sum: no "
                         f"noise would be guaranteed. Need colluding_sites <= {t - 1}, or more sites")


@dataclass
class FederatedSetup:
    """What the server derives from the config and the data: keys, partitions, each site's plan."""

    config: FederatedConfig
    init_key: Key
    select_key: Key
    sites_key: Key
    indices: list[torch.Tensor]
    plans: list[SitePlan]
    extra: dict = field(default_factory=dict)


def _keys(cfg: FederatedConfig) -> tuple[Key, Key, Key, Key]:
    init_key, select_key, partition_key, sites_key = Key(cfg.seed).split(4)
    return init_key, select_key, partition_key, sites_key


def site_indices(cfg: FederatedConfig, labels: torch.Tensor) -> list[torch.Tensor]:
    """Which training examples each site holds (simulation of S hospitals from one data set)."""
    labels = labels[: cfg.train_subset] if cfg.train_subset is not None else labels
    return partition_indices(_keys(cfg)[2], labels, cfg.sites, cfg.partition, alpha=cfg.alpha)


def site_data(cfg: FederatedConfig, site: int, data_dir: str | Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Site ``site``'s training tensors ``(x, y)`` (what a site process loads: its own shard only)."""
    train = pneumoniamnist("train", data_dir)
    idx = site_indices(cfg, train.labels)[site]
    return train.images[idx], train.labels[idx]


@functools.lru_cache(maxsize=64)
def _calibrate(epsilon: float, delta: float, q: float, steps: int, method: str) -> float:
    return accounting.noise_multiplier_for(epsilon, delta, q, steps, method=method)


def plans_for(cfg: FederatedConfig, sizes: list[int]) -> list[SitePlan]:
    """Each site's plan with σ_s calibrated so that R rounds of its local steps spend ε ≤ target."""
    plans = []
    for n in sizes:
        warn_vacuous_delta("run_federated", cfg.delta, n, unit="examples at one site")
        draft = SitePlan(n, cfg.batch_size, cfg.local_epochs, 1.0, cfg.max_grad_norm, cfg.learning_rate, cfg.momentum,
                         cfg.local_steps)
        sigma = _calibrate(cfg.epsilon, cfg.delta, draft.sampling_rate, cfg.rounds * draft.steps_per_round, cfg.accountant)
        plans.append(SitePlan(n, cfg.batch_size, cfg.local_epochs, sigma, cfg.max_grad_norm, cfg.learning_rate, cfg.momentum,
                              cfg.local_steps))
    return plans


def prepare(cfg: FederatedConfig, train_labels: torch.Tensor) -> FederatedSetup:
    """Everything a federated run fixes before its first round, from the config alone: the keys, each site's
    training indices (the partition of ``train_labels``) and its :class:`~dpfunc.federated.site.SitePlan`
    (q, σ, steps per round); with ``cfg.alone`` only that site's (a federation of one)."""
    init_key, select_key, _, sites_key = _keys(cfg)
    indices = site_indices(cfg, train_labels)
    plans = plans_for(cfg, [len(i) for i in indices])
    if cfg.alone is not None:  # a federation of one: that site's shard, plan and key only
        indices, plans = [indices[cfg.alone]], [plans[cfg.alone]]
        sites_key = site_key(sites_key, cfg.alone)
    return FederatedSetup(cfg, init_key, select_key, sites_key, indices, plans)


def build(cfg: FederatedConfig):
    """``(module, apply_fn, params, buffers)`` of the initial global model (from the init key)."""
    from dpfunc.bridge import functionalize

    module = build_model(cfg.model, key=_keys(cfg)[0])
    apply_fn, params, buffers = functionalize(module)
    return module, apply_fn, params, buffers


def make_engine(cfg: FederatedConfig, module, apply_fn):
    """The sites' clipping engine (flat clipping at ``max_grad_norm``)."""
    clipping = FlatClipping(cfg.max_grad_norm)
    if cfg.grad_engine == "fast":
        from dpfunc.bridge.fast import fast_engine

        return fast_engine(module, lambda out, y: F.cross_entropy(out, y, reduction="none"), clipping)
    from dpfunc.step import vmap_engine

    return vmap_engine(lambda p, b, x, y: F.cross_entropy(apply_fn(p, b, x[None]), y[None]), clipping=clipping)


def final_evaluation(apply_fn: Callable, params: dict, buffers: dict, val_set: Any, data_dir: Any, seed: int,
                     bootstrap_resamples: int) -> tuple:
    """The selected model on validation and test: ``(test_set, val_metrics, test_metrics, test_scores, test_ci)``
    (the test split is read here, once, after training)."""
    from dpfunc.train import evaluate_scores

    test_set = pneumoniamnist("test", data_dir)
    val = binary_metrics(val_set.labels, evaluate_scores(apply_fn, params, buffers, val_set))
    scores = evaluate_scores(apply_fn, params, buffers, test_set)
    test = binary_metrics(test_set.labels, scores)
    return test_set, val, test, scores, bootstrap_ci(test_set.labels, scores, seed=seed, num_resamples=bootstrap_resamples)


def open_run_folder(fn: str, run_dir: str | Path | None, cfg: Any, resume: bool) -> tuple[Path | None, dict | None]:
    """The run folder of a federated job (created, ``config.json`` written) and, with ``resume``, its saved
    checkpoint — ``(None, None)`` without a folder.

    Raises:
        ValueError: resuming a checkpoint written by another configuration.
        FileExistsError: the folder already holds a run and ``resume`` is False (nothing is overwritten).
    """
    from dpfunc.bridge.checkpoint import load_checkpoint

    if run_dir is None:
        return None, None
    run_path = Path(run_dir)
    run_path.mkdir(parents=True, exist_ok=True)
    ckpt = run_path / "checkpoint.pt"
    saved = None
    if resume and ckpt.exists():
        saved = load_checkpoint(ckpt)
        if {**_added_defaults(cfg), **saved["config"]} != asdict(cfg):
            raise ValueError(f"{fn}: {ckpt} was written by another configuration; resume with the same "
                             f"flags or choose a new --run-dir.\n saved: {saved['config']}\n given: {asdict(cfg)}")
    elif not resume and (ckpt.exists() or (run_path / IN_FLIGHT).exists()):  # a round in flight: resume charges it
        raise FileExistsError(f"{fn}: {run_path} already holds a run; pass --resume to continue it, or choose a new --run-dir")
    _write_json(run_path / "config.json", asdict(cfg))
    return run_path, saved


IN_FLIGHT = "round_in_flight.json"


def mark_round_started(run_path: Path | None, cfg: Any, start: Any) -> None:
    """Persist that a round is about to ask its sites (``RUN/round_in_flight.json``), before anything is sent.

    Written to a temp file, ``fsync``-ed and renamed, so once a site can have released its update the record
    survives a crash of the server (or of its machine). ``start`` is a :class:`~dpfunc.federated.RoundStart`
    (or a dict); nothing is written without a run folder."""
    from dpfunc.bridge.checkpoint import atomic_write

    if run_path is None:
        return
    record = start.to_dict() if hasattr(start, "to_dict") else dict(start)
    text = json.dumps({"config": asdict(cfg), **record}, indent=1) + "\n"
    atomic_write(run_path / IN_FLIGHT, lambda f: f.write(text.encode()))


def read_round_started(fn: str, run_path: Path | None, cfg: Any) -> dict | None:
    """The record of :func:`mark_round_started` (a dict with ``round``, ``selected``, … and ``config``), or None.

    Raises:
        ValueError: it was written by another configuration, or cannot be read.
    """
    if run_path is None or not (run_path / IN_FLIGHT).exists():
        return None
    path = run_path / IN_FLIGHT
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{fn}: cannot read {path} ({e}); it names the round that was in flight when the run "
                         "stopped, which a resume must charge. Restore it, or start a new --run-dir") from e
    if {**_added_defaults(cfg), **d.get("config", {})} != asdict(cfg):
        raise ValueError(f"{fn}: {path} was written by another configuration; resume with the same flags or choose a "
                         f"new --run-dir.\n saved: {d.get('config')}\n given: {asdict(cfg)}")
    return d


def clear_round_started(run_path: Path | None) -> None:
    """Remove ``round_in_flight.json`` once the round it names is in the checkpoint (applied or charged)."""
    if run_path is not None:
        (run_path / IN_FLIGHT).unlink(missing_ok=True)


def restore_progress(saved: dict) -> tuple[Any, list[dict], float, dict]:
    """``(state, history, elapsed seconds, best)`` of a checkpoint written by :func:`save_progress`
    (``best``: ``{"round", "val_auc", "params"}`` of the model selected so far)."""
    best = {"round": saved["best_round"], "val_auc": saved["best_val_auc"], "params": saved["best_params"]}
    return saved["state"], saved["history"], saved["elapsed"], best


def save_progress(run_path: Path | None, cfg: Any, state: Any, history: list[dict], elapsed: float, best: dict) -> None:
    """Write a federated job's checkpoint after a round (atomically: the previous one survives a failure);
    nothing without a run folder."""
    from dpfunc.bridge.checkpoint import save_checkpoint

    if run_path is not None:
        save_checkpoint(run_path / "checkpoint.pt", {
            "config": asdict(cfg), "state": state, "history": history, "elapsed": elapsed,
            "best_round": best["round"], "best_val_auc": best["val_auc"], "best_params": best["params"]})


def _added_defaults(cfg: Any) -> dict:
    """Defaults of the config fields that a checkpoint written before they existed lacks (``local_steps``):
    such a checkpoint resumes under a config that leaves them at their defaults."""
    return {"local_steps": None} if isinstance(cfg, FederatedConfig) else {}


def _write_json(path: Path, obj: Any) -> None:
    from dpfunc.train import _write_json as write

    write(path, obj)


EPSILON_REPORTS = 30


def epsilon_due(round: int, rounds: int) -> bool:
    """Whether the per-round report after ``round`` (1-based) computes each site's ε: every round for runs of
    at most :data:`EPSILON_REPORTS` rounds, else every ``ceil(rounds / EPSILON_REPORTS)``-th round and the last
    (one PLD ε takes ~1 s per distinct ledger; a FedSGD run has hundreds of short rounds). The final
    ``metrics.json`` ``sites`` entry always holds every site's ε."""
    return round >= rounds or round % max(1, math.ceil(rounds / EPSILON_REPORTS)) == 0


def _site_report(state: ServerState, plans: list[SitePlan], delta: float, method: str, *,
                 with_epsilon: bool = True) -> list[dict]:
    """Each site's n, ε (None when ``with_epsilon`` is False), σ, q, steps, rounds and ledger."""
    out = []
    for s, plan in enumerate(plans):
        ledger = state.sites[s].ledger
        if not with_epsilon:
            eps = None
        else:
            eps = _epsilon(ledger, delta, method) if ledger.total_steps else 0.0
        out.append({"site": s, "n": plan.num_examples, "epsilon": eps, "delta": delta,
                    "noise_multiplier": plan.noise_multiplier, "sampling_rate": plan.sampling_rate,
                    "steps": ledger.total_steps, "rounds": state.sites[s].rounds, "ledger": ledger.to_dict()})
    return out


def _epsilon(ledger, delta: float, method: str) -> float:
    """ε of a ledger, remembered: ledgers are immutable values, and the per-round report asks the same
    question many times (sites of equal size hold equal ledgers; a site alone repeats its federated
    ledger). One PLD ε takes ~0.5 s; a federated round of the case study ~5 s of compute."""
    try:
        hash(ledger)
    except TypeError:
        return accounting.epsilon(ledger, delta, method=method)
    return _epsilon_cached(ledger, delta, method)


@functools.lru_cache(maxsize=256)
def _epsilon_cached(ledger, delta: float, method: str) -> float:
    return accounting.epsilon(ledger, delta, method=method)


def _progress(total: int, initial: int, enabled: bool | None):
    from dpfunc._progress import progress

    return progress(total=total, initial=initial, desc="federated rounds", unit="round", enabled=enabled)


Executor = Callable[[ServerState, tuple[int, ...]], dict]


def run_federated(
    cfg: FederatedConfig,
    *,
    data_dir: str | Path | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
    executor: Callable[[FederatedSetup, Any], Executor] | None = None,
    aggregator: Aggregator | None = None,
    bootstrap_resamples: int = 1000,
    device: str | torch.device = "cpu",
) -> dict:
    """Run (or resume) a federated DP job and write the run folder.

    Args:
        cfg: the :class:`FederatedConfig`.
        data_dir: where ``pneumoniamnist.npz`` is.
        run_dir: the run folder; None writes nothing.
        resume: continue from ``run_dir/checkpoint.pt`` (same config required).
        progress: show a progress bar (one step per round); None decides as :mod:`dpfunc._progress` does
            (on in a terminal or notebook, off under ``--quiet``).
        log: where per-round lines go.
        executor: ``executor(setup, model) -> answers_fn`` with ``answers_fn(state, selected) -> {site: answer}``;
            default trains every site in this process. The Flower ServerApp passes one that messages the sites.
        aggregator: overrides ``cfg.aggregator``.
        device: where the in-process sites compute (``"auto" | "cpu" | "cuda" | "cuda:N"``, ``--device``): their
            shards, the model, their optimizer states and batches go there (:func:`~dpfunc.federated.site_round`).
            The server's part (aggregation, server optimizer, evaluation, checkpoint, ``model.pt``) stays on
            the CPU, so the run folder reads the same on any machine. Not part of the configuration: a run
            resumes on another device with the same ledgers and keys (not bit for bit across devices).

    Returns:
        The metrics dict also written as ``metrics.json``.

    Noise keys and resumes: site ``s``'s noise and Poisson keys at local step ``t`` derive from (run key,
    ``s``, ``t``), and ``t`` is its step counter. Before a round asks any site, the run folder records the
    sites asked and their counters (``round_in_flight.json``, fsync-ed). A round that does not reach the
    checkpoint — it failed, the run was interrupted, the server crashed after the sites had answered —
    charges every asked site that round (ledger and counter: :func:`~dpfunc.federated.charge_started_round`),
    at once when the run can still write, else when ``resume`` finds the record. The re-run round then
    draws fresh noise and batches and is charged again: a resume on another device, torch build or
    thread count (whose clipped sums differ in the last bits) never releases two updates with the same
    noise, which anyone holding both could subtract. The price: each interrupted round costs its sites
    one more round of ε (so ε can end above the target), and a resumed run equals an uninterrupted one no
    more — it is reproducible given where it stopped.

    Raises:
        RoundFailedError: a round had fewer than ``cfg.min_sites`` usable answers or its aggregation failed;
            the checkpoint keeps the last complete round's model and charges each site asked in the failed
            round with that round (its answer may have reached the server; under secure aggregation the
            charge is an upper bound that keeps a retry's noise keys fresh).
    """
    from dpfunc.train import evaluate_scores

    from dpfunc.devices import resolve_device, to_device

    where = resolve_device(device, fn="run_federated", name="device (--device)")
    if cfg.distributed_noise:  # one DP-SGD step per round, noise shared among the sites (issue 14)
        if executor is not None or aggregator is not None:
            raise ValueError("run_federated: distributed_noise runs in process only (no executor or aggregator)")
        from dpfunc.federated.distributed import run_distributed

        return run_distributed(cfg, data_dir=data_dir, run_dir=run_dir, resume=resume, progress=progress, log=log,
                               bootstrap_resamples=bootstrap_resamples, device=where)
    train_set = pneumoniamnist("train", data_dir)
    val_set = pneumoniamnist("val", data_dir)
    setup = prepare(cfg, train_set.labels)
    module, apply_fn, params, buffers = build(cfg)
    server_tx = cfg.server_tx()
    # secure aggregation sums a training loss only with the opt-in (it has no loss slot otherwise)
    loss_option = {"report_train_loss": True} if cfg.report_train_loss and cfg.aggregator == "secagg" else {}
    aggregator = aggregator if aggregator is not None else make_aggregator(cfg.aggregator, **loss_option)
    if executor is None:  # each site's shard lives on the device; site_round computes there
        data = [(to_device(train_set.images[i], where), to_device(train_set.labels[i], where)) for i in setup.indices]
        answers_fn = InProcessSites(data, setup.plans, make_engine(cfg, module.to(where), apply_fn), setup.sites_key,
                                    buffers=buffers, report_train_loss=cfg.report_train_loss)
    else:
        answers_fn = executor(setup, (module, apply_fn, params, buffers))

    state = init_server_state(params, [init_site_state(s, p, site_key(setup.sites_key, s), params)
                                       for s, p in enumerate(setup.plans)], server_tx)
    history: list[dict] = []
    best = {"round": 0, "val_auc": -math.inf, "params": state.params}
    elapsed = 0.0
    run_path, saved = open_run_folder("run_federated", run_dir, cfg, resume)
    if saved is not None:
        state, history, elapsed, best = restore_progress(saved)
        log(f"resumed {run_path / 'checkpoint.pt'} after round {state.round}/{cfg.rounds}")
    in_flight = read_round_started("run_federated", run_path, cfg) if resume else None
    if in_flight is not None:  # a round asked its sites and never reached the checkpoint
        state, charged = charge_started_round(state, RoundStart.from_dict(in_flight), setup.plans)
        if charged:
            log(f"round {in_flight['round']} was in flight when the run stopped: site(s) {list(charged)} may have "
                f"released their updates, so each is charged that round and it is re-run with fresh noise and "
                f"sampling keys (ε can end above the target by up to one round)")
            save_progress(run_path, cfg, state, history, elapsed, best)
        clear_round_started(run_path)

    sig = ", ".join(f"site {s}: n={p.num_examples} q={p.sampling_rate:.4f} σ={p.noise_multiplier:.3f} "
                    f"steps/round={p.steps_per_round}" for s, p in enumerate(setup.plans))
    log(f"federated DP-SGD: {len(setup.plans)} site(s){f' (site {cfg.alone} alone)' if cfg.alone is not None else ''}, of {cfg.sites} ({cfg.partition}{f' α={cfg.alpha}' if cfg.partition == 'dirichlet' else ''}), "
        f"{cfg.rounds} rounds × {cfg.local_epochs} local epoch(s), target ε={cfg.epsilon} δ={cfg.delta} per site, "
        f"engine={cfg.engine}; {sig}")
    bar = _progress(cfg.rounds, state.round, progress)
    try:
        while state.round < cfg.rounds:
            t0 = time.perf_counter()
            selected = select_sites(setup.select_key, state.round, len(setup.plans), cfg.fraction)
            start = start_round(state, selected)
            mark_round_started(run_path, cfg, start)  # durable before any site is asked (see the docstring)
            try:
                answers = answers_fn(state, selected)
                state, report = apply_round(state, selected, answers, plans=setup.plans, aggregator=aggregator,
                                            server_tx=server_tx, min_sites=cfg.min_sites, average_decay=cfg.average_decay)
            except BaseException:
                # The round failed (too few answers, aggregation failed) or was interrupted after asking: answers
                # may have reached the server (under secure aggregation an upper bound: in process the server
                # holds the sites' new states; over Flower the replies carry no optimizer tensor). The checkpoint
                # charges every asked site, counters included, so an abandoned run never under-reports and a
                # retry draws fresh keys. Without a run folder nothing persists.
                if run_path is not None:
                    charged, _ = charge_started_round(state, start, setup.plans)
                    save_progress(run_path, cfg, charged, history, elapsed, best)
                    clear_round_started(run_path)
                raise
            elapsed += time.perf_counter() - t0
            released = state.average if state.average is not None else state.params  # the averaged global model
            vm = binary_metrics(val_set.labels, evaluate_scores(apply_fn, released, buffers, val_set))
            sites = _site_report(state, setup.plans, cfg.delta, cfg.accountant,
                                 with_epsilon=epsilon_due(state.round, cfg.rounds))
            # the server's own curve: validation metrics of the released model on its data. A raw training
            # loss is recorded only when the sites opted in (report_train_loss; not covered by ε).
            record = {"round": state.round, "epoch": state.round,
                      **({"train_loss": report.loss} if cfg.report_train_loss else {}), "val_auc": vm.roc_auc,
                      "val_accuracy": vm.accuracy, "sites_answered": list(report.applied),
                      "excluded": {str(k): v for k, v in report.excluded.items()},
                      "site_epsilon": [s["epsilon"] for s in sites],
                      "epsilon": None if sites[0]["epsilon"] is None else max(s["epsilon"] for s in sites),
                      "seconds": elapsed}
            secure = getattr(aggregator, "last_round", None)  # secure aggregation: what the server learned
            if secure is not None and getattr(secure, "round", None) == state.round - 1 and hasattr(secure, "to_record"):
                record["secure"] = secure.to_record(report.applied)  # mean_loss only with report_train_loss
            history.append(record)
            if vm.roc_auc > best["val_auc"]:
                best = {"round": state.round, "val_auc": vm.roc_auc, "params": released}
            save_progress(run_path, cfg, state, history, elapsed, best)
            clear_round_started(run_path)  # the round is in the checkpoint: every asked site accounted for it
            for s, why in sorted(report.excluded.items()):
                with _external(bar):
                    log(f"round {state.round}: site {s} excluded: {why}")
            eps_text = " ".join("…" if e is None else f"{e:.2f}" for e in record["site_epsilon"])
            loss_text = f" loss {report.loss:.4f}" if cfg.report_train_loss else ""
            bar.set_postfix_str(f"sites {len(report.applied)}/{len(selected)}{loss_text} "
                                f"val AUC {vm.roc_auc:.3f} ε [{eps_text}]")
            bar.update(1)
            with _external(bar):
                log(f"round {state.round:3d}/{cfg.rounds}  sites {list(report.applied)} {loss_text} "
                    f"val AUC {vm.roc_auc:.4f}  acc {vm.accuracy:.4f}  ε per site [{eps_text}]  ({elapsed:.0f}s)")
    finally:
        bar.close()

    test_set, val, test, scores, ci = final_evaluation(apply_fn, best["params"], buffers, val_set, data_dir, cfg.seed,
                                                      bootstrap_resamples)
    sites = _site_report(state, setup.plans, cfg.delta, cfg.accountant)
    result = {
        "config": asdict(cfg),
        "noise_multiplier": min(p.noise_multiplier for p in setup.plans),
        "sampling_rate": max(p.sampling_rate for p in setup.plans),
        "steps": max(s["steps"] for s in sites),
        "epsilon": max(s["epsilon"] for s in sites),
        "delta": cfg.delta,
        "best_epoch": best["round"],
        "val": val.to_dict(), "test": test.to_dict(), "test_ci": {k: v.to_dict() for k, v in ci.items()},
        "train_seconds": elapsed, "history": history,
        "rounds": state.round, "best_round": best["round"], "sites": sites,
    }
    if executor is None:  # the in-process sites' device (over Flower each site's node config decides)
        from dpfunc.devices import describe_device

        result["device"] = describe_device(where)
    if run_path is not None:
        _write_json(run_path / "metrics.json", result)
        torch.save({**{k: v.detach().clone() for k, v in best["params"].items()}, **buffers}, run_path / "model.pt.tmp")
        (run_path / "model.pt.tmp").replace(run_path / "model.pt")
        _plots(run_path, result, test_set.labels, scores)
    return result


class _external:
    """Print a log line without breaking a tqdm bar."""

    def __init__(self, bar):
        self.cm = bar.external_write_mode() if hasattr(bar, "external_write_mode") else None

    def __enter__(self):
        return self.cm.__enter__() if self.cm is not None else None

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc) if self.cm is not None else False


def _plots(run_path: Path, result: dict, labels: torch.Tensor, scores: torch.Tensor) -> None:
    from matplotlib.figure import Figure

    from dpfunc.plots import plot_confusion_matrix, plot_roc

    plot_roc(labels, scores, run_path / "roc.png", name="federated DP")
    plot_confusion_matrix(confusion_matrix(labels, (scores >= 0.5).long()), run_path / "confusion.png")
    h = result["history"]
    fig = Figure(figsize=(10, 3.4))
    ax1, ax2 = fig.subplots(1, 2)
    rounds = [r["round"] for r in h]
    ax1.plot(rounds, [r["val_auc"] for r in h], marker="o", markersize=3, color="tab:green")
    ax1.set(xlabel="round", ylabel="validation ROC-AUC", title="global model, validation AUC")
    ax1.grid(alpha=0.3)
    for s, site in enumerate(result["sites"]):
        known = [r for r in h if r["site_epsilon"][s] is not None]  # long runs: ε every few rounds (epsilon_due)
        ax2.plot([r["round"] for r in known], [r["site_epsilon"][s] for r in known], marker="o", markersize=3,
                 label=f"site {s} (n={site['n']})")
    ax2.axhline(result["config"]["epsilon"], color="grey", ls="--", lw=1, label="target")
    ax2.set(xlabel="round", ylabel="ε spent (PLD)", title=f"per-site ε at δ={result['delta']:g} ({result['config']['accountant'].upper()})")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    tmp = run_path / "federated.tmp.png"
    fig.savefig(tmp, dpi=120)
    tmp.replace(run_path / "federated.png")


def evaluate_federated_run(run_dir: str | Path, data_dir: str | Path | None = None, *,
                           bootstrap_resamples: int = 1000) -> dict:
    """Re-evaluate a federated run folder from its checkpoint (``dpfunc evaluate RUN``); reads, writes nothing.

    The global model selected on validation (``best_params``) is scored on the test split, and each site's
    ε is recomputed from its ledger. A round that was **in flight** when the run stopped
    (``round_in_flight.json``: a hard kill after the sites were asked) is charged here as a resume would
    charge it (:func:`~dpfunc.federated.charge_started_round`, or one discrete-Gaussian step per asked
    site for distributed-noise runs): its sites may have released that round, so an abandoned run is
    never reported below what it spent. The folder itself is left as it is (a ``--resume`` records the
    charge in the checkpoint).

    Args:
        run_dir: a folder written by ``dpfunc federated`` (``config.json``, ``checkpoint.pt``).
        data_dir: where ``pneumoniamnist.npz`` is (flag / ``DPFUNC_DATA_DIR`` / default search).
        bootstrap_resamples: for the test metrics' 95% CIs.

    Returns:
        ``{"config", "rounds", "best_round", "val", "test", "test_ci", "epsilon", "delta", "sites",
        "in_flight_round", "in_flight_charged", "train_seconds"}``; ``epsilon`` is the largest site's,
        ``in_flight_charged`` the sites charged for an in-flight round (empty when none was).

    Raises:
        FileNotFoundError: no ``checkpoint.pt`` in ``run_dir``.
        ValueError: ``round_in_flight.json`` was written by another configuration, or cannot be read.
    """
    from dpfunc.bridge.checkpoint import load_checkpoint

    fn = "evaluate_federated_run"
    run_path = Path(run_dir)
    if not (run_path / "checkpoint.pt").is_file():
        raise FileNotFoundError(f"{fn}: no checkpoint.pt in {run_path}")
    saved = load_checkpoint(run_path / "checkpoint.pt")
    cfg = FederatedConfig(**{**_added_defaults(FederatedConfig()), **saved["config"]})
    state, _, elapsed, best = restore_progress(saved)
    train_set, val_set = pneumoniamnist("train", data_dir), pneumoniamnist("val", data_dir)
    setup = prepare(cfg, train_set.labels)
    module, apply_fn, params, buffers = build(cfg)
    in_flight = read_round_started(fn, run_path, cfg)
    charged: tuple[int, ...] = ()
    if cfg.distributed_noise:
        from dpfunc.federated.distributed import _site_report as distributed_report
        from dpfunc.federated.distributed import charge_interrupted, distributed_noise_for

        sizes = [len(i) for i in setup.indices]
        if in_flight is not None:
            noise = distributed_noise_for(cfg, sum(int(v.numel()) for v in params.values()), sizes)
            rates = [min(1.0, cfg.batch_size / n) for n in sizes]
            state, charged = charge_interrupted(state, in_flight, rates, noise.noise_multiplier_in_sum(noise.threshold))
        sites = distributed_report(state, sizes, cfg)
    else:
        if in_flight is not None:
            state, charged = charge_started_round(state, RoundStart.from_dict(in_flight), setup.plans)
        sites = _site_report(state, setup.plans, cfg.delta, cfg.accountant)
    _, val, test, _, ci = final_evaluation(apply_fn, best["params"], buffers, val_set, data_dir, cfg.seed,
                                           bootstrap_resamples)
    return {"config": asdict(cfg), "rounds": state.round, "best_round": best["round"], "val": val.to_dict(),
            "test": test.to_dict(), "test_ci": {k: v.to_dict() for k, v in ci.items()},
            "epsilon": max(s["epsilon"] for s in sites), "delta": cfg.delta, "sites": sites,
            "in_flight_round": None if in_flight is None else int(in_flight["round"]),
            "in_flight_charged": list(charged), "train_seconds": elapsed}


def is_federated_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir/config.json`` was written by ``dpfunc federated`` (its keys are
    :class:`FederatedConfig` fields, ``sites`` among them)."""
    import dataclasses

    try:
        keys = set(json.loads((Path(run_dir) / "config.json").read_text()))
    except (OSError, ValueError, TypeError):
        return False
    return "sites" in keys and keys <= {f.name for f in dataclasses.fields(FederatedConfig)}


def load_config(run_dir: str | Path) -> FederatedConfig:
    return FederatedConfig(**json.loads((Path(run_dir) / "config.json").read_text()))
