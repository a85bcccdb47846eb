"""Federated DP-SGD with distributed noise: ``dpfunc federated --secure-aggregation --distributed-noise``.

**An option with trust assumptions** (see :class:`dpfunc.secagg.distributed_dp.DistributedDiscreteGaussian`):
no party adds the whole DP noise. A round is ONE DP-SGD step over the union of the sites' data (FedSGD)::

    for site s asked this round (its own key and Poisson sampler, rate q_s = B / n_s):
        S_s  = Σ_{i ∈ batch_s} clip(∇ℓ_i(global), C)                       # the site's clipped sum
        x_s  = round(S_s · 2^k) + N_Z(0, v)   mod 2^ring_bits                # its noise share, secret
    Σ        = secure aggregation of the x_s (the server learns the sum of ≥ t sites, nothing else)
    ĝ        = 2^-k · Σ / Σ_{s ∈ U} q_s n_s                                  # expected batch size
    global'  = SGD(lr, momentum) step with ĝ                                 # on the server
    ledger_s = ledger_s.step(σ_U, q_s, DISCRETE_GAUSSIAN)  for every site asked

with ``v ≥ (σΔ·2^k)²/h``, ``Δ = C + √d·2^-k`` and ``h = t − c`` (``t``: the threshold, a majority of the
sites asked per round; ``c``: ``--colluding``). ``σ_U`` is what the released sum guarantees with up to ``c``
colluders among the ``|U| ≥ t`` sites in it (≥ σ; ``noise_multiplier_in_sum``). σ is calibrated so that
``R`` such steps at the largest ``q_s`` spend at most the target ε (discrete-Gaussian accounting,
:mod:`dpfunc.accounting.discrete_gaussian`). The noise is drawn from ``os.urandom`` (ChaCha20): runs are
not reproducible, by design. Every site asked in a round is charged that round, whether or not its share
made it into the sum (an upper bound). A round with fewer than ``t`` sites at some stage fails: nothing is
released or applied, the run stops with the last checkpoint intact.

Interrupted rounds: before a round, the run folder records it (``round_in_flight.json``, as
:func:`~dpfunc.federated.job.run_federated` does). A round that may have released its sum but never reached
the checkpoint (the run was interrupted or killed after the sum was unmasked) is charged to every site
asked — one step at σ, the smallest multiplier a sum of ``≥ t`` sites carries — at once if the run can still
write, else on ``resume``; ``DistributedState.retries`` then moves on, and the re-run round draws fresh
Poisson batches (its sampling key folds in ``retries``; the noise is fresh OS entropy anyway), so it is a
new release, charged again. Before, the re-run used the same batches and its ledger counted one release.

Only the in-process engine runs this (on Flower each DP-SGD step would need its own five round trips).
The in-process runner computes every site in one process: the protocol and the accounting are exercised
exactly, the separation of parties is not (as for ``--secure-aggregation`` in process).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any, NamedTuple

import torch

from dpfunc.accounting.ledger import Mechanism, PrivacyLedger

__all__ = ["DistributedState", "distributed_threshold", "distributed_noise_for", "run_distributed"]

TRUST = ("distributed noise: at most {c} colluding site(s) share their noise with a semi-honest server; every "
         "site adds its share faithfully; no sum of fewer than t={t} sites is unmasked")


class DistributedState(NamedTuple):
    """The run's state after ``round`` rounds (checkpointed): global model, server SGD state, each site's
    privacy ledger and the number of rounds it was asked to take part in."""

    round: int
    params: dict
    opt_state: Any
    ledgers: tuple
    rounds: tuple
    retries: int = 0  # rounds re-run after an interruption so far (folded into the sampling keys when > 0)


_RETRY_DOMAIN = 0x7265747279  # "retry"


def round_sample_key(sample_key, round: int, retries: int):
    """The key of a site's Poisson batch in ``round``: ``sample_key.fold_in(round)`` in a run never
    interrupted, a key of its own for every ``(round, retries)`` after ``retries`` re-runs."""
    if retries == 0:
        return sample_key.fold_in(round)
    return sample_key.fold_in(_RETRY_DOMAIN).fold_in(retries).fold_in(round)


def charge_interrupted(state: DistributedState, in_flight: Mapping, rates: list[float], sigma: float
                       ) -> tuple[DistributedState, tuple[int, ...]]:
    """Charge the sites of a round recorded as started (``in_flight``: its ``round``, ``selected`` and
    ``retries``) that the state does not account for yet: one discrete-Gaussian step at ``sigma`` and
    sampling rate ``rates[s]`` each, and ``retries + 1``. Pure and idempotent (a record of a round already
    applied or charged changes nothing)."""
    if int(in_flight["round"]) != state.round or int(in_flight.get("retries", 0)) != state.retries:
        return state, ()
    ledgers = list(state.ledgers)
    selected = tuple(int(s) for s in in_flight["selected"])
    for s in selected:
        ledgers[s] = ledgers[s].step(sigma, rates[s], mechanism=Mechanism.DISCRETE_GAUSSIAN)
    return state._replace(ledgers=tuple(ledgers), retries=state.retries + 1), selected


def distributed_threshold(cfg) -> int:
    """``t``: a strict majority of the sites asked per round (at least 2)."""
    asked = max(1, min(cfg.sites, int(math.floor(cfg.fraction * cfg.sites + 0.5))))
    return max(2, asked // 2 + 1)


def _calibrate(cfg, q_max: float) -> float:
    from dpfunc.accounting.discrete_gaussian import discrete_gaussian_noise_multiplier_for

    return discrete_gaussian_noise_multiplier_for(cfg.epsilon, cfg.delta, q_max, cfg.rounds)


def distributed_noise_for(cfg, num_coordinates: int, sizes: list[int]):
    """The :class:`~dpfunc.secagg.distributed_dp.DistributedDiscreteGaussian` of a run: σ calibrated for
    ``cfg.rounds`` steps at the largest sampling rate, ``t`` from :func:`distributed_threshold`."""
    from dpfunc.secagg.distributed_dp import DistributedDiscreteGaussian

    q_max = max(min(1.0, cfg.batch_size / n) for n in sizes)
    return DistributedDiscreteGaussian(_calibrate(cfg, q_max), cfg.max_grad_norm, threshold=distributed_threshold(cfg),
                                       colluding_sites=cfg.colluding_sites, num_coordinates=num_coordinates)


def _epsilon(ledger: PrivacyLedger, delta: float) -> float:
    """ε of a site's ledger: its phases are discrete Gaussian, so this is their bound (CKS Thm 14 curve,
    Zhu–Wang subsampling; :mod:`dpfunc.accounting.discrete_gaussian`)."""
    from dpfunc.accounting import epsilon

    return epsilon(ledger, delta) if ledger.total_steps else 0.0


def _site_report(state: DistributedState, sizes: list[int], cfg) -> list[dict]:
    out = []
    for s, n in enumerate(sizes):
        ledger = state.ledgers[s]
        out.append({"site": s, "n": n, "epsilon": _epsilon(ledger, cfg.delta), "delta": cfg.delta,
                    "noise_multiplier": min((p.noise_multiplier for p in ledger.phases), default=math.nan),
                    "sampling_rate": min(1.0, cfg.batch_size / n), "steps": ledger.total_steps,
                    "rounds": state.rounds[s], "ledger": ledger.to_dict()})
    return out


def run_distributed(cfg, *, data_dir=None, run_dir=None, resume: bool = False, progress: bool | None = None,
                    log: Callable[[str], None] = print, bootstrap_resamples: int = 1000,
                    dropouts: Mapping[int, Mapping] | None = None, device: str | torch.device = "cpu") -> dict:
    """Run (or resume) a distributed-noise federated job; the run folder of :func:`dpfunc.federated.job.run_federated`.

    Args:
        cfg: a :class:`~dpfunc.federated.job.FederatedConfig` with ``distributed_noise=True``.
        dropouts: test hook ``{round: {Stage: sites}}`` passed to the secure-aggregation round.
        device: where the sites' clipped sums are computed (``--device``); the sums, the secure aggregation
            and the server's step are on the CPU (as in :func:`~dpfunc.federated.job.run_federated`).

    Returns:
        The metrics dict (``metrics.json``), with a ``"distributed_noise"`` entry stating σ, t, c, the grid
        and the trust assumptions.

    Raises:
        dpfunc.federated.RoundFailedError: a secure round lost too many sites; nothing of it is applied.
    """
    from dpfunc.data import pneumoniamnist
    from dpfunc.federated.job import (_external, _plots, _progress, _write_json, build, clear_round_started,
                                      final_evaluation, make_engine, mark_round_started, open_run_folder, prepare,
                                      read_round_started, restore_progress, save_progress)
    from dpfunc.federated.rounds import RoundFailedError, RoundReport, select_sites
    from dpfunc.federated.site import site_key, site_keys
    from dpfunc.metrics import binary_metrics
    from dpfunc.sampling import poisson_sample
    from dpfunc.secagg.distributed_dp import distributed_round
    from dpfunc.secagg.types import RoundFailedError as SecureRoundFailed
    from dpfunc.train import evaluate_scores
    from dpfunc.transforms import apply_updates, sgd

    if not getattr(cfg, "distributed_noise", False):
        raise ValueError("run_distributed: cfg.distributed_noise must be True")
    train_set, val_set = pneumoniamnist("train", data_dir), pneumoniamnist("val", data_dir)
    setup = prepare(cfg, train_set.labels)
    sizes = [len(i) for i in setup.indices]
    from dpfunc.devices import describe_device, resolve_device, to_device, tree_to_device

    where = resolve_device(device, fn="run_distributed", name="device (--device)")
    module, apply_fn, params, buffers = build(cfg)
    engine = make_engine(cfg, module.to(where), apply_fn)
    d = sum(int(v.numel()) for v in params.values())
    noise = distributed_noise_for(cfg, d, sizes)
    ring_bits = noise.ring_bits_for(cfg.sites, float(max(sizes)) * cfg.max_grad_norm)
    tx = sgd(cfg.learning_rate, cfg.momentum)
    data = [(to_device(train_set.images[i], where), to_device(train_set.labels[i], where)) for i in setup.indices]
    rates = [min(1.0, cfg.batch_size / n) for n in sizes]
    state = DistributedState(0, dict(params), tx.init(params), tuple(PrivacyLedger() for _ in sizes), (0,) * len(sizes))
    history: list[dict] = []
    best = {"round": 0, "val_auc": -math.inf, "params": state.params}
    elapsed = 0.0
    run_path, saved = open_run_folder("run_distributed", run_dir, cfg, resume)
    if saved is not None:
        state, history, elapsed, best = restore_progress(saved)
        log(f"resumed {run_path / 'checkpoint.pt'} after round {state.round}/{cfg.rounds}")
    sigma_min = noise.noise_multiplier_in_sum(noise.threshold)  # what any released sum (≥ t sites) carries at least
    in_flight = read_round_started("run_distributed", run_path, cfg) if resume else None
    if in_flight is not None:
        state, charged = charge_interrupted(state, in_flight, rates, sigma_min)
        if charged:
            log(f"round {in_flight['round']} was in flight when the run stopped: site(s) {list(charged)} are charged "
                f"a step at σ={sigma_min:.4f} and it is re-run with fresh batches")
            save_progress(run_path, cfg, state, history, elapsed, best)
        clear_round_started(run_path)
    trust = TRUST.format(c=noise.colluding_sites, t=noise.threshold)
    log(f"federated DP-SGD with distributed noise: {cfg.sites} sites, {cfg.rounds} rounds of one step each, σ={noise.noise_multiplier:.4f} "
        f"(Δ = C + √d·2^-{noise.grid_bits} = {noise.sensitivity:.5f}), t={noise.threshold}, c={noise.colluding_sites}, "
        f"per-site noise variance {noise.share.variance} grid steps², ring 2^{ring_bits}; {trust}")
    bar = _progress(cfg.rounds, state.round, progress)
    try:
        while state.round < cfg.rounds:
            t0 = time.perf_counter()
            r = state.round
            selected = select_sites(setup.select_key, r, len(sizes), cfg.fraction)
            sums = {}
            start = {"round": r, "selected": [int(s) for s in selected], "retries": state.retries}
            mark_round_started(run_path, cfg, start)  # durable before any sum can be released
            # no training loss is reported: only the noisy sum leaves the sites (a raw-batch loss would not be DP)
            report = RoundReport(r, tuple(selected), tuple(selected), {}, math.nan)
            try:
                on_device = tree_to_device(state.params, where), tree_to_device(buffers, where)
                for s in selected:
                    sample_key, _ = site_keys(site_key(setup.sites_key, s))
                    idx = to_device(poisson_sample(round_sample_key(sample_key, r, state.retries), sizes[s], rates[s]), where)
                    out = engine(*on_device, tuple(t[idx] for t in data[s]), None)
                    sums[s] = {k: v.detach().to("cpu", torch.float64) for k, v in out.grads.grads.items()}
                res = distributed_round(sums, noise, ring_bits=ring_bits, round_id=r,
                                        dropouts=(dropouts or {}).get(r))
            except SecureRoundFailed as e:
                clear_round_started(run_path)  # no sum was unmasked: nothing to charge, the retry may reuse the batches
                raise RoundFailedError(report, cfg.min_sites, message=(
                    f"round {r} failed in distributed-noise secure aggregation at stage {e.stage.name} ({e.available} < "
                    f"threshold {e.needed}): {e}. Nothing was released or applied; the last checkpoint is unchanged.")) from e
            except BaseException:
                if run_path is not None:  # interrupted: charged at once (an upper bound), re-run with fresh batches
                    charged, _ = charge_interrupted(state, start, rates, sigma_min)
                    save_progress(run_path, cfg, charged, history, elapsed, best)
                    clear_round_started(run_path)
                raise
            expected_batch = sum(rates[s] * sizes[s] for s in res.included)
            grad = {k: (v / expected_batch).to(state.params[k].dtype) for k, v in res.total.items()}
            updates, opt_state = tx.update(grad, state.opt_state, state.params)
            ledgers, rounds = list(state.ledgers), list(state.rounds)
            for s in selected:  # every site asked is charged (an upper bound for those whose share was dropped)
                ledgers[s] = ledgers[s].step(res.noise_multiplier, rates[s], mechanism=Mechanism.DISCRETE_GAUSSIAN)
                rounds[s] += 1
            state = DistributedState(r + 1, apply_updates(state.params, updates), opt_state, tuple(ledgers), tuple(rounds),
                                     state.retries)
            elapsed += time.perf_counter() - t0
            vm = binary_metrics(val_set.labels, evaluate_scores(apply_fn, state.params, buffers, val_set))
            sites = _site_report(state, sizes, cfg)
            dropped = [s for s in selected if s not in res.included]
            record = {"round": state.round, "epoch": state.round, "val_auc": vm.roc_auc,  # no train_loss: none leaves a site
                      "val_accuracy": vm.accuracy, "sites_answered": list(res.included), "excluded": {},
                      "site_epsilon": [s["epsilon"] for s in sites], "epsilon": max(s["epsilon"] for s in sites),
                      "seconds": elapsed,
                      "secure": {"included": list(res.included), "dropped": dropped, "threshold": res.threshold,
                                 "noise_multiplier": res.noise_multiplier, "colluding_assumed": noise.colluding_sites,
                                 "bytes_sent": int(sum(res.stats.sent.values()))}}
            history.append(record)
            if vm.roc_auc > best["val_auc"]:
                best = {"round": state.round, "val_auc": vm.roc_auc, "params": state.params}
            save_progress(run_path, cfg, state, history, elapsed, best)
            clear_round_started(run_path)  # the round is in the checkpoint
            eps_text = " ".join(f"{e:.2f}" for e in record["site_epsilon"])
            bar.update(1)
            with _external(bar):
                log(f"round {state.round:3d}/{cfg.rounds}  sum of sites {list(res.included)}"
                    f"{f' (dropped {dropped})' if dropped else ''}  σ in sum {res.noise_multiplier:.4f}  "
                    f"val AUC {vm.roc_auc:.4f}  ε per site [{eps_text}]  ({elapsed:.0f}s)")
    finally:
        bar.close()

    test_set, val, test, scores, ci = final_evaluation(apply_fn, best["params"], buffers, val_set, data_dir, cfg.seed,
                                                      bootstrap_resamples)
    sites = _site_report(state, sizes, cfg)
    result = {
        "config": asdict(cfg), "noise_multiplier": noise.noise_multiplier, "sampling_rate": max(rates),
        "steps": max(s["steps"] for s in sites), "epsilon": max(s["epsilon"] for s in sites), "delta": cfg.delta,
        "best_epoch": best["round"], "val": val.to_dict(), "test": test.to_dict(),
        "test_ci": {k: v.to_dict() for k, v in ci.items()}, "train_seconds": elapsed, "history": history,
        "rounds": state.round, "best_round": best["round"], "sites": sites,
        "distributed_noise": {"noise_multiplier": noise.noise_multiplier, "threshold": noise.threshold,
                              "colluding_sites": noise.colluding_sites, "honest_sites": noise.honest_sites,
                              "grid_bits": noise.grid_bits, "sensitivity": noise.sensitivity,
                              "share_variance_grid": noise.share.variance, "ring_bits": ring_bits,
                              "mechanism": "distributed discrete Gaussian (Kairouz, Liu & Steinke 2021)",
                              "noise_reproducible": False, "trust": trust},
        "device": describe_device(where),  # where the sites' clipped sums were computed
    }
    if run_path is not None:
        _write_json(run_path / "metrics.json", result)
        torch.save({**{k: v.detach().clone() for k, v in best["params"].items()}, **buffers}, run_path / "model.pt.tmp")
        (run_path / "model.pt.tmp").replace(run_path / "model.pt")
        _plots(run_path, result, test_set.labels, scores)
    return result
