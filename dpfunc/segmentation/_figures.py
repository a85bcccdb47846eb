"""Overlay figure: per patient, the slice with the most organ — image, ground truth, prediction."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dpfunc.segmentation._msd import PatientVolume

__all__ = ["plot_overlays"]


def plot_overlays(patients: Sequence[PatientVolume], predictions: Sequence[torch.Tensor], path: str | os.PathLike) -> Path:
    """One row per patient: the windowed image, the truth (green) and the prediction (red) over it.

    Args:
        patients: volumes; predictions: ``(S, H, W)`` masks, one per patient.
        path: a ``.png`` path (parent folders created); written atomically.
    """
    fn = "plot_overlays"
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{fn}: path must end in .png, got {str(path)!r}")
    if len(patients) != len(predictions) or not patients:
        raise ValueError(f"{fn}: need one prediction per patient and at least one patient, got {len(patients)} and {len(predictions)}")
    fig = Figure(figsize=(7.5, 2.5 * len(patients)))
    for row, (p, pred) in enumerate(zip(patients, predictions)):
        k = int(p.labels.flatten(1).sum(1).argmax())
        image = p.images[k, 0].numpy()
        for col, (title, mask, colour) in enumerate((("image", None, None), ("truth", p.labels[k], "Greens"),
                                                     ("prediction", pred[k], "Reds"))):
            ax = fig.add_subplot(len(patients), 3, 3 * row + col + 1)
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            if mask is not None:
                m = mask.numpy().astype(float)
                ax.imshow(m, cmap=colour, alpha=0.45 * m, vmin=0, vmax=1)
            ax.set_title(f"{p.name} slice {k}: {title}" if col == 0 else title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)
    return path
