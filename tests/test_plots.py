"""Plots: each writes a valid, non-trivial PNG and returns its path; bad input gives clear errors."""

import sys

import numpy as np
import pytest

from dpfunc.metrics import confusion_matrix
from dpfunc.plots import plot_confusion_matrix, plot_roc, plot_training_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

RNG = np.random.default_rng(0)
LABELS = RNG.integers(0, 2, 120)
SCORES = LABELS * 0.5 + RNG.random(120)


def _assert_png(path, min_bytes=5_000):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > min_bytes  # a real figure, not an empty canvas
    assert data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 300 and height > 300


def test_plot_roc_writes_png_and_creates_folders(tmp_path):
    path = tmp_path / "figs" / "nested" / "roc.png"
    out = plot_roc(
        LABELS,
        SCORES,
        path,
        name="DP-SGD, ε=3",
        others={"non-private": (LABELS, SCORES + LABELS * 0.3)},
    )
    assert out == path
    _assert_png(path)


def test_plot_confusion_matrix_writes_png(tmp_path):
    cm = confusion_matrix(LABELS, (SCORES >= 0.75).astype(int))
    out = plot_confusion_matrix(cm, str(tmp_path / "cm.png"))
    assert out == tmp_path / "cm.png"
    _assert_png(out)
    # a class with no examples must not divide by zero
    _assert_png(plot_confusion_matrix([[0, 0], [3, 5]], tmp_path / "cm0.png"))


@pytest.mark.parametrize("form", ["rows", "columns", "no-epsilon"])
def test_plot_training_curves_accepts_rows_or_columns(tmp_path, form):
    rows = [
        {"epoch": e, "train_loss": 0.7 / e, "val_auc": 0.8 + 0.02 * e, "epsilon": 0.5 * e**0.5}
        for e in range(1, 11)
    ]
    rows[3]["val_auc"] = None  # a missing evaluation is a gap, not a crash
    if form == "rows":
        history = rows
    else:
        history = {
            k: [r[k] for r in rows]
            for k in rows[0]
            if not (form == "no-epsilon" and k == "epsilon")
        }
    _assert_png(plot_training_curves(history, tmp_path / f"{form}.png", title="SmallCNN, DP-SGD"))


def test_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="lacks \\['val_auc'\\]"):
        plot_training_curves({"train_loss": [1.0, 0.5]}, tmp_path / "h.png")
    with pytest.raises(ValueError, match="equally long"):
        plot_training_curves({"train_loss": [1.0, 0.5], "val_auc": [0.7]}, tmp_path / "h.png")
    with pytest.raises(ValueError, match="history must be"):
        plot_training_curves(3, tmp_path / "h.png")
    with pytest.raises(ValueError, match="must end in .png"):
        plot_roc(LABELS, SCORES, tmp_path / "roc.pdf")
    with pytest.raises(ValueError, match="plot_confusion_matrix: matrix must be a \\(2, 2\\)"):
        plot_confusion_matrix(np.ones((3, 3)), tmp_path / "cm.png")
    with pytest.raises(ValueError, match="roc_curve: undefined"):
        plot_roc([1, 1], [0.2, 0.4], tmp_path / "roc.png")
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_plots_do_not_use_pyplot():
    import dpfunc.plots as plots

    assert "plt" not in vars(plots) and "pyplot" not in plots.__dict__
    if "matplotlib.pyplot" in sys.modules:  # imported by someone else: we opened no figure
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []
