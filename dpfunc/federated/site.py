"""A site's local work in one round: record-level DP-SGD on its own patients, as a pure function.

One round at site ``s``::

    params   = global_params                               # what the server sent
    for t in range(steps_done, steps_done + steps_per_round):
        batch  = poisson_sample(sample_key.fold_in(t), n_s, q_s)       # q_s = B / n_s (the site's own n)
        params, opt_state = dp_step(params, opt_state, batch)          # clip → noise → SGD
    update   = SiteUpdate(site=s, round=r, params=params, weight=n_s, ...)
    ledger_s = privacy_ledger(opt_state)                   # every step of this site, ever

The site's optimizer state (step count, ledger, momentum buffer) is its :class:`SiteState`; it travels
with the round (the server keeps it in its checkpoint). Everything in it is a function of noisy, clipped
gradient sums, i.e. post-processing of the site's DP mechanism, and safe to store outside the site as far as
ε goes. Where the site's update itself is hidden (secure aggregation over Flower), the momentum buffer — a
noisy function of the site's rounds, close to the hidden update — stays at the site: only
:func:`shared_site_state` (ids, counters, the DP state with the ledger; no tensor) leaves it, and
:func:`rejoin_site_state` puts the site's kept tensors back before its next round.
Because the state persists across rounds, one site with full participation and plain FedAvg trains
exactly as centralised DP-SGD on its data with the same keys (bit for bit; tested).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from dpfunc._tree import Params
from dpfunc._validate import check_int_range, check_nonnegative, check_number, check_positive_finite
from dpfunc.accounting.ledger import PrivacyLedger
from dpfunc.devices import to_device, tree_to_device
from dpfunc.keys import Key
from dpfunc.private import DPAggregateState, dpsgd, find_dp_state, privacy_ledger
from dpfunc.sampling import poisson_sample
from dpfunc.step import GradEngine, make_step
from dpfunc.transforms import GradientTransformation

__all__ = ["SitePlan", "SiteState", "SiteUpdate", "site_keys", "site_key", "site_optimizer", "init_site_state",
           "site_round", "charge_site", "shared_site_state", "rejoin_site_state"]

_SITE_DOMAIN = 0x73697465  # "site": keys of sites live in a domain of their own under the run key


@dataclass(frozen=True)
class SitePlan:
    """How one site trains in every round it takes part in.

    Attributes:
        num_examples: n_s, the site's own number of training examples (its sampling rate uses it).
        expected_batch_size: B; the site's Poisson rate is ``q_s = min(1, B / n_s)``.
        local_epochs: E; a round is ``E · max(1, round(n_s / B))`` local DP-SGD steps (unless ``local_steps``).
        noise_multiplier: σ_s (calibrated by the job so that the site's worst case, taking part in
            every round, spends ε ≤ target).
        max_grad_norm: the per-example clipping bound C.
        learning_rate, momentum: the local SGD.
        local_steps: if set, a round is exactly this many local steps instead of ``local_epochs`` passes
            (``local_steps=1`` is FedSGD: with plain FedAvg each round is one DP-SGD step on the weighted
            mean of the sites' noisy gradients, the site's momentum buffer carried over; no client drift).
    """

    num_examples: int
    expected_batch_size: int
    local_epochs: int
    noise_multiplier: float
    max_grad_norm: float = 1.0
    learning_rate: float = 1.0
    momentum: float = 0.9
    local_steps: int | None = None

    def __post_init__(self) -> None:
        fn = "SitePlan"
        check_int_range(fn, "num_examples", self.num_examples, low=1)
        check_int_range(fn, "expected_batch_size", self.expected_batch_size, low=1)
        check_int_range(fn, "local_epochs", self.local_epochs, low=1)
        check_nonnegative(fn, "noise_multiplier", self.noise_multiplier)
        check_positive_finite(fn, "max_grad_norm", self.max_grad_norm)
        check_positive_finite(fn, "learning_rate", self.learning_rate)
        check_number(fn, "momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        if self.local_steps is not None:
            check_int_range(fn, "local_steps", self.local_steps, low=1)

    @property
    def sampling_rate(self) -> float:
        return min(1.0, self.expected_batch_size / self.num_examples)

    @property
    def steps_per_round(self) -> int:
        if self.local_steps is not None:
            return self.local_steps
        return self.local_epochs * max(1, round(self.num_examples / self.expected_batch_size))


class SiteState(NamedTuple):
    """What a site carries from round to round (all of it DP post-processing).

    Attributes:
        site: the site id (0, 1, …).
        opt_state: the local DP optimizer's state: ``DPAggregateState`` (step count → noise keys,
            the privacy **ledger**) and the momentum buffer.
        steps: local steps done so far (the Poisson sampling counter).
        rounds: rounds this site has taken part in.
    """

    site: int
    opt_state: Any
    steps: int
    rounds: int

    @property
    def ledger(self) -> PrivacyLedger:
        return privacy_ledger(self.opt_state)


class SiteUpdate(NamedTuple):
    """What a site sends to the server after a round.

    Attributes:
        site: the site id.
        round: the server round this update answers (an update is applied once, to that round only).
        params: the site's local model after the round, ``dict`` name → tensor (same keys, shapes and
            dtypes as the global model).
        weight: its FedAvg weight (by default n_s).
        steps: local DP-SGD steps run this round.
        loss: NaN unless the site opted in (``site_round(report_loss=True)``): then its mean training loss
            over the round, computed from raw batches — NOT covered by the site's (ε, δ), a debugging aid.
            The server is untrusted, so by default nothing but the DP model leaves the site.
    """

    site: int
    round: int
    params: Params
    weight: float
    steps: int
    loss: float


def site_key(run_key: Key, site: int) -> Key:
    """The key of site ``site`` under the run's key (each site has its own, independent stream)."""
    return run_key.fold_in(_SITE_DOMAIN).fold_in(site)


