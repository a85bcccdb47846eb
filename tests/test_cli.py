"""The command line and the training driver: arguments, errors, a short real run, resume, evaluate."""

import json
import math

import pytest

from dpfunc.cli import build_parser, main
from dpfunc.train import TrainConfig


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("train", "evaluate", "account"):
        assert cmd in out


def test_train_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--epsilon", "--delta", "--epochs", "--no-dp", "--resume", "--run-dir", "--engine", "--data-dir"):
        assert flag in out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--epsilon", "-1"], "--epsilon must be a finite number > 0"),
        (["train", "--delta", "1.5"], "--delta must be in (0, 1)"),
        (["train", "--epochs", "0"], "--epochs must be >= 1"),
        (["train", "--model", "vgg"], "invalid choice"),
        (["train", "--momentum", "1.5"], "--momentum must be in [0, 1)"),
        (["account", "--noise-multiplier", "1", "--sampling-rate", "0", "--steps", "10"], "--sampling-rate must be in (0, 1]"),
    ],
)
def test_bad_flags_exit_2_with_a_clear_message(argv, needle, capsys):
    assert _exit_code(argv) == 2
    assert needle in capsys.readouterr().err


def _exit_code(argv) -> int:
    """main's return value, or the code argparse exits with (both are the process's exit status)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_missing_data_is_a_clear_error_not_a_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DPFUNC_DATA", raising=False)
    rc = main(["train", "--data-dir", str(tmp_path), "--run-dir", str(tmp_path / "run"), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "pneumoniamnist.npz not found" in err and str(tmp_path) in err


def test_account_prints_every_method(capsys):
    rc = main(["account", "--noise-multiplier", "1.0", "--sampling-rate", "0.01", "--steps", "300", "--delta", "1e-5", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    eps = {r["method"]: r["epsilon"] for r in out["results"]}
    assert set(eps) == {"pld", "rdp", "gdp"}
    assert 0 < eps["pld"] <= eps["rdp"] < 3.0


def test_config_validation_names_the_argument():
    with pytest.raises(ValueError, match="TrainConfig: batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="TrainConfig: engine"):
        TrainConfig(engine="hooks")
    with pytest.raises(ValueError, match="needs epsilon"):
        TrainConfig(epsilon=None, noise_multiplier=None)


@pytest.fixture
def small_train_split(monkeypatch):
    """Real PneumoniaMNIST, but 600 random training images (the file's training split is sorted by
    label, so a prefix would hold one class only), so that a run takes seconds."""
    import torch

    import dpfunc.train
    from dpfunc.data import ImageDataset, pneumoniamnist

    def load(split, data_dir=None, **kwargs):
        data = pneumoniamnist(split, data_dir, **kwargs)
        if split != "train":
            return data
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:600]
        return ImageDataset(data.images[idx], data.labels[idx], data.classes)

    monkeypatch.setattr(dpfunc.train, "pneumoniamnist", load)


@pytest.mark.slow
def test_short_private_run_writes_the_run_folder_and_resumes(data_dir, tmp_path, capsys, small_train_split):
    run = tmp_path / "run"
    common = ["train", "--data-dir", str(data_dir), "--run-dir", str(run), "--batch-size", "128",
              "--epsilon", "8", "--lr", "0.5", "--bootstrap", "50", "--quiet"]
    assert main(common + ["--epochs", "1"]) == 0
    for name in ("config.json", "checkpoint.pt", "metrics.json", "roc.png", "confusion.png", "training.png"):
        assert (run / name).is_file(), name
    first = json.loads((run / "metrics.json").read_text())
    assert len(first["history"]) == 1
    assert 0 < first["epsilon"] <= 8.0 * 1.0001  # calibrated for 1 epoch's steps
    # Re-running without --resume must not clobber the run.
    assert main(common + ["--epochs", "1"]) == 2
    assert "--resume" in capsys.readouterr().err
    # The ledger survives a resume: evaluate recomputes ε from the checkpoint's ledger.
    assert main(["evaluate", str(run), "--data-dir", str(data_dir), "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    assert "roc_auc" in out and f"{first['epsilon']:.3f}" in out
    m = first["test"]
    assert 0.0 <= m["roc_auc"] <= 1.0 and not math.isnan(m["accuracy"])


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_result(data_dir, tmp_path, small_train_split):
    """Stop after epoch 1 (its checkpoint written), resume: the result equals an uninterrupted run."""
    import torch

    from dpfunc.bridge.checkpoint import load_checkpoint
    from dpfunc.train import train

    cfg = TrainConfig(epochs=2, batch_size=128, epsilon=None, noise_multiplier=1.0, learning_rate=0.5, seed=3)
    full = train(cfg, data_dir=data_dir, run_dir=tmp_path / "full", progress=False, log=lambda s: None, bootstrap_resamples=20)

    class Stop(Exception):
        pass

    def stop_after_first_epoch(line):
        if line.startswith("epoch   1/"):
            raise Stop

    with pytest.raises(Stop):
        train(cfg, data_dir=data_dir, run_dir=tmp_path / "cut", progress=False, log=stop_after_first_epoch, bootstrap_resamples=20)
    resumed = train(cfg, data_dir=data_dir, run_dir=tmp_path / "cut", resume=True, progress=False, log=lambda s: None,
                    bootstrap_resamples=20)
    assert resumed.epsilon == full.epsilon
    assert resumed.test == full.test
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    for name, p in a["params"].items():
        assert torch.equal(p, b["params"][name]), name
    assert a["opt_state"][0].ledger == b["opt_state"][0].ledger


@pytest.mark.slow
def test_resume_of_a_finished_run_reports_the_ledgers_epsilon(data_dir, tmp_path, capsys, small_train_split):
    """Issue 12, item 1: `--resume` on a finished run printed ε = 0 and rewrote metrics.json with it.
    Every reported ε must be the ledger's."""
    import re

    from dpfunc import accounting
    from dpfunc.bridge.checkpoint import load_checkpoint
    from dpfunc.private import privacy_ledger

    run = tmp_path / "run"
    common = ["train", "--data-dir", str(data_dir), "--run-dir", str(run), "--batch-size", "200", "--epochs", "1",
              "--epsilon", "4", "--lr", "0.5", "--bootstrap", "20", "--quiet"]
    assert main(common) == 0
    first_out = capsys.readouterr().out
    first = json.loads((run / "metrics.json").read_text())
    state = load_checkpoint(run / "checkpoint.pt")
    ledger_eps = accounting.epsilon(privacy_ledger(state["opt_state"]), 1e-5, method="pld")
    assert 0 < ledger_eps <= 4.0 * 1.0001
    assert first["epsilon"] == ledger_eps

    assert main(common + ["--resume"]) == 0  # the run is already finished: nothing to train
    out = capsys.readouterr().out
    printed = [float(x) for x in re.findall(r"privacy: ε = ([0-9.]+)", first_out + out)]
    assert printed == [round(ledger_eps, 3)] * 2, (first_out, out)
    again = json.loads((run / "metrics.json").read_text())
    assert again["epsilon"] == ledger_eps
    assert again["history"] == first["history"] and again["test"] == first["test"]


def test_progress_helper_resolution_order(monkeypatch):
    """dpfunc._progress: argument > progress_enabled context > $DPFUNC_PROGRESS > terminal check."""
    from dpfunc._progress import progress, progress_enabled, progress_is_enabled

    monkeypatch.setenv("DPFUNC_PROGRESS", "1")
    assert progress_is_enabled() is True
    with progress_enabled(False):
        assert progress_is_enabled() is False
        assert progress_is_enabled(True) is True
        bar = progress(range(5))
        assert bar.disable and list(bar) == [0, 1, 2, 3, 4]  # a disabled bar still iterates
    assert progress_is_enabled() is True
    monkeypatch.setenv("DPFUNC_PROGRESS", "0")
    assert progress_is_enabled() is False
    monkeypatch.setenv("DPFUNC_PROGRESS", "maybe")
    with pytest.raises(ValueError, match="DPFUNC_PROGRESS must be one of"):
        progress_is_enabled()
    monkeypatch.delenv("DPFUNC_PROGRESS")
    assert progress_is_enabled() is False  # pytest captures stderr: not a terminal
    with pytest.raises(TypeError, match="enabled must be True, False or None"):
        progress_is_enabled("yes")
