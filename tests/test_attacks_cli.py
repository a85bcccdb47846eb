"""`dpfunc attack` and `dpfunc audit` end to end on the real data (tiny settings; skipped without the file)."""

import json

from dpfunc.cli import main


def test_attack_command_writes_json_and_grid(tmp_path, data_dir):
    run = tmp_path / "run"
    code = main(["attack", "--run-dir", str(run), "--scenario", "nonprivate", "--batch-size", "2", "--images", "2",
                 "--iterations", "3", "--data-dir", str(data_dir), "--quiet", "--device", "cpu"])
    assert code == 0
    out = json.loads((run / "attack-nonprivate.json").read_text())
    assert len(out["psnr"]) == 2 and len(out["ssim"]) == 2 and len(out["mse"]) == 2
    for key in ("psnr_mean", "ssim_mean", "mse_mean", "baseline_psnr", "baseline_random_psnr"):
        assert key in out
    assert out["job"]["scenario"] == "nonprivate" and out["model"]["weights"] == "initialisation" and out["device"] == "cpu"
    assert (run / "attack-nonprivate.png").stat().st_size > 1000


def test_attack_command_refuses_bad_flags(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["attack", "--run-dir", "x", "--scenario", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_audit_command_writes_claimed_and_lower_bound(tmp_path, data_dir):
    run = tmp_path / "audit"
    code = main(["audit", "--run-dir", str(run), "--noise-multiplier", "1.0", "--epochs", "1", "--batch-size", "4708",
                 "--canaries", "200", "--data-dir", str(data_dir), "--quiet", "--device", "cpu"])
    assert code == 0
    out = json.loads((run / "audit.json").read_text())
    assert out["m"] == 200 and out["confidence"] == 0.95 and out["device"] == "cpu"
    assert 0 <= out["epsilon_lower_bound"] <= out["epsilon_claimed"]
    assert (run / "audit.png").stat().st_size > 1000
