"""Metrics against hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
from sklearn.metrics import roc_auc_score

from shared.evaluation.metrics import (
    _auc_rows,
    best_threshold,
    classification_metrics,
    dice,
    dice_summary,
    paper_table,
    roc_points,
    segmentation_summary,
)
from shared.plumbing.errors import IchfedError

# Six cases, sorted by p:      neg  neg  POS  neg  POS  POS
Y = [0, 0, 1, 0, 1, 1]
P = [0.1, 0.2, 0.3, 0.4, 0.6, 0.8]


def test_auc_by_hand():
    # 3 x 3 positive/negative pairs; positive above negative in:
    # 0.3 > {0.1, 0.2} (2), 0.6 > all 3, 0.8 > all 3  ->  8 / 9
    m = classification_metrics(Y, P, threshold=0.6, n_boot=0)
    assert m["auc"] == pytest.approx(8 / 9)
    assert (m["n"], m["n_pos"], m["n_neg"]) == (6, 3, 3)


def test_best_threshold_maximises_sensitivity_times_specificity():
    # threshold: sens x spec
    #   0.8: 1/3 x 1   = 0.333
    #   0.6: 2/3 x 1   = 0.667  <- tie, highest threshold wins
    #   0.4: 2/3 x 2/3 = 0.444
    #   0.3: 1   x 2/3 = 0.667
    #   0.2: 1   x 1/3 = 0.333
    #   0.1: 1   x 0   = 0
    t = best_threshold(Y, P)
    assert t.p == pytest.approx(0.6)
    assert t.log_p == pytest.approx(math.log(0.6))  # -0.511
    assert t.sensitivity == pytest.approx(2 / 3)
    assert t.specificity == pytest.approx(1.0)
    assert t.reason is None


def test_paper_style_log_threshold():
    # Separable scores: any threshold between the classes is perfect; the highest candidate
    # is the lowest positive score, exp(-1.5) = 0.2231, i.e. the paper's -1.5 on the log scale.
    y = [0, 0, 0, 1, 1]
    p = [0.05, 0.1, 0.2, math.exp(-1.5), 0.9]
    t = best_threshold(y, p)
    assert t.log_p == pytest.approx(-1.5)
    assert (t.sensitivity, t.specificity) == (1.0, 1.0)


def test_confusion_and_rates_at_a_threshold():
    # at 0.6: predicted positive {0.6, 0.8} -> tp 2, fp 0; negatives {0.1, 0.2, 0.4} -> tn 3, fn 1 (0.3)
    m = classification_metrics(Y, P, threshold=0.6, n_boot=0)
    assert m["confusion"] == {"tp": 2, "fp": 0, "tn": 3, "fn": 1}
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1.0)
    assert m["threshold"] == 0.6 and m["threshold_log_p"] == pytest.approx(math.log(0.6))
    # p == threshold counts as positive: at 0.3, the 0.3 positive is a tp and 0.4 an fp
    m = classification_metrics(Y, P, threshold=0.3, n_boot=0)
    assert m["confusion"] == {"tp": 3, "fp": 1, "tn": 2, "fn": 0}


def test_one_class_gives_none_with_reasons_not_a_crash():
    y, p = [1, 1, 1], [0.2, 0.7, 0.9]
    m = classification_metrics(y, p, threshold=0.5, n_boot=200)
    assert m["auc"] is None and "no negative cases" in m["reasons"]["auc"]
    assert m["specificity"] is None and m["reasons"]["specificity"] == "no negative cases"
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["ci"]["auc"] is None and m["ci_n"]["auc"] == 0 and "ci.auc" in m["reasons"]
    assert m["ci"]["specificity"] is None
    t = best_threshold(y, p)
    assert t.p is None and t.log_p is None and "both classes" in t.reason
    assert roc_points(y, p) == ([], [])


def test_no_threshold_leaves_threshold_metrics_undefined():
    m = classification_metrics(Y, P, threshold=None, n_boot=50)
    assert m["auc"] == pytest.approx(8 / 9)
    for name in ("accuracy", "sensitivity", "specificity", "confusion"):
        assert m[name] is None and m["reasons"][name] == "no threshold"
    assert m["ci"]["auc"] is not None and m["ci"]["accuracy"] is None


def test_empty_input():
    m = classification_metrics([], [], threshold=0.5, n_boot=10)
    assert m["n"] == 0 and m["auc"] is None and m["accuracy"] is None
    assert m["reasons"]["accuracy"] == "no cases"


def test_bootstrap_perfect_classifier_has_degenerate_ci():
    # Every resample of a perfectly separated set is still perfect (or lacks a class).
    y = [0] * 10 + [1] * 10
    p = [0.1] * 10 + [0.9] * 10
    m = classification_metrics(y, p, threshold=0.5, n_boot=300, seed=3)
    for name in ("auc", "accuracy", "sensitivity", "specificity"):
        assert m["ci"][name] == [1.0, 1.0]


def test_bootstrap_is_seeded_and_skips_one_class_resamples():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    p = np.clip(0.5 * y + rng.normal(0.25, 0.25, 60), 0, 1)
    a = classification_metrics(y, p, 0.5, n_boot=400, seed=11)
    b = classification_metrics(y, p, 0.5, n_boot=400, seed=11)
    c = classification_metrics(y, p, 0.5, n_boot=400, seed=12)
    assert a["ci"] == b["ci"]
    assert a["ci"] != c["ci"]
    for name in ("auc", "accuracy", "sensitivity", "specificity"):
        lo, hi = a["ci"][name]
        assert lo <= a[name] <= hi and lo < hi
    # Two cases, one of each class: a resample has both classes with probability 1/2.
    tiny = classification_metrics([0, 1], [0.3, 0.7], 0.5, n_boot=1000, seed=0)
    assert 400 < tiny["ci_n"]["auc"] < 600
    assert tiny["ci_n"]["accuracy"] == 1000


def test_vectorised_bootstrap_auc_equals_sklearn_with_ties():
    rng = np.random.default_rng(5)
    yb = rng.integers(0, 2, (50, 25))
    sb = rng.integers(0, 6, (50, 25)) / 5.0  # many ties
    pos = yb.sum(axis=1)
    got = _auc_rows(yb, sb, pos, yb.shape[1] - pos)
    for row in range(50):
        if 0 < pos[row] < yb.shape[1]:
            assert got[row] == pytest.approx(roc_auc_score(yb[row], sb[row]))
        else:
            assert np.isnan(got[row])


def test_bad_input_is_a_one_line_error():
    with pytest.raises(IchfedError, match=r"^y_true: labels must be 0 or 1"):
        classification_metrics([0, 2], [0.1, 0.2], 0.5)
    with pytest.raises(IchfedError, match=r"^p: probabilities must lie in \[0, 1\]"):
        best_threshold([0, 1], [-0.5, 0.2])
    with pytest.raises(IchfedError, match=r"lengths differ"):
        classification_metrics([0, 1, 1], [0.1, 0.2], 0.5)
    with pytest.raises(IchfedError, match=r"^threshold:"):
        classification_metrics([0, 1], [0.1, 0.2], 1.5)


def test_roc_points():
    fpr, tpr = roc_points(Y, P)
    assert fpr[0] == 0.0 and tpr[0] == 0.0 and fpr[-1] == 1.0 and tpr[-1] == 1.0
    assert len(fpr) == len(tpr)
    # area under these points is the AUC (trapezoids)
    assert np.trapezoid(tpr, fpr) == pytest.approx(8 / 9)


def test_dice_by_hand():
    pred = np.array([1, 1, 0, 0, 2, 2])
    truth = np.array([1, 0, 0, 2, 2, 0])
    assert dice(pred, truth, 1) == pytest.approx(2 * 1 / (2 + 1))  # |P|=2 |T|=1 overlap 1
    assert dice(pred, truth, 2) == pytest.approx(2 * 1 / (2 + 2))  # |P|=2 |T|=2 overlap 1
    assert dice(pred, truth, 3) is None  # both empty
    assert dice(np.array([1, 0]), np.array([0, 0]), 1) == 0.0  # one empty
    assert dice(pred, pred, 2) == 1.0


def test_dice_on_images_and_shape_mismatch():
    a = np.zeros((2, 3, 4), np.uint8)
    b = a.copy()
    a[0, :2, :2] = 1  # 4 voxels
    b[0, :2, :1] = 1  # 2 voxels, both inside a
    assert dice(sitk.GetImageFromArray(a), sitk.GetImageFromArray(b), 1) == pytest.approx(2 * 2 / 6)
    with pytest.raises(IchfedError, match=r"^pred/truth: shapes differ"):
        dice(a, np.zeros((2, 3, 5)), 1)


def test_dice_summary_by_hand():
    # values 1.0, 0.5, 0.0 -> mean 0.5, median 0.5, sample sd sqrt((0.25 + 0 + 0.25) / 2) = 0.5
    s = dice_summary([1.0, 0.5, None, 0.0])
    assert s["n"] == 3 and s["n_both_empty"] == 1
    assert s["mean"] == pytest.approx(0.5)
    assert s["median"] == pytest.approx(0.5)
    assert s["sd"] == pytest.approx(0.5)
    assert (s["min"], s["max"]) == (0.0, 1.0)
    one = dice_summary([0.8])
    assert one["sd"] is None and "sd" in one["reasons"]
    none = dice_summary([None, None])
    assert none["n"] == 0 and none["n_both_empty"] == 2 and none["mean"] is None


def test_segmentation_summary_per_label():
    truth = np.array([1, 1, 2, 2, 0])
    case_a = (np.array([1, 1, 2, 2, 0]), truth)  # ich 1.0, phe 1.0
    case_b = (np.array([1, 0, 0, 0, 0]), truth)  # ich 2*1/3, phe 0.0
    s = segmentation_summary([case_a, case_b])
    assert s["ich"]["mean"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert s["phe"]["mean"] == pytest.approx(0.5)
    assert s["phe"]["min"] == 0.0


def test_paper_table():
    m = classification_metrics(Y, P, threshold=0.6, n_boot=200, seed=0)
    none = classification_metrics([1, 1], [0.6, 0.9], threshold=0.5, n_boot=0)
    table = paper_table([("Internal test", m), {"name": "One class", **none}])
    lines = table.strip().splitlines()
    assert lines[0] == "| Cohort | n | AUC | Accuracy | Sensitivity | Specificity |"
    assert len(lines) == 4
    lo, hi = m["ci"]["auc"]
    assert lines[2].startswith(f"| Internal test | 6 | 0.89 ({lo:.2f}–{hi:.2f}) | 0.83 (")
    # undefined values print as n/a; defined ones without a CI print bare
    assert lines[3] == "| One class | 2 | n/a | 1.00 | 1.00 | n/a |"
