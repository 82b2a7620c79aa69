"""Lesions inserted into the real head CT keep the scan's HU everywhere outside the lesion."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from simulations.cohort import case_rng, make_case
from simulations.lesions import ICH, PHE
from simulations.profiles import load_profile
from simulations.real_head import default_scan, make_real_head
from simulations.scanner import Grid, quantise

pytestmark = pytest.mark.skipif(not default_scan().exists(), reason=f"real background scan not present at {default_scan()}")


@pytest.fixture(scope="module")
def real_cases():
    return [make_case("charite-like", k, 9, scale="ci", background="real") for k in range(3)]


def test_background_outside_lesion_is_the_real_scan(real_cases):
    prof = load_profile("charite-like")
    grid = Grid.for_profile("ci", prof.scanner)
    for k, case in enumerate(real_cases):
        head = make_real_head(grid, case_rng(9, prof.name, k, "anatomy"), age=case.plan.age)
        background = quantise(head.hu)
        outside = case.mask == 0
        assert np.array_equal(case.image[outside], background[outside])
        lesion = case.mask > 0
        assert lesion.any() and not np.array_equal(case.image[lesion], background[lesion])
        # Lesions sit inside the real brain's parenchyma.
        assert head.parenchyma[case.mask == PHE].mean() == 1.0
        assert np.median(case.image[case.mask == ICH]) >= 50
        assert np.median(case.image[case.mask == PHE]) < np.median(background[head.tissue >= 5])


def test_real_background_keeps_the_scans_hu_statistics(real_cases):
    from shared.imaging.ingest import read_image

    src = sitk.GetArrayFromImage(read_image(default_scan()).image)
    src_brain = src[(src > 15) & (src < 60)]
    for case in real_cases:
        img = case.image
        brain = img[(img > 15) & (img < 60) & (case.mask == 0)]
        assert np.median(brain) == pytest.approx(np.median(src_brain), abs=3.0)
        assert np.median(img[img > 300]) == pytest.approx(np.median(src[src > 300]), abs=150)


def test_real_backgrounds_differ_between_cases(real_cases):
    a, b = real_cases[0].image, real_cases[1].image
    assert a.shape == b.shape
    assert np.mean(a != b) > 0.2
