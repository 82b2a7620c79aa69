"""Synthetic DICOM series and bad inputs for ingestion tests, written with SimpleITK's GDCM writer.

Slices are written as int16 stored values; the writer converts the HU we hand it into stored
values with the rescale slope/intercept tags we set, so reading back exercises the rescale.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk

_uid_counter = [0]


def new_uid() -> str:
    """A fresh, syntactically valid DICOM UID (unique within the test session)."""
    _uid_counter[0] += 1
    return f"1.2.826.0.1.3680043.10.1000.{_uid_counter[0]}"


def tilted_frame(tilt_deg: float) -> np.ndarray:
    """(row, column, normal) columns of a head CT acquired with gantry tilt about the x axis."""
    t = np.radians(tilt_deg)
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, np.cos(t), -np.sin(t)])
    return np.stack([row, col, np.cross(row, col)], axis=1)


def write_series(
    folder: Path,
    slices_hu: Sequence[np.ndarray],
    positions: Sequence[Sequence[float]],
    *,
    spacing: tuple[float, float] = (0.8, 0.8),
    frame: np.ndarray | None = None,
    modality: str = "CT",
    series_uid: str | None = None,
    intercept: float = -1024.0,
    slope: float = 1.0,
    gantry_tilt: float | None = None,
    prefix: str = "slice",
    file_order: Sequence[int] | None = None,
) -> list[Path]:
    """Write one DICOM file per 2D array (y, x) with its own ImagePositionPatient.

    ``frame`` holds the row and column direction cosines in its first two columns
    (default: axial). ``file_order`` permutes the file names so that tests do not rely
    on names being sorted by position.
    """
    folder.mkdir(parents=True, exist_ok=True)
    frame = np.eye(3) if frame is None else frame
    orientation = "\\".join(f"{v:.7f}" for v in np.concatenate([frame[:, 0], frame[:, 1]]))
    series_uid = series_uid or new_uid()
    study_uid = new_uid()
    order = list(file_order) if file_order is not None else list(range(len(slices_hu)))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    for i, (hu, pos) in enumerate(zip(slices_hu, positions)):
        img = sitk.GetImageFromArray(np.asarray(hu, dtype=np.int16))
        img.SetSpacing(spacing)
        tags = {
            "0008|0060": modality,
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2" if modality == "CT" else "1.2.840.10008.5.1.4.1.1.4",
            "0008|0018": new_uid(),
            "0020|000d": study_uid,
            "0020|000e": series_uid,
            "0020|0013": str(i + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in pos),
            "0020|0037": orientation,
            "0028|0030": f"{spacing[1]:.6f}\\{spacing[0]:.6f}",
            "0028|1052": f"{intercept:g}",
            "0028|1053": f"{slope:g}",
            "0010|0020": "SYNTHETIC",
        }
        if gantry_tilt is not None:
            tags["0018|1120"] = f"{gantry_tilt:g}"
        for k, v in tags.items():
            img.SetMetaData(k, v)
        path = folder / f"{prefix}{order[i]:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(img)
        paths.append(path)
    return paths


def simple_series(folder: Path, n: int = 4, size: int = 8, gap: float = 2.5, modality: str = "CT",
                  series_uid: str | None = None, prefix: str = "slice", seed: int = 0) -> np.ndarray:
    """An untilted, evenly spaced series of random HU values; returns the HU volume (z, y, x)."""
    rng = np.random.default_rng(seed)
    vol = rng.integers(-1000, 1500, size=(n, size, size)).astype(np.int16)
    positions = [(-10.0, -20.0, 30.0 + gap * k) for k in range(n)]
    write_series(folder, list(vol), positions, modality=modality, series_uid=series_uid, prefix=prefix)
    return vol


# ---------------------------------------------------------------- bad inputs, one builder each


def _empty_folder(tmp: Path) -> Path:
    p = tmp / "empty"
    p.mkdir()
    return p


def _non_dicom_folder(tmp: Path) -> Path:
    p = tmp / "notdicom"
    p.mkdir()
    (p / "readme.txt").write_text("this is not a scan\n", encoding="utf-8")
    (p / "slice1.dcm").write_bytes(b"\x00" * 64 + b"not dicom at all")
    return p


def _truncated_dicom(tmp: Path) -> Path:
    p = tmp / "truncated"
    paths = write_series(p, [np.zeros((16, 16))] * 3, [(0, 0, 0), (0, 0, 2), (0, 0, 4)])
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])
    return p


def _mr_series(tmp: Path) -> Path:
    p = tmp / "mr"
    simple_series(p, modality="MR")
    return p


def _seg_series(tmp: Path) -> Path:
    p = tmp / "seg"
    simple_series(p, modality="SEG")
    return p


def _single_slice(tmp: Path) -> Path:
    p = tmp / "single"
    write_series(p, [np.zeros((16, 16))], [(0, 0, 0)])
    return p


def _nan_nifti(tmp: Path) -> Path:
    p = tmp / "nan.nii.gz"
    arr = np.zeros((4, 8, 8), dtype=np.float32)
    arr[2, 3, 3] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(p))
    return p


def _missing_path(tmp: Path) -> Path:
    return tmp / "does-not-exist.nii.gz"


def _bad_zip(tmp: Path) -> Path:
    p = tmp / "broken.zip"
    p.write_bytes(b"PK\x03\x04 this is not really a zip")
    return p


def _zip_slip(tmp: Path) -> Path:
    p = tmp / "slip.zip"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("../escape.dcm", b"x")
    return p


#: name -> (builder(tmp_path) -> input path, a fragment the one-line error must contain)
BAD_INPUTS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing_path": (_missing_path, "no such file or folder"),
    "empty_folder": (_empty_folder, "folder is empty"),
    "non_dicom_folder": (_non_dicom_folder, "no DICOM files found"),
    "truncated_dicom": (_truncated_dicom, "truncated or corrupt DICOM"),
    "mr_series": (_mr_series, "no CT series found (found MR series"),
    "seg_series": (_seg_series, "no CT series found (found SEG series"),
    "single_2d_slice": (_single_slice, "only one 2D CT slice"),
    "nan_nifti": (_nan_nifti, "NaN or infinite"),
    "bad_zip": (_bad_zip, "not a readable zip file"),
    "zip_slip": (_zip_slip, "points outside the archive"),
}


# ---------------------------------------------------------------- corrupt geometry, padding, PACS exports


def series_with_tags(folder: Path, tags: dict[str, str], n: int = 4, size: int = 16, gap: float = 2.5,
                     hu: np.ndarray | None = None) -> np.ndarray:
    """An axial series whose every slice carries ``tags`` on top of (and overriding) the usual ones.

    Tags are written as given (e.g. ``{"0028|0030": "0\\\\0"}`` for a zero PixelSpacing), so a test
    can hand ingestion exactly the header a broken scanner export would. Returns the HU volume (z, y, x).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    vol = rng.integers(-100, 100, size=(n, size, size)).astype(np.int16) if hu is None else hu.astype(np.int16)
    study_uid, series_uid = new_uid(), new_uid()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(vol.shape[0]):
        img = sitk.GetImageFromArray(vol[k])
        img.SetSpacing((0.8, 0.8))
        base = {
            "0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": new_uid(),
            "0020|000d": study_uid, "0020|000e": series_uid, "0020|0013": str(k + 1),
            "0020|0032": f"-10\\-20\\{30.0 + gap * k:.6f}", "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": "0.8\\0.8", "0028|1052": "-1024", "0028|1053": "1", "0010|0020": "SYNTHETIC",
        }
        for key, v in {**base, **tags}.items():
            img.SetMetaData(key, v)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(img)
    return vol


