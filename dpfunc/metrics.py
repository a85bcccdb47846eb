"""Clinical metrics for binary classification (1 = disease, e.g. pneumonia; 0 = normal).

Inputs are 1-D labels in {0, 1} and real-valued scores (probabilities of class 1, or logits with
``threshold=0``); numpy arrays, torch tensors and lists are accepted. A prediction is positive when
``score >= threshold``.

Undefined values. A metric that needs both classes (ROC-AUC) or one particular class
(sensitivity needs positives, specificity negatives) raises ``ValueError`` when called directly.
:func:`binary_metrics` and :func:`bootstrap_ci` never raise for this: they report ``nan`` and say
why in ``notes`` (``to_dict`` writes ``None`` so the result is strict JSON). MCC follows the usual
convention (scikit-learn, Chicco & Jurman 2020): 0 when a row or column of the confusion matrix is
empty. Empty inputs always raise.

References:
    J. A. Hanley, B. J. McNeil, "The meaning and use of the area under a ROC curve", Radiology
    143 (1982). B. W. Matthews, Biochim. Biophys. Acta 405 (1975). B. Efron, R. Tibshirani, "An
    Introduction to the Bootstrap" (1993), ch. 13. X. Robin et al., "pROC", BMC Bioinformatics 12:77
    (2011) (stratified bootstrap for AUC intervals).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "BinaryMetrics",
    "ConfidenceInterval",
    "RocCurve",
    "accuracy",
    "binary_metrics",
    "bootstrap_ci",
    "confusion_matrix",
    "mcc",
    "roc_auc",
    "roc_curve",
    "sensitivity",
    "specificity",
]


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _labels(fn: str, labels: Any) -> np.ndarray:
    y = _to_numpy(labels)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"{fn}: labels must be a non-empty 1-D array, got shape {y.shape}")
    if y.dtype.kind not in "biuf" or not np.isin(y, (0, 1)).all():
        bad = np.unique(y[~np.isin(y, (0, 1))])[:5] if y.dtype.kind in "biuf" else y.dtype
        raise ValueError(f"{fn}: labels must be 0 (normal) or 1 (disease), got values like {bad}")
    return y.astype(np.int64)


def _pair(fn: str, labels: Any, values: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    y = _labels(fn, labels)
    v = _to_numpy(values)
    if v.shape != y.shape:
        raise ValueError(f"{fn}: {name} must have the shape of labels {y.shape}, got {v.shape}")
    if v.dtype.kind not in "biuf" or np.isnan(v.astype(np.float64)).any():
        raise ValueError(f"{fn}: {name} must be real numbers without NaN, got dtype {v.dtype}")
    return y, v.astype(np.float64)


def confusion_matrix(labels: Any, predictions: Any) -> np.ndarray:
    """2×2 counts ``[[TN, FP], [FN, TP]]`` (rows = true class, columns = predicted class).

    Example:
        >>> confusion_matrix([0, 0, 1, 1], [0, 1, 1, 1]).tolist()
        [[1, 1], [0, 2]]
    """
    y, p = _pair("confusion_matrix", labels, predictions, "predictions")
    if not np.isin(p, (0, 1)).all():
        raise ValueError("confusion_matrix: predictions must be 0 or 1 (threshold scores first)")
    return np.bincount(2 * y + p.astype(np.int64), minlength=4).reshape(2, 2)


def _counts(y: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, int]:
    tn, fp, fn, tp = np.bincount(2 * y + pred, minlength=4).tolist()
    return tn, fp, fn, tp


def _safe_ratio(fn: str, num: int, den: int, what: str) -> float:
    if den == 0:
        raise ValueError(f"{fn}: undefined, {what}")
    return num / den


def _predict(fn: str, labels: Any, predictions: Any) -> tuple[np.ndarray, np.ndarray]:
    y, p = _pair(fn, labels, predictions, "predictions")
    if not np.isin(p, (0, 1)).all():
        raise ValueError(f"{fn}: predictions must be 0 or 1 (threshold the scores first)")
    return y, p.astype(np.int64)


def accuracy(labels: Any, predictions: Any) -> float:
    """Fraction of correct predictions, ``(TP + TN) / N``.

    Example:
        >>> accuracy([0, 0, 1, 1], [0, 1, 1, 1])
        0.75
    """
    y, p = _predict("accuracy", labels, predictions)
    return float((y == p).mean())


def sensitivity(labels: Any, predictions: Any) -> float:
    """Recall of the disease class, ``TP / (TP + FN)``; raises if there are no positives.

    Example:
        >>> sensitivity([0, 0, 1, 1], [0, 1, 1, 0])
        0.5
    """
    tn, fp, fn, tp = _counts(*_predict("sensitivity", labels, predictions))
    return _safe_ratio("sensitivity", tp, tp + fn, "no positive (label 1) examples")


def specificity(labels: Any, predictions: Any) -> float:
    """Recall of the normal class, ``TN / (TN + FP)``; raises if there are no negatives.

    Example:
        >>> specificity([0, 0, 0, 1], [0, 1, 0, 1])
        0.6666666666666666
    """
    tn, fp, fn, tp = _counts(*_predict("specificity", labels, predictions))
    return _safe_ratio("specificity", tn, tn + fp, "no negative (label 0) examples")


def _mcc(tn: int, fp: int, fn: int, tp: int) -> float:
    den = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return 0.0 if den == 0 else (tp * tn - fp * fn) / math.sqrt(den)


def mcc(labels: Any, predictions: Any) -> float:
    """Matthews correlation coefficient in [-1, 1]; 0 by convention when undefined.

    ``(TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))``.

    Example:
        >>> mcc([0, 0, 1, 1], [0, 0, 1, 1])
        1.0
    """
    return _mcc(*_counts(*_predict("mcc", labels, predictions)))


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    """Mann–Whitney AUC with mid-ranks (ties count 1/2); assumes both classes present."""
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    midranks = ends - (counts - 1) / 2.0  # 1-based average rank of each distinct value
    ranks = midranks[inverse.reshape(-1)]
    n1 = int(y.sum())
    n0 = y.size - n1
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def roc_auc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve, ``P(s⁺ > s⁻) + ½ P(s⁺ = s⁻)`` (Mann–Whitney U / (n₁ n₀)).

    Computed from mid-ranks in O(N log N); equals the trapezoidal area under :func:`roc_curve`.
    Raises ``ValueError`` unless both classes are present.

    Example:
        >>> roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
        0.75
    """
    y, s = _pair("roc_auc", labels, scores, "scores")
    n1 = int(y.sum())
    if n1 == 0 or n1 == y.size:
        raise ValueError(
            f"roc_auc: undefined, labels contain only class {int(y[0])} ({y.size} examples)"
        )
    return _auc(y, s)


