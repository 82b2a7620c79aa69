"""The volume baseline (issue 19): a logistic regression on log ICH ml, log PHE ml and log(PHE/ICH)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from shared.models.volume_baseline import FLOOR_ML, VolumeBaseline, volume_features


def _cohort(n: int, seed: int):
    """PHE about twice as large in the neoplastic class at the same ICH volume (the paper's Table 1 pattern)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    ich = np.exp(rng.normal(np.log(6.3), 1.0, n))
    phe = ich * np.exp(rng.normal(np.where(y == 1, 1.3, 0.5), 0.6))
    return ich, phe, y


def test_features_are_log_volumes_and_their_ratio_with_a_floor():
    f = volume_features([10.0, 0.0], [20.0, 5.0])
    assert f[0] == pytest.approx([np.log(10), np.log(20), np.log(2)])
    assert f[1][0] == pytest.approx(np.log(FLOOR_ML))  # no ICH: floored, finite
    assert np.isfinite(f).all()
    with pytest.raises(ValueError):
        volume_features([1.0, 2.0], [1.0])


def test_fit_learns_the_edema_signal_and_round_trips_through_json():
    ich, phe, y = _cohort(400, 0)
    model = VolumeBaseline.fit(ich, phe, y)
    ich2, phe2, y2 = _cohort(400, 1)
    p = model.p_neoplastic(ich2, phe2)
    assert roc_auc_score(y2, p) > 0.75  # held-out cases, not the training ones
    assert model.coef[2] > 0  # more edema per ml of blood -> neoplastic
    again = VolumeBaseline.from_dict(json.loads(json.dumps(model.to_dict())))
    assert np.array_equal(again.p_neoplastic(ich2, phe2), p)


def test_one_class_cannot_be_fitted():
    with pytest.raises(ValueError, match="both classes"):
        VolumeBaseline.fit([1.0, 2.0, 3.0], [2.0, 3.0, 4.0], [1, 1, 1])
