"""Out-of-sample threshold rule (shared.evaluation.metrics) and probability calibration (shared.evaluation.calibration)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from shared.evaluation.calibration import (
    Calibration,
    calibration_error,
    operating_point_summary,
    reliability_from_histograms,
    reliability_points,
)
from shared.evaluation.metrics import best_threshold, midpoint_threshold, snap_threshold
from shared.evaluation.rocstats import score_histogram
from shared.plumbing.errors import IchfedError


def test_midpoint_threshold_sits_between_neighbouring_scores_and_keeps_the_operating_point():
    y = [0, 0, 1, 0, 1, 1, 0, 1]
    p = [0.10, 0.20, 0.40, 0.35, 0.70, 0.90, 0.80, 0.30]
    on_score = best_threshold(y, p)
    mid = midpoint_threshold(y, p)
    assert on_score.p == 0.40  # the observed score of the weakest positive called positive
    assert mid.p == pytest.approx(0.375) and mid.p not in p
    assert mid.log_p == pytest.approx(math.log(mid.p))
    assert (mid.sensitivity, mid.specificity) == (on_score.sensitivity, on_score.specificity)
    # Perfect separation: the cut lands midway in the gap, not on the lowest positive.
    assert midpoint_threshold([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]).p == pytest.approx(0.5)
    # Tied scores count once: the neighbour of 0.6 is the distinct score 0.2.
    assert midpoint_threshold([1, 0, 1, 0], [0.2, 0.2, 0.6, 0.2]).p == pytest.approx(0.4)
    assert midpoint_threshold([1, 1], [0.2, 0.3]).p is None


def test_snap_threshold_rounds_to_the_grid_inside_the_open_interval():
    assert snap_threshold(0.123456) == 0.12
    assert snap_threshold(0.0) == 0.01 and snap_threshold(1.0) == 0.99
    assert snap_threshold(0.4449, grid=0.05) == 0.45
    with pytest.raises(IchfedError, match="threshold"):
        snap_threshold(1.5)


def _toy_site(seed: int, n: int):
    rng = np.random.default_rng(seed)
    mu = np.zeros(30)
    mu[:5] = 0.8

    def draw(k):
        y = np.r_[np.ones(k // 2, int), np.zeros(k - k // 2, int)]
        return rng.normal(size=(k, 30)) + np.outer(y, mu), y

    return draw(n), draw(400)


def test_out_of_fold_midpoint_threshold_is_sensible_on_held_out_cases_where_in_sample_is_not():
    """A head that separates its 24 fine-tune cases: the in-sample cut is far too strict."""
    sens_in, sens_oof, bal_in, bal_oof = [], [], [], []
    for seed in range(6):
        (xf, yf), (xh, yh) = _toy_site(seed, 24)
        head = LogisticRegression(C=1.0, max_iter=2000).fit(xf, yf)
        in_sample = head.predict_proba(xf)[:, 1]
        assert best_threshold(yf, in_sample).sensitivity == 1.0  # separates its own cases
        folds = StratifiedKFold(5, shuffle=True, random_state=0)
        oof = cross_val_predict(LogisticRegression(C=1.0, max_iter=2000), xf, yf, cv=folds, method="predict_proba")
        ph = head.predict_proba(xh)[:, 1]
        for t, sens, bal in (
            (best_threshold(yf, in_sample).p, sens_in, bal_in),
            (midpoint_threshold(yf, oof[:, 1]).p, sens_oof, bal_oof),
        ):
            se, sp = np.mean(ph[yh == 1] >= t), np.mean(ph[yh == 0] < t)
            sens.append(se)
            bal.append((se + sp) / 2)
    assert np.mean(sens_in) < 0.55  # the strict in-sample cut misses most new positives
    assert np.mean(sens_oof) > np.mean(sens_in) + 0.1
    assert np.mean(sens_oof) > 0.5 and np.mean(bal_oof) >= np.mean(bal_in) - 0.01


def test_platt_calibration_fixes_overconfident_scores_and_round_trips():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 4000)
    # Classes N(+1, 1) vs N(-1, 1): the true log-odds are 2 x latent; the scores claim 4 x latent.
    latent = rng.normal(size=y.size) + 2.0 * y - 1.0
    overconfident = 1 / (1 + np.exp(-4.0 * latent))  # 4x the log-odds
    cal = Calibration.fit(y, overconfident)
    assert cal.kind == "platt" and cal.slope == pytest.approx(0.5, rel=0.1)
    neg, pos = score_histogram(y, overconfident, bins=10)
    raw = calibration_error(reliability_from_histograms(neg, pos))
    neg_c, pos_c = score_histogram(y, cal(overconfident), bins=10)
    fixed = calibration_error(reliability_from_histograms(neg_c, pos_c))
    assert fixed < raw / 2 and fixed < 0.05
    assert Calibration.from_dict(cal.to_dict()) == cal
    assert np.all(np.diff(cal(np.linspace(0.01, 0.99, 50))) > 0)  # monotone: AUC unchanged


def test_platt_on_perfectly_separated_scores_stays_finite_and_small_sites_get_identity():
    cal = Calibration.fit([0, 0, 0, 1, 1, 1], [0.01, 0.02, 0.03, 0.97, 0.98, 0.99])
    out = cal([0.01, 0.99])
    assert cal.kind == "platt" and 0.05 < out[0] < out[1] < 0.95  # smoothed targets, not a step
    ident = Calibration.fit([0, 1, 1], [0.2, 0.7, 0.9])
    assert ident.kind == "identity" and "2 cases of each class" in ident.reason
    assert ident(0.3) == pytest.approx(0.3)
    assert Calibration.from_dict(None).kind == "identity"
    with pytest.raises(IchfedError, match="unknown fields"):
        Calibration.from_dict({"kind": "platt", "slop": 1})


def test_reliability_and_operating_point_from_histograms():
    neg = [4, 3, 1, 0]
    pos = [0, 1, 3, 4]
    pts = reliability_from_histograms(neg, pos)
    assert pts[0] == (0.125, 0.0, 4) and pts[-1] == (0.875, 1.0, 4)
    op = operating_point_summary(neg, pos, 0.5)
    assert op["ppv"] == pytest.approx(7 / 8) and op["npv"] == pytest.approx(7 / 8)
    assert op["n_called_positive"] == 8
    with pytest.raises(IchfedError):
        reliability_from_histograms([1], [1, 2])


def test_reliability_points_use_the_mean_score_per_bin():
    pts = reliability_points([0, 1, 1, 0], [0.02, 0.04, 0.95, 0.91], bins=10)
    assert pts[0] == (pytest.approx(0.03), 0.5, 2) and pts[1] == (pytest.approx(0.93), 0.5, 2)
