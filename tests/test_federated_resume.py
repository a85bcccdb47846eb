"""A federated round that never reaches the checkpoint is charged, and its re-run draws fresh noise.

The red-team finding: a round's noise keys derive from (run key, site, step counter). A run interrupted
after the sites released round t but before the server checkpointed it resumed round t with the SAME
counters, hence the same noise; on another device (other last bits of the clipped sums) the two releases
differ by a noise-free quantity, and the ledger counted one of them. Now the run folder records the asked
sites and counters before asking (``round_in_flight.json``); a failed or interrupted round charges them at
once, and a resume charges them from that record if the server died too hard to write.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dpfunc import FlatClipping, Key, vmap_engine
from dpfunc.bridge.checkpoint import load_checkpoint
from dpfunc.federated import (InProcessSites, RoundFailedError, RoundStart, SitePlan, apply_round,
                              charge_started_round, init_server_state, init_site_state, select_sites, site_key,
                              start_round)
from dpfunc.federated.job import IN_FLIGHT, FederatedConfig, make_engine, run_federated
from dpfunc.private import find_dp_state

TINY = dict(sites=2, rounds=2, train_subset=160, batch_size=40, accountant="rdp")  # 2 local steps per round


def _executor(seen: dict, *, crash_at: int | None = None, bits: float = 0.0):
    """In-process sites that log every update they release (site, round, step counter, params). ``bits``
    perturbs the images by a relative ``bits`` (another device's last bits); at round ``crash_at`` the
    server 'dies' after the sites answered, keeping copies of the run folder as it was at that moment."""
    def executor(setup, model):
        from dpfunc.data import pneumoniamnist

        module, apply_fn, params, buffers = model
        train = pneumoniamnist("train", seen["data_dir"])
        data = [(train.images[i] * (1.0 + bits), train.labels[i]) for i in setup.indices]
        sites = InProcessSites(data, setup.plans, make_engine(setup.config, module, apply_fn), setup.sites_key,
                               buffers=buffers)

        def answers(state, selected):
            out = sites(state, selected)
            for s, (u, _) in out.items():
                seen["released"].append((s, state.round, state.sites[s].steps, {k: v.clone() for k, v in u.params.items()}))
            if state.round == crash_at:
                run = seen["run_dir"]
                seen["marker"] = json.loads((run / IN_FLIGHT).read_text())
                if (run / "checkpoint.pt").exists():
                    shutil.copy(run / "checkpoint.pt", seen["tmp"] / "ckpt-before-crash.pt")
                raise KeyboardInterrupt  # after the release, before the checkpoint
            return out
        return answers
    return executor


def _kill_hard(seen: dict) -> None:
    """Turn the interrupted run's folder into what a SIGKILL at that moment leaves: the checkpoint before
    the round (or none) and the in-flight record (the handler that charged at once never ran)."""
    run = seen["run_dir"]
    before = seen["tmp"] / "ckpt-before-crash.pt"
    if before.exists():
        shutil.copy(before, run / "checkpoint.pt")
    else:
        (run / "checkpoint.pt").unlink()
    (run / IN_FLIGHT).write_text(json.dumps(seen["marker"]))


def _quiet(**kw):
    return dict(progress=False, log=lambda s: None, bootstrap_resamples=10, **kw)


def test_resume_on_another_device_draws_fresh_noise_and_charges_both_releases(tmp_path, data_dir):
    """Round 1 is released, the server dies before its checkpoint, the run resumes on 'another device'
    (images perturbed by 2^-20). Before the fix the re-run used the same counters (same noise): the two
    round-1 updates of a site differed by ~1e-7, the noise subtracted away, and the ledger held 4 steps.
    Run ``a`` is interrupted (the server still writes: it charges at once), run ``b`` killed (only the
    in-flight record survives: the resume charges); both then end bit for bit the same (reproducible)."""
    cfg = FederatedConfig(**TINY)
    finals = []
    for name, hard in (("a", False), ("b", True)):
        run = tmp_path / name
        seen = {"data_dir": data_dir, "run_dir": run, "tmp": tmp_path, "released": []}
        with pytest.raises(KeyboardInterrupt):
            run_federated(cfg, data_dir=data_dir, run_dir=run, **_quiet(executor=_executor(seen, crash_at=1)))
        if hard:
            _kill_hard(seen)
        else:  # the run could still write: the checkpoint already charges round 1 to both sites
            st_ = load_checkpoint(run / "checkpoint.pt")["state"]
            assert st_.round == 1 and [s.steps for s in st_.sites] == [4, 4] and not (run / IN_FLIGHT).exists()
        with pytest.raises(FileExistsError, match="already holds a run"):  # no silent restart from step 0
            run_federated(cfg, data_dir=data_dir, run_dir=run, **_quiet())
        run_federated(cfg, data_dir=data_dir, run_dir=run, resume=True,
                      **_quiet(executor=_executor(seen, bits=2.0**-20)))
        k = 2
        for s in (0, 1):
            mine = [(r, t, p) for site, r, t, p in seen["released"] if site == s]
            assert [(r, t) for r, t, _ in mine] == [(0, 0), (1, 2), (1, 4)]  # round 1 twice, fresh counters
            ranges = [set(range(t, t + k)) for _, t, _ in mine]
            assert all(not (a & b) for i, a in enumerate(ranges) for b in ranges[i + 1:])  # no noise key twice
            (_, _, first), (_, _, again) = mine[1], mine[2]
            gap = max(float((first[n] - again[n]).abs().max()) for n in first)
            assert gap > 1e-3, f"site {s}: the two round-1 releases differ by {gap}: shared noise"
        final = load_checkpoint(run / "checkpoint.pt")["state"]
        for s in final.sites:  # 3 releases of 2 steps each, all in the ledger; the step counter says the same
            assert s.ledger.total_steps == 6 == s.steps == int(find_dp_state(s.opt_state).count)
        assert not (run / IN_FLIGHT).exists()
        finals.append(final)
    a, b = finals
    assert all(torch.equal(a.params[n], b.params[n]) for n in a.params)
    assert [s.ledger for s in a.sites] == [s.ledger for s in b.sites]


def test_killed_before_the_first_checkpoint_resumes_charged(tmp_path, data_dir):
    """Killed in round 0: no checkpoint, only the in-flight record. A restart without --resume is refused
    (it would redraw step 0's noise); the resume starts from the initial state charged with round 0."""
    cfg = FederatedConfig(**{**TINY, "rounds": 1})
    run = tmp_path / "r"
    seen = {"data_dir": data_dir, "run_dir": run, "tmp": tmp_path, "released": []}
    with pytest.raises(KeyboardInterrupt):
        run_federated(cfg, data_dir=data_dir, run_dir=run, **_quiet(executor=_executor(seen, crash_at=0)))
    _kill_hard(seen)
    assert not (run / "checkpoint.pt").exists()
    with pytest.raises(FileExistsError, match="already holds a run"):
        run_federated(cfg, data_dir=data_dir, run_dir=run, **_quiet())
    lines = []
    m = run_federated(cfg, data_dir=data_dir, run_dir=run, resume=True, progress=False, log=lines.append,
                      bootstrap_resamples=10)
    assert [s["steps"] for s in m["sites"]] == [4, 4]  # round 0 twice
    assert any("round 0 was in flight" in line and "charged" in line for line in lines)


def test_a_failed_secure_round_charges_the_asked_sites(tmp_path, data_dir):
    """Secure aggregation that fails unmasks no sum, but each site's reply carried its new state (the
    momentum buffer is a noisy function of the round): the checkpoint charges the asked sites, as for any
    failed round (it charged nothing before, so a retry reused the noise keys)."""
    from dpfunc.secagg import Stage
    from dpfunc.secagg.federated import SecureAggregator

    cfg = FederatedConfig(**{**TINY, "aggregator": "secagg"})
    agg = SecureAggregator(dropouts={1: {Stage.MASKED_INPUT: {1}}})  # t = 2 of 2: round 1 fails
    with pytest.raises(RoundFailedError, match="round 1 failed in aggregation"):
        run_federated(cfg, data_dir=data_dir, run_dir=tmp_path / "s", aggregator=agg, **_quiet())
    saved = load_checkpoint(tmp_path / "s" / "checkpoint.pt")
    assert saved["state"].round == 1 and len(saved["history"]) == 1
    assert [s.steps for s in saved["state"].sites] == [4, 4]
    assert [s.ledger.total_steps for s in saved["state"].sites] == [4, 4]


def test_an_in_flight_record_of_another_run_is_refused(tmp_path, data_dir):
    cfg = FederatedConfig(**{**TINY, "rounds": 1})
    run = tmp_path / "r"
    run.mkdir()
    (run / IN_FLIGHT).write_text(json.dumps({"config": {**cfg.__dict__, "seed": 7}, "round": 0, "selected": [0],
                                             "steps": [0]}))
    with pytest.raises(ValueError, match="another configuration"):
        run_federated(cfg, data_dir=data_dir, run_dir=run, resume=True, **_quiet())


# ------------------------------------------------------------------------------ the pure contract, as a property


def _linear_sites(seed: int, sizes: list[int]):
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)) for n in sizes]
    loss = lambda p, b, x, y: F.cross_entropy((x @ p["w"])[None], y[None])  # noqa: E731
    return data, vmap_engine(loss, clipping=FlatClipping(1.0))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), key_seed=st.integers(0, 2**63 - 1),
       fates=st.lists(st.sampled_from(["applied", "failed", "crashed", "killed"]), min_size=1, max_size=6),
       fraction=st.sampled_from([0.5, 1.0]), min_sites=st.integers(1, 3))
