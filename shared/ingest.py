"""Ingestion: a NIfTI file, a DICOM series folder or a zip of one -> a float32 HU image.

The DICOM path never trusts the first two slices for geometry. Every slice carries its
own ImagePositionPatient and ImageOrientationPatient; slices are sorted by their distance
along the slice normal and, when the stack is tilted (gantry tilt) or unevenly spaced, they
are resampled onto a regular grid:

* output direction is the orthonormal frame (row, column, normal) of the slice orientation,
  so each source slice is one plane of constant normal coordinate;
* output planes are spaced uniformly along the normal by the **median gap** between source
  slices (robust to a single odd gap; keeps the native resolution of most of the stack);
* in-plane, the output grid is the union of all source slices' footprints at the native
  pixel spacing; each output plane blends the two neighbouring source slices linearly by
  distance, after resampling each onto the output plane with SimpleITK (linear).
  Regions no source slice covers are filled with -1024 HU (air). The number of planes is
  round(coverage / spacing) + 1, so the last plane may lie up to half a spacing past the
  last slice; it repeats that slice rather than dropping coverage.

Series choice: only modality CT is accepted; non-CT series beside a CT are ignored, and of
several CT series the one with the most slices is used; both cases log a warning and add
a ``notes`` entry.

Rescale slope/intercept are applied by GDCM when a slice is read; values are cast to float32.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import dicom_checks
from .errors import IchfedError
from .nifti_checks import check_payload

log = logging.getLogger(__name__)

#: value given to output voxels that no source slice covers (air)
FILL_HU = -1024.0
#: relative deviation of a slice gap from the median gap that counts as non-uniform spacing
GAP_TOLERANCE = 0.01
#: angle (degrees) between slice normal and stacking direction that counts as gantry tilt
TILT_TOLERANCE_DEG = 0.5
#: refuse zips that would unpack to more than this (a zip bomb, or not one CT series)
MAX_UNZIPPED_BYTES = 8 * 1024**3

_TAG_MODALITY = "0008|0060"
_TAG_SERIES_UID = "0020|000e"
_TAG_SERIES_DESCRIPTION = "0008|103e"
_TAG_POSITION = "0020|0032"
_TAG_ORIENTATION = "0020|0037"
_TAG_GANTRY_TILT = "0018|1120"
_TAG_INSTANCE = "0020|0013"
_TAG_SOP_CLASS = "0008|0016"
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_TAGS_READ = (_TAG_MODALITY, _TAG_SERIES_UID, _TAG_SERIES_DESCRIPTION, _TAG_POSITION, _TAG_ORIENTATION,
              _TAG_GANTRY_TILT, _TAG_INSTANCE, _TAG_SOP_CLASS, *dicom_checks.TAGS)


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


def read_image(path: str | Path) -> Ingested:
    """Read ``path`` (``.nii``/``.nii.gz``, a DICOM series folder, or a ``.zip`` of one) as HU.

    Raises ``IchfedError`` naming ``path`` for anything unusable: a missing path, an empty
    folder, no DICOM files, a truncated file, no CT series, a single 2D slice, NaN voxels.
    """
    p = Path(path)
    if not p.exists():
        raise IchfedError(f"{p}: no such file or folder")
    if p.is_dir():
        return _read_dicom_folder(p, source=p)
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
        return _read_dicom_folder(root, source=p)


# --------------------------------------------------------------------------- DICOM


@dataclasses.dataclass
class _Slice:
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
    bad_geometry: str | None = None  # why PixelSpacing/ImageOrientationPatient are unusable


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


def _scan(folder: Path, source: Path) -> tuple[list[_Slice], list[Path], list[Path]]:
    """Read every file's header; return (slices, broken DICOM files, ignored non-image files).

    Non-image files (text, thumbnails, DICOMDIR, vendor directory objects) are ignored; a slice
    whose geometry tags are unusable is marked (``bad_geometry``) and refused if its series is used.
    """
    slices: list[_Slice] = []
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
            bad_geometry = None
        except IchfedError as e:
            bad_geometry = str(e)  # fatal only if this slice belongs to the series that is used
        if meta.get(_TAG_SOP_CLASS, "").strip("\0 ") == _DICOMDIR_SOP_CLASS:
            ignored.append(f)
            continue
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
        slices.append(_Slice(
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
        ))
    return slices, broken, ignored


def _pick_series(slices: list[_Slice], source: Path, notes: list[str]) -> list[_Slice]:
    """Choose the CT series to use; say what else was there.

    Policy: only modality CT is accepted. Other modalities beside a CT series are ignored
    with a note. Of several CT series, the one with the most slices wins (ties: the
    lowest series UID, so the choice is deterministic) and the choice is noted.
    """
    series: dict[str, list[_Slice]] = defaultdict(list)
    for s in slices:
        series[s.series_uid].append(s)
    ct = {uid: ss for uid, ss in series.items() if ss[0].modality == "CT"}
    other = {uid: ss for uid, ss in series.items() if ss[0].modality != "CT"}

    def label(ss: list[_Slice]) -> str:
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


def _frame(orientation: np.ndarray) -> np.ndarray:
    """Orthonormal (row, column, normal) columns from the six direction cosines."""
    row = orientation[:3] / np.linalg.norm(orientation[:3])
    col = orientation[3:] - row * float(np.dot(orientation[3:], row))
    col = col / np.linalg.norm(col)
    return np.stack([row, col, np.cross(row, col)], axis=1)


def _read_slice(s: _Slice, source: Path) -> np.ndarray:
    """One slice's HU values, pixel padding already set to air."""
    try:
        img = sitk.ReadImage(str(s.file), sitk.sitkFloat32, imageIO="GDCMImageIO")
    except RuntimeError:
        raise IchfedError(f"{s.file}: DICOM pixel data is unreadable (truncated or corrupt file in {source})") from None
    arr = sitk.GetArrayFromImage(img)
    if arr.ndim == 3:
        arr = arr[0]
    if not np.all(np.isfinite(arr)):
        raise IchfedError(f"{s.file}: DICOM pixel data contains NaN or infinite values")
    dicom_checks.apply_padding(arr, s.padding_hu)
    return arr


