"""``dpfunc evaluate`` on a federated run folder (``evaluate_federated_run``), above all after a hard kill.

A server killed after asking its sites, before its checkpoint, leaves ``round_in_flight.json`` beside the
previous checkpoint. The sites may have released that round, so the folder's ε must include it even
though nothing resumed the run. The oracle: the same run interrupted softly (the job itself charges the
round in its checkpoint) — a reader of the hard-killed folder must report exactly those ledgers' ε.
"""

from __future__ import annotations

import json
import shutil

import pytest

from dpfunc.cli import main
from dpfunc.federated import InProcessSites
from dpfunc.federated.job import IN_FLIGHT, FederatedConfig, evaluate_federated_run, is_federated_run, make_engine, run_federated

TINY = dict(sites=2, rounds=2, train_subset=160, batch_size=40, accountant="rdp")  # 2 local steps per round


def _killed_at(round_: int, run_dir, snapshot, data_dir):
    """In-process sites; at ``round_`` the server 'dies' after the sites answered: ``snapshot`` is the folder
    as a hard kill leaves it, ``run_dir`` what the job writes when it can still catch the interruption."""
    def executor(setup, model):
        from dpfunc.data import pneumoniamnist

        module, apply_fn, _, buffers = model
        train = pneumoniamnist("train", data_dir)
        sites = InProcessSites([(train.images[i], train.labels[i]) for i in setup.indices], setup.plans,
                               make_engine(setup.config, module, apply_fn), setup.sites_key, buffers=buffers)

        def answers(state, selected):
            out = sites(state, selected)
            if state.round == round_:
                shutil.copytree(run_dir, snapshot)
                raise KeyboardInterrupt
            return out
        return answers
    return executor


def _run(cfg, data_dir, run_dir, executor=None):
    return run_federated(cfg, data_dir=data_dir, run_dir=run_dir, progress=False, log=lambda s: None,
                         bootstrap_resamples=20, executor=executor)


def test_a_finished_run_evaluates_to_its_metrics(tmp_path, data_dir):
    cfg = FederatedConfig(**{**TINY, "rounds": 1})
    result = _run(cfg, data_dir, tmp_path / "run")
    assert is_federated_run(tmp_path / "run") and not is_federated_run(tmp_path)
    got = evaluate_federated_run(tmp_path / "run", data_dir, bootstrap_resamples=20)
    assert got["test"] == result["test"] and got["test_ci"] == result["test_ci"]
    assert [s["epsilon"] for s in got["sites"]] == [s["epsilon"] for s in result["sites"]]
    assert got["epsilon"] == result["epsilon"] > 0 and got["in_flight_charged"] == [] and got["in_flight_round"] is None


def test_a_hard_killed_run_reports_the_round_in_flight(tmp_path, data_dir, capsys):
    cfg = FederatedConfig(**TINY)
    run, snap = tmp_path / "run", tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        _run(cfg, data_dir, run, _killed_at(1, run, snap, data_dir))
    assert (snap / IN_FLIGHT).exists() and not (run / IN_FLIGHT).exists()  # the job charged its own folder
    before = {p.name: p.read_bytes() for p in snap.iterdir() if p.is_file()}
    soft = evaluate_federated_run(run, data_dir, bootstrap_resamples=20)  # charged by the job itself
    hard = evaluate_federated_run(snap, data_dir, bootstrap_resamples=20)  # charged by the reader
    assert hard["in_flight_round"] == 1 and hard["in_flight_charged"] == [0, 1] and soft["in_flight_charged"] == []
    assert [s["ledger"] for s in hard["sites"]] == [s["ledger"] for s in soft["sites"]]
    assert [s["epsilon"] for s in hard["sites"]] == [s["epsilon"] for s in soft["sites"]]
    assert all(s["steps"] == 4 for s in hard["sites"])  # 2 rounds of 2 local steps: round 0 applied, round 1 charged
    assert hard["test"] == soft["test"] and hard["rounds"] == soft["rounds"] == 1
    # without the record the checkpoint alone says one round: less than the sites may have spent
    (tmp_path / "bare").mkdir()
    for name in ("config.json", "checkpoint.pt"):
        shutil.copy(snap / name, tmp_path / "bare" / name)
    bare = evaluate_federated_run(tmp_path / "bare", data_dir, bootstrap_resamples=20)
    assert all(b["epsilon"] < h["epsilon"] for b, h in zip(bare["sites"], hard["sites"]))
    assert {p.name: p.read_bytes() for p in snap.iterdir() if p.is_file()} == before  # reading wrote nothing
    # the command line says it
    assert main(["evaluate", str(snap), "--data-dir", str(data_dir), "--bootstrap", "20", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "UNFINISHED: checkpoint after round 1 of 2" in out
    assert "round 1 was in flight when the run stopped: site(s) [0, 1]" in out
    eps = ", ".join(f"site {s['site']} (n={s['n']}): ε={s['epsilon']:.3f}" for s in hard["sites"])
    assert f"per-site guarantee at δ=1e-05: {eps}" in out


def test_a_run_killed_in_its_first_round_is_refused_with_the_way_out(tmp_path, data_dir, capsys):
    cfg = FederatedConfig(**TINY)
    run, snap = tmp_path / "run", tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        _run(cfg, data_dir, run, _killed_at(0, run, snap, data_dir))
    assert not (snap / "checkpoint.pt").exists() and json.loads((snap / IN_FLIGHT).read_text())["round"] == 0
    assert main(["evaluate", str(snap), "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert "stopped in its first round, before any checkpoint" in err and "--resume" in err
    with pytest.raises(FileNotFoundError, match="evaluate_federated_run: no checkpoint.pt"):
        evaluate_federated_run(snap, data_dir)


def test_a_hard_killed_distributed_noise_run_reports_the_round_in_flight(tmp_path, data_dir, monkeypatch):
    """The same for distributed-noise runs: the reader charges one discrete-Gaussian step per asked site,
    the ledgers the job itself writes when it catches the interruption."""
    import dpfunc.secagg.distributed_dp as ddp

    cfg = FederatedConfig(sites=3, rounds=2, train_subset=150, batch_size=25, aggregator="secagg",
                          distributed_noise=True, colluding_sites=1, epsilon=3.0)
    run, snap = tmp_path / "run", tmp_path / "killed"
    real, calls = ddp.distributed_round, []

    def second_round_dies(*a, **k):
        calls.append(real(*a, **k))
        if len(calls) == 2:  # round 1's sum is released, the checkpoint of round 0 is the last
            shutil.copytree(run, snap)
            raise KeyboardInterrupt
        return calls[-1]

    monkeypatch.setattr(ddp, "distributed_round", second_round_dies)
    with pytest.raises(KeyboardInterrupt):
        run_federated(cfg, data_dir=data_dir, run_dir=run, progress=False, log=lambda s: None, bootstrap_resamples=20)
    soft = evaluate_federated_run(run, data_dir, bootstrap_resamples=20)
    hard = evaluate_federated_run(snap, data_dir, bootstrap_resamples=20)
    assert hard["in_flight_round"] == 1 and hard["in_flight_charged"] == [0, 1, 2] and soft["in_flight_charged"] == []
    assert [s["ledger"] for s in hard["sites"]] == [s["ledger"] for s in soft["sites"]]
    assert [s["steps"] for s in hard["sites"]] == [2, 2, 2]
    assert [s["epsilon"] for s in hard["sites"]] == [s["epsilon"] for s in soft["sites"]]
