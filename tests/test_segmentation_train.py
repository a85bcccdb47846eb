"""Segmentation end to end on tiny phantoms: DP training, run folder, resume, evaluation, metrics schema."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

pytest.importorskip("nibabel", reason="the phantom path writes NIfTI: pip install 'dpfunc[segmentation]'")

from dpfunc.keys import Key  # noqa: E402
from dpfunc.segmentation import SegmentationConfig, evaluate_segmentation_run, make_phantoms, train_segmentation  # noqa: E402
from dpfunc.train import RunResult  # noqa: E402

TINY = dict(accountant="rdp", image_size=32, width=4, depth=2, groups=2, batch_size=2, slices_per_patient=2, epochs=2)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return make_phantoms(tmp_path_factory.mktemp("ph") / "liver", patients=6, seed=3, size=32, slices=6, progress=False)


def test_dp_run_folder_resume_and_evaluate(phantoms, tmp_path):
    cfg = SegmentationConfig(epsilon=8.0, **TINY)
    run = tmp_path / "run"
    result = train_segmentation(cfg, data_dir=phantoms, run_dir=run, progress=False, log=lambda s: None, bootstrap_resamples=50)
    metrics = json.loads((run / "metrics.json").read_text())
    # the same top-level schema as a classification run, with test.dice and epsilon
    assert set(metrics) == {f.name for f in dataclasses.fields(RunResult)}
    assert 0.0 <= metrics["test"]["dice"] <= 1.0 and metrics["test"]["num_patients"] == 1
    assert 0 < metrics["epsilon"] <= 8.0 * (1 + 1e-9) and metrics["steps"] == 2 * 2  # 4 train patients / 2 per step
    assert metrics["config"]["unit"] == "patient" and math.isclose(metrics["sampling_rate"], 0.5)
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    # HD95 per test patient (mm from the NIfTI spacing; null where exactly one mask is empty) and its mean with the grid diagonal standing in
    assert metrics["test"]["hd95_unit"] == "mm" and set(metrics["test"]["hd95_per_patient"]) == set(metrics["test"]["dice_per_patient"])
    per = [v for v in metrics["test"]["hd95_per_patient"].values()]
    assert (metrics["test"]["hd95_empty_mismatch"] == sum(v is None for v in per)) and metrics["test"]["hd95"] >= 0
    assert metrics["test_ci"]["hd95"]["lower"] <= metrics["test"]["hd95"] <= metrics["test_ci"]["hd95"]["upper"]
    for name in ("checkpoint.pt", "config.json", "overlays.png", "training.png"):
        assert (run / name).is_file(), name
    with pytest.raises(FileExistsError, match="already holds a run"):
        train_segmentation(cfg, data_dir=phantoms, run_dir=run, progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match="another configuration"):
        train_segmentation(dataclasses.replace(cfg, seed=1), data_dir=phantoms, run_dir=run, resume=True, progress=False,
                           log=lambda s: None)
    resumed = train_segmentation(cfg, data_dir=phantoms, run_dir=run, resume=True, progress=False, log=lambda s: None,
                                 bootstrap_resamples=50)
    assert resumed.test["dice"] == result.test["dice"] and resumed.epsilon == result.epsilon
    again = evaluate_segmentation_run(run, bootstrap_resamples=50)
    assert again.test["dice"] == result.test["dice"] and again.epsilon == pytest.approx(result.epsilon)


def test_resume_after_an_interrupted_run_equals_the_uninterrupted_run(phantoms, tmp_path):
    # a given σ: the same for 1 and 2 epochs; a non-default iterate average, whose state must resume exactly too
    cfg = SegmentationConfig(epsilon=None, noise_multiplier=1.0, ema_decay=0.95, ema_warmup=3.0, **TINY)
    full = train_segmentation(cfg, data_dir=phantoms, run_dir=tmp_path / "a", progress=False, log=lambda s: None,
                              bootstrap_resamples=20)
    short = dataclasses.replace(cfg, epochs=1)
    train_segmentation(short, data_dir=phantoms, run_dir=tmp_path / "b", progress=False, log=lambda s: None, bootstrap_resamples=20)
    # turn the 1-epoch checkpoint into an interrupted 2-epoch run: same keys, so the same steps follow
    from dpfunc.bridge.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    state["config"] = cfg
    save_checkpoint(tmp_path / "b" / "checkpoint.pt", state)
    resumed = train_segmentation(cfg, data_dir=phantoms, run_dir=tmp_path / "b", resume=True, progress=False,
                                 log=lambda s: None, bootstrap_resamples=20)
    assert resumed.test["dice"] == full.test["dice"] and resumed.epsilon == full.epsilon
    assert [h["val_dice"] for h in resumed.history] == [h["val_dice"] for h in full.history]
    a, b = load_checkpoint(tmp_path / "a" / "checkpoint.pt"), load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    for name in a["params"]:  # the last iterate, the running average and the selected average: bit for bit
        assert torch.equal(a["params"][name], b["params"][name]) and torch.equal(a["average"][name], b["average"][name]), name
        assert torch.equal(a["best_params"][name], b["best_params"][name]), name


def test_non_private_and_slice_unit_runs(phantoms):
    nodp = train_segmentation(SegmentationConfig(private=False, **{**TINY, "epochs": 1}), data_dir=phantoms, progress=False,
                              log=lambda s: None, bootstrap_resamples=20)
    assert nodp.epsilon is None and nodp.noise_multiplier is None
    post = train_segmentation(SegmentationConfig(private=False, largest_component=True, lr_schedule="cosine",
                                                 **{**TINY, "epochs": 1}), data_dir=phantoms, progress=False,
                              log=lambda s: None, bootstrap_resamples=20)
    assert post.config["largest_component"] and post.config["lr_schedule"] == "cosine"
    assert post.history[0]["train_loss"] == nodp.history[0]["train_loss"]  # the first step is at the full rate
    sl = train_segmentation(SegmentationConfig(unit="slice", epsilon=8.0, **{**TINY, "epochs": 1, "batch_size": 4}),
                            data_dir=phantoms, progress=False, log=lambda s: None, bootstrap_resamples=20)
    n_slices = round(4 / sl.sampling_rate)
    assert n_slices > 4 and sl.config["unit"] == "slice"  # accounted over slices, not patients


def test_public_pretraining_start_is_shared_by_both_arms_and_cached(phantoms, tmp_path, monkeypatch):
    from dpfunc.segmentation._public import public_shapes
    from dpfunc.segmentation._train import _build, _public_weights

    monkeypatch.setenv("DPFUNC_CACHE_DIR", str(tmp_path / "cache"))
    _public_weights.cache_clear()
    x, y = public_shapes(Key(5), 3, 32)
    x2, y2 = public_shapes(Key(5), 3, 32)
    assert torch.equal(x, x2) and torch.equal(y, y2) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert set(y.unique().tolist()) <= {0, 1}
    cfg = SegmentationConfig(epsilon=8.0, pretrain_steps=2, **TINY)
    _, _, dp_params, _ = _build(cfg)
    _, _, np_params, _ = _build(dataclasses.replace(cfg, private=False, seed=4))
    _, _, fresh, _ = _build(dataclasses.replace(cfg, pretrain_steps=0))
    assert len(list((tmp_path / "cache").glob("public_unet_v*.pt"))) == 1  # computed once, then read back
    for name in dp_params:  # both arms and every run seed start from the same public weights
        assert torch.equal(dp_params[name], np_params[name]), name
    assert torch.equal(dp_params["net.head.bias"], fresh["net.head.bias"])  # the output bias is the public prior again
    assert not torch.equal(dp_params["net.head.weight"], fresh["net.head.weight"])
    _public_weights.cache_clear()
    again = _build(cfg)[2]  # from the disk cache
    assert all(torch.equal(again[k], dp_params[k]) for k in dp_params)
    with pytest.raises(ValueError, match="SegmentationConfig: pretrain_steps"):
        SegmentationConfig(pretrain_steps=-1)


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="SegmentationConfig: unit must be"):
        SegmentationConfig(unit="hospital")
    with pytest.raises(ValueError, match="SegmentationConfig: image_size must be divisible by 2\\*\\*depth = 8"):
        SegmentationConfig(image_size=36)
    with pytest.raises(ValueError, match="SegmentationConfig: delta"):
        SegmentationConfig(delta=0.0)
    with pytest.raises(ValueError, match="SegmentationConfig: accountant must be"):
        SegmentationConfig(accountant="gdp")
    with pytest.raises(ValueError, match="SegmentationConfig: task must be one of"):
        SegmentationConfig(task="brain")
    for bad in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="SegmentationConfig: foreground_prior must be in \\(0, 1\\)"):
            SegmentationConfig(foreground_prior=bad)
    assert SegmentationConfig(foreground_prior=None).foreground_prior is None  # the default initialisation
    with pytest.raises(ValueError, match="SegmentationConfig: lr_schedule must be"):
        SegmentationConfig(lr_schedule="linear")


def test_train_task_liver_is_forwarded_to_segment():
    from dpfunc.cli import forward_train_task

    assert forward_train_task(["train", "--task", "liver", "--epochs", "1"]) == ["segment", "--task", "liver", "--epochs", "1"]
    assert forward_train_task(["train", "--epochs", "1", "--task=liver"]) == ["segment", "--epochs", "1", "--task=liver"]
    assert forward_train_task(["train", "--task", "liver", "--task", "pneumonia"])[0] == "train"  # the last one wins
    assert forward_train_task(["train", "--epochs", "3"]) == ["train", "--epochs", "3"]
    assert forward_train_task(["segment", "--task", "liver"]) == ["segment", "--task", "liver"]
    assert forward_train_task(["evaluate", "train", "--task", "liver"])[0] == "evaluate"


def test_command_line_make_phantoms_segment_evaluate(tmp_path, capsys, monkeypatch):
    from dpfunc.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["make-phantoms", "--out", "ph", "--patients", "5", "--seed", "1", "--size", "32", "--slices", "5", "--quiet"]) == 0
    assert (tmp_path / "ph" / "dataset.json").is_file() and len(list((tmp_path / "ph" / "imagesTr").iterdir())) == 5
    assert main(["make-phantoms", "--out", "ph", "--patients", "1", "--quiet"]) == 2
    assert "already holds a dataset.json" in capsys.readouterr().err
    flags = ["--data-dir", "ph", "--image-size", "32", "--width", "4", "--depth", "2", "--epochs", "1", "--batch-size", "2",
             "--slices-per-patient", "2", "--accountant", "rdp", "--bootstrap", "20", "--quiet", "--device", "cpu"]
    assert main(["segment", *flags, "--epsilon", "5"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "liver-patient-eps5.0-seed0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert "test Dice (mean over 1 patients" in out and f"{metrics['test']['dice']:.4f}" in out and "per patient" in out
    assert f"test HD95 (mm, mean over patients): {metrics['test']['hd95']:.2f}" in out
    assert main(["evaluate", str(run), "--bootstrap", "20", "--quiet", "--device", "cpu"]) == 0
    assert f"{metrics['test']['dice']:.4f}" in capsys.readouterr().out
    assert main(["segment", *flags, "--epsilon", "5"]) == 2  # the run folder holds a run
    assert "--resume" in capsys.readouterr().err
    # `train --task liver` is the same command: it finds the same default run folder (and refuses it the same way)
    assert main(["train", "--task", "liver", *flags, "--epsilon", "5"]) == 2
    err = capsys.readouterr().err
    assert "dpfunc segment: error" in err and str(run.relative_to(tmp_path)) in err and "--resume" in err
    assert main(["train", "--tas", "liver"]) == 2  # an abbreviated --task cannot be forwarded: told how to spell it
    assert "spell the flag out, `--task liver`" in capsys.readouterr().err


def test_a_diverging_non_private_run_is_refused_before_its_epoch_is_saved(phantoms, tmp_path):
    """The divergence check reads the epoch's losses once (no host read per step) and still stops the run
    before a checkpoint with non-finite weights is written."""
    cfg = SegmentationConfig(private=False, epsilon=None, learning_rate=1e30, **TINY)
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"train_segmentation: the loss became (nan|inf) at step \d+ .*lower --lr \(now 1e\+30\)"):
        train_segmentation(cfg, data_dir=phantoms, run_dir=run, progress=False, log=lambda s: None)
    assert not (run / "checkpoint.pt").exists() and not (run / "metrics.json").exists()