@dataclasses.dataclass
class _Plan:
    """Everything about a DICOM series that headers tell: which slices, in what order, onto what grid."""

    stack: list[_Slice]
    frame: np.ndarray  # columns: row, column, normal
    depth: np.ndarray  # each slice's coordinate along the normal
    uv: np.ndarray  # each slice's first pixel along row and column
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    corrections: list[str]
    notes: list[str]
    multiframe: bool = False


def _plan_dicom(folder: Path, source: Path) -> _Plan:
    slices, broken, ignored = _scan(folder, source)
    if broken:
        names = ", ".join(str(f.relative_to(folder)) for f in broken[:3])
        more = f" and {len(broken) - 3} more" if len(broken) > 3 else ""
        raise IchfedError(f"{source}: truncated or corrupt DICOM file(s): {names}{more}")
    if not slices:
        raise IchfedError(f"{source}: no DICOM files found ({len(ignored)} file(s), none readable as DICOM)")
    notes: list[str] = []
    if ignored:
        # PACS/CD exports put DICOMDIR, vendor directory files, text and thumbnails beside the slices.
        names = ", ".join(str(f.relative_to(folder)) for f in ignored[:5])
        more = f" and {len(ignored) - 5} more" if len(ignored) > 5 else ""
        msg = f"skipped {len(ignored)} non-image file(s): {names}{more}"
        log.info("%s: %s", source, msg)
        notes.append(msg)
    chosen = _pick_series(slices, source, notes)
    bad = [s.bad_geometry for s in chosen if s.bad_geometry]
    if bad:
        raise IchfedError(bad[0] + (f" (and {len(bad) - 1} more slice(s))" if len(bad) > 1 else ""))

    if len(chosen) == 1 and len(chosen[0].size) == 3 and chosen[0].size[2] > 1:
        # One multi-frame (enhanced) file: GDCM already assembles a regular 3D grid.
        s = chosen[0]
        frame = _frame(s.orientation)
        dicom_checks.check_volume_size(source, s.size)
        return _Plan(chosen, frame, np.zeros(1), np.zeros((1, 2)), tuple(s.size), (*s.spacing, s.z_spacing),
                     tuple(float(v) for v in s.position), [], notes, multiframe=True)

    # A localizer or a reformat sometimes shares the series UID; keep the largest stack
    # of slices that share size, pixel spacing and orientation.
    groups: dict[tuple, list[_Slice]] = defaultdict(list)
    for s in chosen:
        key = (s.size[:2], tuple(np.round(s.spacing, 4)), tuple(np.round(s.orientation, 3)))
        groups[key].append(s)
    stack = max(groups.values(), key=len)
    if len(stack) < len(chosen):
        msg = f"ignored {len(chosen) - len(stack)} slice(s) whose size, spacing or orientation differ from the main stack"
        log.warning("%s: %s", source, msg)
        notes.append(msg)
    if len(stack) < 2:
        raise IchfedError(f"{source}: only one 2D CT slice; a 3D series of at least 2 slices is needed")

    frame = _frame(np.mean([s.orientation for s in stack], axis=0))
    normal = frame[:, 2]
    stack.sort(key=lambda s: (float(np.dot(s.position, normal)), s.instance))
    depth = np.array([float(np.dot(s.position, normal)) for s in stack])
    gaps = np.diff(depth)
    if np.any(gaps < 1e-3):
        i = int(np.argmin(gaps))
        raise IchfedError(f"{source}: two slices at the same position ({stack[i].file.name}, {stack[i + 1].file.name}); "
                          "more than one acquisition in the series?")
    step = float(np.median(gaps))
    corrections: list[str] = []
    travel = stack[-1].position - stack[0].position
    cos_angle = abs(float(np.dot(travel, normal))) / float(np.linalg.norm(travel))
    tilt_deg = float(np.degrees(np.arccos(min(1.0, cos_angle))))
    tilt_tag = max((abs(s.tilt_tag) for s in stack), default=0.0)
    if tilt_deg > TILT_TOLERANCE_DEG or tilt_tag > 0.01:
        corrections.append("gantry_tilt")
        log.info("%s: gantry tilt %.2f deg (tag %.2f deg); resampling on the slice normal", source, tilt_deg, tilt_tag)
    if float(np.max(np.abs(gaps - step))) > GAP_TOLERANCE * step:
        corrections.append("nonuniform_spacing")
        log.info("%s: slice gaps %.3f..%.3f mm; resampling to %.3f mm", source, gaps.min(), gaps.max(), step)

    # Output grid: the union of the slices' in-plane footprints, planes every `step` along the normal.
    nx, ny = stack[0].size[:2]
    sx, sy = stack[0].spacing
    uv = np.array([[float(np.dot(s.position, frame[:, 0])), float(np.dot(s.position, frame[:, 1]))] for s in stack])
    (u0, v0), (u1, v1) = uv.min(axis=0), uv.max(axis=0)
    size = (int(round((u1 - u0) / sx)) + nx, int(round((v1 - v0) / sy)) + ny, int(round((depth[-1] - depth[0]) / step)) + 1)
    dicom_checks.check_volume_size(source, size)
    origin = frame[:, 0] * u0 + frame[:, 1] * v0 + frame[:, 2] * depth[0]
    return _Plan(stack, frame, depth, uv, size, (sx, sy, step), tuple(float(v) for v in origin), corrections, notes)


