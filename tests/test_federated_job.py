"""The federated job and its command line: run folder, metrics schema, model.pt, resume, failed rounds."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from dpfunc.bridge.checkpoint import load_checkpoint
from dpfunc.federated import InProcessSites, RoundFailedError
from dpfunc.cli import main
from dpfunc.federated.job import FederatedConfig, make_engine, run_federated
from dpfunc import Key
from dpfunc.models import build_model

TINY = dict(sites=2, rounds=2, train_subset=160, batch_size=40, accountant="rdp")


def _faulty(fail_at_round: int, exc: BaseException | None, seen: dict):
    """An executor that trains in process but fails (or interrupts) at ``fail_at_round``."""
    def executor(setup, model):
        module, apply_fn, params, buffers = model
        from dpfunc.data import pneumoniamnist

        train = pneumoniamnist("train", seen["data_dir"])
        sites = InProcessSites([(train.images[i], train.labels[i]) for i in setup.indices], setup.plans,
                               make_engine(setup.config, module, apply_fn), setup.sites_key, buffers=buffers)

        def answers(state, selected):
            if state.round == fail_at_round:
                ckpt = seen["run_dir"] / "checkpoint.pt"
                seen["bytes_before"] = hashlib.sha256(ckpt.read_bytes()).hexdigest()
                if exc is not None:
                    raise exc
                return {s: RuntimeError("site down") for s in selected}
            return sites(state, selected)
        return answers
    return executor


def test_cli_writes_run_folder_with_train_schema(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    argv = ["federated", "--sites", "2", "--rounds", "2", "--train-subset", "160", "--batch-size", "40", "--accountant", "rdp",
            "--epsilon", "3", "--data-dir", str(data_dir), "--run-dir", str(run), "--bootstrap", "20", "--quiet", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "test ROC-AUC" in out and "site 1 (n=80)" in out
    for f in ("config.json", "checkpoint.pt", "metrics.json", "model.pt", "federated.png", "roc.png", "confusion.png"):
        assert (run / f).is_file(), f
    m = json.loads((run / "metrics.json").read_text())
    for k in ("config", "noise_multiplier", "sampling_rate", "steps", "epsilon", "delta", "best_epoch", "val",
              "test", "test_ci", "train_seconds", "history", "rounds", "sites"):
        assert k in m, k
    assert 0 <= m["test"]["roc_auc"] <= 1 and 0 <= m["test"]["accuracy"] <= 1
    assert m["rounds"] == 2 and len(m["history"]) == 2
    assert [s["site"] for s in m["sites"]] == [0, 1] and [s["n"] for s in m["sites"]] == [80, 80]
    for s in m["sites"]:
        assert 0 < s["epsilon"] <= 3.0 and s["delta"] == 1e-5
    # every site's ledger is in the checkpoint and gives the reported ε
    from dpfunc import accounting

    state = load_checkpoint(run / "checkpoint.pt")["state"]
    for s in m["sites"]:
        assert accounting.epsilon(state.sites[s["site"]].ledger, 1e-5, method="rdp") == pytest.approx(s["epsilon"])
    # model.pt is the selected global state_dict, loadable without pickled code
    cfg = FederatedConfig(**json.loads((run / "config.json").read_text()))
    model = build_model(cfg.model, key=Key(123))
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    # a second run into the same folder without --resume is refused
    assert main(argv) == 2
    assert "already holds a run" in capsys.readouterr().err


# Resume after an interruption: tests/test_federated_resume.py (a resumed run re-runs the interrupted round
# with fresh keys and charges it, so it no longer equals the uninterrupted run bit for bit).


def test_failed_round_keeps_the_model_and_charges_the_asked_sites(tmp_path, data_dir):
    """Round 1: site 0 answers (its update reaches the server), site 1 is down, min_sites = 2. The model and
    history stay those of round 1, but both sites' ledgers are charged the failed round: the run's ε
    never under-reports a release (it did, by one round, when the checkpoint was left as it was)."""
    cfg = FederatedConfig(**{**TINY, "min_sites": 2})
    seen = {"data_dir": data_dir, "run_dir": tmp_path / "r"}
    inner = _faulty(99, None, seen)

    def executor(setup, model):
        sites = inner(setup, model)

        def answers(state, selected):
            if state.round == 1:
                seen["before"] = load_checkpoint(tmp_path / "r" / "checkpoint.pt")["state"]
                return {**sites(state, [0]), 1: RuntimeError("site down")}
            return sites(state, selected)
        return answers

    with pytest.raises(RoundFailedError, match="round 1 failed.*at least 2 needed.*site down.*charged"):
        run_federated(cfg, data_dir=data_dir, run_dir=tmp_path / "r", progress=False, log=lambda s: None,
                      executor=executor)
    saved = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    before, after = seen["before"], saved["state"]
    assert after.round == 1 and len(saved["history"]) == 1
    for k in before.params:
        assert torch.equal(before.params[k], after.params[k]), k
    for b, a in zip(before.sites, after.sites):
        k = a.steps - b.steps
        assert k > 0 and a.ledger.total_steps == b.ledger.total_steps + k  # charged one round, fresh keys next
        assert a.ledger.phases[-1].noise_multiplier == b.ledger.phases[-1].noise_multiplier
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_site_alone_is_a_federation_of_one(tmp_path, data_dir):
    """``alone=s`` trains site s's shard (from the 3-site split) by itself with its own plan."""
    base = {**TINY, "rounds": 1}
    fed = run_federated(FederatedConfig(**base), data_dir=data_dir, progress=False, log=lambda s: None, bootstrap_resamples=10)
    alone = run_federated(FederatedConfig(**base, alone=1), data_dir=data_dir, progress=False, log=lambda s: None,
                          bootstrap_resamples=10)
    assert len(alone["sites"]) == 1
    for k in ("n", "noise_multiplier", "sampling_rate", "steps", "epsilon"):
        assert alone["sites"][0][k] == fed["sites"][1][k], k
    with pytest.raises(ValueError, match="in process only"):
        FederatedConfig(**base, alone=0, engine="flower")


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="FederatedConfig: min_sites"):
        FederatedConfig(sites=3, min_sites=4)
    with pytest.raises(ValueError, match="min_sites=2 can never be met"):
        FederatedConfig(sites=4, fraction=0.25, min_sites=2)
    with pytest.raises(ValueError, match="FederatedConfig: partition must be one of"):
        FederatedConfig(partition="shards")
    with pytest.raises(ValueError, match="FederatedConfig: epsilon"):
        FederatedConfig(epsilon=float("nan"))


