"""DICOM headers of a folder: every file's geometry and tags, and the choice of the CT series.

Only headers are read here (``shared/imaging/dicom_series.py`` reads pixel data and regularises the grid).
Non-image files (text, thumbnails, DICOMDIR, vendor directory objects) are skipped; series choice:
only modality CT is accepted, and of several CT series the one with the most slices is used.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from shared.imaging import dicom_checks
from shared.plumbing.errors import IchfedError

log = logging.getLogger(__name__)

_TAG_MODALITY = "0008|0060"
_TAG_SERIES_UID = "0020|000e"
_TAG_SERIES_DESCRIPTION = "0008|103e"
_TAG_POSITION = "0020|0032"
_TAG_ORIENTATION = "0020|0037"
_TAG_GANTRY_TILT = "0018|1120"
_TAG_INSTANCE = "0020|0013"
_TAG_SOP_CLASS = "0008|0016"
# Scanner metadata kept for the site's Table 1 (``ichfed stats``): never pixel data or patient tags.
TAG_MANUFACTURER = "0008|0070"
TAG_MODEL = "0008|1090"
TAG_KERNEL = "0018|1210"
TAG_SLICE_THICKNESS = "0018|0050"
SCANNER_TAGS = (TAG_MANUFACTURER, TAG_MODEL, TAG_KERNEL, TAG_SLICE_THICKNESS)
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_TAGS_READ = (_TAG_MODALITY, _TAG_SERIES_UID, _TAG_SERIES_DESCRIPTION, _TAG_POSITION, _TAG_ORIENTATION,
              _TAG_GANTRY_TILT, _TAG_INSTANCE, _TAG_SOP_CLASS, *SCANNER_TAGS, *dicom_checks.TAGS)


@dataclasses.dataclass
class SliceHeader:
    file: Path
    modality: str
    series_uid: str
    description: str
    size: tuple[int, ...]
    spacing: tuple[float, float]
    position: np.ndarray
    orientation: np.ndarray  # 6 values: row cosines, column cosines
    tilt_tag: float
    instance: int
    z_spacing: float = 0.0  # only for multi-frame files
    padding_hu: tuple[float, float] | None = None  # pixel padding (0028,0120/0121) in HU
    bad_geometry: str | None = None  # why PixelSpacing/ImageOrientationPatient/Rescale tags are unusable
    slope_zero: bool = False  # RescaleSlope was 0 (read as 1, as GDCM does)
    scanner_tags: dict[str, str] = dataclasses.field(default_factory=dict)


def _is_dicom_magic(f: Path) -> bool:
    try:
        with open(f, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _floats(text: str, n: int) -> np.ndarray | None:
    try:
        vals = [float(v) for v in text.strip().replace(" ", "").split("\\") if v != ""]
    except ValueError:
        return None
    return np.asarray(vals, dtype=float) if len(vals) == n else None


def scan_headers(folder: Path, source: Path) -> tuple[list[SliceHeader], list[Path], list[Path]]:
    """Read every file's header; return (slices, broken DICOM files, ignored non-image files).

    Non-image files (text, thumbnails, DICOMDIR, vendor directory objects) are ignored; a slice
    whose geometry tags are unusable is marked (``bad_geometry``) and refused if its series is used.
    """
    slices: list[SliceHeader] = []
    broken: list[Path] = []
    ignored: list[Path] = []
    # Hidden files and folders (.DS_Store, ._resource forks, .git) are never slices.
    files = sorted(f for f in folder.rglob("*")
                   if f.is_file() and not any(part.startswith(".") for part in f.relative_to(folder).parts))
    if not files:
        raise IchfedError(f"{source}: folder is empty (expected one DICOM series)")
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    for f in files:
        reader.SetFileName(str(f))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            (broken if _is_dicom_magic(f) and dicom_checks.unreadable_is_image(f) else ignored).append(f)
            continue
        meta = {k: reader.GetMetaData(k) for k in _TAGS_READ if reader.HasMetaDataKey(k)}
        try:
            dicom_checks.check_geometry_tags(f, meta)
            slope_zero = dicom_checks.rescale(f, meta)[2]
            bad_geometry = None
        except IchfedError as e:
            bad_geometry, slope_zero = str(e), False  # fatal only if this slice belongs to the series that is used
        if meta.get(_TAG_SOP_CLASS, "").strip("\0 ") == _DICOMDIR_SOP_CLASS:
            ignored.append(f)
            continue
        header = _header_of(f, reader, meta, bad_geometry)
        header.slope_zero = slope_zero
        slices.append(header)
    return slices, broken, ignored


def _header_of(f: Path, reader, meta: dict[str, str], bad_geometry: str | None) -> SliceHeader:
    """One slice's geometry and tags from its header (``reader`` has read its information)."""
    size = reader.GetSize()
    origin = np.asarray(reader.GetOrigin(), dtype=float)
    direction = np.asarray(reader.GetDirection(), dtype=float).reshape(3, 3)
    position = _floats(meta.get(_TAG_POSITION, ""), 3)
    orientation = _floats(meta.get(_TAG_ORIENTATION, ""), 6)
    if position is None:
        position = origin
    if orientation is None:
        orientation = np.concatenate([direction[:, 0], direction[:, 1]])
    try:
        tilt = float(meta.get(_TAG_GANTRY_TILT, "0").strip() or 0.0)
    except ValueError:
        tilt = 0.0
    try:
        instance = int(float(meta.get(_TAG_INSTANCE, "0").strip() or 0))
    except ValueError:
        instance = 0
    return SliceHeader(
        file=f,
        modality=meta.get(_TAG_MODALITY, "").strip().upper(),
        series_uid=meta.get(_TAG_SERIES_UID, "").strip("\0 "),
        description=meta.get(_TAG_SERIES_DESCRIPTION, "").strip(),
        size=tuple(size),
        spacing=(float(reader.GetSpacing()[0]), float(reader.GetSpacing()[1])),
        position=position,
        orientation=orientation,
        tilt_tag=tilt,
        instance=instance,
        z_spacing=float(reader.GetSpacing()[2]) if len(size) == 3 else 0.0,
        padding_hu=dicom_checks.padding_range_hu(meta),
        bad_geometry=bad_geometry,
        scanner_tags={k: meta[k].strip("\0 ") for k in SCANNER_TAGS if meta.get(k, "").strip("\0 ")},
    )


