"""`dpfunc infer RUN_DIR [--encrypted]` end to end: a tiny run folder, real images, three real
processes (model owner, data owner, dealer) over gloo on localhost, with a hard timeout; the
launcher kills the parties' process groups in its ``finally``."""

import json
import os
from dataclasses import asdict

import pytest
import torch

from dpfunc.cli import main
from dpfunc.keys import Key
from dpfunc.models import build_model
from dpfunc.train import TrainConfig


@pytest.fixture
def tiny_run(tmp_path):
    """A run folder as `dpfunc train` leaves it, as far as `dpfunc infer` reads it (config and best
    parameters of the default SmallCNN at 28²), without the training."""
    from dpfunc.bridge.checkpoint import save_checkpoint

    cfg = TrainConfig(model="cnn", image_size=28, seed=3)
    model = build_model("cnn", key=Key(5))
    run = tmp_path / "run"
    run.mkdir()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    save_checkpoint(run / "checkpoint.pt", {"config": asdict(cfg), "best_params": params})
    return run


@pytest.mark.slow
def test_encrypted_infer_command_matches_plaintext(tiny_run, data_dir, capsys):
    from dpfunc.mpc.cli import load_run_model

    n = 4
    rc = main(["infer", str(tiny_run), "--encrypted", "--data-dir", str(data_dir), "--limit", str(n),
               "--batch-size", "2", "--timeout", "90", "--quiet"])
    assert rc == 0
    result = json.loads((tiny_run / "encrypted_inference.json").read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert not any(p.suffix == ".tmp" for p in tiny_run.iterdir())
    # the plaintext reference, recomputed here: the margins of these 4 images are far above the
    # fixed-point error, so every prediction must agree (deterministic: fixed seeds throughout)
    from dpfunc.data import pneumoniamnist

    _, module, _ = load_run_model(str(tiny_run))
    with torch.no_grad():
        logits = module(pneumoniamnist("test", str(data_dir), size=28).images[:n]).double()
    margins = (logits[:, 0] - logits[:, 1]).abs()
    assert result["max_abs_logit_error"] < 5e-3
    assert bool((margins > 4 * result["max_abs_logit_error"]).all())
    assert result["agreement"] == 1.0
    assert result["images"] == n and result["batch_size"] == 2 and result["model"] == "cnn"
    assert abs(result["plaintext"]["accuracy"] - result["accuracy"]) < 1e-12
    assert result["rounds"] > 100 and result["bytes_per_image"] > 0 and result["dealer_bytes_per_image"] > 0
    assert result["setup"]["reuse_weight_masks"] is True and result["setup"]["rounds"] >= 2
    # the dealer's setup is each party's 40-byte header (its seed): the weight masks are expanded from it
    assert result["setup"]["dealer_bytes"] == 2 * 40
    assert set(result["max_rss_bytes"]) == {"model-owner", "data-owner", "dealer"}
    assert all(v > 0 for v in result["max_rss_bytes"].values())
    # each process's own peak (VmHWM), not wait4's ru_maxrss, which on Linux starts from the launcher's
    # resident set inherited over fork and made all three figures equal to the launcher's
    assert len(set(result["max_rss_bytes"].values())) == 3, result["max_rss_bytes"]
    # the plaintext path: no parties, no file rewritten
    os.remove(tiny_run / "encrypted_inference.json")
    assert main(["infer", str(tiny_run), "--data-dir", str(data_dir), "--limit", str(n)]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["images"] == n and plain["plaintext"]["accuracy"] == result["plaintext"]["accuracy"]
    assert not (tiny_run / "encrypted_inference.json").exists()


def test_infer_refuses_bad_limits(tiny_run, capsys):
    assert main(["infer", str(tiny_run), "--limit", "0"]) == 2
    assert "--limit must be an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["infer", str(tiny_run), "--batch-size", "0", "--encrypted"]) == 2
    assert "--batch-size must be an integer >= 1, got 0" in capsys.readouterr().err


def test_party_usage_report_is_this_process(tmp_path):
    """A party's usage file holds its own VmHWM (what /proc says for the writing process) and CPU time."""
    from dpfunc.mpc.parties import _peak_rss_bytes, _write_usage

    path = tmp_path / "usage.json"
    _write_usage(str(path))
    usage = json.loads(path.read_text())
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    assert 0 < usage["peak_rss_bytes"] <= hwm == _peak_rss_bytes() and usage["cpu_seconds"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["usage.json"]
