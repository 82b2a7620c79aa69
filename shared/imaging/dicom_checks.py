"""Checks on DICOM headers and pixel values that ingestion applies to every slice.

* Geometry tags are validated before they are trusted: GDCM turns a zero PixelSpacing into
  1 mm (a 0.5 mm scan then measures 4x too large per slice) and an all-zero or negative tag
  ends in a NaN grid or an ITK exception. Each is a one-line error naming the tag.
* Rescale Slope/Intercept (0028,1053)/(0028,1052) turn stored values into HU (HU = slope x stored +
  intercept, PS3.3 C.11.1.1.2). A slope of 0 would map every pixel to the intercept, which no CT
  image can mean; GDCM reads it as 1 (so does dcm2niix), and ichfed does too, but says so in the
  result's notes (it used to pass unnoticed). A slope or intercept that is not a finite number is
  refused, naming the tag.
* Pixel padding (0028,0120)/(0028,0121) marks voxels outside the reconstruction circle with a
  sentinel such as -2000; left alone it becomes -3024 HU "tissue" beside air. Padded voxels are
  set to air before anything else sees the slice.
* A PACS or CD export puts non-image DICOM objects beside the slices (DICOMDIR, Philips
  DIRFILE, presentation states). GDCM cannot read them as images; a file that is complete DICOM
  but carries no Pixel Data element is skipped, while one that ends mid-element is reported as
  truncated. GDCM has no API for "is this an image", so a minimal walk of the element headers
  (little endian, the transfer syntaxes exports use) decides; it never interprets values.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from shared.imaging.nifti_checks import MAX_VOLUME_BYTES
from shared.plumbing.errors import IchfedError

TAG_PIXEL_SPACING = "0028|0030"
TAG_ORIENTATION = "0020|0037"
TAG_PADDING = "0028|0120"
TAG_PADDING_LIMIT = "0028|0121"
TAG_INTERCEPT = "0028|1052"
TAG_SLOPE = "0028|1053"
#: header tags ingestion must read for these checks
TAGS = (TAG_PIXEL_SPACING, TAG_ORIENTATION, TAG_PADDING, TAG_PADDING_LIMIT, TAG_INTERCEPT, TAG_SLOPE)
#: direction cosines further than this from unit length or from perpendicular are refused
COSINE_TOLERANCE = 0.01
AIR_HU = -1024.0

_PIXEL_DATA = (0x7FE0, 0x0010)
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UR", b"UT", b"UN", b"SV", b"UV"}
_IMPLICIT_LE = "1.2.840.10008.1.2"
_UNDEFINED = 0xFFFFFFFF


def _numbers(text: str) -> list[float] | None:
    try:
        return [float(v) for v in text.strip(" \0").split("\\") if v.strip() != ""]
    except ValueError:
        return None


def check_geometry_tags(file: Path, meta: dict[str, str]) -> None:
    """Raise ``IchfedError`` naming ``file`` and the tag when PixelSpacing or ImageOrientationPatient is unusable.

    Absent tags are left to the caller (GDCM's defaults); present ones must be sane.
    """
    if TAG_PIXEL_SPACING in meta:
        raw = meta[TAG_PIXEL_SPACING].strip(" \0")
        vals = _numbers(raw)
        if vals is None or len(vals) != 2:
            raise IchfedError(f"{file}: PixelSpacing (0028,0030) is '{raw}', expected two numbers")
        if not all(math.isfinite(v) and v > 0 for v in vals):
            raise IchfedError(f"{file}: PixelSpacing (0028,0030) is '{raw}'; pixel spacing must be positive")
    if TAG_ORIENTATION in meta:
        raw = meta[TAG_ORIENTATION].strip(" \0")
        vals = _numbers(raw)
        if vals is None or len(vals) != 6 or not all(math.isfinite(v) for v in vals):
            raise IchfedError(f"{file}: ImageOrientationPatient (0020,0037) is '{raw}', expected six numbers")
        row, col = np.asarray(vals[:3]), np.asarray(vals[3:])
        if (abs(np.linalg.norm(row) - 1) > COSINE_TOLERANCE or abs(np.linalg.norm(col) - 1) > COSINE_TOLERANCE
                or abs(float(np.dot(row, col))) > COSINE_TOLERANCE):
            raise IchfedError(f"{file}: ImageOrientationPatient (0020,0037) is '{raw}'; row and column "
                              "direction cosines must be unit vectors at right angles")


def rescale(file: Path, meta: dict[str, str]) -> tuple[float, float, bool]:
    """(slope, intercept, slope was 0) as GDCM applies them; raises naming the tag for a non-number.

    Absent tags mean 1 and 0 (GDCM's defaults); a slope of 0 is read as 1 (module doc).
    """
    values = []
    for tag, name, default in ((TAG_SLOPE, "RescaleSlope (0028,1053)", 1.0),
                               (TAG_INTERCEPT, "RescaleIntercept (0028,1052)", 0.0)):
        raw = meta.get(tag, "").strip(" \0")
        nums = _numbers(raw) if raw else [default]
        if not nums or not math.isfinite(nums[0]):
            raise IchfedError(f"{file}: {name} is '{raw}'; it must be a finite number")
        values.append(nums[0])
    slope, intercept = values
    return (1.0 if slope == 0 else slope), intercept, slope == 0


def check_volume_size(source: Path, size: tuple[int, ...]) -> None:
    """Refuse a planned grid whose float32 volume exceeds ``MAX_VOLUME_BYTES`` before it is allocated.

    A few KB of headers can declare 65535x65535 slices or place one slice a kilometre away; the
    grid then asks for tens of GB.
    """
    n_bytes = math.prod(int(v) for v in size) * 4
    if n_bytes > MAX_VOLUME_BYTES:
        raise IchfedError(f"{source}: the series would make a {'x'.join(str(int(v)) for v in size)} volume "
                          f"({n_bytes / 1024**3:.1f} GiB as float32); refusing more than "
                          f"{MAX_VOLUME_BYTES // 1024**3} GiB (check Rows/Columns and ImagePositionPatient)")


def padding_range_hu(meta: dict[str, str]) -> tuple[float, float] | None:
    """The HU interval that pixel padding (0028,0120)/(0028,0121) marks, or None without padding.

    Padding values are stored values; the rescale slope/intercept turn them into the HU that
    GDCM hands back, so the comparison happens in the same units as the pixels.
    """
    pad = _numbers(meta.get(TAG_PADDING, ""))
    if not pad:
        return None
    limit = _numbers(meta.get(TAG_PADDING_LIMIT, "")) or pad
    try:
        slope, intercept, _ = rescale(Path("(header)"), meta)  # GDCM's slope: 0 is read as 1
    except IchfedError:
        return None  # the slice is refused for its rescale tags if its series is used
    a, b = pad[0] * slope + intercept, limit[0] * slope + intercept
    # Stored values are integers: half a stored step either side absorbs float32 rounding.
    half = 0.5 * abs(slope)
    return min(a, b) - half, max(a, b) + half


def apply_padding(arr: np.ndarray, hu_range: tuple[float, float] | None) -> int:
    """Set padded voxels of ``arr`` (HU, in place) to air; returns how many there were."""
    if hu_range is None:
        return 0
    padded = (arr >= hu_range[0]) & (arr <= hu_range[1])
    arr[padded] = AIR_HU
    return int(np.count_nonzero(padded))


# ----------------------------------------------------------------- files GDCM cannot read


def raw_header(file: Path) -> tuple[bool, dict[str, str], bool] | None:
    """Walk a Part-10 file's element headers: (complete, string values of TAGS found, has pixel data).

    ``complete`` is True when the elements end exactly at the end of the file. Returns None when
    the file is not Part-10 DICOM or uses a transfer syntax this walk does not know (big endian).
    """
    data = file.read_bytes()
    if len(data) < 132 or data[128:132] != b"DICM":
        return None
    pos, explicit, found, pixels = 132, True, {}, False  # pixels: set only by returning
    wanted = {tuple(int(x, 16) for x in t.split("|")): t for t in TAGS}
    while pos < len(data):
        if pos + 8 > len(data):
            return False, found, pixels
        group, elem = int.from_bytes(data[pos:pos + 2], "little"), int.from_bytes(data[pos + 2:pos + 4], "little")
        if group != 0x0002 and pos > 132 and explicit is None:
            return None
        vr = data[pos + 4:pos + 6]
        if group == 0xFFFE:  # items and delimiters: no VR, 4-byte length; step into the item's content
            length, head, skip = int.from_bytes(data[pos + 4:pos + 8], "little"), 8, False
        elif (group == 0x0002 or explicit) and vr.isalpha():
            if vr in _LONG_VRS:
                if pos + 12 > len(data):
                    return False, found, pixels
                length, head = int.from_bytes(data[pos + 8:pos + 12], "little"), 12
            else:
                length, head = int.from_bytes(data[pos + 6:pos + 8], "little"), 8
            skip = vr != b"SQ"
        else:
            length, head, skip = int.from_bytes(data[pos + 4:pos + 8], "little"), 8, True
        if (group, elem) == _PIXEL_DATA:
            # Geometry tags precede pixel data; what follows (possibly encapsulated fragments) is not walked.
            return True, found, True
        if length == _UNDEFINED:
            pos += head  # undefined length (sequence, encapsulated pixels): its content follows as elements
            continue
        if skip or group == 0xFFFE and elem != 0xE000:
            value = data[pos + head:pos + head + length]
            if pos + head + length > len(data):
                return False, found, pixels
            if (group, elem) in wanted:
                found[wanted[(group, elem)]] = value.decode("ascii", "replace")
            if (group, elem) == (0x0002, 0x0010):
                ts = value.decode("ascii", "replace").strip(" \0")
                explicit = False if ts == _IMPLICIT_LE else (None if ts == "1.2.840.10008.1.2.2" else True)
            pos += head + length
        else:
            pos += head
    return True, found, pixels


def unreadable_is_image(f: Path) -> bool:
    """For a Part-10 file GDCM cannot read: True when it is a broken image slice, False when it is no image.

    A complete DICOM object without Pixel Data (DICOMDIR, Philips DIRFILE) is not an image; a file cut
    off mid-element is a broken slice; one whose geometry tags are unusable raises naming the tag.
    """
    walked = raw_header(f)
    if walked is None:
        return True  # a transfer syntax the walk does not know: treat as a slice GDCM failed on
    complete, meta, has_pixels = walked
    check_geometry_tags(f, meta)
    return has_pixels or not complete
