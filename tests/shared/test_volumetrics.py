"""Volumetrics on analytic shapes: boxes of known voxel count, spacing and HU."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from shared.imaging.volumetrics import Volumetrics, ich_components, measure
from shared.plumbing.errors import IchfedError


def _image(arr_zyx: np.ndarray, spacing=(0.5, 0.8, 5.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(arr_zyx)
    img.SetSpacing(spacing)
    img.SetOrigin((-12.0, 30.0, 4.0))
    return img


def _pair(hu: np.ndarray, labels: np.ndarray, spacing=(0.5, 0.8, 5.0)) -> tuple[sitk.Image, sitk.Image]:
    image = _image(hu.astype(np.float32), spacing)
    mask = _image(labels.astype(np.uint8), spacing)
    return image, mask


def test_box_volumes_are_exact_ml():
    # voxel = 0.5 * 0.8 * 5.0 = 2.0 mm^3
    # ICH box 5 (z) x 20 (y) x 10 (x) = 1000 voxels -> 2000 mm^3 = 2.0 ml
    # PHE: the 7 x 22 x 12 shell around it minus the ICH = 1848 - 1000 = 848 voxels -> 1.696 ml
    labels = np.zeros((12, 40, 30), np.uint8)
    labels[2:9, 4:26, 4:16] = 2
    labels[3:8, 5:25, 5:15] = 1
    image, mask = _pair(np.full(labels.shape, 40.0), labels)
    v = measure(image, mask)
    assert v.ich_ml == pytest.approx(2.0, rel=1e-12)
    assert v.phe_ml == pytest.approx(848 * 2.0 / 1000, rel=1e-12)
    assert v.n_components == 1


def test_hu_mean_and_median_per_label():
    labels = np.zeros((4, 6, 6), np.uint8)
    hu = np.full(labels.shape, -1000.0)
    # ICH: 3 voxels at 10, 20, 90 HU -> mean 40, median 20
    labels[1, 1, 1:4] = 1
    hu[1, 1, 1:4] = [10.0, 20.0, 90.0]
    # PHE: 4 voxels at 5, 5, 15, 25 HU -> mean 12.5, median 10
    labels[2, 3, 1:5] = 2
    hu[2, 3, 1:5] = [5.0, 5.0, 15.0, 25.0]
    v = measure(*_pair(hu, labels))
    assert v.ich_mean_hu == pytest.approx(40.0)
    assert v.ich_median_hu == pytest.approx(20.0)
    assert v.phe_mean_hu == pytest.approx(12.5)
    assert v.phe_median_hu == pytest.approx(10.0)


def test_empty_regions_give_zero_ml_and_no_hu():
    labels = np.zeros((4, 6, 6), np.uint8)
    labels[1, 1, 1] = 2
    v = measure(*_pair(np.full(labels.shape, 30.0), labels))
    assert v.ich_ml == 0.0
    assert v.ich_mean_hu is None and v.ich_median_hu is None
    assert v.n_components == 0
    assert v.phe_mean_hu == pytest.approx(30.0)


def test_components_counted_in_3d_with_face_connectivity():
    labels = np.zeros((6, 12, 12), np.uint8)
    labels[1:3, 1:4, 1:4] = 1  # bleed A (18 voxels)
    labels[3, 4, 4] = 1  # touches A only at a corner: a separate bleed
    labels[1:5, 8:11, 8:11] = 1  # bleed B (36 voxels), the largest
    labels[3, 8, 5:8] = 1  # a 3-voxel spur face-connected to B, clear of A
    v = measure(*_pair(np.zeros(labels.shape), labels))
    assert v.n_components == 3
    comps, n = ich_components(_image(labels))
    arr = sitk.GetArrayFromImage(comps)
    assert n == 3
    # largest first: B plus its attached bridge (36 + 3 voxels)
    assert int((arr == 1).sum()) == 39
    assert int((arr == 2).sum()) == 18
    assert int((arr == 3).sum()) == 1


def test_float_mask_and_to_dict():
    labels = np.zeros((3, 4, 4), np.float32)
    labels[1, 1, 1] = 1.0
    labels[1, 2, 2] = 2.0
    image = _image(np.full(labels.shape, 55.0, np.float32), (1.0, 1.0, 1.0))
    mask = _image(labels, (1.0, 1.0, 1.0))
    d = measure(image, mask).to_dict()
    assert d == {
        "ich_ml": 0.001,
        "phe_ml": 0.001,
        "ich_mean_hu": 55.0,
        "ich_median_hu": 55.0,
        "phe_mean_hu": 55.0,
        "phe_median_hu": 55.0,
        "n_components": 1,
    }
    assert isinstance(measure(image, mask), Volumetrics)


def test_mismatched_grid_is_a_one_line_error():
    image = _image(np.zeros((3, 4, 4), np.float32))
    with pytest.raises(IchfedError, match=r"^mask: size .* does not match"):
        measure(image, _image(np.zeros((3, 4, 5), np.uint8)))
    with pytest.raises(IchfedError, match=r"^mask: spacing"):
        measure(image, _image(np.zeros((3, 4, 4), np.uint8), (1.0, 1.0, 1.0)))