def dicom_non_image(path: Path, sop_class: str = "1.2.840.10008.1.3.10", private_text: bytes = b"PHILIPS DIRFILE") -> Path:
    """A DICOM Part-10 file with no pixel data, as a PACS/CD export's ``DICOMDIR`` or Philips ``DIRFILE``.

    Written byte by byte (explicit VR little endian): 128-byte preamble, ``DICM``, a file meta group
    naming ``sop_class`` and one private text element. GDCM cannot read it as an image.
    """
    def element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
        if len(value) % 2:
            value += b"\0" if vr == b"UI" else b" "
        if vr in (b"OB", b"UN", b"UT"):
            return group.to_bytes(2, "little") + elem.to_bytes(2, "little") + vr + b"\0\0" + len(value).to_bytes(4, "little") + value
        return group.to_bytes(2, "little") + elem.to_bytes(2, "little") + vr + len(value).to_bytes(2, "little") + value

    meta = (element(0x0002, 0x0001, b"OB", b"\0\1") + element(0x0002, 0x0002, b"UI", sop_class.encode())
            + element(0x0002, 0x0003, b"UI", new_uid().encode()) + element(0x0002, 0x0010, b"UI", b"1.2.840.10008.1.2.1"))
    group_length = element(0x0002, 0x0000, b"UL", b"") [:6] + (4).to_bytes(2, "little") + len(meta).to_bytes(4, "little")
    body = element(0x0029, 0x0010, b"LO", b"PHILIPS") + element(0x0029, 0x1010, b"UT", private_text * 20)
    path.write_bytes(b"\0" * 128 + b"DICM" + group_length + meta + body)
    return path


def pacs_export_clutter(folder: Path) -> list[str]:
    """Add what a PACS/CD export leaves beside the slices; returns the names added."""
    dicom_non_image(folder / "DICOMDIR")
    dicom_non_image(folder / "DIRFILE", sop_class="1.3.46.670589.2.5.1.1")
    (folder / "README.TXT").write_text("Exported by a PACS viewer\n", encoding="utf-8")
    (folder / "thumb.jpg").write_bytes(b"\xff\xd8\xff\xe0\0\x10JFIF\0" + b"\0" * 200 + b"\xff\xd9")
    return ["DICOMDIR", "DIRFILE", "README.TXT", "thumb.jpg"]


def patch_tag(path: Path, group: int, elem: int, value: str) -> None:
    """Replace one string element (DS, IS, ...) in a written file, byte by byte.

    For headers GDCM's writer refuses to produce (e.g. an all-zero ImageOrientationPatient).
    """
    data = path.read_bytes()
    tag = group.to_bytes(2, "little") + elem.to_bytes(2, "little")
    i = data.index(tag, 132)
    raw = value.encode("ascii")
    raw += b" " * (len(raw) % 2)
    if data[i + 4:i + 6].isalpha():  # explicit VR: 2-byte VR, 2-byte length
        n = int.from_bytes(data[i + 6:i + 8], "little")
        new = tag + data[i + 4:i + 6] + len(raw).to_bytes(2, "little") + raw
        path.write_bytes(data[:i] + new + data[i + 8 + n:])
    else:  # implicit VR (what GDCM's writer produces): 4-byte length
        n = int.from_bytes(data[i + 4:i + 8], "little")
        path.write_bytes(data[:i] + tag + len(raw).to_bytes(4, "little") + raw + data[i + 8 + n:])
