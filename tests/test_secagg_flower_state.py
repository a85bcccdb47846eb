"""Secure aggregation over Flower keeps the site's optimizer state (momentum buffer) at the site.

The Flower apps' own functions — the server's :class:`~dpfunc.federated.flower.apps.FlowerSites` and the
ClientApp's ``train`` and ``query.secagg`` handlers — run in this process over a fake ``Grid`` that hands each
message to the handler with that node's persistent ``Context`` (what a SuperNode keeps between messages of
one run). No SuperLink, no processes: the property is checked on the very messages the apps build. The
end-to-end run over real processes is tests/test_secagg_flower.py.

What is pinned:

* the train message and reply of a secure round carry no optimizer tensor, the reply no tensor at all:
  no ArrayRecord, a ConfigRecord of ids, counters and the encoded shared site state, whose decoded
  optimizer state holds no tensor (the momentum buffer is withheld) — while the site's ``context.state``
  keeps its real, nonzero buffer;
* the server's checkpoint holds those tensor-free site states, and the charge paths (a site whose reply
  is lost, ``charge_started_round``) work on them;
* the site's next round uses its kept buffer: two secure rounds over the fake grid give the same model,
  ledgers and counters as the in-process secure engine (which carries the whole state), bit for bit;
  with the kept states dropped between rounds (what a resumed run — a new Flower run — sees) the
  momentum restarts from zero: the model differs, the ledgers and counters do not.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: E402

from dpfunc.bridge.checkpoint import load_checkpoint  # noqa: E402
from dpfunc.federated.flower import apps  # noqa: E402
from dpfunc.federated.job import FederatedConfig, run_federated  # noqa: E402
from dpfunc.federated.rounds import RoundStart, charge_started_round  # noqa: E402
from dpfunc.federated.site import (SitePlan, SiteState, charge_site, init_site_state,  # noqa: E402
                                   rejoin_site_state, shared_site_state)
from dpfunc.keys import Key  # noqa: E402
from dpfunc.private import find_dp_state  # noqa: E402
from dpfunc.transforms import TraceState  # noqa: E402

from _trees import tensors_in as _tensors  # noqa: E402

# 3 sites, 150 examples, batch 25: each site runs 2 local DP-SGD steps a round, momentum 0.9 (the default)
TINY = dict(sites=3, train_subset=150, batch_size=25, accountant="rdp", aggregator="secagg")


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Flower stamps a new message with the process's task identity (set by its runtime): one for the test."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _traces(opt_state) -> list[TraceState]:
    if isinstance(opt_state, TraceState):
        return [opt_state]
    if isinstance(opt_state, tuple):
        return [t for s in opt_state for t in _traces(s)]
    return []


class FakeGrid:
    """``send_and_receive`` delivered in process: node ``100 + s`` is site ``s``, with its own Context kept
    across messages (as a SuperNode keeps ``context.state`` for a run). Every train reply is recorded."""

    def __init__(self, sites: int, data_dir):
        self.contexts = {100 + s: Context(run_id=1, node_id=100 + s, state=RecordDict(), run_config={},
                                          node_config={"partition-id": s, "num-partitions": sites,
                                                       "data-dir": str(data_dir)})
                         for s in range(sites)}
        self.train_replies: list[Message] = []
        self.train_messages: list[Message] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            handler = apps._train if m.metadata.message_type == "train" else apps._secagg
            if m.metadata.message_type == "train":
                self.train_messages.append(m)
            reply = handler(m, self.contexts[node])
            assert reply.metadata.src_node_id == node
            if m.metadata.message_type == "train":
                self.train_replies.append(reply)
            out.append(reply)
        return out


def _run_over_fake_flower(cfg, data_dir, run_dir, between_rounds=None, resume=False):
    """run_federated with the Flower apps' executor and secure aggregator over a FakeGrid."""
    from dpfunc.secagg.remote import RemoteSecureAggregator

    grid = FakeGrid(cfg.sites, data_dir)
    executors = []

    def executor(setup, model):
        executors.append(apps.FlowerSites(grid, setup, grid.get_node_ids(), 60.0, lambda s: None, str(data_dir)))
        inner = executors[-1]

        def call(state, selected):
            if between_rounds is not None and state.round > 0:
                between_rounds(grid)
            return inner(state, selected)
        return call

    agg = RemoteSecureAggregator(lambda requests: executors[-1].secagg_channel(requests))
    out = run_federated(cfg, data_dir=data_dir, run_dir=run_dir, resume=resume, progress=False, log=lambda s: None,
                        bootstrap_resamples=10, executor=executor, aggregator=agg)
    return grid, out


