"""Ingestion: a NIfTI file, a DICOM series folder or a zip of one -> a float32 HU image.

DICOM series are read and regularised (gantry tilt, uneven spacing) in ``shared/imaging/dicom_series.py``,
NIfTI files as the NIfTI standard reads them in ``shared/imaging/nifti_read.py``, zips unpacked within
bounds in ``shared/imaging/zip_input.py``; this module picks the reader and describes the result.
``IngestOptions`` carries what a user may explicitly accept (``--allow-missing-slices``,
``--nifti-geometry``); by default ingestion refuses such input with one line, and an accepted one
is named in the result's ``notes``.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

import SimpleITK as sitk

from shared.imaging.dicom_series import Scanner, plan_series, read_series
from shared.imaging.nifti_geometry import FORMS
from shared.imaging.nifti_read import nifti_grid, read_nifti
from shared.imaging.zip_input import unpack
from shared.plumbing.errors import IchfedError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class IngestOptions:
    """What a user may explicitly accept at ingestion (CLI ``ichfed ingest`` / ``ichfed predict``).

    ``allow_missing_slices``: interpolate across a DICOM series' missing slice(s) instead of refusing;
    ``nifti_geometry``: ``"sform"`` or ``"qform"`` to use that form when a NIfTI file's forms (or its
    ``pixdim``) disagree, None to refuse. Each accepted case is named in the result's ``notes``.
    """

    allow_missing_slices: bool = False
    nifti_geometry: str | None = None

    def __post_init__(self) -> None:
        if self.nifti_geometry is not None and self.nifti_geometry not in FORMS:
            raise IchfedError(f"--nifti-geometry: expected one of {', '.join(FORMS)}, got {self.nifti_geometry!r}")


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


def read_image(path: str | Path, options: IngestOptions | None = None) -> Ingested:
    """Read ``path`` (``.nii``/``.nii.gz``, a DICOM series folder, or a ``.zip`` of one) as HU.

    Raises ``IchfedError`` naming ``path`` for anything unusable: a missing path, an empty
    folder, no DICOM files, a truncated file, no CT series, a single 2D slice, NaN voxels, a
    missing slice, NIfTI geometries that disagree (unless ``options`` accepts the last two).
    """
    opts = options or IngestOptions()
    p = Path(path)
    if not p.exists():
        raise IchfedError(f"{p}: no such file or folder")
    if p.is_dir():
        return _read_dicom(p, source=p, opts=opts)
    name = p.name.lower()
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        return _read_nifti(p, opts)
    if name.endswith(".zip"):
        return _read_zip(p, opts)
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


def _read_nifti(p: Path, opts: IngestOptions) -> Ingested:
    nifti = read_nifti(p, opts.nifti_geometry)
    return Ingested(image=nifti.image, modality="unknown", corrections=[], source_slices=nifti.image.GetSize()[2],
                    source=str(p), notes=nifti.notes)


# --------------------------------------------------------------------------- zip


def _read_zip(p: Path, opts: IngestOptions) -> Ingested:
    with tempfile.TemporaryDirectory(prefix="ichfed-unzip-") as tmp:
        root = Path(tmp).resolve()
        members = unpack(p, root)
        niftis = [f for f in root.rglob("*") if f.is_file() and f.name.lower().endswith((".nii", ".nii.gz"))]
        if len(niftis) == 1 and len(members) == 1:
            ing = _read_nifti(niftis[0], opts)
            ing.source = str(p)
            return ing
        return _read_dicom(root, source=p, opts=opts)


def _read_dicom(folder: Path, source: Path, opts: IngestOptions) -> Ingested:
    vol = read_series(folder, source, allow_missing_slices=opts.allow_missing_slices)
    return Ingested(vol.image, "CT", vol.corrections, vol.source_slices, str(source), vol.notes, vol.scanner)


def read_geometry(path: str | Path, options: IngestOptions | None = None) -> dict | None:
    """The grid ``read_image(path, options)`` will produce, from file headers only (no pixel data).

    Returns ``{"size", "spacing", "origin", "direction"}`` for a NIfTI file or a DICOM
    folder, and None for a zip (which would have to be unpacked). Raises ``IchfedError``
    for input ``read_image`` would refuse on header grounds.
    """
    opts = options or IngestOptions()
    p = Path(path)
    if not p.exists():
        raise IchfedError(f"{p}: no such file or folder")
    if p.is_dir():
        plan = plan_series(p, p, allow_missing_slices=opts.allow_missing_slices)
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
        return nifti_grid(p, opts.nifti_geometry)
    return None
