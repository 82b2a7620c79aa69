"""Slice and overlay rendering: orientation, windowing, overlays, best slice."""

from __future__ import annotations

import io

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from client.reader.render import WINDOWS, best_slice, make_view
from shared.plumbing.errors import IchfedError


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _pair(direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    """A 6-slice 40x30 image at 40 HU with a marked ICH/PHE lesion on slice 4."""
    hu = np.full((6, 30, 40), 40.0, dtype=np.float32)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[4, 10:20, 5:15] = 2
    labels[4, 12:18, 7:13] = 1
    labels[1, 2:4, 2:4] = 1  # a smaller second focus on another slice
    hu[labels == 1] = 70.0
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((0.5, 0.8, 5.0))
    image.SetDirection(direction)
    mask = sitk.GetImageFromArray(labels)
    mask.CopyInformation(image)
    return image, mask, hu, labels


def test_view_opens_on_the_slice_with_most_ich_and_reports_geometry():
    image, mask, _, _ = _pair()
    view = make_view(image, mask)
    d = view.describe()
    assert d["best_slice"] == 4
    assert (d["n_slices"], d["width"], d["height"]) == (6, 40, 30)
    assert d["aspect"] == pytest.approx((40 * 0.5) / (30 * 0.8))
    assert d["slices_with"] == {"ich": [1, 4], "phe": [4]}


def test_best_slice_falls_back_to_edema_then_middle():
    labels = np.zeros((5, 4, 4), np.uint8)
    assert best_slice(labels) == 2
    labels[3, 1, 1] = 2
    assert best_slice(labels) == 3


def test_brain_window_maps_0_to_80_hu_onto_grey_levels():
    image, mask, _, _ = _pair()
    view = make_view(image, mask)
    grey = _png(view.slice_png(4, "brain"))
    assert grey.shape == (30, 40) and grey.dtype == np.uint8
    assert grey[0, 0] == pytest.approx(40 / 80 * 255, abs=1)  # 40 HU: mid-grey
    assert grey[15, 10] == pytest.approx(70 / 80 * 255, abs=1)  # the 70 HU clot is near-white
    sub = _png(view.slice_png(4, "subdural"))
    lo, hi = WINDOWS["subdural"]
    assert sub[0, 0] == pytest.approx((40 - lo) / (hi - lo) * 255, abs=1)


def test_overlays_are_transparent_outside_the_label_with_an_opaque_edge():
    image, mask, _, labels = _pair()
    view = make_view(image, mask)
    ich = _png(view.overlay_png(4, "ich"))
    phe = _png(view.overlay_png(4, "phe"))
    assert ich.shape == (30, 40, 4)
    assert (ich[..., 3] > 0).sum() == (labels[4] == 1).sum()
    assert (phe[..., 3] > 0).sum() == (labels[4] == 2).sum()
    assert ich[12, 7, 3] == 255 and ich[15, 10, 3] < 255  # edge opaque, interior translucent
    assert tuple(ich[15, 10, :3]) == (0, 230, 64) and phe[10, 5, 0] == 255
    assert _png(view.overlay_png(0, "ich"))[..., 3].max() == 0


def test_images_are_turned_to_radiological_lps_whatever_the_stored_direction():
    # Stored RAS-like (x and y flipped): the lesion sits at high x index in the array, but in
    # LPS order it must come out mirrored, so the patient's right is on the viewer's left.
    image, mask, _, labels = _pair(direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    view = make_view(image, mask)
    np.testing.assert_array_equal(view.labels, labels[:, ::-1, ::-1])
    # The same physical voxel gets the same label whichever way the file stored it.
    point = image.TransformIndexToPhysicalPoint((10, 15, 4))
    idx = sitk.DICOMOrient(image, "LPS").TransformPhysicalPointToIndex(point)
    assert view.labels[idx[2], idx[1], idx[0]] == mask[10, 15, 4]


def test_bad_slice_window_or_label_is_a_user_error():
    image, mask, _, _ = _pair()
    view = make_view(image, mask)
    with pytest.raises(IchfedError, match="slice"):
        view.slice_png(6, "brain")
    with pytest.raises(IchfedError, match="window"):
        view.slice_png(0, "lung")
    with pytest.raises(IchfedError, match="label"):
        view.overlay_png(0, "sah")


def test_probe_reads_hu_and_label_of_one_voxel():
    image, mask, _, _ = _pair()
    view = make_view(image, mask)
    assert view.probe(4, 15, 10) == {"hu": 70, "label": "ich"}
    assert view.probe(4, 11, 6) == {"hu": 40, "label": "phe"}
    assert view.probe(4, 0, 0) == {"hu": 40, "label": None}
    with pytest.raises(IchfedError, match="outside"):
        view.probe(4, 30, 0)
