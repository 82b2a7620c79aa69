"""How a segmenter is judged (shared.evaluation.segmentation): Dice, components, the largest component's place."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

from shared.evaluation import segmentation
from shared.evaluation.segmentation import score_labels, summarise


def _truth():
    t = np.zeros((6, 20, 20), np.uint8)
    t[2:4, 5:10, 5:10] = 1
    t[2:4, 4, 5:10] = 2
    return t


def test_docstring_example_holds():
    assert doctest.testmod(segmentation).failed == 0


def test_specks_elsewhere_keep_the_largest_component_on_the_lesion_but_count_as_false_ml():
    pred = _truth().copy()
    pred[0, 15, 15] = pred[5, 0, 0] = 1
    s = score_labels(pred, _truth(), voxel_ml=0.5)
    assert s.ich_components == 3 and s.largest_on_lesion is True
    assert s.false_ich_ml == pytest.approx(1.0) and s.phe_dice == pytest.approx(1.0)


def test_a_larger_false_blob_moves_the_crop_off_the_lesion():
    pred = _truth().copy()
    pred[0:2, 12:19, 12:19] = 1  # 98 voxels, larger than the 50-voxel lesion
    s = score_labels(pred, _truth(), voxel_ml=1.0)
    assert s.largest_on_lesion is False and s.ich_ml_error > 1.0


def test_summary_counts_a_case_without_ich_as_a_miss_and_pools_false_ml():
    hit = score_labels(_truth(), _truth(), 1.0)
    empty = score_labels(np.zeros_like(_truth()), _truth(), 1.0)
    assert empty.largest_on_lesion is None and empty.ich_dice == 0.0
    out = summarise([hit, empty], flagged=[False, True])
    assert out["largest_on_lesion_share"] == 0.5 and out["flagged_share"] == 0.5 and out["false_ich_share"] == 0.0
    assert out["median_ich_dice"] == pytest.approx(0.5)
