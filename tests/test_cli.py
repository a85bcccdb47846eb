"""The command line and the training driver: arguments, errors, a short real run, resume, evaluate."""

import json
import math
import os

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
    assert main(["evaluate", str(run), "--data-dir", str(data_dir), "--bootstrap", "50", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "roc_auc" in out and f"{first['epsilon']:.3f}" in out
    m = first["test"]
    assert 0.0 <= m["roc_auc"] <= 1.0 and not math.isnan(m["accuracy"])


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_result(data_dir, tmp_path, capsys, small_train_split):
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
    # evaluate says the run is unfinished (1 of 2 epochs), not "best epoch 1 of 1 done"
    assert main(["evaluate", str(tmp_path / "cut"), "--data-dir", str(data_dir), "--bootstrap", "20"]) == 0
    assert "UNFINISHED: checkpoint after epoch 1 of 2" in capsys.readouterr().out
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

    # --overwrite starts the run afresh in the same folder; the same seed reproduces it exactly.
    assert main(common + ["--overwrite"]) == 0
    capsys.readouterr()
    redone = json.loads((run / "metrics.json").read_text())
    assert redone["epsilon"] == ledger_eps and redone["test"] == first["test"]
    assert [h["val_auc"] for h in redone["history"]] == [h["val_auc"] for h in first["history"]]


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


# --------------------------------------------------------------------------- failure modes (issue 12)


def test_help_shows_each_default_once_and_never_none(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "(default: None)" not in out and "(default: False)" not in out
    options = out[out.index("options:"):]
    data_help = options[options.index("--data-dir"):options.index("--download")]
    assert data_help.count("(default") == 1 and "shared/data" in data_help


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--no-dp", "--epsilon", "1"], "--no-dp trains without privacy, so --epsilon would be ignored"),
        (["train", "--no-dp", "--delta", "1e-6", "--engine", "vmap"], "so --delta, --engine would be ignored"),
        (["train", "--epsilon", "1", "--noise-multiplier", "1.1"], "not both"),
        (["train", "--resume", "--overwrite"], "give one of them"),
    ],
)
def test_contradictory_flags_are_refused(argv, needle, capsys):
    assert _exit_code(argv) == 2
    assert needle in capsys.readouterr().err


def test_missing_data_error_speaks_the_command_lines_flags(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DPFUNC_DATA", raising=False)
    rc = main(["train", "--data-dir", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "--data-dir" in err and "--download" in err and "DPFUNC_DATA" in err
    assert "data_dir=" not in err and "download=True" not in err  # Python API names stay out of the CLI
    assert not (tmp_path / "run").exists()  # nothing written before the data is found


def test_data_lookup_order(tmp_path, monkeypatch):
    """--data-dir, else $DPFUNC_DATA (each alone), else the project's ../shared/data, else the cache."""
    from dpfunc.data import _files

    monkeypatch.delenv("DPFUNC_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    project = _files.project_data_dir()
    assert project is not None and project.name == "data" and project.parent.name == "shared"  # a source checkout
    assert [f for f, _ in _files.search_path()] == [project, tmp_path / "xdg" / "dpfunc"]
    monkeypatch.setenv("DPFUNC_DATA", str(tmp_path / "env"))
    assert [f for f, _ in _files.search_path()] == [tmp_path / "env"]
    assert [f for f, _ in _files.search_path(tmp_path / "arg")] == [tmp_path / "arg"]
    with pytest.raises(_files.DataNotFoundError) as err:
        _files.locate_pneumoniamnist()
    assert err.value.searched == ((tmp_path / "env", "$DPFUNC_DATA"),)


@pytest.mark.parametrize("case", ["file", "under-a-file", "read-only"])
def test_unusable_run_dir_is_a_message_not_a_traceback(case, tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    run_dir = {"file": afile, "under-a-file": afile / "sub", "read-only": tmp_path / "ro" / "run"}[case]
    if case == "read-only":
        (tmp_path / "ro").mkdir()
        if os.geteuid() == 0:  # root ignores permission bits: simulate what a read-only folder answers
            import dpfunc.cli

            def refuse(*args, **kwargs):
                raise PermissionError(13, "Permission denied")

            monkeypatch.setattr(dpfunc.cli.tempfile, "TemporaryFile", refuse)
        else:
            (tmp_path / "ro").chmod(0o500)
    try:
        rc = main(["train", "--run-dir", str(run_dir), "--quiet"])
    finally:
        (tmp_path / "ro").exists() and (tmp_path / "ro").chmod(0o700)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    expected = {"file": "is an existing file, not a folder", "under-a-file": "is a file, so no folder can be made",
                "read-only": "cannot write in"}[case]
    assert expected in err and "--run-dir" in err


def test_resume_with_a_mistyped_run_dir_is_refused(tmp_path, capsys):
    assert main(["train", "--run-dir", str(tmp_path / "tpyo"), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "does not exist" in err
    assert not (tmp_path / "tpyo").exists()


def test_download_without_internet_fails_fast_with_the_flags_to_use(tmp_path, capsys, monkeypatch):
    """A server that accepts the connection and never answers (what a dead proxy does): the download
    gives up after DOWNLOAD_TIMEOUT_S and says how to proceed offline."""
    import socket
    import time

    from dpfunc.data import _files

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    monkeypatch.setattr(_files, "PNEUMONIAMNIST_URL", f"http://127.0.0.1:{server.getsockname()[1]}/pneumoniamnist.npz")
    monkeypatch.setattr(_files, "DOWNLOAD_TIMEOUT_S", 0.5)
    try:
        t0 = time.perf_counter()
        rc = main(["train", "--download", "--data-dir", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run"),
                   "--quiet"])
        seconds = time.perf_counter() - t0
    finally:
        server.close()
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and seconds < 10
    assert "no answer within 0.5 s" in err and "--data-dir" in err
    assert list((tmp_path / "data").iterdir()) == []  # no partial file left behind


def test_run_folders_new_per_run_resume_picks_the_newest_matching(tmp_path):
    """`make train` twice: runs/<name>, then runs/<name>-2; --resume continues the newest one of the
    same configuration; --overwrite reuses runs/<name>; an explicit --run-dir holding a run is refused."""
    import json as _json
    from dataclasses import asdict

    from dpfunc.cli import CommandError, resolve_run_dir

    root = tmp_path / "runs"
    cfg = TrainConfig()
    fresh = resolve_run_dir(None, "cnn-eps3.0-seed0", resume=False, overwrite=False, root=root)
    assert fresh == root / "cnn-eps3.0-seed0"
    with pytest.raises(CommandError, match="no run folder"):
        resolve_run_dir(None, "cnn-eps3.0-seed0", resume=True, overwrite=False, root=root)
    for folder, config in ((fresh, cfg), (root / "cnn-eps3.0-seed0-2", TrainConfig(epochs=2))):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(_json.dumps(asdict(config)))
        (folder / "checkpoint.pt").write_bytes(b"")
    assert resolve_run_dir(None, "cnn-eps3.0-seed0", resume=False, overwrite=False, root=root) == root / "cnn-eps3.0-seed0-3"
    same = lambda folder: TrainConfig(**_json.loads((folder / "config.json").read_text())) == cfg  # noqa: E731
    assert resolve_run_dir(None, "cnn-eps3.0-seed0", resume=True, overwrite=False, root=root, matches=same) == fresh
    assert resolve_run_dir(None, "cnn-eps3.0-seed0", resume=True, overwrite=False, root=root) == root / "cnn-eps3.0-seed0-2"
    assert resolve_run_dir(None, "cnn-eps3.0-seed0", resume=False, overwrite=True, root=root) == fresh
    with pytest.raises(CommandError, match="already holds a run; pass --resume to continue it, --overwrite"):
        resolve_run_dir(str(fresh), "x", resume=False, overwrite=False)


def test_account_formats_huge_gdp_epsilon(capsys):
    assert main(["account", "--noise-multiplier", "0.1", "--sampling-rate", "0.5", "--steps", "100"]) == 0
    lines = capsys.readouterr().out.splitlines()
    gdp = next(line for line in lines if line.startswith("gdp"))
    assert "e+" in gdp and max(len(tok) for tok in gdp.split()) < 16  # not a 45-digit number


def test_progress_bar_text_before_the_first_validation_has_no_nan():
    from dpfunc.train import _bar_text

    assert _bar_text(0, 15, None, True) == "epoch 1/15"
    last = {"epoch": 3, "train_loss": 0.5, "val_auc": 0.9, "val_accuracy": 0.8, "epsilon": 1.234}
    assert _bar_text(3, 15, last, True) == "epoch 4/15 | epoch 3: loss 0.500 val AUC 0.900 acc 0.800 ε 1.23"
    assert "ε" not in _bar_text(3, 15, {**last, "epsilon": None}, False)


@pytest.mark.slow
def test_batch_size_above_n_is_refused(data_dir, tmp_path, capsys):
    rc = main(["train", "--data-dir", str(data_dir), "--run-dir", str(tmp_path / "run"), "--batch-size", "10000",
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "batch_size 10000 (--batch-size) is larger than the training set (n = 4708)" in err


def test_env_args_are_appended_and_announced(monkeypatch, capsys):
    """$DPFUNC_<COMMAND>_ARGS is appended to that command's line (later flags win) and said on stderr."""
    monkeypatch.setenv("DPFUNC_ACCOUNT_ARGS", "--json --steps 10")
    assert main(["account", "--noise-multiplier", "1.0", "--sampling-rate", "0.01", "--steps", "300"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["steps"] == 10
    assert "appending $DPFUNC_ACCOUNT_ARGS: --json --steps 10" in captured.err


def test_parser_for_one_command_does_not_build_the_others():
    """`dpfunc train` declares train in full and the other subcommands by name only (no imports)."""
    parser = build_parser(["train", "--epochs", "2"])
    sub = next(a for a in parser._actions if a.dest == "command")
    assert "--engine" in sub.choices["train"].format_help()
    assert sub.choices["account"].format_help().count("--") <= 1  # just -h/--help
    assert "--noise-multiplier" in build_parser()._actions[-1].choices["account"].format_help()
