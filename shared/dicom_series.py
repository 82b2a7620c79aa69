"""One DICOM CT series folder -> a regular float32 HU volume (``shared.ingest`` calls it).

The reader never trusts the first two slices for geometry. Every slice carries its
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
from collections import defaultdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import dicom_checks
from .errors import IchfedError

log = logging.getLogger(__name__)

#: value given to output voxels that no source slice covers (air)
FILL_HU = -1024.0
#: relative deviation of a slice gap from the median gap that counts as non-uniform spacing
GAP_TOLERANCE = 0.01
#: angle (degrees) between slice normal and stacking direction that counts as gantry tilt
TILT_TOLERANCE_DEG = 0.5

_TAG_MODALITY = "0008|0060"
_TAG_SERIES_UID = "0020|000e"
_TAG_SERIES_DESCRIPTION = "0008|103e"
_TAG_POSITION = "0020|0032"
_TAG_ORIENTATION = "0020|0037"
_TAG_GANTRY_TILT = "0018|1120"
_TAG_INSTANCE = "0020|0013"
_TAG_SOP_CLASS = "0008|0016"
# Scanner metadata kept for the site's Table 1 (``ichfed stats``): never pixel data or patient tags.
_TAG_MANUFACTURER = "0008|0070"
_TAG_MODEL = "0008|1090"
_TAG_KERNEL = "0018|1210"
_TAG_SLICE_THICKNESS = "0018|0050"
_SCANNER_TAGS = (_TAG_MANUFACTURER, _TAG_MODEL, _TAG_KERNEL, _TAG_SLICE_THICKNESS)
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_TAGS_READ = (_TAG_MODALITY, _TAG_SERIES_UID, _TAG_SERIES_DESCRIPTION, _TAG_POSITION, _TAG_ORIENTATION,
              _TAG_GANTRY_TILT, _TAG_INSTANCE, _TAG_SOP_CLASS, *_SCANNER_TAGS, *dicom_checks.TAGS)



@dataclasses.dataclass(frozen=True)
class Scanner:
    """What the scanner's DICOM tags say about the acquisition ("unknown" / None when not said).

    ``tilt_deg`` is the larger of the GantryDetectorTilt tag and the tilt measured from the
    slice positions. Kept for the site's Table 1 (``client/stats.py``); it leaves the site only
    as category counts.
    """

    manufacturer: str = "unknown"
    model: str = "unknown"
    kernel: str = "unknown"
    slice_thickness_mm: float | None = None
    tilt_deg: float | None = None


@dataclasses.dataclass
class DicomVolume:
    """The series as ``shared.ingest.read_image`` wraps it."""

    image: sitk.Image
    corrections: list[str]
    source_slices: int
    notes: list[str]
    scanner: Scanner


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
        slices.append(_slice_from_header(f, reader, meta, bad_geometry))
    return slices, broken, ignored


def _slice_from_header(f: Path, reader, meta: dict[str, str], bad_geometry: str | None) -> _Slice:
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
    return _Slice(
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
        scanner_tags={k: meta[k].strip("\0 ") for k in _SCANNER_TAGS if meta.get(k, "").strip("\0 ")},
    )


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
    tilt_deg: float = 0.0  # the larger of the measured and the tagged gantry tilt


def plan_series(folder: Path, source: Path) -> _Plan:
    """Which slices of ``folder`` make the CT volume, in what order, onto what grid (headers only).

    ``source`` names the input in error messages (the zip, for an unpacked one). Raises
    ``IchfedError`` for a folder ``read_series`` would refuse on header grounds.
    """
    chosen, notes = _chosen_series(folder, source)
    if len(chosen) == 1 and len(chosen[0].size) == 3 and chosen[0].size[2] > 1:
        # One multi-frame (enhanced) file: GDCM already assembles a regular 3D grid.
        s = chosen[0]
        frame = _frame(s.orientation)
        dicom_checks.check_volume_size(source, s.size)
        return _Plan(chosen, frame, np.zeros(1), np.zeros((1, 2)), tuple(s.size), (*s.spacing, s.z_spacing),
                     tuple(float(v) for v in s.position), [], notes, multiframe=True, tilt_deg=abs(s.tilt_tag))
    return _regular_grid(_main_stack(chosen, source, notes), source, notes)


def _chosen_series(folder: Path, source: Path) -> tuple[list[_Slice], list[str]]:
    """The slices of the CT series to use, and notes on what else the folder held."""
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
    return chosen, notes


def _main_stack(chosen: list[_Slice], source: Path, notes: list[str]) -> list[_Slice]:
    """The largest set of parallel slices of one size and spacing (at least two)."""
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
    return stack


def _regular_grid(stack: list[_Slice], source: Path, notes: list[str]) -> _Plan:
    """Order the slices along their normal, note tilt and uneven gaps, and lay out the output grid."""
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
    return _Plan(stack, frame, depth, uv, size, (sx, sy, step), tuple(float(v) for v in origin), corrections, notes,
                 tilt_deg=max(tilt_deg, tilt_tag))


def read_series(folder: Path, source: Path) -> DicomVolume:
    """The CT series in ``folder`` as a regular float32 HU volume, with its scanner metadata."""
    plan = plan_series(folder, source)
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
        return DicomVolume(img, [], img.GetSize()[2], plan.notes, _scanner(plan))
    image = _resample_stack(plan, source)
    return DicomVolume(image, plan.corrections, len(plan.stack), plan.notes, _scanner(plan))


def _scanner(plan: _Plan) -> Scanner:
    """The scanner tags most slices of the stack agree on."""
    def common(tag: str) -> str | None:
        values = [s.scanner_tags[tag] for s in plan.stack if tag in s.scanner_tags]
        return max(sorted(set(values)), key=values.count) if values else None

    try:
        thickness = float(common(_TAG_SLICE_THICKNESS) or "nan")
    except ValueError:
        thickness = float("nan")
    return Scanner(manufacturer=common(_TAG_MANUFACTURER) or "unknown", model=common(_TAG_MODEL) or "unknown",
                   kernel=common(_TAG_KERNEL) or "unknown",
                   slice_thickness_mm=thickness if np.isfinite(thickness) and thickness > 0 else None,
                   tilt_deg=round(float(plan.tilt_deg), 3))


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
