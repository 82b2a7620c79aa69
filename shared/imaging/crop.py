"""The classifier's input: a fixed-size, lesion-masked, HU-normalised crop around the ICH.

Steps, following Nawabi et al.:

1. **Components.** ICH (label 1) is split into 3D connected components (face connectivity);
   ``n_components`` counts them. The crop is centred on the centroid (world coordinates) of the
   largest one.
2. **Lesion policy** (``CropSpec.lesion_policy``):

   - ``largest`` (the paper): keep the largest ICH component and every PHE (label 2) connected
     component that touches it, diagonals included (i.e. overlaps the largest component after a
     one-voxel 3x3x3 dilation on the native grid). Other bleeds and their edema are zeroed; the
     paper lost metastatic cases with several small bleeds this way.
   - ``all``: keep every ICH and PHE voxel that falls inside the crop.

3. **Grid.** The output grid has ``CropSpec.size_xyz`` voxels at ``CropSpec.spacing_mm`` with
   the input's direction, centred on that centroid. Only this grid is resampled (SimpleITK,
   linear for HU, nearest neighbour for labels), so the cost does not grow with the scan.
   Parts of the grid outside the scan take the resampler's default value and, being outside
   any lesion, end up 0: a bleed at the edge of the scan is padded, never an error.
4. **Normalisation.** HU are clipped to ``CropSpec.hu_window`` ``[lo, hi]`` (default
   [-20, 120]) and scaled linearly, ``(hu - lo) / (hi - lo)``, to [0, 1]. Every voxel outside
   the kept lesion is then set to 0, so 0 means both "outside the lesion" and "<= lo HU inside
   it"; the classifier was trained on this convention, so it is kept.

The result is float32 numpy in (z, y, x) order, shape ``size_xyz[::-1]``.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from shared.imaging.volumetrics import (
    ICH_LABEL,
    PHE_LABEL,
    as_label_image,
    ich_components,
)
from shared.plumbing.config import CropSpec
from shared.plumbing.errors import IchfedError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Crop:
    """A classifier input and what was found while making it.

    ``array`` is None when the mask holds no ICH (``lesion_found`` False); such cases are
    counted separately downstream rather than classified. ``center_mm`` is the crop centre in
    world coordinates (mm). ``lesion_clipped`` is True when the kept lesion reaches beyond the
    crop, i.e. part of it was cut off.
    """

    array: np.ndarray | None
    lesion_found: bool
    n_components: int
    center_mm: tuple[float, float, float] | None
    lesion_clipped: bool = False
    policy: str = "largest"


def make_crop(image: sitk.Image, mask: sitk.Image, spec: CropSpec | None = None) -> Crop:
    """Turn a HU image and its ICH/PHE mask into the classifier's input crop.

    ``mask`` is resampled in world coordinates, so it need only cover the same anatomy;
    normally it shares the image's grid. See the module docstring for the exact rules.
    """
    spec = spec or CropSpec()
    if image.GetDimension() != 3:
        raise IchfedError(f"image: must be 3D, got {image.GetDimension()}D")
    labels = as_label_image(mask)
    components, n = ich_components(labels)
    if n == 0:
        return Crop(array=None, lesion_found=False, n_components=0, center_mm=None, policy=spec.lesion_policy)

    comp = sitk.GetArrayViewFromImage(components)
    largest = comp == 1
    center_mm = _centroid_mm(components, largest)
    kept = _kept_lesion(labels, comp, largest, spec.lesion_policy)

    size = [int(s) for s in spec.size_xyz]
    spacing = [float(s) for s in spec.spacing_mm]
    direction = image.GetDirection()
    origin = _grid_origin(center_mm, size, spacing, direction)

    hu = sitk.Resample(
        image, size, sitk.Transform(), sitk.sitkLinear, origin, spacing, direction, 0.0, sitk.sitkFloat32
    )
    lesion = sitk.Resample(
        kept, size, sitk.Transform(), sitk.sitkNearestNeighbor, origin, spacing, direction, 0, sitk.sitkUInt8
    )
    lo, hi = (float(v) for v in spec.hu_window)
    arr = sitk.GetArrayFromImage(hu)
    np.clip(arr, lo, hi, out=arr)
    arr -= lo
    arr /= hi - lo
    arr[sitk.GetArrayViewFromImage(lesion) == 0] = 0.0

    clipped = _reaches_beyond(kept, origin, spacing, direction, size)
    # One line per case would flood the log: counted, and summarised once per stage (shared.plumbing.logs).
    from shared.plumbing.logs import tally

    tally(log, f"lesion reaches beyond the {'x'.join(map(str, size))} crop (the part outside is cut off)", clipped)
    return Crop(
        array=arr.astype(np.float32, copy=False),
        lesion_found=True,
        n_components=n,
        center_mm=tuple(float(c) for c in center_mm),
        lesion_clipped=clipped,
        policy=spec.lesion_policy,
    )


def _centroid_mm(components: sitk.Image, largest: np.ndarray) -> np.ndarray:
    zyx = np.argwhere(largest).mean(axis=0)
    return np.array(components.TransformContinuousIndexToPhysicalPoint([float(v) for v in zyx[::-1]]))


def _kept_lesion(labels: sitk.Image, comp: np.ndarray, largest: np.ndarray, policy: str) -> sitk.Image:
    """Label image (1 ICH, 2 PHE) on the native grid holding only what the policy keeps."""
    lab = sitk.GetArrayViewFromImage(labels)
    if policy == "all":
        kept = np.where((lab == ICH_LABEL) | (lab == PHE_LABEL), lab, 0).astype(np.uint8)
    else:
        kept = np.zeros(lab.shape, np.uint8)
        kept[largest] = ICH_LABEL
        phe_labels = _touching_phe(labels, largest)
        if phe_labels is not None:
            phe_comp, touching = phe_labels
            kept[np.isin(phe_comp, touching)] = PHE_LABEL
    out = sitk.GetImageFromArray(kept)
    out.CopyInformation(labels)
    return out


def _touching_phe(labels: sitk.Image, largest: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    phe = sitk.BinaryThreshold(labels, PHE_LABEL, PHE_LABEL, 1, 0)
    phe_comp = sitk.GetArrayFromImage(sitk.ConnectedComponent(phe, False))
    if not phe_comp.any():
        return None
    # Dilate only inside the largest bleed's bounding box (+1 voxel): at paper scale a
    # whole-volume dilation would cost more than the rest of the crop together.
    idx = np.argwhere(largest)
    lo = np.maximum(idx.min(axis=0) - 1, 0)
    hi = np.minimum(idx.max(axis=0) + 2, largest.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    ring = ndimage.binary_dilation(largest[box], structure=np.ones((3, 3, 3), bool))
    touching = np.unique(phe_comp[box][ring])
    touching = touching[touching != 0]
    return phe_comp, touching


def _grid_origin(center_mm, size, spacing, direction) -> tuple[float, ...]:
    # The grid centre is continuous index (size - 1) / 2; origin = centre - D @ (spacing * half).
    d = np.array(direction, float).reshape(3, 3)
    half = (np.array(size, float) - 1.0) / 2.0 * np.array(spacing, float)
    return tuple(float(v) for v in np.asarray(center_mm) - d @ half)


def _reaches_beyond(kept: sitk.Image, origin, spacing, direction, size) -> bool:
    arr = sitk.GetArrayViewFromImage(kept)
    idx = np.argwhere(arr)
    lo, hi = idx.min(axis=0)[::-1], idx.max(axis=0)[::-1]  # (x, y, z)
    # The eight corners of the kept lesion's native bounding box, expressed in crop indices.
    d = np.array(direction, float).reshape(3, 3)
    for corner in np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1).T:
        p = np.array(kept.TransformIndexToPhysicalPoint([int(c) for c in corner]))
        ci = np.linalg.solve(d, p - np.array(origin)) / np.array(spacing)
        if np.any(ci < -0.5) or np.any(ci > np.array(size) - 0.5):
            return True
    return False