def pick_series(slices: list[SliceHeader], source: Path, notes: list[str]) -> list[SliceHeader]:
    """Choose the CT series to use; say what else was there.

    Policy: only modality CT is accepted. Other modalities beside a CT series are ignored
    with a note. Of several CT series, the one with the most slices wins (ties: the
    lowest series UID, so the choice is deterministic) and the choice is noted.
    """
    series: dict[str, list[SliceHeader]] = defaultdict(list)
    for s in slices:
        series[s.series_uid].append(s)
    ct = {uid: ss for uid, ss in series.items() if ss[0].modality == "CT"}
    other = {uid: ss for uid, ss in series.items() if ss[0].modality != "CT"}

    def label(ss: list[SliceHeader]) -> str:
        return f"{ss[0].modality or 'no modality'} series with {len(ss)} file(s)"

    if not ct:
        found = ", ".join(sorted(label(ss) for ss in other.values()))
        raise IchfedError(f"{source}: no CT series found (found {found}); only CT is accepted")
    if other:
        msg = "ignored non-CT " + ", ".join(sorted(label(ss) for ss in other.values()))
        log.warning("%s: %s", source, msg)
        notes.append(msg)
    ranked = sorted(ct.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    uid, chosen = ranked[0]
    if len(ranked) > 1:
        msg = (f"{len(ranked)} CT series found; using series {uid or '(no UID)'} with {len(chosen)} slices, "
               f"ignored " + ", ".join(f"{u or '(no UID)'} ({len(ss)} slices)" for u, ss in ranked[1:]))
        log.warning("%s: %s", source, msg)
        notes.append(msg)
    return chosen
