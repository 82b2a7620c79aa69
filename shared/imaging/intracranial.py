"""The intracranial space of a head CT, and keeping hemorrhage labels inside it.

Hemorrhage and its edema are intracranial. The demo segmenter, trained on phantoms, labels
temporalis and neck muscle and scalp (40-60 HU, the density of acute blood) as ICH; nothing a
classifier does downstream can repair a crop centred on muscle. So every predicted label map
goes through ``restrict_labels`` before it is measured or cropped.

The mask is computed from bone HU alone, with SimpleITK morphology, on a ~1 mm in-plane working
grid (the thin features that matter, skull and its gaps, are millimetres wide; a 0.5 mm grid
would cost 4x for nothing):

1. **Bone**: HU >= ``BONE_HU``.
2. **Per axial slice**, closing of the bone with a growing radius (3, 8, 15 mm) followed by a
   2D hole fill; the interior is what the closed skull encloses minus the bone. The first
   radius whose interior covers most of the slice's skull hull (its convex hull of bone) wins:
   small gaps (sutures, the thin temporal squama, vessels' foramina) close at 3 mm, an open
   skull base or foramen magnum at 8-15 mm.
3. **Craniectomy**: a supratentorial slice whose skull ring is open wider than 15 mm encloses
   nothing; there the convex hull of the slice's bone (minus bone) is used, on slices above the
   widest intracranial slice only (below it, at the skull base, the hull would take in the
   face and the masticator muscles).
4. **3D**: the largest face-connected component; slices past the vertex or below the foramen
   magnum simply contribute nothing.

The result is resampled back to the image grid (nearest neighbour), less the bone voxels there.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import SimpleITK as sitk

log = logging.getLogger(__name__)

# Cortical bone is > 700 HU, thin or partial-volumed calvaria at 4-5 mm slices still > 250;
# calcified falx and choroid plexus stay below this often enough not to split the space.
BONE_HU = 250.0
WORK_SPACING_MM = 1.0
CLOSING_RADII_MM = (3.0, 8.0, 15.0)
# The interior must cover this share of the area enclosed by the bone's convex hull for a
# closing radius to be accepted (a healthy slice reaches ~0.8-0.95).
MIN_HULL_COVER = 0.6
# A slice with less bone than this (mm^2) has no skull to speak of (air above the vertex,
# neck below the skull base).
MIN_BONE_MM2 = 150.0
# Below the widest slice the hull fallback may grow the space by at most this factor per slice.
MAX_HULL_GROWTH = 1.15
BODY_HU = -300.0


@dataclasses.dataclass(frozen=True)
class Intracranial:
    """The intracranial mask (uint8 0/1 on the image grid) and how each slice was closed.

    ``methods`` has one entry per axial slice of the working grid: ``"none"``, ``"closing-3mm"``
    etc., or ``"hull"`` (the craniectomy fallback).
    """

    mask: sitk.Image
    methods: tuple[str, ...]

    @property
    def volume_ml(self) -> float:
        """Volume of the intracranial space in millilitres."""
        arr = sitk.GetArrayViewFromImage(self.mask)
        return float(np.count_nonzero(arr)) * _voxel_ml(self.mask)


def intracranial_mask(image: sitk.Image, bone_hu: float = BONE_HU) -> Intracranial:
    """Compute the intracranial space of a CT in HU (see the module docstring for the method)."""
    work = _to_work_grid(image)
    hu = sitk.GetArrayFromImage(work)
    # Bone of the head only: the head holder and table are as dense as bone but separated from
    # the head by air in each slice (they may touch it in 3D, at the neck).
    bone = (hu >= bone_hu) & _head_per_slice(hu > BODY_HU)
    spacing_yx = np.array(work.GetSpacing()[:2][::-1])
    pixel_mm2 = float(np.prod(spacing_yx))
    inside = np.zeros(bone.shape, bool)
    methods = ["none"] * bone.shape[0]
    hulls: dict[int, np.ndarray] = {}
    for k in range(bone.shape[0]):
        if bone[k].sum() * pixel_mm2 < MIN_BONE_MM2:
            continue
        inside[k], methods[k], hulls[k] = _close_slice(bone[k], spacing_yx)
    _craniectomy_fallback(inside, methods, hulls, _superior_sign(work))
    inside = _largest_component(inside)
    mask_work = sitk.GetImageFromArray(inside.astype(np.uint8))
    mask_work.CopyInformation(work)
    mask = sitk.Resample(mask_work, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    # The 1 mm grid's edge overlaps the inner table on the finer native grid: bone is never inside.
    mask = sitk.And(mask, sitk.Cast(sitk.Less(image, float(bone_hu)), sitk.sitkUInt8))
    return Intracranial(mask=mask, methods=tuple(methods))


def restrict_labels(labels: np.ndarray, inside: np.ndarray) -> tuple[np.ndarray, int]:
    """Zero ``labels`` outside ``inside`` (both z, y, x); returns the labels and how many voxels were removed."""
    outside = (labels != 0) & ~inside.astype(bool)
    removed = int(np.count_nonzero(outside))
    if removed:
        labels = labels.copy()
        labels[outside] = 0
    return labels, removed


def voxel_ml(image: sitk.Image) -> float:
    """Volume of one voxel of ``image`` in millilitres."""
    return _voxel_ml(image)


def _voxel_ml(image: sitk.Image) -> float:
    return float(np.prod(image.GetSpacing())) / 1000.0


def _to_work_grid(image: sitk.Image) -> sitk.Image:
    """The image at ~1 mm in-plane (never finer than it is), slices unchanged, linear interpolation."""
    sx, sy, sz = image.GetSpacing()
    nx, ny, nz = image.GetSize()
    new_sp = (max(sx, WORK_SPACING_MM), max(sy, WORK_SPACING_MM), sz)
    if new_sp[:2] == (sx, sy):
        return sitk.Cast(image, sitk.sitkFloat32)
    size = [max(1, int(round(nx * sx / new_sp[0]))), max(1, int(round(ny * sy / new_sp[1]))), nz]
    # Keep the field of view: the first voxel's centre moves by half the spacing change.
    d = np.array(image.GetDirection()).reshape(3, 3)
    shift = d @ np.array([(new_sp[0] - sx) / 2, (new_sp[1] - sy) / 2, 0.0])
    origin = tuple(np.array(image.GetOrigin()) + shift)
    return sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), size, sitk.Transform(), sitk.sitkLinear, origin,
                         new_sp, image.GetDirection(), -1024.0, sitk.sitkFloat32)


def _close_slice(bone: np.ndarray, spacing_yx: np.ndarray) -> tuple[np.ndarray, str, np.ndarray]:
    """Interior of one slice's skull: the smallest closing radius that encloses most of the hull."""
    from skimage.morphology import convex_hull_image

    hull = convex_hull_image(bone) & ~bone
    hull_area = max(int(hull.sum()), 1)
    bone_img = sitk.GetImageFromArray(bone.astype(np.uint8))
    bone_img.SetSpacing(tuple(float(s) for s in spacing_yx[::-1]))
    best = np.zeros_like(bone)
    best_method = "none"
    for r_mm in CLOSING_RADII_MM:
        radius = [max(1, int(math.ceil(r_mm / s))) for s in spacing_yx[::-1]]
        # Pad so the closing does not stick to the slice border (a head cut by the field of view).
        closed = sitk.BinaryMorphologicalClosing(sitk.ConstantPad(bone_img, radius, radius, 0), radius,
                                                 sitk.sitkBall, 1)
        filled = sitk.BinaryFillhole(closed, fullyConnected=False, foregroundValue=1)
        crop = [slice(radius[1], radius[1] + bone.shape[0]), slice(radius[0], radius[0] + bone.shape[1])]
        closed_a = sitk.GetArrayViewFromImage(closed)[crop[0], crop[1]].astype(bool)
        filled_a = sitk.GetArrayViewFromImage(filled)[crop[0], crop[1]].astype(bool)
        interior = filled_a & ~closed_a
        if interior.sum() > best.sum():
            best, best_method = interior, f"closing-{r_mm:g}mm"
        if interior.sum() >= MIN_HULL_COVER * hull_area:
            break
    return best, best_method, hull


