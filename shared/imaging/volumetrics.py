"""Lesion volumes and densities on the native CT grid (what the reader page shows).

ICH is mask label 1, PHE label 2. Volumes are ``voxel count x voxel volume (mm^3) / 1000``
in millilitres. Densities are the mean and median HU of the image voxels under each label,
``None`` when the label is absent (an empty region has no density, and 0 HU would be a lie).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import SimpleITK as sitk

from shared.plumbing.errors import IchfedError

ICH_LABEL = 1
PHE_LABEL = 2


@dataclasses.dataclass(frozen=True)
class Volumetrics:
    """Per-case lesion measurements on the native grid."""

    ich_ml: float
    phe_ml: float
    ich_mean_hu: float | None
    ich_median_hu: float | None
    phe_mean_hu: float | None
    phe_median_hu: float | None
    n_components: int

    def to_dict(self) -> dict:
        """Plain JSON-ready dict of every field."""
        return dataclasses.asdict(self)


def ich_components(mask: sitk.Image) -> tuple[sitk.Image, int]:
    """Label the 3D connected ICH components of ``mask``, largest first.

    Returns ``(labels, n)`` where ``labels`` is an image on the mask's grid in which component
    1 is the largest ICH bleed, 2 the next and so on (0 elsewhere), and ``n`` the number of
    components. Connectivity is face-only (6-neighbourhood): with thick slices, bleeds that
    merely touch at a corner are usually separate bleeds.
    """
    ich = sitk.BinaryThreshold(as_label_image(mask), ICH_LABEL, ICH_LABEL, 1, 0)
    components = sitk.ConnectedComponent(ich, False)
    relabel = sitk.RelabelComponentImageFilter()
    relabel.SetSortByObjectSize(True)
    labels = relabel.Execute(components)
    return labels, int(relabel.GetNumberOfObjects())


def measure(image: sitk.Image, mask: sitk.Image) -> Volumetrics:
    """ICH/PHE volumes (ml), mean/median HU and the number of ICH components.

    ``image`` holds HU; ``mask`` must share its grid (size, spacing, origin).
    """
    _check_same_grid(image, mask)
    # A copy, not a view: a view of the temporary label image would dangle once it is freed.
    labels = sitk.GetArrayFromImage(as_label_image(mask))
    hu = sitk.GetArrayViewFromImage(image)
    voxel_ml = math.prod(image.GetSpacing()) / 1000.0

    ich = labels == ICH_LABEL
    phe = labels == PHE_LABEL
    ich_mean, ich_median = _hu_stats(hu, ich)
    phe_mean, phe_median = _hu_stats(hu, phe)
    _, n = ich_components(mask)
    return Volumetrics(
        ich_ml=float(np.count_nonzero(ich)) * voxel_ml,
        phe_ml=float(np.count_nonzero(phe)) * voxel_ml,
        ich_mean_hu=ich_mean,
        ich_median_hu=ich_median,
        phe_mean_hu=phe_mean,
        phe_median_hu=phe_median,
        n_components=n,
    )


def _hu_stats(hu: np.ndarray, region: np.ndarray) -> tuple[float | None, float | None]:
    values = hu[region]
    if values.size == 0:
        return None, None
    # float64 so that a large bleed's mean does not drift in float32 accumulation
    values = values.astype(np.float64)
    return float(values.mean()), float(np.median(values))


def as_label_image(mask: sitk.Image) -> sitk.Image:
    """``mask`` as a 3D uint8 label image (0 background, 1 ICH, 2 PHE)."""
    if mask.GetDimension() != 3:
        raise IchfedError(f"mask: must be 3D, got {mask.GetDimension()}D")
    if mask.GetPixelID() == sitk.sitkUInt8:
        return mask
    # float masks from other tools carry 0.0/1.0/2.0; rounding first keeps 1.9999 as PHE
    if mask.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        mask = sitk.Round(mask)
    return sitk.Cast(mask, sitk.sitkUInt8)


def _check_same_grid(image: sitk.Image, mask: sitk.Image) -> None:
    if image.GetDimension() != 3:
        raise IchfedError(f"image: must be 3D, got {image.GetDimension()}D")
    if image.GetSize() != mask.GetSize():
        raise IchfedError(f"mask: size {mask.GetSize()} does not match the image size {image.GetSize()}")
    if not np.allclose(image.GetSpacing(), mask.GetSpacing(), rtol=1e-4, atol=1e-5):
        raise IchfedError(f"mask: spacing {mask.GetSpacing()} does not match the image spacing {image.GetSpacing()}")
