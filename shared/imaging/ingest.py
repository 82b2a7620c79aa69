"""Ingestion: a NIfTI file, a DICOM series folder or a zip of one -> a float32 HU image.

DICOM series are read and regularised (gantry tilt, uneven spacing) in ``shared/imaging/dicom_series.py``;
this module picks the reader, reads NIfTI, unpacks zips and describes the result.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from shared.imaging.dicom_series import Scanner, plan_series, read_series
from shared.imaging.nifti_checks import check_payload
from shared.plumbing.errors import IchfedError

log = logging.getLogger(__name__)

#: refuse zips that would unpack to more than this (a zip bomb, or not one CT series)
MAX_UNZIPPED_BYTES = 8 * 1024**3


@dataclasses.dataclass
class Ingested:
    """One ingested CT volume.

    ``image`` is float32 in Hounsfield units with the scanner's geometry; ``corrections``
    lists what was fixed (``gantry_tilt``, ``nonuniform_spacing``); ``notes`` are human
    readable remarks (e.g. which of several series was picked).
    """

    image: sitk.Image
    modality: str
    corrections: list[str]
    source_slices: int
    source: str
    notes: list[str] = dataclasses.field(default_factory=list)
    scanner: Scanner = dataclasses.field(default_factory=Scanner)  # all "unknown" for NIfTI


def read_image(path: str | Path) -> Ingested:
    """Read ``path`` (``.nii``/``.nii.gz``, a DICOM series folder, or a ``.zip`` of one) as HU.

    Raises ``IchfedError`` naming ``path`` for anything unusable: a missing path, an empty
    folder, no DICOM files, a truncated file, no CT series, a single 2D slice, NaN voxels.
    """
    p = Path(path)
    if not p.exists():
        raise IchfedError(f"{p}: no such file or folder")
    if p.is_dir():
        return _read_dicom(p, source=p)
    name = p.name.lower()
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        return _read_nifti(p)
    if name.endswith(".zip"):
        return _read_zip(p)
    raise IchfedError(f"{p}: not a NIfTI file (.nii/.nii.gz), a DICOM folder or a .zip of one")


def describe(ingested: Ingested) -> dict:
    """The JSON summary printed by ``ichfed ingest``; ``shape`` is in SimpleITK (x, y, z) order."""
    img = ingested.image
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(img)
    return {
        "shape": list(img.GetSize()),
        "spacing": [round(v, 6) for v in img.GetSpacing()],
        "origin": [round(v, 6) for v in img.GetOrigin()],
        "direction": [round(v, 6) for v in img.GetDirection()],
        "modality": ingested.modality,
        "hu_min": float(stats.GetMinimum()),
        "hu_max": float(stats.GetMaximum()),
        "corrections": list(ingested.corrections),
        "source_slices": ingested.source_slices,
        "notes": list(ingested.notes),
        "scanner": dataclasses.asdict(ingested.scanner),
    }


# --------------------------------------------------------------------------- NIfTI


def _read_nifti(p: Path) -> Ingested:
    # Before ITK allocates what the header declares or zero-fills a short payload.
    check_payload(p)
    try:
        img = sitk.ReadImage(str(p), sitk.sitkFloat32)
    except RuntimeError:
        raise IchfedError(f"{p}: not a readable NIfTI image (truncated or corrupt?)") from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise IchfedError(f"{p}: has {img.GetNumberOfComponentsPerPixel()} components per voxel, expected a grey-value CT")
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    if img.GetDimension() != 3:
        raise IchfedError(f"{p}: is {img.GetDimension()}D, expected a 3D CT volume")
    if min(img.GetSize()) < 2:
        raise IchfedError(f"{p}: is a single 2D slice (size {img.GetSize()}), expected a 3D CT volume")
    bad = _count_non_finite_nifti(p)
    if bad:
        raise IchfedError(f"{p}: contains {bad} NaN or infinite voxel values")
    arr = sitk.GetArrayViewFromImage(img)
    notes = []
    if float(arr.min()) >= 0.0 or float(arr.max()) < 100.0:
        # Probably not HU (e.g. raw stored values or a normalised image); the classifier expects HU.
        msg = f"values {float(arr.min()):.0f}..{float(arr.max()):.0f} do not look like Hounsfield units"
        log.warning("%s: %s", p, msg)
        notes.append(msg)
    return Ingested(image=img, modality="unknown", corrections=[], source_slices=img.GetSize()[2],
                    source=str(p), notes=notes)


def _count_non_finite_nifti(p: Path) -> int:
    """Count NaN/inf voxels as stored in the file.

    ITK's NIfTI reader silently replaces non-finite values with 0, which would hide a
    broken export, so the stored values are checked with nibabel (an nnU-Net dependency).
    """
    import nibabel

    try:
        nii = nibabel.load(str(p))
    except Exception as e:  # nibabel raises several unrelated types for a bad file
        raise IchfedError(f"{p}: not a readable NIfTI image ({e})") from None
    if not np.issubdtype(nii.get_data_dtype(), np.floating):
        return 0
    return int(np.count_nonzero(~np.isfinite(np.asanyarray(nii.dataobj))))


# --------------------------------------------------------------------------- zip


def _read_zip(p: Path) -> Ingested:
    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError) as e:
        raise IchfedError(f"{p}: not a readable zip file ({e})") from None
    with zf, tempfile.TemporaryDirectory(prefix="ichfed-unzip-") as tmp:
        root = Path(tmp).resolve()
        members = [m for m in zf.infolist() if not m.is_dir()]
        if sum(m.file_size for m in members) > MAX_UNZIPPED_BYTES:
            raise IchfedError(f"{p}: unpacks to more than {MAX_UNZIPPED_BYTES // 1024**3} GiB")
        for m in members:
            target = (root / m.filename).resolve()
            # A member named ../x would write outside the temporary folder.
            if root not in target.parents:
                raise IchfedError(f"{p}: member {m.filename!r} points outside the archive")
        try:
            zf.extractall(root)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise IchfedError(f"{p}: cannot unpack ({e})") from None
        niftis = [f for f in root.rglob("*") if f.is_file() and f.name.lower().endswith((".nii", ".nii.gz"))]
        if len(niftis) == 1 and len(members) == 1:
            ing = _read_nifti(niftis[0])
            ing.source = str(p)
            return ing
        return _read_dicom(root, source=p)


def _read_dicom(folder: Path, source: Path) -> Ingested:
    vol = read_series(folder, source)
    return Ingested(vol.image, "CT", vol.corrections, vol.source_slices, str(source), vol.notes, vol.scanner)


def read_geometry(path: str | Path) -> dict | None:
    """The grid ``read_image(path)`` will produce, from file headers only (no pixel data).

    Returns ``{"size", "spacing", "origin", "direction"}`` for a NIfTI file or a DICOM
    folder, and None for a zip (which would have to be unpacked). Raises ``IchfedError``
    for input ``read_image`` would refuse on header grounds.
    """
    p = Path(path)
    if not p.exists():
        raise IchfedError(f"{p}: no such file or folder")
    if p.is_dir():
        plan = plan_series(p, p)
        if plan.multiframe:
            reader = sitk.ImageFileReader()
            reader.SetImageIO("GDCMImageIO")
            reader.SetFileName(str(plan.stack[0].file))
            reader.ReadImageInformation()
            return {"size": tuple(reader.GetSize()), "spacing": tuple(reader.GetSpacing()),
                    "origin": tuple(reader.GetOrigin()), "direction": tuple(reader.GetDirection())}
        return {"size": plan.size, "spacing": plan.spacing, "origin": plan.origin,
                "direction": tuple(float(v) for v in plan.frame.ravel())}
    if p.name.lower().endswith((".nii", ".nii.gz")):
        check_payload(p, stream_gzip=False)  # header-level: declared size vs file size, pixdim
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(p))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise IchfedError(f"{p}: not a readable NIfTI image (truncated or corrupt?)") from None
        size, spacing, origin, direction = reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()
        if len(size) == 4 and size[3] == 1:
            # read_image drops a trailing time axis of length 1.
            size, spacing, origin = size[:3], spacing[:3], origin[:3]
            direction = tuple(direction[r * 4 + c] for r in range(3) for c in range(3))
        if len(size) != 3:
            raise IchfedError(f"{p}: is {len(size)}D, expected a 3D CT volume")
        if min(size) < 2:
            raise IchfedError(f"{p}: is a single 2D slice (size {tuple(size)}), expected a 3D CT volume")
        return {"size": tuple(size), "spacing": tuple(spacing), "origin": tuple(origin), "direction": tuple(direction)}
    return None


