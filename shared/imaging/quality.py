"""Plausibility checks on a predicted segmentation: named quality flags.

A segmentation can be wrong in ways the numbers give away: fat called edema (-26 HU "PHE"),
brain called clot (30 HU "ICH"), eighty "bleeds" of muscle speckle, labels on the skull or at
the edge of the field of view. Each check below names one such sign; the result of
``ichfed predict`` carries the list (``quality_flags``, empty when plausible), the reader shows
them and never a confident label on a flagged case, and the site report counts flagged cases.
The flags are checks, not a diagnosis: a flagged case is one a person should look at.

Ranges (non-contrast CT, ~5 mm slices, so partial volume pulls means towards brain):
acute to subacute clot 40-100 HU mean (hyperacute or anaemic clot a little lower, so 35);
perihematomal edema 0-35 HU mean (below grey matter's ~36, above CSF's ~5).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the flag names are imported by shared.federation.protocol, which stays free of imaging libraries
    import SimpleITK as sitk

    from shared.imaging.volumetrics import Volumetrics

ICH_HU_RANGE = (35.0, 100.0)
PHE_HU_RANGE = (0.0, 35.0)
MAX_COMPONENTS = 3
# Components are counted from this size up: a single irregular bleed has a fringe of one- or
# two-voxel fragments at 5 mm slices (even in ground truth); muscle speckle is larger and many.
COMPONENT_MIN_ML = 0.2
# Labelled voxels within ~1 voxel of bone: more than this share means the label lies on the
# inner table (extra-axial collection, or a segmentation of the skull's partial volume).
MAX_SKULL_CONTACT = 0.10
BONE_HU = 250.0
MIN_ICH_ML = 0.5
MAX_EXTRACRANIAL_ML = 1.0

FLAGS: dict[str, str] = {
    "many_components": f"more than {MAX_COMPONENTS} separate ICH components of {COMPONENT_MIN_ML:g} ml or more",
    "small_lesion": f"ICH under {MIN_ICH_ML:g} ml: possibly noise, not a hemorrhage",
    "ich_hu_not_blood": f"mean ICH density outside {ICH_HU_RANGE[0]:g}-{ICH_HU_RANGE[1]:g} HU (not acute blood)",
    "phe_hu_not_edema": f"mean PHE density outside {PHE_HU_RANGE[0]:g}-{PHE_HU_RANGE[1]:g} HU (not edema)",
    "touches_skull": f"more than {MAX_SKULL_CONTACT:.0%} of the labelled voxels lie against bone",
    "touches_volume_edge": "labels reach the edge of the scanned volume (lesion may be cut off)",
    "extracranial_removed": f"more than {MAX_EXTRACRANIAL_ML:g} ml of labels outside the skull were removed",
    "no_intracranial_mask": "no skull found in the image: labels could not be kept inside it",
}


def quality_flags(image: "sitk.Image", labels: "sitk.Image", volumetrics: "Volumetrics",
                  extracranial_ml_removed: float | None = None, intracranial_found: bool = True) -> list[str]:
    """Names of the failed plausibility checks (keys of ``FLAGS``, in that order); [] when plausible.

    ``image`` is the HU volume and ``labels`` the label map on the same grid; ``volumetrics``
    is ``shared.imaging.volumetrics.measure`` of them; ``extracranial_ml_removed`` what the
    intracranial mask took away (None for a given, not predicted, mask); ``intracranial_found``
    False when no skull was found (``shared.models.segment.Segmentation``).
    """
    import SimpleITK as sitk

    from shared.imaging.volumetrics import ICH_LABEL, PHE_LABEL

    v = volumetrics
    flags: set[str] = set()
    lab = sitk.GetArrayViewFromImage(labels)
    if v.n_components > MAX_COMPONENTS and _n_sizable(lab == ICH_LABEL, labels) > MAX_COMPONENTS:
        flags.add("many_components")
    if 0 < v.ich_ml < MIN_ICH_ML:
        flags.add("small_lesion")
    if v.ich_mean_hu is not None and not ICH_HU_RANGE[0] <= v.ich_mean_hu <= ICH_HU_RANGE[1]:
        flags.add("ich_hu_not_blood")
    if v.phe_mean_hu is not None and not PHE_HU_RANGE[0] <= v.phe_mean_hu <= PHE_HU_RANGE[1]:
        flags.add("phe_hu_not_edema")
    lesion = (lab == ICH_LABEL) | (lab == PHE_LABEL)
    if lesion.any():
        if _skull_contact(sitk.GetArrayViewFromImage(image), lesion) > MAX_SKULL_CONTACT:
            flags.add("touches_skull")
        if _touches_edge(lesion):
            flags.add("touches_volume_edge")
    if extracranial_ml_removed is not None and extracranial_ml_removed > MAX_EXTRACRANIAL_ML:
        flags.add("extracranial_removed")
    if not intracranial_found:
        flags.add("no_intracranial_mask")
    return [name for name in FLAGS if name in flags]


def _n_sizable(ich: np.ndarray, labels: "sitk.Image") -> int:
    """ICH components (face connectivity, as ``volumetrics``) of at least ``COMPONENT_MIN_ML``."""
    from scipy import ndimage

    comp, n = ndimage.label(ich)
    if n == 0:
        return 0
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    sizes = np.bincount(comp.ravel(), minlength=n + 1)[1:]
    return int(np.count_nonzero(sizes * voxel_ml >= COMPONENT_MIN_ML))


def _skull_contact(hu: np.ndarray, lesion: np.ndarray) -> float:
    """Share of lesion voxels with bone among their in-plane 8 neighbours."""
    from scipy import ndimage

    # Only the lesion's bounding box (plus one voxel) matters; the whole scan would cost 10x.
    idx = np.nonzero(lesion)
    box = tuple(slice(max(0, int(i.min()) - 1), int(i.max()) + 2) for i in idx)
    bone = hu[box] >= BONE_HU
    near_bone = ndimage.binary_dilation(bone, structure=np.ones((1, 3, 3), bool))
    sub = lesion[box]
    return float(np.count_nonzero(near_bone & sub)) / float(np.count_nonzero(sub))


def _touches_edge(lesion: np.ndarray) -> bool:
    return bool(lesion[0].any() or lesion[-1].any() or lesion[:, 0].any() or lesion[:, -1].any()
                or lesion[:, :, 0].any() or lesion[:, :, -1].any())