def test_secure_train_reply_carries_no_tensor_and_the_site_keeps_its_momentum(tmp_path, data_dir):
    cfg = FederatedConfig(**TINY, rounds=1)
    grid, out = _run_over_fake_flower(cfg, data_dir, tmp_path / "run")
    assert out["history"][0]["sites_answered"] == [0, 1, 2]
    replies = [r for r in grid.train_replies if bool(r.content["reply"]["trained"])]
    assert sorted(int(r.content["reply"]["site"]) for r in replies) == [0, 1, 2]
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["state"]
    for r in replies:
        # the reply is one ConfigRecord of ids, counters and the shared state: no ArrayRecord, no loss
        assert list(r.content.keys()) == ["reply"]
        assert not any(isinstance(v, ArrayRecord) for v in r.content.values())
        rec = r.content["reply"]
        assert isinstance(rec, ConfigRecord)
        assert set(rec.keys()) == {"site", "trained", "round", "weight", "steps", "state"}
        site = int(rec["site"])
        shared = apps.decode_state(bytes(rec["state"]))
        assert isinstance(shared, SiteState) and shared.site == site
        assert _tensors(shared) == []  # no momentum buffer, nor any other tensor
        traces = _traces(shared.opt_state)
        assert len(traces) == 1 and set(traces[0].trace.values()) == {None}  # the slot is there, withheld
        assert shared.ledger.total_steps == shared.steps == 2 and find_dp_state(shared.opt_state).count == 2
        # ... while the site's own context.state keeps the real buffer (nonzero after two noisy steps)
        kept = apps.decode_state(bytes(grid.contexts[100 + site].state[apps._KEPT]["state"]))
        (kept_trace,) = _traces(kept.opt_state)
        assert kept_trace.count == 2 and all(v.abs().max() > 0 for v in kept_trace.trace.values())
        assert kept.ledger == shared.ledger and kept.steps == shared.steps
        assert shared == shared_site_state(kept)
        # the server stored what it received: its checkpoint holds no tensor of any site's optimizer state
        assert _tensors(ckpt.sites[site].opt_state) == [] and ckpt.sites[site].ledger == shared.ledger
    # nor does the server send any optimizer tensor (a site takes its own): ids, counters, ledger only
    states = [apps.decode_state(bytes(v)) for m in grid.train_messages
              for k, v in m.content["task"].items() if k.startswith("state-")]
    assert len(states) >= 3 and all(_tensors(st) == [] for st in states)
    # the charge paths work on tensor-free site states: a lost reply, and a round that never checkpointed
    plans = [SitePlan(**_plan_dict(cfg, data_dir, s)) for s in range(3)]
    charged = charge_site(ckpt.sites[0], plans[0])
    assert charged.steps == 4 and charged.ledger.total_steps == 4 and _tensors(charged.opt_state) == []
    state2, who = charge_started_round(ckpt, RoundStart(1, (0, 2), (2, 2)), plans)
    assert who == (0, 2) and [s.steps for s in state2.sites] == [4, 2, 4]


def _plan_dict(cfg, data_dir, site):
    import dataclasses

    from dpfunc.data import pneumoniamnist
    from dpfunc.federated.job import prepare

    return dataclasses.asdict(prepare(cfg, pneumoniamnist("train", data_dir).labels).plans[site])