def site_keys(key: Key) -> tuple[Key, Key]:
    """``(sample_key, noise_key)`` of a site key: Poisson sampling and DP noise."""
    sample, noise = key.split(2)
    return sample, noise


def site_optimizer(plan: SitePlan, key: Key) -> GradientTransformation:
    """The site's local DP-SGD (``dpsgd`` with the site's σ, C, q_s, n_s and noise key)."""
    _, noise = site_keys(key)
    return dpsgd(plan.learning_rate, noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
                 sampling_rate=plan.sampling_rate, num_examples=plan.num_examples, key=noise, momentum=plan.momentum)


def init_site_state(site: int, plan: SitePlan, key: Key, params: Params) -> SiteState:
    """A site before its first round: empty ledger, zero steps."""
    check_int_range("init_site_state", "site", site, low=0)
    return SiteState(site, site_optimizer(plan, key).init(params), 0, 0)


def site_round(
    global_params: Params,
    state: SiteState,
    data: Sequence[torch.Tensor],
    key: Key,
    *,
    plan: SitePlan,
    engine: GradEngine,
    round: int,
    buffers: Params | None = None,
    report_loss: bool = False,
) -> tuple[SiteUpdate, SiteState]:
    """Run one round of local DP-SGD at a site. Pure: inputs are not modified.

    Args:
        global_params: the server's model, ``dict`` name → tensor.
        state: the site's :class:`SiteState`.
        data: the site's training tensors ``(x, y)`` with leading dim n_s. The round computes on their
            device (``--device``): the model, its optimizer state and each batch are moved there, and the
            update and the new state come back on the device of ``global_params``.
        key: the site's key (:func:`site_key`); sampling step ``t`` uses ``sample_key.fold_in(t)``,
            noise step ``t`` uses ``noise_key(noise_key, t)`` as in :func:`dpfunc.dp_aggregate`.
        plan: the :class:`SitePlan` (n_s must equal ``len(data[0])``).
        engine: how per-example gradients are clipped (``vmap_engine`` or ``fast_engine``, built with
            ``FlatClipping(plan.max_grad_norm)``).
        round: the server round (recorded in the update).
        buffers: model buffers (none for the GroupNorm models).
        report_loss: put the round's mean raw training loss in ``update.loss`` (default False: NaN). The
            loss is a non-private statistic of the site's data, outside the (ε, δ) guarantee: opt in for
            debugging only.

    Returns:
        ``(update, new_state)``; ``new_state.ledger`` has ``plan.steps_per_round`` more steps at
        ``(σ_s, q_s)``.
    """
    fn = "site_round"
    n = int(data[0].shape[0])
    if n != plan.num_examples:
        raise ValueError(f"{fn}: site {state.site} has {n} examples but its plan says num_examples={plan.num_examples}")
    check_int_range(fn, "round", round, low=0)
    if not isinstance(report_loss, bool):
        raise TypeError(f"{fn}: report_loss must be a bool, got {type(report_loss).__name__} {report_loss!r}")
    sample_key, _ = site_keys(key)
    tx = site_optimizer(plan, key)
    step = make_step(None, tx, engine=engine)
    # The site computes where its data lives (e.g. a GPU); what it returns lives where the global model does.
    where = data[0].device
    home = next(iter(global_params.values())).device if global_params else where
    params, opt_state = tree_to_device(dict(global_params), where), tree_to_device(state.opt_state, where)
    buffers = tree_to_device(buffers, where)
    losses = []
    for t in range(state.steps, state.steps + plan.steps_per_round):
        idx = to_device(poisson_sample(sample_key.fold_in(t), n, plan.sampling_rate), where)
        params, opt_state, m = step(params, opt_state, tuple(d[idx] for d in data), buffers=buffers)
        if report_loss and len(idx):  # the batch size is known on the host: no device read per step (the loss is read once below)
            losses.append(m.loss)
    loss = float(torch.stack(losses).double().mean()) if losses else math.nan  # NaN unless report_loss
    params, opt_state = tree_to_device(params, home), tree_to_device(opt_state, home)
    new_state = SiteState(state.site, opt_state, state.steps + plan.steps_per_round, state.rounds + 1)
    return SiteUpdate(state.site, round, params, float(plan.num_examples), plan.steps_per_round, loss), new_state