class RocCurve(NamedTuple):
    """ROC curve points, from ``(0, 0)`` (threshold +inf) to ``(1, 1)``.

    Attributes:
        fpr: false-positive rates ``(M,)``, non-decreasing.
        tpr: true-positive rates ``(M,)``, non-decreasing.
        thresholds: ``(M,)``, decreasing; point ``m`` predicts positive when
            ``score >= thresholds[m]``.
    """

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


def roc_curve(labels: Any, scores: Any) -> RocCurve:
    """ROC curve at every distinct score; raises unless both classes are present.

    Example:
        >>> roc_curve([0, 1], [0.2, 0.7]).tpr.tolist()
        [0.0, 1.0, 1.0]
    """
    y, s = _pair("roc_curve", labels, scores, "scores")
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        raise ValueError(
            f"roc_curve: undefined, labels contain only class {int(y[0])} ({y.size} examples)"
        )
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], y.size - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    return RocCurve(
        fpr=np.r_[0.0, fp / n0], tpr=np.r_[0.0, tp / n1], thresholds=np.r_[np.inf, s[last]]
    )


def _all_metrics(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, float]:
    """Every metric, NaN where undefined (no raising)."""
    tn, fp, fn, tp = _counts(y, (s >= threshold).astype(np.int64))
    n1, n0 = tp + fn, tn + fp
    return {
        "accuracy": (tp + tn) / y.size,
        "sensitivity": tp / n1 if n1 else math.nan,
        "specificity": tn / n0 if n0 else math.nan,
        "mcc": _mcc(tn, fp, fn, tp),
        "roc_auc": _auc(y, s) if n1 and n0 else math.nan,
    }