def test_the_site_next_round_uses_its_kept_buffer(tmp_path, data_dir):
    """Two secure rounds over the Flower apps equal the in-process secure engine bit for bit (it carries the
    whole site state, momentum included); dropping the kept states between rounds changes the model only."""
    cfg = FederatedConfig(**TINY, rounds=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order for both runs
    try:
        _, fl = _run_over_fake_flower(cfg, data_dir, tmp_path / "flower")
        run_federated(cfg, data_dir=data_dir, run_dir=tmp_path / "inproc", progress=False, log=lambda s: None,
                      bootstrap_resamples=10)

        def forget(grid):  # a resumed run is a new Flower run: no site has a kept state
            for ctx in grid.contexts.values():
                del ctx.state[apps._KEPT]
        _run_over_fake_flower(cfg, data_dir, tmp_path / "fresh", between_rounds=forget)
    finally:
        torch.set_num_threads(threads)
    a, b, c = (load_checkpoint(tmp_path / d / "checkpoint.pt")["state"] for d in ("flower", "inproc", "fresh"))
    assert a.round == b.round == c.round == 2
    for k in b.params:
        assert torch.equal(a.params[k], b.params[k]), k
    assert max((c.params[k] - b.params[k]).abs().max().item() for k in b.params) > 1e-6
    for sa, sb, sc in zip(a.sites, b.sites, c.sites):
        assert sa.ledger == sb.ledger == sc.ledger and sa.steps == sb.steps == sc.steps == 4
        assert sa.rounds == sb.rounds == sc.rounds == 2
        assert _tensors(sa.opt_state) == [] and _tensors(sb.opt_state) != []  # in process it keeps it all
    assert fl["history"][1]["sites_answered"] == [0, 1, 2]


def test_rejoin_takes_tensors_from_the_site_and_checks_the_structure():
    plan = SitePlan(num_examples=10, expected_batch_size=5, local_epochs=1, noise_multiplier=1.0)
    params = {"w": torch.zeros(3), "b": torch.zeros(1)}
    full = init_site_state(1, plan, Key(0), params)
    (trace,) = _traces(full.opt_state)
    kept_trace = trace._replace(trace={"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([4.0])}, count=2)
    kept = full._replace(opt_state=(full.opt_state[0], (kept_trace, *full.opt_state[1][1:])))
    shared = charge_site(shared_site_state(kept), plan)  # the server moved the counters on: they are the server's
    back = rejoin_site_state(shared, kept.opt_state)
    assert back.steps == shared.steps and back.ledger == shared.ledger
    (t,) = _traces(back.opt_state)
    assert torch.equal(t.trace["w"], kept_trace.trace["w"]) and torch.equal(t.trace["b"], kept_trace.trace["b"])
    # a tensor the server sends is never used: the site's own wins
    assert torch.equal(_traces(rejoin_site_state(kept._replace(opt_state=full.opt_state), kept.opt_state).opt_state)[0]
                       .trace["w"], kept_trace.trace["w"])
    with pytest.raises(ValueError, match="rejoin_site_state"):  # another model's buffers
        rejoin_site_state(shared, init_site_state(1, plan, Key(0), {"w": torch.zeros(3)}).opt_state)
    no_momentum = SitePlan(num_examples=10, expected_batch_size=5, local_epochs=1, noise_multiplier=1.0, momentum=0.0)
    with pytest.raises(ValueError, match="rejoin_site_state"):  # another optimizer
        rejoin_site_state(shared, init_site_state(1, no_momentum, Key(0), params).opt_state)
    with pytest.raises(ValueError, match="shared_site_state"):
        shared_site_state(full._replace(opt_state=(trace,)))


def test_a_resumed_secure_run_charges_the_interrupted_round_and_restarts_momentum(tmp_path, data_dir):
    """The real resume path on tensor-free site states: round 2 is interrupted after its sites were asked
    (charged in the checkpoint), the resumed run — a new Flower run, every context.state empty — re-runs it
    with fresh keys; each site rejoins the server's counters with zero momentum and the run completes."""
    cfg = FederatedConfig(**TINY, rounds=2)

    class Interrupted(RuntimeError):
        pass

    def interrupt(grid):
        raise Interrupted("stopped before round 2's answers")
    with pytest.raises(Interrupted):
        _run_over_fake_flower(cfg, data_dir, tmp_path / "run", between_rounds=interrupt)
    stopped = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["state"]
    assert stopped.round == 1 and [s.steps for s in stopped.sites] == [4, 4, 4]  # round 2 charged
    assert all(_tensors(s.opt_state) == [] for s in stopped.sites)
    grid, out = _run_over_fake_flower(cfg, data_dir, tmp_path / "run", resume=True)
    done = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["state"]
    assert done.round == 2 and out["history"][-1]["sites_answered"] == [0, 1, 2]
    for s, site in enumerate(done.sites):
        assert site.steps == site.ledger.total_steps == 6 and site.rounds == 2 and _tensors(site.opt_state) == []
        kept = apps.decode_state(bytes(grid.contexts[100 + s].state[apps._KEPT]["state"]))
        assert kept.steps == 6 and shared_site_state(kept) == site


def test_a_site_refuses_a_replayed_train_message(tmp_path, data_dir):
    """A server that sends a site its old counters again (a replay) would get the same noise on new
    parameters from a site with a secret key-seed; the site remembers the keys it used in this run."""
    cfg = FederatedConfig(**TINY, rounds=1)
    grid, _ = _run_over_fake_flower(cfg, data_dir, tmp_path / "run")
    first = next(m for m in grid.train_messages if m.metadata.dst_node_id == 100)  # site 0, round 0: steps 0, 1
    assert dict(grid.contexts[100].state[apps._USED]) == {"steps": 2, "count": 2}
    kept = bytes(grid.contexts[100].state[apps._KEPT]["state"])
    with pytest.raises(ValueError, match="site 0: the server asked for sampling step 0 and noise-key index 0, but this "
                                         "site has already used keys up to step 2 and index 2 in this run"):
        apps._train(first, grid.contexts[100])
    assert bytes(grid.contexts[100].state[apps._KEPT]["state"]) == kept  # refused before anything ran or changed
    assert dict(grid.contexts[100].state[apps._USED]) == {"steps": 2, "count": 2}
    # a node that has not trained in this run (a fresh context: a new Flower run) has no record to refuse by
    fresh = Context(run_id=2, node_id=100, state=RecordDict(), run_config={},
                    node_config=dict(grid.contexts[100].node_config))
    reply = apps._train(first, fresh)
    assert bool(reply.content["reply"]["trained"]) and dict(fresh.state[apps._USED]) == {"steps": 2, "count": 2}


def test_a_key_seed_gives_each_run_its_own_noise_key():
    """A SuperNode serves every run with one key-seed; step t's noise derives from (key, t). Two runs on
    the same node must not share keys (their releases' difference would be noise-free), one run keeps one."""
    cfg = FederatedConfig(**TINY)

    def context(run_id, **node):
        return Context(run_id=run_id, node_id=100, state=RecordDict(), run_config={}, node_config=node)

    first, second = context(1, **{"key-seed": 123}), context(2, **{"key-seed": 123})
    k1, k2 = apps._site_key(first, cfg, 0), apps._site_key(second, cfg, 0)
    noise = lambda k: torch.randn(8, generator=k.fold_in(0).generator())  # noqa: E731
    assert not torch.equal(noise(k1), noise(k2))  # same seed, two runs: two keys
    assert torch.equal(noise(apps._site_key(first, cfg, 0)), noise(k1))  # stable within a run (context.state)
    assert int(first.state[apps._NONCE]["nonce"]) != int(second.state[apps._NONCE]["nonce"])
    # without a key-seed: the run seed's key, reproducible and equal to the in-process runner's (no nonce)
    from dpfunc.federated.job import _keys
    from dpfunc.federated.site import site_key

    plain = context(3)
    assert apps._site_key(plain, cfg, 1) == site_key(_keys(cfg)[3], 1) and apps._NONCE not in plain.state