def test_no_two_releases_share_a_noise_key_and_every_release_is_charged(seed, key_seed, fates, fraction, min_sites):
    """Rounds that are applied, fail (too few answers), crash (the server still writes) or are killed (only
    the in-flight record survives), each followed by a resume on 'another device' (perturbed data): the step
    counters a site released from never overlap (its noise key at step t is noise_key(site key, t)), and
    each site's ledger holds exactly k steps per round it was asked in — every attempt, none twice."""
    sizes = [30, 40, 50]
    data, engine = _linear_sites(seed, sizes)
    plans = [SitePlan(n, 10, 1, noise_multiplier=1.0, local_steps=2) for n in sizes]
    key = Key(key_seed)
    params = {"w": torch.zeros(3, 2)}
    state = init_server_state(params, [init_site_state(s, p, site_key(key, s), params) for s, p in enumerate(plans)], None)
    released: dict[int, list[range]] = {0: [], 1: [], 2: []}
    asked = [0, 0, 0]
    bits = 0.0
    for fate in fates:
        sites = InProcessSites([(x * (1 + bits), y) for x, y in data], plans, engine, key)
        selected = select_sites(key, state.round, 3, fraction)
        start = start_round(state, selected)               # what the job persists before asking
        answers = sites(state, selected)
        for s in selected:
            released[s].append(range(state.sites[s].steps, state.sites[s].steps + 2))
            asked[s] += 1
        if fate == "failed":
            answers = {s: a for s, a in answers.items() if s == selected[0]}
            need = len(selected) + 1
        else:
            need = min(min_sites, len(selected))
        try:
            new, _ = apply_round(state, selected, answers, plans=plans, min_sites=need)
        except RoundFailedError:
            new = None
        if fate == "applied" and new is not None:
            state = new
        elif fate == "killed":  # nothing written: the resume charges from the record
            state, charged = charge_started_round(state, RoundStart.from_dict(start.to_dict()), plans)
            assert charged == start.selected
        else:                   # failed or crashed: charged at once; a resume finds nothing left to charge
            state, charged = charge_started_round(state, start, plans)
            assert charge_started_round(state, start, plans)[1] == ()
        bits = 2.0 ** -20 if bits == 0.0 else 0.0  # the next attempt runs elsewhere
    for s in range(3):
        used = [t for r in released[s] for t in r]
        assert len(used) == len(set(used)), f"site {s} released step counters {released[s]}: a noise key twice"
        assert state.sites[s].ledger.total_steps == 2 * asked[s] == state.sites[s].steps


def test_charge_started_round_refuses_a_record_of_another_state():
    plan = SitePlan(40, 10, 1, noise_multiplier=1.0)
    params = {"w": torch.zeros(2)}
    state = init_server_state(params, [init_site_state(0, plan, Key(0), params)], None)
    with pytest.raises(ValueError, match="charge_started_round: site 0 was asked in round 0 at step 8"):
        charge_started_round(state, RoundStart(0, (0,), (8,)), [plan])
    with pytest.raises(ValueError, match="charge_started_round: round 3 was started"):
        charge_started_round(state, RoundStart(3, (0,), (0,)), [plan])
    with pytest.raises(ValueError, match="RoundStart.from_dict"):
        RoundStart.from_dict({"round": 0, "selected": [0, 1], "steps": [0]})
