"""Rounds on the server: who takes part, what is applied, and the in-process runner.

``apply_round`` is the one function every engine calls with the answers it collected, so the
in-process runner and the Flower ServerApp produce the same global model from the same answers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from dpfunc._tree import Params
from dpfunc._validate import check_int_range, check_number, check_probability
from dpfunc.federated.aggregate import AggregationError, Aggregator, WeightedFedAvg, check_update
from dpfunc.federated.site import SitePlan, SiteState, SiteUpdate, charge_site, site_key, site_round
from dpfunc.keys import Key
from dpfunc.private import find_dp_state
from dpfunc.step import GradEngine
from dpfunc.transforms import EmptyState, GradientTransformation, apply_updates

__all__ = ["ServerState", "RoundReport", "RoundFailedError", "RoundStart", "select_sites", "apply_round",
           "init_server_state", "start_round", "charge_started_round", "InProcessSites", "run_round_inprocess",
           "average_rounds"]

_SELECT_DOMAIN = 0x73656C656374  # "select"


class ServerState(NamedTuple):
    """The whole federated state after ``round`` rounds (what a server checkpoint holds).

    Attributes:
        round: rounds applied so far (the next round's number).
        params: the global model.
        opt_state: the server optimizer's state (``EmptyState()`` for plain FedAvg).
        sites: every site's :class:`SiteState`, by id (each holds its privacy ledger).
        average: the server-side average of the global models over the rounds so far
            (:func:`average_rounds`; what the job evaluates and releases, like ``dpfunc train``'s
            averaged iterates). ``None`` before the first round (and in checkpoints written before
            it existed): the average then starts at the first round's model.
    """

    round: int
    params: Params
    opt_state: Any
    sites: tuple[SiteState, ...]
    average: Params | None = None


class RoundReport(NamedTuple):
    """What happened in one round: participants asked, sites applied, sites excluded with the reason."""

    round: int
    selected: tuple[int, ...]
    applied: tuple[int, ...]
    excluded: dict[int, str]
    loss: float  # mean of the applied sites' raw training losses: NaN unless they opted in (report_train_loss; not private)


class RoundFailedError(RuntimeError):
    """Fewer than ``min_sites`` usable answers, or the aggregator failed: nothing of the round is applied
    to the returned state.

    The sites that answered did release that round's outputs to the server, so
    :func:`~dpfunc.federated.job.run_federated` checkpoints the failed round with every asked site
    charged (:func:`charge_started_round`: ledger and step counter), as an abandoned run's ε must count
    them and a retry must not reuse their noise keys (a retry on other hardware is not bit for bit the
    same release). A failure inside secure aggregation is charged too, as an upper bound: the sum was
    not unmasked, and over Flower the replies carry no optimizer tensor (the momentum buffer stays at
    the site), but the in-process engine holds each site's new state, whose momentum buffer is a noisy
    function of the round, and the charge keeps a retry's noise keys fresh whatever the server kept.
    """

    def __init__(self, report: RoundReport | None, min_sites: int = 0, *, message: str | None = None):
        self.report = report
        if message is None:
            reasons = "; ".join(f"site {s}: {r}" for s, r in sorted(report.excluded.items())) or "none"
            message = (f"round {report.round} failed: {len(report.applied)} usable answer(s) from sites "
                       f"{list(report.applied)}, at least {min_sites} needed (--min-sites). Excluded: {reasons}. "
                       f"Nothing was applied to the model; the answers that came reached the server, so each asked site is charged "
                       f"the round.")
        super().__init__(message)

    @classmethod
    def from_message(cls, message: str) -> RoundFailedError:
        """The error as reported by another process (the Flower ServerApp), without its report."""
        return cls(None, message=message)


def init_server_state(params: Params, sites: Sequence[SiteState], server_tx: GradientTransformation | None) -> ServerState:
    """The server's state before round 0: the initial global model, the server optimizer's state and every site's.

    Args:
        params: the initial global model (copied into a new dict; the tensors are shared, never modified).
        sites: one :class:`~dpfunc.federated.SiteState` per site, ordered by site id 0 … S−1.
        server_tx: the server optimizer (FedAdam, FedAvgM, …) applied to the averaged update; None = plain
            FedAvg (the average becomes the new model).

    Raises:
        ValueError: the site states are not ordered by id 0 … S−1.
    """
    ids = [s.site for s in sites]
    if ids != list(range(len(ids))):
        raise ValueError(f"init_server_state: site states must be ordered by id 0..S-1, got ids {ids}")
    return ServerState(0, dict(params), server_tx.init(params) if server_tx is not None else EmptyState(), tuple(sites))


def average_rounds(average: Params | None, params: Params, decay: float, round: int) -> Params:
    """Server-side iterate averaging: fold round ``round``'s new global model into the running average. Pure.

    ``average ← d·average + (1 − d)·params`` with ``d = min(decay, r / (r + 1))`` and ``r = round`` (0 for
    the first round): the plain running mean of the global models while ``r/(r+1) < decay``, an
    exponential moving average with ``decay`` after that (Polyak–Ruppert averaging turned EMA, as De et
    al. 2022 use for DP-SGD). ``decay = 0`` keeps the last model (no averaging). The initial model is
    never part of the average: at ``r = 0`` (or when ``average`` is None: a checkpoint written before
    averaging existed) the average starts at ``params``.

    Privacy: the average is a function of the released global models only (each of which is
    post-processing of the sites' DP outputs), so it costs no privacy.

    Args:
        average: the average after rounds ``0..r-1`` (dict name → tensor), or None at ``r = 0``.
        params: the global model after round ``r`` (same keys, shapes and dtypes).
        decay: in ``[0, 1)``.
        round: ``r``, the number of the round just applied (``ServerState.round`` before it).

    Returns:
        A new dict; computed in float64 then cast to each parameter's dtype, so every engine gets the
        same bits.

    Example:
        >>> import torch
        >>> a = average_rounds(None, {"w": torch.tensor([3.0])}, 0.9, 0)
        >>> a = average_rounds(a, {"w": torch.tensor([6.0])}, 0.9, 1)       # mean of 3 and 6
        >>> average_rounds(a, {"w": torch.tensor([0.0])}, 0.5, 2)["w"]     # d = min(0.5, 2/3)
        tensor([2.2500])
    """
    fn = "average_rounds"
    check_number(fn, "decay", decay, low=0.0, high=1.0, high_open=True)
    check_int_range(fn, "round", round, low=0)
    d = min(float(decay), round / (round + 1))
    if d == 0.0 or average is None:
        return {k: v.detach().clone() for k, v in params.items()}
    if set(average) != set(params):
        raise ValueError(f"{fn}: average and params hold different names: {sorted(set(average) ^ set(params))}")
    return {k: (d * average[k].to(torch.float64) + (1.0 - d) * p.to(torch.float64)).to(p.dtype) for k, p in params.items()}


class RoundStart(NamedTuple):
    """What a server persists BEFORE it asks the sites to train (``round_in_flight.json`` of a run folder).

    Attributes:
        round: the round's number (``ServerState.round`` when it started).
        selected: the sites asked, sorted.
        steps: each asked site's step counter when asked (``SiteState.steps``), in ``selected``'s order:
            the round's noise and sampling keys are those of steps ``steps .. steps + steps_per_round − 1``.
    """

    round: int
    selected: tuple[int, ...]
    steps: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"round": int(self.round), "selected": [int(s) for s in self.selected], "steps": [int(t) for t in self.steps]}

    @classmethod
    def from_dict(cls, d: Mapping) -> RoundStart:
        start = cls(int(d["round"]), tuple(int(s) for s in d["selected"]), tuple(int(t) for t in d["steps"]))
        if len(start.selected) != len(start.steps):
            raise ValueError(f"RoundStart.from_dict: {len(start.selected)} sites but {len(start.steps)} step counters: {dict(d)}")
        return start


def start_round(state: ServerState, selected: Sequence[int]) -> RoundStart:
    """The :class:`RoundStart` of asking ``selected`` to train from ``state``. Pure."""
    sel = tuple(sorted(set(int(s) for s in selected)))
    return RoundStart(state.round, sel, tuple(state.sites[s].steps for s in sel))


def charge_started_round(state: ServerState, start: RoundStart, plans: Sequence[SitePlan]) -> tuple[ServerState, tuple[int, ...]]:
    """Charge every site asked in ``start`` whose state does not yet account for that round. Pure, idempotent.

    Once a site is asked, its noised update may be seen (it reached the server, a relay or a log) even
    if the round never completes: the server crashed before its checkpoint, the round failed, or the run
    was interrupted. Such a site's state still has the step counter it was asked with (``start.steps``);
    it is charged the round (:func:`~dpfunc.federated.charge_site`: ledger ``steps_per_round`` steps at
    ``(σ_s, q_s)``, step counter advanced). A retry of the round then draws fresh noise and Poisson keys
    (they are indexed by the step counter) and is charged again, as the new release it is: no two
    releases share noise, and the ledger counts every release anyone could have seen. A site whose
    counter moved past ``start.steps`` (the round was applied, or already charged) is left as it is.

    Args:
        state: the server state (from the checkpoint).
        start: the round that was started (:func:`start_round`).
        plans: every site's :class:`SitePlan`.

    Returns:
        ``(state', charged site ids)``; ``state'.round`` is unchanged (the round is not applied).

    Raises:
        ValueError: a site's counter is behind ``start.steps`` (the record belongs to another state), or
            ``start.round`` is ahead of ``state.round``.

    Example:
        >>> import torch
        >>> from dpfunc import Key
        >>> from dpfunc.federated import SitePlan, init_site_state, init_server_state
        >>> plan = SitePlan(40, 10, 1, noise_multiplier=1.0)
        >>> state = init_server_state({"w": torch.zeros(2)}, [init_site_state(0, plan, Key(0), {"w": torch.zeros(2)})], None)
        >>> start = start_round(state, [0])
        >>> state, charged = charge_started_round(state, start, [plan])
        >>> charged, state.sites[0].steps, charge_started_round(state, start, [plan])[1]
        ((0,), 4, ())
    """
    fn = "charge_started_round"
    if start.round > state.round:
        raise ValueError(f"{fn}: round {start.round} was started but the state is before round {state.round}; "
                         "the record belongs to another run")
    sites, charged = list(state.sites), []
    for s, steps in zip(start.selected, start.steps):
        if not 0 <= s < len(sites):
            raise ValueError(f"{fn}: site {s} was asked in round {start.round}, but there are {len(sites)} sites")
        if sites[s].steps < steps:
            raise ValueError(f"{fn}: site {s} was asked in round {start.round} at step {steps}, but its state is at step "
                             f"{sites[s].steps}; the record belongs to another run")
        if sites[s].steps == steps:
            sites[s] = charge_site(sites[s], plans[s])
            charged.append(s)
    return state._replace(sites=tuple(sites)), tuple(charged)


def select_sites(key: Key, round: int, num_sites: int, fraction: float) -> tuple[int, ...]:
    """The sites asked to train in round ``round``: ``max(1, round(fraction·S))`` of them, uniformly
    without replacement from ``key.fold_in(round)``, sorted by id; all sites when ``fraction == 1``."""
    fn = "select_sites"
    check_int_range(fn, "num_sites", num_sites, low=1)
    check_probability(fn, "fraction", fraction, open_low=True)
    m = max(1, min(num_sites, int(math.floor(fraction * num_sites + 0.5))))
    if m == num_sites:
        return tuple(range(num_sites))
    perm = torch.randperm(num_sites, generator=key.fold_in(_SELECT_DOMAIN).fold_in(round).generator())
    return tuple(sorted(int(i) for i in perm[:m]))


def apply_round(
    state: ServerState,
    selected: Sequence[int],
    answers: Mapping[int, tuple[SiteUpdate, SiteState] | BaseException | str],
    *,
    plans: Sequence[SitePlan],
    aggregator: Aggregator | None = None,
    server_tx: GradientTransformation | None = None,
    min_sites: int = 1,
    average_decay: float = 0.0,
) -> tuple[ServerState, RoundReport]:
    """Apply one round's answers to the server state. Pure.

    Args:
        state: the state before the round (``state.round`` is this round's number).
        selected: the sites asked to train.
        answers: per selected site, ``(update, new_site_state)`` or the failure (an exception or a reason).
            A selected site with no entry stalled.
        plans: every site's :class:`SitePlan` (to charge a failed site's ledger).
        aggregator: default :class:`WeightedFedAvg`.
        server_tx: server optimizer on ``global − mean`` (None: the new global is the mean).
        min_sites: the least number of usable answers for the round to count.
        average_decay: decay of the server-side average of the global models (:func:`average_rounds`;
            0 keeps ``average`` equal to the last global model).

    Returns:
        ``(new_state, report)``. Usable answers are aggregated in site-id order. A selected site whose
        answer is missing, failed or malformed is excluded with its reason and its ledger is charged
        the round's steps (:func:`~dpfunc.federated.charge_site`): it may have trained before failing.

    Raises:
        RoundFailedError: fewer than ``min_sites`` usable answers, or the aggregator raised
            :class:`AggregationError` (e.g. a secure round lost too many sites); nothing is applied.
    """
    aggregator = aggregator if aggregator is not None else WeightedFedAvg()
    r = state.round
    kept: list[tuple[SiteUpdate, SiteState]] = []
    excluded: dict[int, str] = {}
    for s in sorted(set(selected)):
        a = answers.get(s)
        if a is None:
            excluded[s] = "no answer (stalled, timed out or crashed)"
        elif isinstance(a, BaseException):
            excluded[s] = f"failed: {type(a).__name__}: {a}"
        elif isinstance(a, str):
            excluded[s] = a
        else:
            upd, new_site = a
            reason = check_update(upd, state.params, r)
            if reason is None and upd.site != s:
                reason = f"update claims to come from site {upd.site}"
            if reason is None:
                reason = _check_site_state(new_site, state.sites[s], plans[s], s)
            if reason is None:
                kept.append((upd, new_site))
            else:
                excluded[s] = f"malformed update: {reason}"
    losses = [u.loss for u, _ in kept if math.isfinite(u.loss)]
    report = RoundReport(r, tuple(sorted(set(selected))), tuple(u.site for u, _ in kept), excluded,
                         sum(losses) / len(losses) if losses else math.nan)
    if len(kept) < min_sites:
        raise RoundFailedError(report, min_sites)
    try:
        mean = aggregator.aggregate([u for u, _ in kept], state.params)
    except AggregationError as e:  # e.g. a secure round with fewer than t survivors: fail it, apply nothing
        raise RoundFailedError(report, min_sites, message=(
            f"round {r} failed in aggregation ({type(e).__name__}: {e}). Nothing was applied; the last "
            f"checkpoint is unchanged.")) from e
    if server_tx is None:
        params, opt_state = {k: v.to(state.params[k].dtype) for k, v in mean.items()}, state.opt_state
    else:
        pseudo_grad = {k: state.params[k] - mean[k] for k in state.params}
        updates, opt_state = server_tx.update(pseudo_grad, state.opt_state, state.params)
        params = apply_updates(state.params, updates)
    sites = list(state.sites)
    for u, new_site in kept:
        sites[u.site] = new_site
    for s in excluded:
        sites[s] = charge_site(sites[s], plans[s])
    average = average_rounds(state.average, params, average_decay, r)
    return ServerState(r + 1, params, opt_state, tuple(sites), average), report


def _check_site_state(new: object, old: SiteState, plan: SitePlan, site: int) -> str | None:
    """The returned site state must account for exactly one round of the site's plan (its ledger is what
    the run reports: a reset or short ledger would under-report ε)."""
    if not isinstance(new, SiteState) or new.site != site:
        return "malformed site state"
    expected = charge_site(old, plan)
    try:
        same = (new.steps == expected.steps and new.rounds == old.rounds + 1 and new.ledger == expected.ledger
                and int(find_dp_state(new.opt_state).count) == int(find_dp_state(expected.opt_state).count))
    except (ValueError, AttributeError, TypeError):
        same = False
    if not same:
        return (f"site state does not account for this round (steps {new.steps}, expected {expected.steps}; "
                f"ledger {new.ledger if isinstance(new, SiteState) else None}, expected {expected.ledger})")
    return None


class InProcessSites:
    """All sites in this process: their data, plans and engine (for tests, prototyping and the CLI's
    ``--engine inprocess``).

    Args:
        data: per site, its training tensors ``(x, y)``.
        plans: per site, its :class:`SitePlan`.
        engine: the gradient engine shared by the sites.
        run_key: the run's key; site ``s`` uses ``site_key(run_key, s)``.
        buffers: model buffers.
        fault: optional test hook ``fault(site, round, update) -> update | exception`` applied to each
            answer (to simulate crashes and malformed updates).
        report_train_loss: the sites put their raw mean training loss in each update (``site_round(
            report_loss=True)``); NOT covered by ε, default False (the loss is NaN).
    """

    def __init__(self, data: Sequence[Sequence[torch.Tensor]], plans: Sequence[SitePlan], engine: GradEngine,
                 run_key: Key, *, buffers: Params | None = None, fault: Callable | None = None,
                 report_train_loss: bool = False):
        if len(data) != len(plans):
            raise ValueError(f"InProcessSites: {len(data)} data sets for {len(plans)} plans")
        self.data, self.plans, self.engine, self.run_key = list(data), list(plans), engine, run_key
        self.buffers, self.fault, self.report_train_loss = buffers, fault, report_train_loss

    def __call__(self, state: ServerState, selected: Sequence[int]) -> dict[int, Any]:
        answers: dict[int, Any] = {}
        for s in selected:
            try:
                ans = site_round(state.params, state.sites[s], self.data[s], site_key(self.run_key, s),
                                 plan=self.plans[s], engine=self.engine, round=state.round, buffers=self.buffers,
                                 report_loss=self.report_train_loss)
                if self.fault is not None:
                    ans = self.fault(s, state.round, ans)
            except Exception as e:  # a crashing site is excluded, not fatal
                ans = e
            if ans is not None:
                answers[s] = ans
        return answers


def run_round_inprocess(state: ServerState, sites: InProcessSites, *, key: Key, fraction: float = 1.0,
                        aggregator: Aggregator | None = None, server_tx: GradientTransformation | None = None,
                        min_sites: int = 1, average_decay: float = 0.0) -> tuple[ServerState, RoundReport]:
    """Select, train every selected site in this process, apply: one complete round."""
    selected = select_sites(key, state.round, len(state.sites), fraction)
    answers = sites(state, selected)
    return apply_round(state, selected, answers, plans=sites.plans, aggregator=aggregator, server_tx=server_tx,
                       min_sites=min_sites, average_decay=average_decay)
