"""Figures of the case study: ROC curves, confusion matrix, training curves (loss, metric, ε).

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, never through
``pyplot``: no global figure state, no backend switch, no window, safe in threads and on servers.
Each function writes one PNG (parent folders created) and returns its path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dpfunc.metrics import roc_auc, roc_curve

__all__ = ["plot_roc", "plot_confusion_matrix", "plot_training_curves"]

_DPI = 150


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plots: path must end in .png, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=_DPI, format="png")
    return path


def plot_roc(
    labels: Any,
    scores: Any,
    path: str | os.PathLike,
    *,
    name: str = "model",
    others: Mapping[str, tuple[Any, Any]] | None = None,
    title: str = "ROC curve",
) -> Path:
    """ROC curve(s) with the AUC in the legend and the chance diagonal.

    Args:
        labels: ``(N,)`` in {0, 1} (1 = pneumonia).
        scores: ``(N,)`` real scores of class 1.
        path: output ``.png``.
        name: legend name of this curve.
        others: more curves to compare, ``{name: (labels, scores)}`` (e.g. non-private vs ε = 1).
        title: figure title.

    Returns:
        ``path`` as a ``Path``.

    Example:
        >>> plot_roc([0, 1, 1], [0.2, 0.9, 0.4], "roc.png", name="DP-SGD, ε=3")  # doctest: +SKIP
    """
    curves = {name: (labels, scores), **dict(others or {})}
    fig = Figure(figsize=(4.8, 4.6))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1, label="chance (AUC 0.5)")
    for curve_name, (y, s) in curves.items():
        curve = roc_curve(y, s)
        # straight segments: tied scores give diagonal pieces, so the area is the AUC
        ax.plot(
            curve.fpr, curve.tpr, linewidth=1.8, label=f"{curve_name} (AUC {roc_auc(y, s):.3f})"
        )
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        aspect="equal",
        title=title,
        xlabel="1 − specificity (false-positive rate)",
        ylabel="sensitivity (true-positive rate)",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion_matrix(
    matrix: Any,
    path: str | os.PathLike,
    *,
    class_names: Sequence[str] = ("normal", "pneumonia"),
    title: str = "Confusion matrix",
) -> Path:
    """A confusion matrix with counts and row percentages (per true class).

    Args:
        matrix: ``(K, K)`` counts, rows = true class, columns = predicted (as
            :func:`dpfunc.metrics.confusion_matrix`).
        path: output ``.png``.
        class_names: ``K`` names in label order.
        title: figure title.

    Example:
        >>> plot_confusion_matrix([[200, 34], [20, 370]], "cm.png")  # doctest: +SKIP
    """
    m = np.asarray(matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(class_names) or (m < 0).any():
        raise ValueError(
            f"plot_confusion_matrix: matrix must be a ({len(class_names)}, {len(class_names)}) array "
            f"of counts >= 0 matching class_names={tuple(class_names)}, got shape {m.shape}"
        )
    rows = m.sum(axis=1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros(m.shape, dtype=float), where=rows > 0)
    fig = Figure(figsize=(4.4, 3.9))
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(
                j,
                i,
                f"{int(m[i, j])}\n{100 * share[i, j]:.1f}%",
                ha="center",
                va="center",
                color="white" if share[i, j] > 0.5 else "black",
                fontsize=11,
            )
    ticks = range(len(class_names))
    ax.set_xticks(ticks, labels=list(class_names))
    ax.set_yticks(ticks, labels=list(class_names))
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    fig.tight_layout()
    return _save(fig, path)


def _columns(history: Any) -> dict[str, np.ndarray]:
    """Rows (a list of per-epoch dicts) or columns (dict of lists) -> dict of float arrays."""
    if isinstance(history, Mapping):
        cols = {k: list(v) for k, v in history.items()}
    elif isinstance(history, Sequence) and all(isinstance(r, Mapping) for r in history):
        keys = list(dict.fromkeys(k for row in history for k in row))
        cols = {k: [row.get(k, math.nan) for row in history] for k in keys}
    else:
        raise ValueError(
            "plot_training_curves: history must be a list of per-epoch dicts or a dict of per-epoch "
            f"lists, got {type(history).__name__}"
        )
    lengths = {len(v) for v in cols.values()}
    if len(lengths) > 1 or lengths == {0}:
        raise ValueError(
            f"plot_training_curves: history columns must be non-empty and equally long, got lengths "
            f"{ {k: len(v) for k, v in cols.items()} }"
        )
    return {
        k: np.asarray([math.nan if v is None else v for v in vals], dtype=float)
        for k, vals in cols.items()
    }


def plot_training_curves(
    history: Any,
    path: str | os.PathLike,
    *,
    metric: str = "val_auc",
    loss: str = "train_loss",
    epsilon: str = "epsilon",
    title: str | None = None,
) -> Path:
    """Three panels per epoch: training loss, a validation metric, and the privacy budget ε spent.

    Args:
        history: per-epoch records, either ``[{"epoch": 1, "train_loss": .., "val_auc": ..,
            "epsilon": ..}, ...]`` or ``{"train_loss": [...], ...}``. ``epoch`` is optional
            (default 1, 2, …); ``None``/missing values are gaps.
        path: output ``.png``.
        metric: key of the validation metric (its name is the panel label).
        loss: key of the training loss.
        epsilon: key of ε; if absent, the panel says the run is non-private (ε = ∞).
        title: figure title.

    Example:
        >>> plot_training_curves([{"train_loss": 0.6, "val_auc": 0.8, "epsilon": 0.5},
        ...     {"train_loss": 0.4, "val_auc": 0.9, "epsilon": 0.8}], "h.png")  # doctest: +SKIP
    """
    cols = _columns(history)
    missing = [k for k in (loss, metric) if k not in cols]
    if missing:
        raise ValueError(
            f"plot_training_curves: history lacks {missing}; it has {sorted(cols)} (choose with "
            f"loss=..., metric=...)"
        )
    n = len(cols[loss])
    epochs = cols.get("epoch", np.arange(1, n + 1, dtype=float))
    fig = Figure(figsize=(11, 3.4))
    axes = fig.subplots(1, 3)
    panels = [(loss, "training loss", "tab:blue"), (metric, metric, "tab:green")]
    for ax, (key, label, color) in zip(axes, panels):
        ax.plot(epochs, cols[key], marker="o", markersize=3, color=color)
        ax.set(xlabel="epoch", ylabel=label, title=label)
        ax.grid(alpha=0.3)
    ax = axes[2]
    if epsilon in cols:
        ax.plot(epochs, cols[epsilon], marker="o", markersize=3, color="tab:red")
        finite = cols[epsilon][np.isfinite(cols[epsilon])]
        ax.set(
            ylabel="ε (privacy spent)",
            title=f"privacy budget, ε = {finite[-1]:.2f} at end"
            if finite.size
            else "privacy budget",
        )
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    else:
        ax.text(
            0.5, 0.5, "non-private run\n(ε = ∞)", ha="center", va="center", transform=ax.transAxes
        )
        ax.set(title="privacy budget", xticks=[], yticks=[])
    ax.set(xlabel="epoch")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