def _head_per_slice(body: np.ndarray) -> np.ndarray:
    """The largest 2D component of ``body`` in each slice."""
    out = np.zeros_like(body)
    for k in range(body.shape[0]):
        if body[k].any():
            out[k] = _largest_component(body[k])
    return out


def _superior_sign(image: sitk.Image) -> int:
    """+1 when the slice index grows towards the head's top (LPS world z), else -1."""
    return 1 if image.GetDirection()[8] >= 0 else -1


def _craniectomy_fallback(inside: np.ndarray, methods: list[str], hulls: dict[int, np.ndarray],
                          superior: int) -> None:
    """Use the bone's convex hull on open slices (in place).

    Above the widest slice (a craniectomy, a thin vertex) the hull is always taken. Below it the
    hull is taken only where it is no larger than ``MAX_HULL_GROWTH`` times the slice above: at
    the real skull base the hull of the facial bones is far larger and is refused, while a skull
    ring that no closing could seal (partial volume on coarse slices, a foramen) keeps the brain.
    """
    areas = inside.reshape(inside.shape[0], -1).sum(axis=1)
    if not areas.any():
        return
    widest = int(np.argmax(areas))
    upper = range(widest + 1, inside.shape[0]) if superior > 0 else range(widest - 1, -1, -1)
    lower = range(widest - 1, -1, -1) if superior > 0 else range(widest + 1, inside.shape[0])
    for k in upper:
        hull = hulls.get(k)
        if hull is not None and areas[k] < MIN_HULL_COVER * max(int(hull.sum()), 1):
            inside[k], methods[k] = hull, "hull"
    previous = int(areas[widest])
    for k in lower:
        hull = hulls.get(k)
        if hull is not None and areas[k] < MIN_HULL_COVER * max(int(hull.sum()), 1) \
                and 0 < hull.sum() <= MAX_HULL_GROWTH * previous:
            inside[k], methods[k] = hull, "hull"
        previous = int(inside[k].sum())
        if previous == 0:
            break  # below the skull base: nothing further down is intracranial


def _largest_component(mask: np.ndarray) -> np.ndarray:
    if not mask.any():
        return mask
    cc = sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), False)
    relabeled = sitk.RelabelComponent(cc, sortByObjectSize=True)
    return sitk.GetArrayFromImage(relabeled) == 1
