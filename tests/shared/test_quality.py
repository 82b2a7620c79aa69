"""Plausibility flags (`shared.imaging.quality`) on constructed label maps and on the real GE head."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from shared.imaging.quality import FLAGS, quality_flags
from shared.imaging.volumetrics import measure


def _volume(hu: np.ndarray, labels: np.ndarray, spacing=(1.0, 1.0, 5.0)):
    image = sitk.GetImageFromArray(hu.astype(np.float32))
    image.SetSpacing(spacing)
    mask = sitk.GetImageFromArray(labels.astype(np.uint8))
    mask.CopyInformation(image)
    return image, mask


def _head() -> tuple[np.ndarray, np.ndarray]:
    """A 64 x 64 x 12 head: 30 HU brain in a 1000 HU skull ring, air outside; no labels."""
    z, y, x = np.mgrid[0:12, 0:64, 0:64]
    r = np.hypot(y - 32, x - 32)
    hu = np.where(r < 26, 30.0, np.where(r < 30, 1000.0, -1000.0))
    return hu, np.zeros(hu.shape, np.uint8)


def _flags(hu, labels, removed=0.0):
    image, mask = _volume(hu, labels)
    return quality_flags(image, mask, measure(image, mask), removed)


def test_a_plausible_bleed_has_no_flags():
    hu, labels = _head()
    labels[4:8, 24:38, 24:38] = 2
    labels[4:8, 27:35, 27:35] = 1
    hu[labels == 1] = 65.0
    hu[labels == 2] = 18.0
    assert _flags(hu, labels) == []


def test_each_implausible_sign_is_named():
    hu, labels = _head()
    labels[4:8, 27:35, 27:35] = 1  # "ICH" on 30 HU brain
    assert _flags(hu, labels) == ["ich_hu_not_blood"]

    hu, labels = _head()
    labels[4:8, 24:38, 24:38] = 2
    labels[4:8, 27:35, 27:35] = 1
    hu[labels == 1] = 65.0
    hu[labels == 2] = -25.9  # fat called edema, as on the plain GE head
    assert _flags(hu, labels) == ["phe_hu_not_edema"]

    hu, labels = _head()
    for i in range(5):  # five separate blood-density specks of 2 ml each
        labels[1:9, 10 + 9 * i:15 + 9 * i, 30:35] = 1
    hu[labels == 1] = 60.0
    assert _flags(hu, labels) == ["many_components"]

    hu, labels = _head()
    labels[5, 31:33, 31:33] = 1  # 0.02 ml
    hu[labels == 1] = 60.0
    assert _flags(hu, labels) == ["small_lesion"]

    hu, labels = _head()
    labels[3:9, 24:40, 4:9] = 1  # along the inner table
    hu[labels == 1] = 60.0
    assert _flags(hu, labels) == ["touches_skull"]

    hu, labels = _head()
    labels[9:12, 27:37, 27:37] = 1  # through the last slice
    hu[labels == 1] = 60.0
    assert _flags(hu, labels) == ["touches_volume_edge"]

    hu, labels = _head()
    labels[4:8, 27:35, 27:35] = 1
    hu[labels == 1] = 60.0
    assert _flags(hu, labels, removed=35.0) == ["extracranial_removed"]
    assert _flags(hu, labels, removed=0.5) == []
    image, mask = _volume(hu, labels)
    assert quality_flags(image, mask, measure(image, mask), 0.0, intracranial_found=False) == ["no_intracranial_mask"]
    assert set(FLAGS) >= {"many_components", "ich_hu_not_blood", "phe_hu_not_edema", "touches_skull",
                          "touches_volume_edge", "extracranial_removed"}


def test_ground_truth_of_generated_cases_is_mostly_plausible():
    """The checks must not flag real-looking bleeds: most synthetic truths pass."""
    from simulations.cohort import make_case

    flagged = []
    for k in range(8):
        case = make_case("charite-like", k, 3, scale="demo")
        image, mask = case.images()
        flags = quality_flags(image, mask, measure(image, mask), 0.0)
        if flags:
            flagged.append((k, case.record.etiology, case.record.n_lesions, flags))
    # Measured: 1 of 8 (an intraventricular extension reaching the last slice of the demo grid).
    assert len(flagged) <= 2, flagged


def test_the_plain_ge_head_is_not_a_confident_bleed(tiny_bundle, ge_series):
    """No lesion in the real GE head: no lesion found, or the finding is flagged; never outside the skull."""
    from shared.bundle import load_bundle
    from shared.pipeline import Predictor

    predictor = Predictor(load_bundle(tiny_bundle.path, tiny_bundle.public_key), device="cpu")
    from shared.imaging.ingest import read_image

    ingested = read_image(ge_series)
    typed, image, mask = predictor.predict_image(ingested)
    result = typed.to_dict()
    assert isinstance(result["quality_flags"], list)
    assert result["extracranial_ml_removed"] is not None and result["extracranial_ml_removed"] >= 0
    assert (not result["lesion_found"]) or result["quality_flags"], result
    from shared.imaging.intracranial import intracranial_mask

    inside = sitk.GetArrayFromImage(intracranial_mask(image).mask).astype(bool)
    labels = sitk.GetArrayFromImage(mask)
    assert not labels[~inside].any()
    assert mask.GetSize() == image.GetSize()


@pytest.mark.parametrize("removed, expect", [(None, []), (0.0, [])])
def test_a_given_mask_is_not_flagged_for_removal(removed, expect):
    hu, labels = _head()
    labels[4:8, 27:35, 27:35] = 1
    hu[labels == 1] = 60.0
    assert _flags(hu, labels, removed) == expect
