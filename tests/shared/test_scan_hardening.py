"""Issue 21 items 1-5: scans that used to give a confident answer from broken data.

Every input is a real file: NIfTI written by nibabel/SimpleITK and then cut or patched byte by
byte, the real GE HiSpeed series copied and damaged, DICOM from ``tests/dicom_factory.py``, zips
built with ``zipfile``. Each test fails on the code before the fix.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk

from shared.imaging.ingest import IngestOptions, describe, read_geometry, read_image
from shared.plumbing.errors import IchfedError
from tests.dicom_factory import patch_tag, series_with_tags, write_series

REPO = Path(__file__).resolve().parents[2]
GE = REPO / ".." / "shared" / "data" / "ct" / "ge-hispeed-head-tilt"
needs_ge = pytest.mark.skipif(not GE.is_dir(), reason=f"real GE series not found at {GE}")


def ichfed(*args: str, limit_gb: float | None = None) -> subprocess.CompletedProcess:
    """``ichfed ARGS`` in a child process (optionally with an address-space limit)."""
    code = "import sys; from ichfed.cli import main; sys.exit(main(sys.argv[1:]))"
    if limit_gb is not None:
        n = int(limit_gb * 1024**3)
        code = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({n}, {n})); " + code
    return subprocess.run([sys.executable, "-c", code, "-q", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, encoding="utf-8")


def one_line_error(r: subprocess.CompletedProcess, *fragments: str) -> str:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------ 1. truncated NIfTI with an extension


def _nifti_with_extension(path: Path, ext_bytes: int = 300_000) -> np.ndarray:
    """An int16 head-like volume (64x64x40, 320 KB of voxels) behind a ``ext_bytes`` header extension."""
    arr = np.full((64, 64, 40), -1000, np.int16)
    arr[8:56, 8:56, :] = 35
    arr[20:40, 20:40, 24:36] = 70  # the "bleed", in the slices a cut file loses
    img = nibabel.Nifti1Image(arr, np.diag([0.5, 0.5, 5.0, 1.0]))
    img.header.extensions.append(nibabel.nifti1.Nifti1Extension(40, b"x" * ext_bytes))
    raw = path.with_suffix("") if path.name.endswith(".gz") else path
    nibabel.save(img, str(raw))
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(raw.read_bytes(), compresslevel=1))
        raw.unlink()
    return arr


def _cut_payload(path: Path, fraction: float) -> None:
    """Drop ``fraction`` of the voxel payload from the end; a .gz stays a complete gzip stream of a short file."""
    gz = path.name.endswith(".gz")
    data = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    header = nibabel.Nifti1Header.from_fileobj(__import__("io").BytesIO(data))
    payload = len(data) - int(header["vox_offset"])
    data = data[: len(data) - int(payload * fraction)]
    path.write_bytes(gzip.compress(data, compresslevel=1) if gz else data)


@pytest.mark.parametrize("name", ["ext.nii", "ext.nii.gz"])
@pytest.mark.parametrize("fraction", [0.5, 0.7])
def test_truncated_nifti_with_a_header_extension_is_refused(tmp_path, name, fraction):
    path = tmp_path / name
    arr = _nifti_with_extension(path)
    intact = sitk.GetArrayFromImage(read_image(path).image)
    assert np.array_equal(intact, arr.transpose(2, 1, 0))  # the whole file is read exactly
    _cut_payload(path, fraction)
    # What ITK alone returns: the bleed's slices zero-filled, exit 0 before the fix.
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[24:36].max() < 70
    with pytest.raises(IchfedError, match="truncated NIfTI") as e:
        read_image(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_a_nifti_short_by_two_bytes_is_refused(tmp_path):
    path = tmp_path / "short.nii"
    _nifti_with_extension(path, ext_bytes=0)
    path.write_bytes(path.read_bytes()[:-2])
    for read in (read_image, read_geometry):
        with pytest.raises(IchfedError, match="truncated NIfTI"):
            read(path)


# ------------------------------------------------------------------ 2. missing DICOM slices


@pytest.fixture
def ge_copy(tmp_path) -> Path:
    if not GE.is_dir():
        pytest.skip(f"real GE series not found at {GE}")
    return Path(shutil.copytree(GE, tmp_path / "ge"))


@needs_ge
@pytest.mark.parametrize("how", ["deleted", "zero-byte"])
def test_a_missing_slice_of_the_real_ge_series_is_refused_naming_where(ge_copy, how):
    victim = ge_copy / "08.dcm"
    if how == "deleted":
        victim.unlink()
    else:
        victim.write_bytes(b"")
    with pytest.raises(IchfedError) as e:
        read_image(ge_copy)
    msg = str(e.value)
    assert "slice missing between 07.dcm and 09.dcm" in msg and "InstanceNumber 8" in msg, msg
    assert "near ImagePositionPatient (-125.0, -123.5, 35.4)" in msg and "--allow-missing-slices" in msg
    assert "\n" not in msg
    with pytest.raises(IchfedError, match="slice missing"):
        read_geometry(ge_copy)  # the site dry run refuses it too


@needs_ge
def test_an_accepted_missing_slice_keeps_the_series_spacing_and_is_noted(ge_copy):
    (ge_copy / "08.dcm").unlink()
    ing = read_image(ge_copy, IngestOptions(allow_missing_slices=True))
    info = describe(ing)
    # Before: the 8 mm gap moved the median and the volume was resampled to 7 mm (22 planes).
    assert info["shape"] == [512, 611, 37] and info["spacing"][2] == pytest.approx(4.0019, abs=1e-3)
    assert "missing_slices" in ing.corrections and ing.source_slices == 27
    assert any("1 missing slice" in n and "InstanceNumber 8" in n for n in ing.notes), ing.notes


@pytest.mark.parametrize("z, between, where", [
    ([0.0, 2.5, 5.0, 10.0, 12.5], ("slice002", "slice003"), "(0.0, 0.0, 7.5)"),  # inside the series
    ([0.0, 2.5, 5.0, 7.5, 12.5], ("slice003", "slice004"), "(0.0, 0.0, 10.0)"),  # the last gap
    ([0.0, 5.0, 7.5, 10.0, 12.5], ("slice000", "slice001"), "(0.0, 0.0, 2.5)"),  # the first gap
])
def test_a_position_gap_beyond_the_series_spacing_is_refused(tmp_path, z, between, where):
    # InstanceNumbers 1..5 are consecutive: only the positions show the slice that is not there.
    write_series(tmp_path / "s", [np.zeros((8, 8))] * 5, [(0, 0, v) for v in z])
    with pytest.raises(IchfedError, match=rf"slice missing between {between[0]}.dcm and {between[1]}.dcm: near "
                                          rf"ImagePositionPatient {re.escape(where)}"):
        read_image(tmp_path / "s")


@pytest.mark.parametrize("z", [
    [0.0, 4.0, 8.0, 12.0, 13.1, 20.1, 27.1, 34.1],  # the GE pattern: 4 mm, a 1.1 mm step, then 7 mm
    [0.0, 2.0, 4.0, 5.0, 8.0],  # uneven (2, 2, 1, 3 mm): 3 mm is not twice the series' own spacing
    [0.0, 2.5, 5.0, 10.0, 15.0, 20.0],  # a change of reconstruction interval (2.5 mm, then 5 mm)
])
def test_a_series_whose_spacing_changes_is_not_a_missing_slice(tmp_path, z):
    write_series(tmp_path / "s", [np.zeros((8, 8))] * len(z), [(0, 0, v) for v in z])
    assert read_image(tmp_path / "s").corrections == ["nonuniform_spacing"]


def test_rows_and_columns_changing_mid_series_is_an_error(tmp_path):
    slices = [np.zeros((16, 16))] * 3 + [np.zeros((12, 12))] * 2
    write_series(tmp_path / "s", slices, [(0, 0, 2.5 * k) for k in range(5)])
    with pytest.raises(IchfedError, match=r"Rows/Columns or PixelSpacing change within the series \(3 slice\(s\) "
                                          r"are 16x16 .*slice003.dcm is 12x12"):
        read_image(tmp_path / "s")


@needs_ge
def test_cli_ingest_refuses_a_missing_slice_in_one_line_and_accepts_it_when_asked(ge_copy, tmp_path):
    (ge_copy / "20.dcm").unlink()
    out = tmp_path / "out.nii.gz"
    one_line_error(ichfed("ingest", str(ge_copy), "-o", str(out)), "slice missing between 19.dcm and 21.dcm",
                   "InstanceNumber 20")
    r = ichfed("ingest", str(ge_copy), "-o", str(out), "--allow-missing-slices")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert "missing_slices" in info["corrections"] and any("InstanceNumber 20" in n for n in info["notes"])


# ------------------------------------------------------------------ 3. NIfTI geometry


def _nifti(path: Path, sform: np.ndarray | None, qform: np.ndarray | None, pixdim=None, data=None) -> np.ndarray:
    arr = np.full((20, 24, 16), -1000, np.int16) if data is None else data
    arr[5, 6, 7] = 1000  # one bright voxel to locate
    img = nibabel.Nifti1Image(arr, sform if sform is not None else qform)
    img.set_sform(sform if sform is not None else np.eye(4), code=1 if sform is not None else 0)
    img.set_qform(qform if qform is not None else np.eye(4), code=1 if qform is not None else 0)
    nibabel.save(img, str(path))
    if pixdim is not None:
        data_ = bytearray(path.read_bytes())
        struct.pack_into("<3f", data_, 80, *pixdim)
        path.write_bytes(bytes(data_))
    return arr


def _itk_point_of_bright_voxel(img: sitk.Image) -> np.ndarray:
    k, j, i = np.argwhere(sitk.GetArrayFromImage(img) == 1000)[0]
    return np.asarray(img.TransformIndexToPhysicalPoint((int(i), int(j), int(k))))


def _nibabel_point(path: Path) -> np.ndarray:
    ras = nibabel.load(str(path)).affine @ np.array([5, 6, 7, 1.0])
    return np.array([-ras[0], -ras[1], ras[2]])  # RAS -> ITK's LPS


def test_a_consistent_oblique_nifti_gets_the_geometry_nibabel_reads(tmp_path):
    c, s = np.cos(0.3), np.sin(0.3)
    aff = np.array([[0.9 * c, -0.9 * s, 0, -50], [0.9 * s, 0.9 * c, 0, 20], [0, 0, 4.0, -30], [0, 0, 0, 1]])
    path = tmp_path / "oblique.nii.gz"
    _nifti(path, aff, aff)
    img = read_image(path).image
    assert np.allclose(_itk_point_of_bright_voxel(img), _nibabel_point(path), atol=1e-3)
    assert img.GetSpacing() == pytest.approx((0.9, 0.9, 4.0), abs=1e-5)
    assert read_geometry(path)["spacing"] == pytest.approx(img.GetSpacing())


def test_qform_and_sform_that_disagree_are_refused_and_an_option_picks_one(tmp_path):
    path = tmp_path / "qs.nii"
    _nifti(path, np.diag([1.8, 1.8, 1.8, 1.0]), np.diag([5.0, 5.0, 5.0, 1.0]))
    # Before: ITK took pixdim's 5 mm (volumes x 21.4) with exit 0.
    assert sitk.ReadImage(str(path)).GetSpacing() == pytest.approx((5, 5, 5))
    with pytest.raises(IchfedError, match=r"qform and sform disagree \(voxel size 5x5x5 mm vs 1.8x1.8x1.8 mm"):
        read_image(path)
    with pytest.raises(IchfedError, match="qform and sform disagree"):
        read_geometry(path)
    ing = read_image(path, IngestOptions(nifti_geometry="sform"))
    assert ing.image.GetSpacing() == pytest.approx((1.8, 1.8, 1.8), abs=1e-5)
    assert np.allclose(_itk_point_of_bright_voxel(ing.image), _nibabel_point(path), atol=1e-3)
    assert any("geometry from the sform" in n and "pixdim 5x5x5 mm ignored" in n for n in ing.notes), ing.notes
    q = read_image(path, IngestOptions(nifti_geometry="qform"))
    assert q.image.GetSpacing() == pytest.approx((5, 5, 5)) and "geometry from the qform" in q.notes[0]


def test_a_negative_pixdim_beside_a_positive_sform_is_refused_not_mirrored(tmp_path):
    path = tmp_path / "neg.nii"
    aff = np.diag([-0.8, 0.8, 2.5, 1.0])
    aff[:3, 3] = (10, -20, 30)
    _nifti(path, aff, None, pixdim=(-0.8, 0.8, 2.5))
    # Before: ITK mirrored the image left-right (the bright voxel lands 15 mm off).
    assert not np.allclose(_itk_point_of_bright_voxel(sitk.ReadImage(str(path))), _nibabel_point(path), atol=1)
    with pytest.raises(IchfedError, match=r"pixdim\[1\] is -0.8; voxel sizes must be positive"):
        read_image(path)
    ing = read_image(path, IngestOptions(nifti_geometry="sform"))
    assert np.allclose(_itk_point_of_bright_voxel(ing.image), _nibabel_point(path), atol=1e-3)


def test_pixdim_contradicting_the_sform_is_refused(tmp_path):
    path = tmp_path / "pix.nii"
    _nifti(path, np.diag([1.8, 1.8, 1.8, 1.0]), None, pixdim=(5.0, 5.0, 5.0))
    with pytest.raises(IchfedError, match=r"pixdim says 5x5x5 mm voxels but the sform says 1.8x1.8x1.8 mm"):
        read_image(path)


def test_a_sheared_affine_is_refused_with_its_real_reason(tmp_path):
    path = tmp_path / "shear.nii"
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    aff[0, 1] = 0.5
    _nifti(path, aff, None)
    with pytest.raises(IchfedError, match=r"the sform is sheared \(voxel axes 1 and 2 at 63.4 deg") as e:
        read_image(path)
    assert "truncated or corrupt" not in str(e.value)


def test_cli_ingest_nifti_geometry_option(tmp_path):
    path = tmp_path / "qs.nii.gz"
    _nifti(path, np.diag([1.8, 1.8, 1.8, 1.0]), np.diag([5.0, 5.0, 5.0, 1.0]))
    out = tmp_path / "o.nii.gz"
    one_line_error(ichfed("ingest", str(path), "-o", str(out)), "qform and sform disagree", "--nifti-geometry")
    r = ichfed("ingest", str(path), "-o", str(out), "--nifti-geometry", "sform")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["spacing"] == pytest.approx([1.8, 1.8, 1.8], abs=1e-5)
    assert any("geometry from the sform" in n for n in info["notes"])


# ------------------------------------------------------------------ 4. intensity scaling


@pytest.mark.parametrize("slope", [0.0, float("nan")])
def test_nifti_scl_slope_zero_or_nan_means_no_scaling(tmp_path, slope):
    path = tmp_path / "scl.nii"
    stored = np.arange(20 * 24 * 16, dtype=np.int16).reshape(20, 24, 16) % 2000
    _nifti(path, np.eye(4), np.eye(4), data=stored.copy())
    data = bytearray(path.read_bytes())
    struct.pack_into("<2f", data, 112, slope, -1024.0)  # scl_slope, scl_inter
    path.write_bytes(bytes(data))
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[0, 0, 0] == -1024  # ITK applies the intercept
    ing = read_image(path)
    got = sitk.GetArrayFromImage(ing.image).transpose(2, 1, 0)
    assert np.array_equal(got, np.asarray(nibabel.load(str(path)).dataobj))  # nibabel: unscaled
    assert got[1, 0, 0] == stored[1, 0, 0]
    assert any("no intensity scaling" in n and "scl_inter -1024 was not applied" in n for n in describe(ing)["notes"])


def test_dicom_rescale_slope_zero_is_read_as_one_and_noted(tmp_path):
    vol = series_with_tags(tmp_path / "s", {})
    for f in sorted((tmp_path / "s").glob("*.dcm")):
        patch_tag(f, 0x0028, 0x1053, "0")
    ing = read_image(tmp_path / "s")
    assert np.allclose(sitk.GetArrayFromImage(ing.image), vol, atol=1e-3)  # HU = 1 x stored - 1024
    assert any("RescaleSlope (0028,1053) is 0 on 4 slice(s)" in n for n in describe(ing)["notes"])


def test_dicom_rescale_slope_that_is_not_a_number_is_refused(tmp_path):
    series_with_tags(tmp_path / "s", {})
    for f in sorted((tmp_path / "s").glob("*.dcm")):
        patch_tag(f, 0x0028, 0x1053, "nan")
    with pytest.raises(IchfedError, match=r"RescaleSlope \(0028,1053\) is 'nan'; it must be a finite number"):
        read_image(tmp_path / "s")


# ------------------------------------------------------------------ 5. expensive inputs


def _giant_zero_nifti(path: Path) -> Path:
    """A 1000^3 int16 NIfTI of zeros: a sparse .nii, or a ~2 MB .nii.gz of concatenated gzip members."""
    hdr = nibabel.Nifti1Header()
    hdr.set_data_shape((1000, 1000, 1000))
    hdr.set_data_dtype(np.int16)
    hdr.set_zooms((0.2, 0.2, 0.2))
    hdr["vox_offset"] = 352
    head = hdr.binaryblock + b"\0" * 4
    if not path.name.endswith(".gz"):
        with open(path, "wb") as fh:
            fh.write(head)
            fh.truncate(352 + 2 * 1000**3)  # sparse: no disk, no time
        return path
    block = gzip.compress(b"\0" * (64 << 20), compresslevel=9)
    with open(path, "wb") as fh:
        fh.write(gzip.compress(head))
        for _ in range(2 * 1000**3 // (64 << 20) + 1):
            fh.write(block)
    return path


@pytest.mark.parametrize("name", ["giant.nii", "giant.nii.gz"])
def test_decoded_size_is_bounded_before_allocation(tmp_path, name):
    path = _giant_zero_nifti(tmp_path / name)
    t0 = time.perf_counter()
    # 3 GB of address space: ITK's int16 read plus its float32 copy (6 GB) would die.
    r = ichfed("ingest", str(path), "-o", str(tmp_path / "o.nii.gz"), limit_gb=3)
    one_line_error(r, str(path), "1000x1000x1000 int16", "5.6 GiB", "refusing more than 4 GiB")
    assert time.perf_counter() - t0 < 60


def _zip_bomb(path: Path, mb: int = 40) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr("slice001.dcm", b"\0" * (mb << 20))
    return path


def _overlap_bomb(path: Path, copies: int = 20) -> Path:
    """Several central-directory entries pointing at one compressed member (a non-recursive zip bomb).

    The member is incompressible, so only the overlap (not the ratio) gives it away.
    """
    import copy

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("slice000.dcm", np.random.default_rng(0).bytes(50_000))
        first = zf.infolist()[0]
        for k in range(1, copies):
            twin = copy.copy(first)
            twin.filename = twin.orig_filename = f"slice{k:03d}.dcm"
            zf.filelist.append(twin)
            zf.NameToInfo[twin.filename] = twin
    return path


@pytest.mark.parametrize("bomb, fragment", [(_zip_bomb, "compression ratio"), (_overlap_bomb, "share compressed data")])
def test_zip_bombs_are_refused_before_extraction(tmp_path, monkeypatch, bomb, fragment):
    path = bomb(tmp_path / "bomb.zip")
    assert path.stat().st_size < 200_000
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    written = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, *a, **k: written.append(a) or real_open(self, *a, **k))
    with pytest.raises(IchfedError, match=fragment) as e:
        read_image(path)
    assert str(e.value).startswith(str(path)) and written == []  # nothing was extracted
    assert list(scratch.iterdir()) == []


def test_an_honest_zip_of_a_series_still_reads(tmp_path):
    vol = series_with_tags(tmp_path / "s", {}, n=6, size=32)
    path = tmp_path / "series.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in sorted((tmp_path / "s").glob("*.dcm")):
            zf.write(f, f"export/{f.name}")
    assert np.allclose(sitk.GetArrayFromImage(read_image(path).image), vol, atol=1e-3)


@pytest.mark.slow
def test_cli_predict_passes_the_ingest_options_and_its_json_notes_them(tiny_bundle, tmp_path):
    """``ichfed predict --nifti-geometry sform``: the chosen form gives the same volumes as the intact file."""
    from tests.shared.test_pipeline import UNSEEN_CASE, write_synthetic_case

    whole = tmp_path / "case.nii.gz"
    write_synthetic_case(UNSEEN_CASE, whole)
    img = nibabel.load(str(whole))
    qform = img.affine.copy()
    qform[:3, :3] *= 2.0  # a qform with twice the voxel size: ITK alone would report volumes x 8
    bad = nibabel.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header)
    bad.set_qform(qform, code=1)
    bad.set_sform(img.affine, code=1)
    disagree = tmp_path / "disagree.nii.gz"
    nibabel.save(bad, str(disagree))
    r = ichfed("predict", "--bundle", str(tiny_bundle.path), "--pubkey", str(tiny_bundle.public_key), "--json",
               "--device", "cpu", "--nifti-geometry", "sform", str(whole), str(disagree))
    assert r.returncode == 0, r.stderr
    intact, chosen = [json.loads(line) for line in r.stdout.splitlines()]
    assert intact["ingest_notes"] == []
    assert any("geometry from the sform" in n for n in chosen["ingest_notes"]), chosen["ingest_notes"]
    assert chosen["ich_ml"] == pytest.approx(intact["ich_ml"], rel=1e-3)
    assert chosen["p_neoplastic"] == pytest.approx(intact["p_neoplastic"], abs=1e-4)
