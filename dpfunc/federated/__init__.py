"""Federated DP training across sites (hospitals): pure rounds, pluggable aggregation, engines outside.

Each site runs DP-SGD on its own patients with its own key and privacy ledger; the server combines the
sites' models; no raw data leaves a site. This package is pure: it never imports an engine. The
multi-process engine lives in :mod:`dpfunc.federated.flower` (the only module importing ``flwr``); the
in-process runner (:class:`InProcessSites`, :func:`run_round_inprocess`) covers tests and research.

One round, as data::

    selected   = select_sites(key, r, S, fraction)                       # partial participation
    for s in selected (each at its site, own key, own ledger):
        update_s, state_s = site_round(global, state_s, data_s, site_key(run_key, s), plan=plan_s, ...)
    state', report = apply_round(state, selected, answers, plans=plans, aggregator=..., server_tx=...)
    ε_s        = epsilon(state'.sites[s].ledger, δ)                       # a patient's guarantee

Privacy (parallel composition):
    Every patient belongs to exactly one site, and only that site's DP-SGD steps touch their record.
    So a patient's guarantee is their site's ledger: ``ε_s = epsilon(ledger_s, δ)`` with record-level
    (add/remove-one) adjacency on the site's own data, its own sampling rate ``q_s = B / n_s`` and its
    own σ_s. The server's aggregate and the global model are post-processing of the sites' DP outputs.
    Partial participation is accounted exactly by the ledgers: a site's ledger grows only in rounds it
    is asked to train (no amplification by site sampling is claimed); a site that was asked and failed
    is charged the full round (it may have trained before failing), so the report is an upper bound.
    A round that never reaches the checkpoint (failed, interrupted, the server crashed) charges every
    site asked in it (:func:`charge_started_round`), and its re-run draws fresh noise keys (they are
    indexed by the site's step counter): no two releases share noise, each is in the ledger.
    σ_s is calibrated for the worst case (the site trains in every round), so ε_s ≤ target always.
    The guarantee is NOT user-level across sites (a patient seen by two hospitals counts twice). By
    default a site sends no raw training statistic (``SiteUpdate.loss`` is NaN); the opt-in
    ``report_train_loss`` / ``site_round(report_loss=True)`` sends its raw mean loss, NOT covered by ε.

Plugging in another aggregation (e.g. secure aggregation, issue 14):
    Implement the :class:`Aggregator` protocol — one method,
    ``aggregate(updates: Sequence[SiteUpdate], reference: Params) -> Params`` — returning the weighted
    mean ``Σ_s w_s·params_s / Σ_s w_s`` of the validated updates (given sorted by site id, never fewer
    than ``min_sites``); raise :class:`AggregationError` to fail the round (nothing is applied, the
    sites' ledgers are still charged by the engine's rules). Pass the object as
    ``apply_round(..., aggregator=...)``, ``run_round_inprocess(..., aggregator=...)`` or
    ``FederatedJob(aggregator=...)``; the CLI and the Flower ServerApp look it up by name in
    :data:`AGGREGATORS` (``register_aggregator("secagg", factory)``). A protocol that needs extra round
    trips with the sites (Bonawitz et al. 2017) runs them inside ``aggregate`` through whatever channel
    its engine gives it; the core needs no change.

Example (in process, two sites, tiny data)::

    >>> import torch, torch.nn.functional as F
    >>> from dpfunc import Key, FlatClipping, vmap_engine
    >>> from dpfunc.federated import SitePlan, init_site_state, init_server_state, InProcessSites, run_round_inprocess
    >>> params = {"w": torch.zeros(3, 2)}
    >>> loss = lambda p, b, x, y: F.cross_entropy((x @ p["w"])[None], y[None])
    >>> engine = vmap_engine(loss, clipping=FlatClipping(1.0))
    >>> g = torch.Generator().manual_seed(0)
    >>> data = [(torch.randn(40, 3, generator=g), torch.randint(0, 2, (40,), generator=g)) for _ in range(2)]
    >>> plans = [SitePlan(40, 10, 1, noise_multiplier=1.0) for _ in data]
    >>> key = Key(0)
    >>> state = init_server_state(params, [init_site_state(s, p, key, params) for s, p in enumerate(plans)], None)
    >>> state, report = run_round_inprocess(state, InProcessSites(data, plans, engine, key), key=key)
    >>> report.applied, state.sites[0].ledger.total_steps
    ((0, 1), 4)
"""

from dpfunc.federated.aggregate import AggregationError, Aggregator, WeightedFedAvg, check_update, fedadam, fedavgm
from dpfunc.federated.partition import Partition, partition_indices
from dpfunc.federated.registry import AGGREGATORS, make_aggregator, register_aggregator
from dpfunc.federated.rounds import (
    InProcessSites,
    RoundFailedError,
    RoundReport,
    RoundStart,
    ServerState,
    apply_round,
    average_rounds,
    charge_started_round,
    init_server_state,
    run_round_inprocess,
    select_sites,
    start_round,
)
from dpfunc.federated.site import (
    SitePlan,
    SiteState,
    SiteUpdate,
    charge_site,
    init_site_state,
    rejoin_site_state,
    shared_site_state,
    site_key,
    site_keys,
    site_optimizer,
    site_round,
)

__all__ = [
    "AGGREGATORS", "AggregationError", "Aggregator", "InProcessSites", "Partition", "RoundFailedError", "RoundReport",
    "RoundStart", "ServerState", "SitePlan", "SiteState", "SiteUpdate", "WeightedFedAvg", "apply_round", "average_rounds",
    "charge_site", "charge_started_round", "start_round", "shared_site_state", "rejoin_site_state",
    "check_update", "fedadam", "fedavgm", "init_server_state", "init_site_state", "make_aggregator",
    "partition_indices", "register_aggregator", "run_round_inprocess", "select_sites", "site_key", "site_keys",
    "site_optimizer", "site_round",
]