def test_job_releases_the_server_average_and_caches_epsilon(tmp_path, data_dir):
    """The job evaluates, selects and saves the averaged global model (checkpointed with the state); with
    average_decay=0 it releases the last global model, as before averaging existed. The per-round ε reports
    (remembered per ledger) equal accounting.epsilon of each site's ledger exactly."""
    from dpfunc import accounting
    from dpfunc.federated import average_rounds
    from dpfunc.federated.job import _epsilon_cached

    cfg = FederatedConfig(**{**TINY, "rounds": 3, "accountant": "pld"}, average_decay=0.9)
    m = run_federated(cfg, data_dir=data_dir, run_dir=tmp_path / "avg", progress=False, log=lambda s: None,
                      bootstrap_resamples=10)
    saved = load_checkpoint(tmp_path / "avg" / "checkpoint.pt")
    state = saved["state"]
    model = torch.load(tmp_path / "avg" / "model.pt", weights_only=True)
    assert saved["best_round"] == m["best_round"]
    for k, v in saved["best_params"].items():
        assert torch.equal(model[k], v), k
    if m["best_round"] == 3:
        assert all(torch.equal(model[k], state.average[k]) for k in state.average)
    assert any(not torch.equal(state.average[k], state.params[k]) for k in state.params)  # 3 rounds: a real mean
    for s in m["sites"]:
        assert s["epsilon"] == accounting.epsilon(state.sites[s["site"]].ledger, cfg.delta, method="pld")
    assert _epsilon_cached.cache_info().hits > 0  # the two equal-size sites share one computation per round

    last = FederatedConfig(**{**TINY, "rounds": 2}, average_decay=0.0)
    run_federated(last, data_dir=data_dir, run_dir=tmp_path / "last", progress=False, log=lambda s: None,
                  bootstrap_resamples=10)
    saved = load_checkpoint(tmp_path / "last" / "checkpoint.pt")
    state = saved["state"]
    assert all(torch.equal(state.average[k], state.params[k]) for k in state.params)
    if saved["best_round"] == 2:
        assert all(torch.equal(saved["best_params"][k], state.params[k]) for k in state.params)
    with pytest.raises(ValueError, match="FederatedConfig: average_decay must be"):
        FederatedConfig(average_decay=1.0)
    assert average_rounds(None, state.params, 0.0, 0).keys() == state.params.keys()


def test_supernode_credentials_and_launch_commands(tmp_path, capsys):
    """The localhost credentials are what Flower 1.42 accepts (P-384 OpenSSH keys, a CA-signed certificate for
    127.0.0.1, private keys mode 0600); the deployment commands carry the authentication flags."""
    pytest.importorskip("cryptography")
    import ipaddress
    import stat

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from dpfunc.federated.flower.driver import launch_commands, make_credentials

    c = make_credentials(tmp_path / "c", 2)
    ca = x509.load_pem_x509_certificate(c.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(c.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ipaddress.ip_address("127.0.0.1") in server.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)
    for key, pub in zip(c.site_keys, c.site_public_keys):
        k = load_ssh_private_key(key.read_bytes(), None)
        assert isinstance(k, ec.EllipticCurvePrivateKey) and k.curve.name == "secp384r1"
        assert load_ssh_public_key(pub.read_bytes()).public_numbers() == k.public_key().public_numbers()
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(set(p.read_bytes() for p in c.site_public_keys)) == 2  # one key pair per site
    with pytest.raises(ValueError, match="make_credentials: sites"):
        make_credentials(tmp_path / "d", 0)
    text = launch_commands(FederatedConfig(sites=3), superlink="hq.example.org:9092")
    assert "--enable-supernode-auth" in text and text.count("flwr supernode register") == 3
    assert text.count("--auth-supernode-private-key site") == 3 and "--insecure" not in text
    plain = launch_commands(FederatedConfig(sites=3), supernode_auth=False)
    assert "--enable-supernode-auth" not in plain and "register" not in plain and "--root-certificates ca.crt" in plain
    assert main(["federated", "--engine", "flower", "--write-flower-app", "--supernode-auth", "--sites", "2",
                 "--run-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "flwr supernode register site1.pub" in out and (tmp_path / "run" / "flower" / "app" / "pyproject.toml").is_file()
