"""Clinical metrics: hand-computed values, brute-force oracles, degenerate cases, bootstrap."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from dpfunc.metrics import (
    BinaryMetrics,
    accuracy,
    binary_metrics,
    bootstrap_ci,
    confusion_matrix,
    mcc,
    roc_auc,
    roc_curve,
    sensitivity,
    specificity,
)

# 7 examples: 3 normal, 4 pneumonia. Threshold 0.5.
LABELS = [0, 0, 0, 1, 1, 1, 1]
SCORES = [0.1, 0.6, 0.3, 0.8, 0.4, 0.9, 0.5]
PREDS = [0, 1, 0, 1, 0, 1, 1]  # TN=2, FP=1, FN=1, TP=3


def test_hand_computed_values():
    assert confusion_matrix(LABELS, PREDS).tolist() == [[2, 1], [1, 3]]
    assert accuracy(LABELS, PREDS) == pytest.approx(5 / 7)
    assert sensitivity(LABELS, PREDS) == pytest.approx(3 / 4)
    assert specificity(LABELS, PREDS) == pytest.approx(2 / 3)
    assert mcc(LABELS, PREDS) == pytest.approx((3 * 2 - 1 * 1) / math.sqrt(4 * 4 * 3 * 3))  # 5/12
    # positives 0.8, 0.4, 0.9, 0.5 vs negatives 0.1, 0.6, 0.3: wins 3 + 2 + 3 + 2 = 10 of 12
    assert roc_auc(LABELS, SCORES) == pytest.approx(10 / 12)
    m = binary_metrics(LABELS, SCORES)
    assert (m.accuracy, m.sensitivity, m.specificity) == pytest.approx((5 / 7, 3 / 4, 2 / 3))
    assert m.confusion == ((2, 1), (1, 3)) and (m.n, m.n_positive, m.n_negative) == (7, 4, 3)
    assert m.notes == ()


def test_ties_count_half_and_threshold_is_inclusive():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]) == pytest.approx(3.5 / 4)
    assert roc_auc([0, 1], [0.5, 0.5]) == 0.5
    assert binary_metrics([0, 1], [0.5, 0.5]).sensitivity == 1.0  # 0.5 >= 0.5 is positive
    assert binary_metrics([0, 1], [-0.2, 0.1], threshold=0.0).accuracy == 1.0  # logits


def test_roc_curve_hand_example():
    curve = roc_curve([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9])
    assert curve.fpr.tolist() == [0.0, 0.0, 0.5, 1.0]
    assert curve.tpr.tolist() == [0.0, 0.5, 1.0, 1.0]
    assert curve.thresholds.tolist() == [math.inf, 0.9, 0.5, 0.1]


def _pairwise_auc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (pos.size * neg.size)


data = st.integers(2, 60).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 1), min_size=n, max_size=n),
        st.lists(st.integers(-4, 4), min_size=n, max_size=n),  # few values: many ties
    )
)


@given(data)
def test_auc_matches_pairwise_oracle_and_trapezoidal_roc(pair):
    y, s = np.array(pair[0]), np.array(pair[1], dtype=float) / 4
    assume(0 < y.sum() < y.size)
    auc = roc_auc(y, s)
    assert auc == pytest.approx(_pairwise_auc(y, s), abs=1e-12)
    curve = roc_curve(y, s)
    assert float(
        np.sum(np.diff(curve.fpr) * (curve.tpr[1:] + curve.tpr[:-1]) / 2)
    ) == pytest.approx(auc, abs=1e-12)
    assert (curve.fpr[0], curve.tpr[0], curve.fpr[-1], curve.tpr[-1]) == (0, 0, 1, 1)
    assert (np.diff(curve.fpr) >= 0).all() and (np.diff(curve.tpr) >= 0).all()
    assert roc_auc(y, -s) == pytest.approx(1 - auc, abs=1e-12)  # reversing the order
    assert roc_auc(y, np.exp(3 * s)) == pytest.approx(auc, abs=1e-12)  # rank-invariant


@given(data, st.floats(-1, 1))
def test_threshold_metrics_match_definitions(pair, threshold):
    y, s = np.array(pair[0]), np.array(pair[1], dtype=float) / 4
    p = (s >= threshold).astype(int)
    m = binary_metrics(y, s, threshold=threshold)
    assert m.accuracy == pytest.approx(np.mean(y == p))
    cm = confusion_matrix(y, p)
    assert cm.sum() == y.size and cm[1].sum() == y.sum()
    if y.any():
        assert m.sensitivity == pytest.approx(p[y == 1].mean())
    if (y == 0).any():
        assert m.specificity == pytest.approx(1 - p[y == 0].mean())
    # MCC is Pearson's correlation of labels and predictions (0 by convention when constant)
    expected = 0.0 if y.std() == 0 or p.std() == 0 else np.corrcoef(y, p)[0, 1]
    assert m.mcc == pytest.approx(expected, abs=1e-9)
    assert -1 <= m.mcc <= 1


def test_torch_inputs_are_accepted():
    y, s = torch.tensor(LABELS), torch.tensor(SCORES, requires_grad=True)
    assert roc_auc(y, s) == pytest.approx(10 / 12)
    assert binary_metrics(y.bool(), s.double()).accuracy == pytest.approx(5 / 7)


def test_single_class_raises_in_point_metrics_and_is_nan_with_reason_in_report():
    y, s = [1, 1, 1], [0.2, 0.7, 0.9]
    with pytest.raises(ValueError, match="roc_auc: undefined, labels contain only class 1"):
        roc_auc(y, s)
    with pytest.raises(ValueError, match="roc_curve: undefined"):
        roc_curve(y, s)
    with pytest.raises(ValueError, match="specificity: undefined, no negative"):
        specificity(y, [0, 1, 1])
    with pytest.raises(ValueError, match="sensitivity: undefined, no positive"):
        sensitivity([0, 0], [0, 1])
    m = binary_metrics(y, s)
    assert (
        math.isnan(m.roc_auc)
        and math.isnan(m.specificity)
        and m.sensitivity == pytest.approx(2 / 3)
    )
    assert m.mcc == 0.0 and any("no negative examples" in note for note in m.notes)
    d = json.loads(json.dumps(m.to_dict(), allow_nan=False))
    assert d["roc_auc"] is None and d["confusion"] == [[0, 0], [1, 2]]


@pytest.mark.parametrize(
    "labels, scores, fragment",
    [
        ([], [], "non-empty"),
        ([0, 1], [0.1], "shape of labels"),
        ([0, 2], [0.1, 0.2], "must be 0"),
        ([0, 1], [0.1, float("nan")], "without NaN"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
        (["a", "b"], [0.1, 0.2], "labels must be"),
    ],
)
def test_bad_inputs_raise_clear_errors(labels, scores, fragment):
    with pytest.raises(ValueError, match=fragment):
        binary_metrics(labels, scores)


def test_bootstrap_reproducible_and_consistent():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = y * 0.6 + rng.random(200)
    a = bootstrap_ci(y, s, seed=0, num_resamples=300)
    b = bootstrap_ci(y, s, seed=0, num_resamples=300)
    c = bootstrap_ci(y, s, seed=1, num_resamples=300)
    assert a == b and a["roc_auc"] != c["roc_auc"]
    point = binary_metrics(y, s)
    for name, ci in a.items():
        assert ci.estimate == pytest.approx(getattr(point, name))
        assert ci.lower <= ci.upper and ci.num_valid == ci.num_resamples == 300
        assert ci.lower <= ci.estimate + 0.05 and ci.estimate - 0.05 <= ci.upper
    assert 0.01 < a["roc_auc"].upper - a["roc_auc"].lower < 0.3
    json.dumps({k: v.to_dict() for k, v in a.items()}, allow_nan=False)


def test_bootstrap_perfect_classifier_and_narrowing_with_n():
    y = np.r_[np.zeros(50, int), np.ones(50, int)]
    ci = bootstrap_ci(y, y.astype(float), seed=3, num_resamples=100)
    assert (ci["roc_auc"].lower, ci["roc_auc"].upper) == (1.0, 1.0)
    rng = np.random.default_rng(0)
    widths = []
    for n in (100, 1600):
        yy = rng.integers(0, 2, n)
        ss = yy + rng.normal(0, 1, n)
        c = bootstrap_ci(yy, ss, seed=0, num_resamples=200)["roc_auc"]
        widths.append(c.upper - c.lower)
    assert widths[1] < widths[0] / 2  # ~1/sqrt(n): 4x narrower expected


def test_bootstrap_degenerate_cases_report_instead_of_crashing():
    ci = bootstrap_ci([1, 1, 1, 1], [0.1, 0.2, 0.8, 0.9], seed=0, num_resamples=50)
    assert (
        math.isnan(ci["roc_auc"].lower)
        and ci["roc_auc"].num_valid == 0
        and "undefined" in ci["roc_auc"].note
    )
    assert ci["sensitivity"].num_valid == 50
    # unstratified resampling of a tiny sample sometimes draws one class only: those are skipped
    ci = bootstrap_ci([0, 1, 1], [0.2, 0.9, 0.4], seed=0, num_resamples=200, stratified=False)
    assert 0 < ci["roc_auc"].num_valid < 200
    assert ci["roc_auc"].to_dict()["num_resamples"] == 200


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"seed": None}, "seed"),
        ({"seed": 0, "num_resamples": 0}, "num_resamples"),
        ({"seed": 0, "confidence": 1.0}, "confidence"),
        ({"seed": 0, "threshold": "0.5"}, "threshold"),
    ],
)
def test_bootstrap_argument_errors(kwargs, fragment):
    with pytest.raises(ValueError, match=f"bootstrap_ci: {fragment}"):
        bootstrap_ci(LABELS, SCORES, **kwargs)


def test_report_is_frozen():
    m = binary_metrics(LABELS, SCORES)
    assert isinstance(m, BinaryMetrics)
    with pytest.raises(AttributeError):
        m.accuracy = 1.0