def _nan_notes(n1: int, n0: int) -> tuple[str, ...]:
    notes = []
    if n1 == 0:
        notes.append("no positive examples: sensitivity and roc_auc undefined (nan); mcc set to 0")
    if n0 == 0:
        notes.append("no negative examples: specificity and roc_auc undefined (nan); mcc set to 0")
    return tuple(notes)


def _json_float(x: float) -> float | None:
    return None if isinstance(x, float) and math.isnan(x) else x


@dataclass(frozen=True)
class BinaryMetrics:
    """Point estimates of the clinical metrics at one threshold.

    Attributes:
        n, n_positive, n_negative: example counts.
        threshold: positive iff ``score >= threshold``.
        accuracy, sensitivity, specificity, mcc, roc_auc: the metrics (nan where undefined).
        confusion: ``((TN, FP), (FN, TP))``.
        notes: why any value is nan (empty when all are defined).
    """

    n: int
    n_positive: int
    n_negative: int
    threshold: float
    accuracy: float
    sensitivity: float
    specificity: float
    mcc: float
    roc_auc: float
    confusion: tuple[tuple[int, int], tuple[int, int]]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A strict-JSON-serialisable dict (nan → None, tuples → lists)."""
        d = asdict(self)
        d["confusion"] = [list(row) for row in self.confusion]
        d["notes"] = list(self.notes)
        return {k: _json_float(v) for k, v in d.items()}


def _check_threshold(fn: str, threshold: Any) -> float:
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or math.isnan(threshold)
    ):
        raise ValueError(
            f"{fn}: threshold must be a real number (0.5 for probabilities, 0 for logits), "
            f"got {threshold!r}"
        )
    return float(threshold)


def binary_metrics(labels: Any, scores: Any, *, threshold: float = 0.5) -> BinaryMetrics:
    """Accuracy, sensitivity, specificity, MCC, ROC-AUC and the confusion matrix, in one call.

    Args:
        labels: ``(N,)`` in {0, 1}, 1 = disease.
        scores: ``(N,)`` real; probabilities of class 1 (``threshold=0.5``) or logit differences
            (``threshold=0``).
        threshold: positive iff ``score >= threshold``.

    Example:
        >>> m = binary_metrics([0, 0, 1, 1], [0.1, 0.6, 0.7, 0.9])
        >>> m.accuracy, m.sensitivity, m.specificity, m.roc_auc
        (0.75, 1.0, 0.5, 1.0)
    """
    fn = "binary_metrics"
    threshold = _check_threshold(fn, threshold)
    y, s = _pair(fn, labels, scores, "scores")
    tn, fp, fneg, tp = _counts(y, (s >= threshold).astype(np.int64))
    values = _all_metrics(y, s, threshold)
    return BinaryMetrics(
        n=int(y.size),
        n_positive=tp + fneg,
        n_negative=tn + fp,
        threshold=threshold,
        confusion=((tn, fp), (fneg, tp)),
        notes=_nan_notes(tp + fneg, tn + fp),
        **values,
    )


@dataclass(frozen=True)
class ConfidenceInterval:
    """A percentile bootstrap interval.

    Attributes:
        estimate: the metric on the full data (nan if undefined).
        lower, upper: the ``(1 ∓ confidence)/2`` quantiles of the bootstrap distribution.
        confidence: e.g. 0.95.
        num_resamples: resamples drawn.
        num_valid: resamples where the metric was defined (the quantiles use only these).
        note: why the interval is nan, if it is.
    """

    estimate: float
    lower: float
    upper: float
    confidence: float
    num_resamples: int
    num_valid: int
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A strict-JSON-serialisable dict (nan → None)."""
        return {k: _json_float(v) for k, v in asdict(self).items()}