def charge_site(state: SiteState, plan: SitePlan) -> SiteState:
    """The state of a site that was asked to train but whose answer was lost or refused.

    It may have run its round (a crash after training, a stalled reply, a malformed update), so its
    ledger is charged the round's steps and its step counter advances: the accounting stays an upper
    bound and no noise key is ever used twice. Its model and momentum are left as they were.
    """
    dp = find_dp_state(state.opt_state)
    if dp is None:
        raise ValueError(f"charge_site: site {state.site}'s opt_state holds no DPAggregateState")
    k = plan.steps_per_round
    new_dp = dp._replace(count=dp.count + k, ledger=dp.ledger.step(plan.noise_multiplier, plan.sampling_rate, k))
    return state._replace(opt_state=_replace_dp(state.opt_state, new_dp), steps=state.steps + k)


def _replace_dp(opt_state: Any, new: DPAggregateState) -> Any:
    if isinstance(opt_state, DPAggregateState):
        return new
    if isinstance(opt_state, tuple) and not hasattr(opt_state, "_fields"):
        out, done = [], False
        for s in opt_state:
            if not done and find_dp_state(s) is not None:
                out.append(_replace_dp(s, new))
                done = True
            else:
                out.append(s)
        return tuple(out)
    raise ValueError("charge_site: cannot locate the DP state in opt_state")


def shared_site_state(state: SiteState) -> SiteState:
    """The part of a site's state that may leave the site when its update must stay hidden.

    Under secure aggregation over Flower the server learns only the masked sum of the sites' updates, but
    the site's momentum buffer (``TraceState.trace``, ``momentum`` > 0) is a noisy function of its rounds —
    the server could difference two consecutive buffers and come close to the update that the sum hides. It
    is covered by the site's ε (post-processing), so this is about confidentiality, not accounting.

    Returns:
        ``state`` with every tensor of ``opt_state`` outside its :class:`~dpfunc.private.DPAggregateState`
        replaced by ``None`` (the slot stays, so the structure and the step counters of the chained
        transforms remain); ``site``, ``steps``, ``rounds`` and the DP state (noise-key count, privacy
        ledger, clipping, budget) are kept: the server needs them to account and to charge (``charge_site``,
        ``charge_started_round`` and the round checks read nothing else). The result holds no tensor.

    Raises:
        ValueError: ``opt_state`` holds no DP state, or its DP state holds a tensor (it would leave the site).

    Example:
        >>> from dpfunc.keys import Key
        >>> plan = SitePlan(num_examples=10, expected_batch_size=5, local_epochs=1, noise_multiplier=1.0)
        >>> shared = shared_site_state(init_site_state(0, plan, Key(0), {"w": torch.zeros(2)}))
        >>> shared.opt_state[1][0].trace, shared.ledger.total_steps
        ({'w': None}, 0)
    """
    dp = find_dp_state(state.opt_state)
    if dp is None:
        raise ValueError(f"shared_site_state: site {state.site}'s opt_state holds no DPAggregateState")
    if _holds_tensor(dp):
        raise ValueError(f"shared_site_state: site {state.site}'s DP state holds a tensor; it cannot be shared")
    return state._replace(opt_state=_withhold(state.opt_state))


