"""The site data layout a hospital fills, and a reader that says what is unusable.

```
<site>/cases.csv                  case_id,label[,...]  label: neoplastic | non-neoplastic | 1 | 0 | empty
<site>/images/<case_id>.nii.gz    or .nii, or images/<case_id>/ (one DICOM series), or images/<case_id>.zip
<site>/masks/<case_id>.nii.gz     optional (or .nii): 0 background, 1 ICH, 2 PHE, image geometry
```

``read_site`` reports every unusable case with the reason and carries on; only a missing
or malformed ``cases.csv`` (or site folder) stops it. Images and masks are checked from
file headers only (no pixel data): a DICOM folder must hold a usable CT series, and a mask
must sit on the grid ingestion will produce (after any tilt/spacing correction). Zips are
not unpacked here; their problems surface when they are ingested.

An empty label marks an **unlabelled** case (a scan without a confirmed diagnosis). A federated
site (``read_site(root, allow_unlabelled=True)``) never trains on it or counts it in a metric,
but uses its crop for the site's own BatchNorm statistics (``shared.models.batchnorm_stats``); for
every other reader (reference training) an empty label is a problem like any other.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from shared.imaging.ingest import read_geometry
from shared.imaging.nifti_checks import check_payload
from shared.plumbing.errors import IchfedError

log = logging.getLogger(__name__)

LABELS = {"neoplastic": 1, "1": 1, "non-neoplastic": 0, "0": 0}
MASK_LABELS = (0, 1, 2)
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".zip")
MASK_SUFFIXES = (".nii.gz", ".nii")
# case_id becomes a file name; keep it to characters that are safe on every file system.
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Geometry tolerances: NIfTI stores float32, DICOM-derived geometry is float64.
_SPACING_RTOL = 1e-4
_ORIGIN_ATOL_MM = 1e-3
_DIRECTION_ATOL = 1e-4


@dataclasses.dataclass(frozen=True)
class CaseRef:
    """One usable case: its label (1 neoplastic, 0 non-neoplastic, None unlabelled), image and optional mask."""

    case_id: str
    label: int | None
    image_path: Path
    mask_path: Path | None
    extra: dict[str, str]


@dataclasses.dataclass(frozen=True)
class Problem:
    """Why a case (or, with ``case_id`` None, the site as a whole) is unusable."""

    case_id: str | None
    message: str


@dataclasses.dataclass
class SiteData:
    """A site folder: the usable cases and every problem found."""

    root: Path
    cases: list[CaseRef]
    problems: list[Problem]

    @property
    def labelled(self) -> list[CaseRef]:
        """The cases with a label (the only ones any training or metric uses)."""
        return [c for c in self.cases if c.label is not None]

    @property
    def unlabelled(self) -> list[CaseRef]:
        """The cases with an empty label (only read with ``allow_unlabelled``)."""
        return [c for c in self.cases if c.label is None]


def read_site(root: str | Path, *, allow_unlabelled: bool = False) -> SiteData:
    """Read ``<root>/cases.csv`` and locate each case's image and mask.

    Raises ``IchfedError`` only when the folder or ``cases.csv`` is missing or malformed;
    every per-case issue (bad id, label not allowed, duplicate id, missing or ambiguous
    image, mask geometry mismatch) becomes a ``Problem`` and the case is left out. An empty
    label is kept as ``label=None`` with ``allow_unlabelled`` and is a ``Problem`` without it.
    """
    root = Path(root)
    if not root.is_dir():
        raise IchfedError(f"{root}: site folder not found")
    rows = _read_cases_csv(root / "cases.csv")
    problems: list[Problem] = []
    if not rows:
        problems.append(Problem(None, "cases.csv lists no cases"))

    seen: dict[str, list[int]] = {}
    for line, row in rows:
        cid = (row.get("case_id") or "").strip()
        seen.setdefault(cid, []).append(line)
    duplicates = {cid for cid, lines in seen.items() if cid and len(lines) > 1}
    for cid in sorted(duplicates):
        problems.append(Problem(cid, f"duplicate case_id on cases.csv lines {', '.join(map(str, seen[cid]))}; "
                                     "all of them are left out"))

    cases: list[CaseRef] = []
    for line, row in rows:
        cid = (row.get("case_id") or "").strip()
        if cid in duplicates:
            continue
        if not cid:
            problems.append(Problem(None, f"cases.csv line {line}: empty case_id"))
            continue
        if not _CASE_ID.match(cid):
            problems.append(Problem(cid, f"cases.csv line {line}: case_id {cid!r} may only hold letters, digits, "
                                         "'.', '_' and '-' and must start with a letter or digit"))
            continue
        case, why = _case(root, cid, line, row, allow_unlabelled)
        if why:
            problems.extend(Problem(cid, w) for w in why)
        else:
            cases.append(case)

    for p in problems:
        log.warning("%s: %s%s", root, f"case {p.case_id}: " if p.case_id else "", p.message)
    listed = {cid for cid in seen}
    images = root / "images"
    if images.is_dir():
        unlisted = sorted(_stem(f) for f in images.iterdir() if not f.name.startswith(".") and _stem(f) not in listed)
        if unlisted:
            log.info("%s: %d image(s) not listed in cases.csv are ignored (e.g. %s)", root, len(unlisted), unlisted[0])
    return SiteData(root=root, cases=cases, problems=problems)


def read_mask(path: str | Path, like: sitk.Image) -> sitk.Image:
    """Read a label mask (0 background, 1 ICH, 2 PHE) as uint8 on ``like``'s grid.

    Raises ``IchfedError`` naming ``path`` when it is unreadable or truncated, not 3D, holds
    non-integer (probability) or other values, or does not share ``like``'s size, spacing, origin and
    direction. Geometry within float32 rounding is accepted and set exactly to ``like``'s.
    """
    p = Path(path)
    if not p.is_file():
        raise IchfedError(f"{p}: mask file not found")
    if p.name.lower().endswith((".nii", ".nii.gz")):
        check_payload(p)  # ITK zero-fills a short payload: a cut-off mask would lose lesion voxels
    try:
        mask = sitk.ReadImage(str(p))
    except RuntimeError:
        raise IchfedError(f"{p}: not a readable mask image") from None
    if mask.GetNumberOfComponentsPerPixel() != 1 or mask.GetDimension() != 3:
        raise IchfedError(f"{p}: mask must be a 3D single-channel label image")
    why = _geometry_mismatch(_Geometry.of(mask), _Geometry.of(like))
    if why:
        raise IchfedError(f"{p}: mask geometry does not match the image ({why})")
    arr = sitk.GetArrayViewFromImage(mask)
    values = np.unique(arr)
    if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
        # A probability map or a linearly resampled label image, not labels 0/1/2.
        raise IchfedError(f"{p}: mask holds non-integer values (e.g. {values[values != np.round(values)][:3].tolist()}); "
                          "expected an integer label image (0 background, 1 ICH, 2 PHE)")
    if not np.all(np.isin(values, MASK_LABELS)):
        bad = [v.item() for v in values if v not in MASK_LABELS][:5]
        raise IchfedError(f"{p}: mask holds values {bad}; allowed are 0 background, 1 ICH, 2 PHE")
    out = sitk.Cast(mask, sitk.sitkUInt8)
    out.CopyInformation(like)
    return out


# --------------------------------------------------------------------------- internals


def _read_cases_csv(path: Path) -> list[tuple[int, dict[str, str]]]:
    if not path.is_file():
        raise IchfedError(f"{path}: file not found (every site needs cases.csv with columns case_id,label)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise IchfedError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise IchfedError(f"{path}: cannot read ({e.strerror})") from None
    reader = csv.DictReader(text.splitlines(), strict=True)
    try:
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in ("case_id", "label") if c not in header]
        if missing:
            raise IchfedError(f"{path}: header must hold case_id and label, missing {', '.join(missing)} "
                              f"(found: {', '.join(header) or 'nothing'})")
        if len(set(header)) != len(header):
            raise IchfedError(f"{path}: header repeats a column name ({', '.join(header)})")
        reader.fieldnames = header
        rows = []
        for row in reader:
            if not any((v or "").strip() for k, v in row.items() if k is not None and isinstance(v, str)):
                continue  # blank line
            if None in row:
                raise IchfedError(f"{path}: line {reader.line_num} has more fields than the header")
            rows.append((reader.line_num, {k: (v or "") for k, v in row.items()}))
    except csv.Error as e:
        raise IchfedError(f"{path}: malformed CSV at line {reader.line_num} ({e})") from None
    return rows


def _case(root: Path, cid: str, line: int, row: dict[str, str],
          allow_unlabelled: bool = False) -> tuple[CaseRef | None, list[str]]:
    why: list[str] = []
    raw_label = row["label"].strip()
    label = LABELS.get(raw_label.lower())
    if not raw_label and not allow_unlabelled:
        why.append(f"cases.csv line {line}: empty label (only a federated site uses unlabelled cases)")
    elif label is None and raw_label:
        why.append(f"cases.csv line {line}: label {raw_label!r} is not one of neoplastic, non-neoplastic, 1, 0"
                   + (" or empty" if allow_unlabelled else ""))

    image = None
    image_geometry = None
    candidates = [root / "images" / f"{cid}{s}" for s in IMAGE_SUFFIXES if (root / "images" / f"{cid}{s}").is_file()]
    folder = root / "images" / cid
    if folder.is_dir():
        candidates.append(folder)
    if not candidates:
        why.append(f"no image: expected images/{cid}.nii.gz, images/{cid}.nii, images/{cid}/ or images/{cid}.zip")
    elif len(candidates) > 1:
        why.append("several images: " + ", ".join(str(c.relative_to(root)) for c in candidates) + "; keep one")
    else:
        image = candidates[0]
        try:
            image_geometry = read_geometry(image)
        except IchfedError as e:
            why.append(f"image unusable: {e}")
            image = None

    mask = None
    masks = [root / "masks" / f"{cid}{s}" for s in MASK_SUFFIXES if (root / "masks" / f"{cid}{s}").is_file()]
    if len(masks) > 1:
        why.append("several masks: " + ", ".join(str(m.relative_to(root)) for m in masks) + "; keep one")
    elif masks:
        mask = masks[0]
        mismatch = _header_check(mask, image_geometry)
        if mismatch:
            why.append(f"{mask.relative_to(root)}: {mismatch}")

    if why:
        return None, why
    extra = {k: v for k, v in row.items() if k not in ("case_id", "label")}
    return CaseRef(case_id=cid, label=label, image_path=image, mask_path=mask, extra=extra), []


@dataclasses.dataclass(frozen=True)
class _Geometry:
    dimension: int
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, img) -> "_Geometry":
        # Works for sitk.Image and for an ImageFileReader after ReadImageInformation.
        return cls(img.GetDimension(), tuple(img.GetSize()), tuple(img.GetSpacing()), tuple(img.GetOrigin()),
                   tuple(img.GetDirection()))


def _read_header(path: Path) -> _Geometry:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return _Geometry.of(reader)


def _geometry_mismatch(a: _Geometry, b: _Geometry) -> str | None:
    """A short reason why ``a`` (mask) and ``b`` (image) are not on the same grid, or None."""
    if a.dimension != b.dimension:
        return f"{a.dimension}D vs {b.dimension}D"
    if a.size != b.size:
        return f"size {list(a.size)} vs {list(b.size)}"
    if not np.allclose(a.spacing, b.spacing, rtol=_SPACING_RTOL, atol=0):
        return f"spacing {[round(v, 4) for v in a.spacing]} vs {[round(v, 4) for v in b.spacing]}"
    if not np.allclose(a.origin, b.origin, rtol=0, atol=_ORIGIN_ATOL_MM + 1e-6 * max(map(abs, b.origin), default=0)):
        return f"origin {[round(v, 3) for v in a.origin]} vs {[round(v, 3) for v in b.origin]}"
    if not np.allclose(a.direction, b.direction, rtol=0, atol=_DIRECTION_ATOL):
        return "direction differs"
    return None


def _header_check(mask: Path, image_geometry: dict | None) -> str | None:
    try:
        check_payload(mask, stream_gzip=False)  # header-level: a cut .nii or an absurd declared size
        mg = _read_header(mask)
    except IchfedError as e:
        return str(e).removeprefix(f"{mask}: ")
    except RuntimeError:
        return "not a readable image"
    if mg.dimension != 3:
        return f"mask is {mg.dimension}D, expected 3D"
    if image_geometry is None:
        return None  # image unusable (reported already) or a zip; read_mask checks after ingestion
    ig = _Geometry(3, **{k: tuple(v) for k, v in image_geometry.items()})
    why = _geometry_mismatch(mg, ig)
    return f"mask geometry does not match the image ({why})" if why else None


def _stem(f: Path) -> str:
    name = f.name
    for s in IMAGE_SUFFIXES:
        if name.lower().endswith(s):
            return name[: -len(s)]
    return name