def bootstrap_ci(
    labels: Any,
    scores: Any,
    *,
    seed: int,
    threshold: float = 0.5,
    num_resamples: int = 1000,
    confidence: float = 0.95,
    stratified: bool = True,
    progress: bool | None = False,
) -> dict[str, ConfidenceInterval]:
    """Percentile bootstrap confidence intervals for every metric of :func:`binary_metrics`.

    Each resample draws N examples with replacement; with ``stratified=True`` (the default, as in
    pROC) it draws ``n_positive`` positives and ``n_negative`` negatives separately, so every
    resample has both classes. Resamples where a metric is undefined are left out of its quantiles
    and counted in ``num_valid``.

    Args:
        labels, scores, threshold: as in :func:`binary_metrics`.
        seed: seed of ``numpy.random.default_rng`` (keyword-only, required; 0 is valid).
        num_resamples: B >= 1 (1000 is usual; 2000+ for 99% intervals).
        confidence: in (0, 1).
        stratified: resample within each class.
        progress: show a ``tqdm.auto`` bar over the resamples (None: when stderr is a terminal; see
            :mod:`dpfunc._progress`).

    Returns:
        ``{"accuracy", "sensitivity", "specificity", "mcc", "roc_auc"} -> ConfidenceInterval``.

    Example:
        >>> ci = bootstrap_ci([0, 0, 1, 1, 1], [0.2, 0.6, 0.5, 0.8, 0.9], seed=0, num_resamples=200)
        >>> ci["roc_auc"].lower <= ci["roc_auc"].estimate <= ci["roc_auc"].upper
        True
    """
    fn = "bootstrap_ci"
    threshold = _check_threshold(fn, threshold)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"{fn}: seed must be an int (0 is valid), got {seed!r}")
    if isinstance(num_resamples, bool) or not isinstance(num_resamples, int) or num_resamples < 1:
        raise ValueError(f"{fn}: num_resamples must be an int >= 1, got {num_resamples!r}")
    if not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
        raise ValueError(f"{fn}: confidence must be in (0, 1), e.g. 0.95, got {confidence!r}")
    y, s = _pair(fn, labels, scores, "scores")
    rng = np.random.default_rng(seed)
    draw: Callable[[], np.ndarray]
    if stratified:
        pos, neg = np.nonzero(y == 1)[0], np.nonzero(y == 0)[0]

        def draw() -> np.ndarray:
            parts = [g[rng.integers(0, g.size, g.size)] for g in (pos, neg) if g.size]
            return np.concatenate(parts)
    else:

        def draw() -> np.ndarray:
            return rng.integers(0, y.size, y.size)

    estimates = _all_metrics(y, s, threshold)
    samples: dict[str, list[float]] = {name: [] for name in estimates}
    from dpfunc._progress import progress as progress_bar

    for _ in progress_bar(range(num_resamples), enabled=progress, desc="bootstrap", unit="resample", delay=0.5):
        idx = draw()
        for name, value in _all_metrics(y[idx], s[idx], threshold).items():
            samples[name].append(value)
    alpha = (1.0 - confidence) / 2.0
    out = {}
    for name, values in samples.items():
        v = np.asarray(values)
        v = v[~np.isnan(v)]
        if v.size:
            lower, upper = (float(q) for q in np.quantile(v, [alpha, 1.0 - alpha]))
            note = ""
        else:
            lower = upper = math.nan
            note = f"{name} undefined in every resample (one class only)"
        out[name] = ConfidenceInterval(
            estimate=float(estimates[name]),
            lower=lower,
            upper=upper,
            confidence=float(confidence),
            num_resamples=num_resamples,
            num_valid=int(v.size),
            note=note,
        )
    return out