def rejoin_site_state(shared: SiteState, local_opt_state: Any) -> SiteState:
    """``shared`` (a :func:`shared_site_state`, or a full state) with its optimizer tensors from the site.

    Args:
        shared: the state the server sent: its ids, counters and DP state (ledger) are authoritative.
        local_opt_state: an ``opt_state`` of the same optimizer: the one the site kept after its last round,
            or ``site_optimizer(plan, key).init(params)`` when it kept none (momentum restarts from zero).

    Returns:
        ``shared`` whose every tensor-or-withheld slot of ``opt_state`` (outside the DP state) holds the
        tensor at the same place in ``local_opt_state``; a tensor the server sent is never used.

    Raises:
        ValueError: the two optimizer states differ in structure (another optimizer or model).

    Example:
        >>> from dpfunc.keys import Key
        >>> plan = SitePlan(num_examples=10, expected_batch_size=5, local_epochs=1, noise_multiplier=1.0)
        >>> full = init_site_state(0, plan, Key(0), {"w": torch.zeros(2)})
        >>> kept = full.opt_state[1][0]._replace(trace={"w": torch.ones(2)})  # the site's own momentum buffer
        >>> local = (full.opt_state[0], (kept,) + full.opt_state[1][1:])
        >>> rejoin_site_state(shared_site_state(full), local).opt_state[1][0].trace
        {'w': tensor([1., 1.])}
    """
    return shared._replace(opt_state=_rejoin(shared.opt_state, local_opt_state, "opt_state"))


def _holds_tensor(tree: Any) -> bool:
    if isinstance(tree, torch.Tensor):
        return True
    if isinstance(tree, dict):
        return any(_holds_tensor(v) for v in tree.values())
    if isinstance(tree, (tuple, list)):
        return any(_holds_tensor(v) for v in tree)
    return False


def _withhold(tree: Any) -> Any:
    if isinstance(tree, DPAggregateState):
        return tree
    if isinstance(tree, torch.Tensor):
        return None
    if isinstance(tree, dict):
        return {k: _withhold(v) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_withhold(v) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_withhold(v) for v in tree)
    return tree


def _rejoin(shared: Any, local: Any, path: str) -> Any:
    fn = "rejoin_site_state"
    if isinstance(shared, DPAggregateState):
        return shared
    if shared is None or isinstance(shared, torch.Tensor):
        if isinstance(local, torch.Tensor):
            return local
        if shared is None and local is None:
            return None
        raise ValueError(f"{fn}: the kept optimizer state has {type(local).__name__} at {path}, where the "
                         f"shared one has {'a withheld tensor' if shared is None else 'a tensor'}")
    if isinstance(shared, dict):
        if not isinstance(local, dict) or set(local) != set(shared):
            got = sorted(local) if isinstance(local, dict) else type(local).__name__
            raise ValueError(f"{fn}: the kept optimizer state differs at {path}: keys {got} vs {sorted(shared)}")
        return {k: _rejoin(v, local[k], f"{path}[{k!r}]") for k, v in shared.items()}
    if isinstance(shared, (tuple, list)):
        if type(local) is not type(shared) or len(local) != len(shared):
            raise ValueError(f"{fn}: the kept optimizer state differs at {path}: {type(local).__name__} vs "
                             f"{type(shared).__name__}")
        parts = [_rejoin(a, b, f"{path}[{i}]") for i, (a, b) in enumerate(zip(shared, local))]
        return type(shared)(*parts) if hasattr(shared, "_fields") else type(shared)(parts)
    return shared
