"""The intracranial mask on the real GE head CT, and labels kept inside it."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from shared.imaging.crop import make_crop
from shared.imaging.ingest import read_image
from shared.imaging.intracranial import intracranial_mask, restrict_labels
from shared.plumbing.config import CropSpec


@pytest.fixture(scope="module")
def ge_head(ge_series):
    image = read_image(ge_series).image
    return image, intracranial_mask(image)


def _inplane_depth_mm(hu: np.ndarray, spacing_yx) -> np.ndarray:
    """Distance of each voxel from the outside air, in-plane (scalp surface at 0)."""
    depth = np.zeros(hu.shape, np.float32)
    for k in range(hu.shape[0]):
        body = ndimage.binary_fill_holes(hu[k] > -300)
        depth[k] = ndimage.distance_transform_edt(body, sampling=spacing_yx)
    return depth


def test_ge_head_mask_holds_the_brain_and_no_scalp(ge_head):
    image, ic = ge_head
    hu = sitk.GetArrayFromImage(image)
    mask = sitk.GetArrayFromImage(ic.mask).astype(bool)
    assert mask.shape == hu.shape and ic.mask.GetSpacing() == image.GetSpacing()
    # An adult's intracranial volume is 1200-1700 ml; this scan stops at the skull base.
    assert 1100 < ic.volume_ml < 1800
    spacing_yx = image.GetSpacing()[1::-1]
    depth = _inplane_depth_mm(hu, spacing_yx)
    # Brain: grey/white matter density, deep inside the head, in the slices of the cerebrum.
    smooth = ndimage.gaussian_filter(hu, sigma=(0, 2, 2))
    brain = (smooth > 20) & (smooth < 45) & (depth > 20)
    brain[: hu.shape[0] // 3] = False  # skull base: orbits, muscles of mastication, pharynx
    brain[-2:] = False
    assert brain.sum() > 100_000
    assert mask[brain].mean() > 0.97
    # Nothing of the scalp, and no bone.
    assert not mask[depth < 6].any()
    assert (hu[mask] < 250).all()
    # The soft tissue outside the skull at blood density (temporalis, scalp, neck) is excluded:
    # on every slice with a closed skull ring, the mask stays inside the ring.
    for k in range(hu.shape[0]):
        if ic.methods[k] == "closing-3mm" and mask[k].any():
            ring = ndimage.binary_fill_holes(ndimage.binary_closing(hu[k] >= 250, iterations=8))
            assert not (mask[k] & ~ring).any()


def test_labels_outside_the_skull_are_removed_and_inside_kept(ge_head):
    image, ic = ge_head
    hu = sitk.GetArrayFromImage(image)
    inside = sitk.GetArrayFromImage(ic.mask).astype(bool)
    depth = _inplane_depth_mm(hu, image.GetSpacing()[1::-1])
    labels = np.zeros(hu.shape, np.uint8)
    k = hu.shape[0] // 2
    scalp = (depth[k] > 0) & (depth[k] < 4) & (hu[k] > 0) & (hu[k] < 100)
    labels[k][scalp] = 1  # a false "ICH" rim on the scalp
    zz, yy, xx = np.nonzero(inside)
    c = (int(np.median(zz)), int(np.median(yy)), int(np.median(xx)))
    labels[c[0] - 1:c[0] + 2, c[1] - 10:c[1] + 10, c[2] - 10:c[2] + 10] = 1  # a true bleed deep inside
    out, removed = restrict_labels(labels, inside)
    assert removed == int(scalp.sum()) > 100
    assert out[c] == 1 and not out[k][scalp].any()
    assert labels[k][scalp].all()  # the input is not modified


def test_craniectomy_and_vertex_cut_keep_the_brain(ge_head):
    image, ic = ge_head
    hu = sitk.GetArrayFromImage(image)
    full = sitk.GetArrayFromImage(ic.mask).astype(bool)
    n = hu.shape[0]
    upper = slice(n // 2, n - 3)
    # Craniectomy: a 6 cm bone flap removed on one side of the upper half (bone -> scalp density).
    cut = hu.copy()
    ys, xs = np.nonzero(full[n // 2])
    y0, x_right = int(np.median(ys)), int(xs.max())
    flap = np.zeros(hu.shape[1:], bool)
    half = int(30 / image.GetSpacing()[1])
    flap[y0 - half:y0 + half, x_right - 5:x_right + int(25 / image.GetSpacing()[0])] = True
    for k in range(upper.start, upper.stop):
        sl = cut[k]
        sl[flap & (sl >= 250)] = 40.0
    opened = sitk.GetImageFromArray(cut)
    opened.CopyInformation(image)
    m = sitk.GetArrayFromImage(intracranial_mask(opened).mask).astype(bool)
    assert (m[upper] & full[upper]).sum() > 0.95 * full[upper].sum()
    # Vertex cut: a scan that stops 3 cm below the top of the skull still gives its brain.
    keep = n - int(30 / image.GetSpacing()[2])
    top_cut = image[:, :, :keep]
    m2 = sitk.GetArrayFromImage(intracranial_mask(top_cut).mask).astype(bool)
    assert (m2 & full[:keep]).sum() > 0.95 * full[:keep].sum()
    assert (m2 & ~full[:keep]).sum() < 0.05 * full[:keep].sum()


def test_real_background_lesions_lie_inside_and_the_crop_stays_on_them():
    """A synthetic bleed in the real head is inside the mask; muscle 'ICH' no longer steals the crop."""
    from simulations.cohort import make_case
    from simulations.real_head import default_scan

    if not default_scan().exists():
        pytest.skip("real background scan not present")
    spec = CropSpec(size_xyz=(24, 24, 20), spacing_mm=(3.6, 3.6, 5.0))
    for k in range(3):
        case = make_case("charite-like", k, 5, scale="demo", background="real")
        image, truth = case.images()
        inside = sitk.GetArrayFromImage(intracranial_mask(image).mask).astype(bool)
        lesion = case.mask > 0
        assert inside[lesion].mean() > 0.99, f"case {k}: lesion outside the intracranial mask"
        # A larger false "ICH" on the scalp/temporalis (blood-density soft tissue outside the skull).
        hu = case.image
        depth = _inplane_depth_mm(hu.astype(np.float32), image.GetSpacing()[1::-1])
        false_ich = (depth > 0.5) & (depth < 8) & (hu > 20) & (hu < 90) & ~inside
        assert false_ich.sum() > (case.mask == 1).sum()
        noisy = case.mask.copy()
        noisy[false_ich] = 1
        cleaned, _ = restrict_labels(noisy, inside)
        crop_img = sitk.GetImageFromArray(cleaned)
        crop_img.CopyInformation(image)
        crop = make_crop(image, crop_img, spec)
        centre = np.array(image.TransformPhysicalPointToIndex(crop.center_mm))[::-1]
        comp, _ = ndimage.label(case.mask == 1)
        largest = np.argmax(np.bincount(comp.ravel())[1:]) + 1
        dist = ndimage.distance_transform_edt(comp != largest, sampling=image.GetSpacing()[::-1])
        assert dist[tuple(centre)] < 5.0, f"case {k}: crop centre {dist[tuple(centre)]:.1f} mm from the true bleed"


def test_an_image_without_skull_has_no_mask_and_segmentation_keeps_its_labels():
    """A skull-stripped or cropped volume: no intracranial space is found, so nothing is removed."""
    from shared.models.segment import MIN_INTRACRANIAL_ML

    hu = np.full((10, 40, 40), 30.0, np.float32)  # brain-like tissue, no bone anywhere
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((2.0, 2.0, 5.0))
    assert intracranial_mask(image).volume_ml < MIN_INTRACRANIAL_ML


def test_coarse_ci_scale_phantoms_keep_every_lesion_voxel(tmp_path):
    """At 3.6 mm no closing seals some lower slices' skull ring (partial volume): the hull fallback
    below the widest slice must keep the brain there. Before it, case 9 of this cohort lost its whole
    bleed (6.8 ml) as 'extracranial', and the segmenter's Dice on it fell to 0."""
    from shared.imaging.intracranial import intracranial_mask
    from shared.imaging.sitedata import read_mask, read_site
    from simulations.cohort import write_cohort

    write_cohort("charite-like", 10, 0, tmp_path / "site", scale="ci")
    for case in read_site(tmp_path / "site").cases:
        image = read_image(case.image_path).image
        lesion = sitk.GetArrayFromImage(read_mask(case.mask_path, image)) > 0
        inside = sitk.GetArrayFromImage(intracranial_mask(image).mask) > 0
        assert (lesion & ~inside).sum() == 0, case.case_id