def _read_dicom_folder(folder: Path, source: Path) -> Ingested:
    plan = _plan_dicom(folder, source)
    if plan.multiframe:
        f = plan.stack[0].file
        try:
            img = sitk.ReadImage(str(f), sitk.sitkFloat32, imageIO="GDCMImageIO")
        except RuntimeError:
            raise IchfedError(f"{f}: DICOM pixel data is unreadable (truncated or corrupt)") from None
        if plan.stack[0].padding_hu is not None:
            arr = sitk.GetArrayFromImage(img)
            dicom_checks.apply_padding(arr, plan.stack[0].padding_hu)
            padded = sitk.GetImageFromArray(arr)
            padded.CopyInformation(img)
            img = padded
        return Ingested(img, "CT", [], img.GetSize()[2], str(source), plan.notes)
    image = _resample_stack(plan, source)
    return Ingested(image, "CT", plan.corrections, len(plan.stack), str(source), plan.notes)


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
        plan = _plan_dicom(p, p)
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


def _resample_stack(plan: _Plan, source: Path) -> sitk.Image:
    """Put the sorted parallel slices onto the plan's regular (row, column, normal) grid.

    When slices are evenly spaced and untilted the output planes coincide with the
    source slices and this reproduces them exactly.
    """
    from tqdm import tqdm

    stack, depth, uv = plan.stack, plan.depth, plan.uv
    out_nx, out_ny, n_out = plan.size
    sx, sy, step = plan.spacing
    plane_origin = (float(uv[:, 0].min()), float(uv[:, 1].min()))
    cache: dict[int, np.ndarray] = {}

    def on_plane(i: int) -> np.ndarray:
        # Source slice i resampled onto the output plane's in-plane grid.
        if i not in cache:
            src = sitk.GetImageFromArray(_read_slice(stack[i], source))
            src.SetSpacing((sx, sy))
            src.SetOrigin((float(uv[i, 0]), float(uv[i, 1])))
            out = sitk.Resample(src, (out_nx, out_ny), sitk.Transform(), sitk.sitkLinear, plane_origin,
                                (sx, sy), (1.0, 0.0, 0.0, 1.0), FILL_HU, sitk.sitkFloat32)
            # Output planes advance monotonically, so older slices are never needed again.
            for old in [j for j in cache if j < i - 1]:
                del cache[old]
            cache[i] = sitk.GetArrayFromImage(out)
        return cache[i]

    volume = np.empty((n_out, out_ny, out_nx), dtype=np.float32)
    for k in tqdm(range(n_out), desc="resample slices", unit="slice", disable=None, leave=False):
        d = depth[0] + k * step
        i = int(np.clip(np.searchsorted(depth, d, side="right") - 1, 0, len(stack) - 2))
        w = float(np.clip((d - depth[i]) / (depth[i + 1] - depth[i]), 0.0, 1.0))
        if w < 1e-6:
            volume[k] = on_plane(i)
        elif w > 1 - 1e-6:
            volume[k] = on_plane(i + 1)
        else:
            volume[k] = (1.0 - w) * on_plane(i) + w * on_plane(i + 1)

    image = sitk.GetImageFromArray(volume)
    image.SetSpacing(plan.spacing)
    image.SetOrigin(plan.origin)
    image.SetDirection(tuple(float(v) for v in plan.frame.ravel()))
    return image
