"""One DICOM CT series folder -> a regular float32 HU volume (``shared.imaging.ingest`` calls it).

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

Series choice (``shared/imaging/dicom_headers.py``, headers only): only modality CT is accepted; non-CT
series beside a CT are ignored, and of several CT series the one with the most slices is used;
both cases log a warning and add a ``notes`` entry.

Rescale slope/intercept are applied by GDCM when a slice is read; values are cast to float32. A
RescaleSlope of 0 (which would map every pixel to the intercept) is read as 1, as GDCM and dcm2niix
do, and noted (``dicom_checks.rescale``).

A missing slice (``shared/imaging/dicom_gaps.py``) is refused with one line naming where it is missing,
unless ``allow_missing_slices``; slices of one orientation whose Rows/Columns or PixelSpacing change
mid-series are refused (they cannot be one stack).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from shared.imaging import dicom_checks, dicom_gaps
from shared.imaging.dicom_headers import (
    TAG_KERNEL,
    TAG_MANUFACTURER,
    TAG_MODEL,
    TAG_SLICE_THICKNESS,
    SliceHeader,
    pick_series,
    scan_headers,
)
from shared.plumbing.errors import IchfedError

log = logging.getLogger(__name__)

#: value given to output voxels that no source slice covers (air)
FILL_HU = -1024.0
#: relative deviation of a slice gap from the median gap that counts as non-uniform spacing
GAP_TOLERANCE = 0.01
#: angle (degrees) between slice normal and stacking direction that counts as gantry tilt
TILT_TOLERANCE_DEG = 0.5

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
    """The series as ``shared.imaging.ingest.read_image`` wraps it."""

    image: sitk.Image
    corrections: list[str]
    source_slices: int
    notes: list[str]
    scanner: Scanner


def _frame(orientation: np.ndarray) -> np.ndarray:
    """Orthonormal (row, column, normal) columns from the six direction cosines."""
    row = orientation[:3] / np.linalg.norm(orientation[:3])
    col = orientation[3:] - row * float(np.dot(orientation[3:], row))
    col = col / np.linalg.norm(col)
    return np.stack([row, col, np.cross(row, col)], axis=1)


def _read_slice(s: SliceHeader, source: Path) -> np.ndarray:
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

    stack: list[SliceHeader]
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


def plan_series(folder: Path, source: Path, allow_missing_slices: bool = False) -> _Plan:
    """Which slices of ``folder`` make the CT volume, in what order, onto what grid (headers only).

    ``source`` names the input in error messages (the zip, for an unpacked one). Raises
    ``IchfedError`` for a folder ``read_series`` would refuse on header grounds (a missing slice
    too, unless ``allow_missing_slices``: it is then interpolated and noted).
    """
    chosen, notes = _chosen_series(folder, source)
    if len(chosen) == 1 and len(chosen[0].size) == 3 and chosen[0].size[2] > 1:
        # One multi-frame (enhanced) file: GDCM already assembles a regular 3D grid.
        s = chosen[0]
        frame = _frame(s.orientation)
        dicom_checks.check_volume_size(source, s.size)
        return _Plan(chosen, frame, np.zeros(1), np.zeros((1, 2)), tuple(s.size), (*s.spacing, s.z_spacing),
                     tuple(float(v) for v in s.position), [], notes, multiframe=True, tilt_deg=abs(s.tilt_tag))
    return _regular_grid(_main_stack(chosen, source, notes), source, notes, allow_missing_slices)


def _chosen_series(folder: Path, source: Path) -> tuple[list[SliceHeader], list[str]]:
    """The slices of the CT series to use, and notes on what else the folder held."""
    slices, broken, ignored = scan_headers(folder, source)
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
    chosen = pick_series(slices, source, notes)
    bad = [s.bad_geometry for s in chosen if s.bad_geometry]
    if bad:
        raise IchfedError(bad[0] + (f" (and {len(bad) - 1} more slice(s))" if len(bad) > 1 else ""))
    zero = [s for s in chosen if s.slope_zero]
    if zero:
        msg = (f"RescaleSlope (0028,1053) is 0 on {len(zero)} slice(s) (e.g. {zero[0].file.name}); read as 1, as GDCM "
               "and dcm2niix do (a zero slope would map every pixel to the intercept)")
        log.warning("%s: %s", source, msg)
        notes.append(msg)
    return chosen, notes


def _main_stack(chosen: list[SliceHeader], source: Path, notes: list[str]) -> list[SliceHeader]:
    """The largest set of parallel slices (at least two), which must share one size and pixel spacing."""
    # A localizer sometimes shares the series UID: slices of another orientation are left out.
    groups: dict[tuple, list[SliceHeader]] = defaultdict(list)
    for s in chosen:
        groups[tuple(np.round(s.orientation, 3))].append(s)
    stack = max(groups.values(), key=len)
    if len(stack) < len(chosen):
        msg = f"ignored {len(chosen) - len(stack)} slice(s) whose orientation differs from the main stack"
        log.warning("%s: %s", source, msg)
        notes.append(msg)
    if len(stack) < 2:
        raise IchfedError(f"{source}: only one 2D CT slice; a 3D series of at least 2 slices is needed")
    shapes = Counter((s.size[:2], tuple(np.round(s.spacing, 4))) for s in stack)
    if len(shapes) > 1:
        (size, spacing), n = shapes.most_common(1)[0]
        odd = next(s for s in stack if (s.size[:2], tuple(np.round(s.spacing, 4))) != (size, spacing))
        raise IchfedError(f"{source}: Rows/Columns or PixelSpacing change within the series ({n} slice(s) are "
                          f"{size[1]}x{size[0]} at {spacing[0]:g} mm, {odd.file.name} is {odd.size[1]}x{odd.size[0]} "
                          f"at {odd.spacing[0]:g} mm); one series must have one slice size")
    return stack


def _regular_grid(stack: list[SliceHeader], source: Path, notes: list[str], allow_missing: bool = False) -> _Plan:
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
    corrections: list[str] = []
    missing = dicom_gaps.find_gaps([s.instance for s in stack], np.array([s.position for s in stack]), depth)
    if missing:
        _missing_slices(missing, stack, source, notes, allow_missing)
        corrections.append("missing_slices")
    # A missing stretch counts as the slices it lacks, so one gap does not set the spacing.
    step = float(np.median(dicom_gaps.filled_gaps(depth, missing)))
    travel = stack[-1].position - stack[0].position
    cos_angle = abs(float(np.dot(travel, normal))) / float(np.linalg.norm(travel))
    tilt_deg = float(np.degrees(np.arccos(min(1.0, cos_angle))))
    tilt_tag = max((abs(s.tilt_tag) for s in stack), default=0.0)
    if tilt_deg > TILT_TOLERANCE_DEG or tilt_tag > 0.01:
        corrections.append("gantry_tilt")
        log.info("%s: gantry tilt %.2f deg (tag %.2f deg); resampling on the slice normal", source, tilt_deg, tilt_tag)
    if float(np.max(np.abs(dicom_gaps.filled_gaps(depth, missing) - step))) > GAP_TOLERANCE * step:
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


def _missing_slices(missing: list, stack: list[SliceHeader], source: Path, notes: list[str], allow: bool) -> None:
    """Refuse the series (one line naming the first gap) or, when ``allow``, note every gap."""
    first = missing[0]
    a, b = stack[first.after], stack[first.after + 1]
    n = sum(g.n_missing for g in missing)
    if not allow:
        more = f" ({len(missing) - 1} more gap(s) in the series)" if len(missing) > 1 else ""
        skipped = next((m for m in notes if m.startswith("skipped ")), None)
        raise IchfedError(f"{source}: slice missing between {a.file.name} and {b.file.name}: "
                          f"{dicom_gaps.describe(first)}; the two are {first.gap_mm:.2f} mm apart where the "
                          f"series' slices are {first.usual_mm:.2f} mm apart{more}"
                          f"{f' ({skipped})' if skipped else ''}; pass --allow-missing-slices to interpolate across it")
    msg = (f"interpolated across {n} missing slice(s) (--allow-missing-slices): "
           + "; ".join(dicom_gaps.describe(g) for g in missing))
    log.warning("%s: %s", source, msg)
    notes.append(msg)


def read_series(folder: Path, source: Path, allow_missing_slices: bool = False) -> DicomVolume:
    """The CT series in ``folder`` as a regular float32 HU volume, with its scanner metadata.

    A missing slice is refused unless ``allow_missing_slices`` (then interpolated and noted).
    """
    plan = plan_series(folder, source, allow_missing_slices)
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
        thickness = float(common(TAG_SLICE_THICKNESS) or "nan")
    except ValueError:
        thickness = float("nan")
    return Scanner(manufacturer=common(TAG_MANUFACTURER) or "unknown", model=common(TAG_MODEL) or "unknown",
                   kernel=common(TAG_KERNEL) or "unknown",
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
