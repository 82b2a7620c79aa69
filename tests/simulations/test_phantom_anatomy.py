"""Phantom extracranial muscle at blood density, and the intracranial mask on phantoms (issue 13)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from simulations.cohort import case_rng, make_case
from simulations.phantom import SCALP, SKULL, make_phantom
from simulations.profiles import load_profile
from simulations.scanner import Grid


@pytest.fixture(scope="module")
def head():
    prof = load_profile("charite-like")
    grid = Grid.for_profile("demo", prof.scanner)
    return make_phantom(grid, case_rng(4, prof.name, 0, "anatomy"), age=60.0)


def test_temporalis_and_nuchal_muscle_lie_outside_the_skull_at_blood_density(head):
    muscle = (head.tissue == SCALP) & (head.hu >= 40) & (head.hu <= 60)
    ml = muscle.sum() * head.grid.voxel_ml
    assert ml > 30, f"only {ml:.1f} ml of muscle"
    assert (head.depth_mm[muscle] < 0).all()  # all outside the inner skull surface
    # Both sides of the head (temporalis) and the back of the lower slices (nuchal muscles).
    z, y, x = np.nonzero(muscle)
    cx = head.grid.shape_zyx[2] / 2
    assert (x < cx - 20).sum() > 50 and (x > cx + 20).sum() > 50
    lower = z < head.grid.shape_zyx[0] // 3
    assert (lower & (y > head.grid.shape_zyx[1] / 2)).sum() > 100
    # The scalp keeps its skin and fat elsewhere.
    scalp = head.hu[(head.tissue == SCALP) & ~muscle]
    assert scalp.min() < -50 and np.median(scalp) > 20


def test_intracranial_mask_of_a_phantom_holds_the_lesion_and_no_muscle():
    from shared.imaging.intracranial import intracranial_mask

    case = make_case("charite-like", 0, 4, scale="demo")
    image, _ = case.images()
    inside = sitk.GetArrayFromImage(intracranial_mask(image).mask).astype(bool)
    assert inside[case.mask > 0].mean() > 0.99
    prof = load_profile("charite-like")
    head = make_phantom(case.grid, case_rng(4, prof.name, 0, "anatomy"), age=case.plan.age,
                        atrophy_scale=prof.population.atrophy_scale, tilt_deg=prof.scanner.gantry_tilt_deg)
    extracranial = (head.tissue == SCALP) | (head.tissue == SKULL)
    assert not (inside & (head.tissue == SCALP)).any()
    assert (inside & extracranial).sum() < 0.005 * inside.sum()
