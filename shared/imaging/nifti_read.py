"""One NIfTI file as a float32 image, read as the NIfTI standard (and nibabel) reads it.

ITK reads the voxels (one pass, straight into float32). Where ITK departs from the standard, the
header as stored (``nifti_checks.raw_header``) decides instead:

* size and memory: ``nifti_checks.check_payload`` before anything is allocated;
* geometry: ``nifti_geometry.choose_grid`` (sform, else qform; a disagreement is refused);
* intensity scaling: ``scl_slope`` 0 or not finite means *no scaling*, the intercept included
  (NIfTI-1 standard, nibabel). ITK applies the intercept anyway; it is taken off again and the
  result's notes say so. A valid slope with a NaN/infinite intercept is refused (nibabel does too);
* non-finite voxels: ITK reads a stored NaN as 0, so float files are scanned as stored first, a
  slab at a time (no second copy of the volume), and the scaled result is checked as well.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from shared.imaging.nifti_checks import check_payload
from shared.imaging.nifti_geometry import Grid, choose_grid
from shared.plumbing.errors import IchfedError

log = logging.getLogger(__name__)

_SLAB_BYTES = 64 * 1024**2  # stored values scanned for NaN per read


@dataclasses.dataclass
class NiftiRead:
    """A NIfTI file read: the float32 image (ITK geometry) and the notes for the result's JSON."""

    image: sitk.Image
    notes: list[str]


def read_nifti(p: Path, geometry: str | None = None) -> NiftiRead:
    """Read ``p`` as float32 with the standard's geometry and scaling (module doc).

    ``geometry`` is ``--nifti-geometry`` (``"sform"``/``"qform"``, or None: refuse a disagreement).
    Raises ``IchfedError`` naming ``p`` for anything unusable.
    """
    header = check_payload(p)
    grid = choose_grid(p, header, geometry)  # before ITK: it would call a sheared form "corrupt"
    undo, notes = _scaling(p, header)
    notes = [*(grid.notes if grid else ()), *notes]
    if grid is None:
        notes.append("no qform or sform (both codes 0): voxel sizes from pixdim, orientation unknown")
    try:
        img = sitk.ReadImage(str(p), sitk.sitkFloat32)
    except RuntimeError as e:
        raise IchfedError(f"{p}: not a readable NIfTI image ({_itk_reason(e, header)})") from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise IchfedError(f"{p}: has {img.GetNumberOfComponentsPerPixel()} components per voxel, expected a grey-value CT")
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    if img.GetDimension() != 3:
        raise IchfedError(f"{p}: is {img.GetDimension()}D, expected a 3D CT volume")
    if min(img.GetSize()) < 2:
        raise IchfedError(f"{p}: is a single 2D slice (size {img.GetSize()}), expected a 3D CT volume")
    bad = count_non_finite(p, header)
    if bad:
        raise IchfedError(f"{p}: contains {bad} NaN or infinite voxel values")
    if undo:
        img -= undo  # in place: no second copy of the volume
    if grid is not None:
        _apply(img, grid)
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(img)
    lo, hi = stats.GetMinimum(), stats.GetMaximum()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise IchfedError(f"{p}: scl_slope {float(header['scl_slope']):g} / scl_inter {float(header['scl_inter']):g} "
                          "overflow float32 (infinite voxel values after scaling)")
    if lo >= 0.0 or hi < 100.0:
        # Probably not HU (e.g. raw stored values or a normalised image); the classifier expects HU.
        msg = f"values {lo:.0f}..{hi:.0f} do not look like Hounsfield units"
        log.warning("%s: %s", p, msg)
        notes.append(msg)
    return NiftiRead(image=img, notes=notes)


def nifti_grid(p: Path, geometry: str | None = None) -> dict:
    """The grid ``read_nifti(p, geometry)`` will produce, from the header only (no voxel data)."""
    header = check_payload(p, stream_gzip=False)  # header-level: declared size vs file size, pixdim
    grid = choose_grid(p, header, geometry)
    _scaling(p, header)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise IchfedError(f"{p}: not a readable NIfTI image ({_itk_reason(e, header)})") from None
    size = reader.GetSize()
    if len(size) == 4 and size[3] == 1:
        size = size[:3]  # read_nifti drops a trailing time axis of length 1
    if len(size) != 3:
        raise IchfedError(f"{p}: is {len(size)}D, expected a 3D CT volume")
    if min(size) < 2:
        raise IchfedError(f"{p}: is a single 2D slice (size {tuple(size)}), expected a 3D CT volume")
    if grid is not None:
        return {"size": tuple(size), "spacing": grid.spacing, "origin": grid.origin, "direction": grid.direction}
    n = reader.GetDimension()
    direction = reader.GetDirection()
    return {"size": tuple(size), "spacing": tuple(reader.GetSpacing()[:3]), "origin": tuple(reader.GetOrigin()[:3]),
            "direction": tuple(direction[r * n + c] for r in range(3) for c in range(3))}


def _scaling(p: Path, header) -> tuple[float, list[str]]:
    """(intercept ITK adds that the standard does not, notes) for the header's scl_slope / scl_inter."""
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    if slope != 0 and math.isfinite(slope):
        if not math.isfinite(inter):
            raise IchfedError(f"{p}: scl_slope is {slope:g} but scl_inter is {inter:g}; a valid slope needs a "
                              "finite intercept (NIfTI standard)")
        return 0.0, []
    if not math.isfinite(inter) or inter == 0:
        return 0.0, []  # ITK adds nothing either (a NaN intercept counts as 0)
    note = (f"scl_slope is {slope:g}: no intensity scaling (NIfTI standard), so scl_inter {inter:g} "
            "was not applied")
    log.warning("%s: %s", p, note)
    return inter, [note]


def count_non_finite(p: Path, header) -> int:
    """NaN/inf voxels as stored in ``p`` (float types only), read a slab of slices at a time."""
    import nibabel

    if not np.issubdtype(header.get_data_dtype(), np.floating):
        return 0
    try:
        proxy = nibabel.load(str(p), keep_file_open=True).dataobj
        shape = tuple(proxy.shape)
        if len(shape) < 3:
            return int(np.count_nonzero(~np.isfinite(np.asanyarray(proxy))))
        per_slice = max(1, math.prod(shape[:2]) * math.prod(shape[3:]) * header.get_data_dtype().itemsize)
        step = max(1, _SLAB_BYTES // per_slice)
        bad = 0
        for z in range(0, shape[2], step):
            index = (slice(None), slice(None), slice(z, z + step)) + (slice(None),) * (len(shape) - 3)
            bad += int(np.count_nonzero(~np.isfinite(np.asanyarray(proxy[index]))))
        return bad
    except IchfedError:
        raise
    except Exception as e:  # nibabel raises several unrelated types for a bad file
        raise IchfedError(f"{p}: not a readable NIfTI image ({e})") from None


def _apply(img: sitk.Image, grid: Grid) -> None:
    img.SetSpacing(grid.spacing)
    img.SetOrigin(grid.origin)
    img.SetDirection(grid.direction)


def _itk_reason(e: RuntimeError, header) -> str:
    """ITK's own last line (e.g. "... only supports orthonormal direction cosines"), without the source path."""
    if int(header["sizeof_hdr"]) == 540:
        return "a NIfTI-2 header, which this ITK cannot read; save it as NIfTI-1"
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else "unknown error"
    return last.split("): ", 1)[-1][:200]
