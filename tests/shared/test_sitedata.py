"""The site folder reader: usable cases, and every problem reported without stopping."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from shared.imaging.ingest import read_image
from shared.imaging.sitedata import read_mask, read_site
from shared.plumbing.errors import IchfedError
from tests.dicom_factory import simple_series, tilted_frame, write_series


def _nifti(path: Path, arr: np.ndarray, spacing=(0.8, 0.8, 5.0), origin=(0.0, 0.0, 0.0), pixel=None) -> Path:
    img = sitk.GetImageFromArray(arr if pixel is None else arr.astype(pixel))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def _ct(path: Path, **kw) -> Path:
    return _nifti(path, np.full((4, 8, 8), 30.0, dtype=np.float32), **kw)


def _mask(path: Path, **kw) -> Path:
    arr = np.zeros((4, 8, 8), dtype=np.uint8)
    arr[1:3, 2:5, 2:5] = 2
    arr[2, 3, 3] = 1
    return _nifti(path, arr, **kw)


@pytest.fixture
def site(tmp_path) -> Path:
    """A site with four good cases and six kinds of problem."""
    root = tmp_path / "site"
    (root / "images").mkdir(parents=True)
    (root / "cases.csv").write_text(
        "case_id,label,age\n"
        "good_nifti,neoplastic,71\n"
        "good_zero,0,64\n"
        "good_dicom,1,55\n"
        "good_zip,Non-Neoplastic,80\n"
        "no_image,neoplastic,60\n"
        "bad_label,maybe,61\n"
        "dup,1,50\n"
        "bad_mask,0,49\n"
        "dup,0,51\n"
        "../escape,1,40\n"
        "two_images,1,33\n", encoding="utf-8")
    _ct(root / "images" / "good_nifti.nii.gz")
    _mask(root / "masks" / "good_nifti.nii.gz")
    _ct(root / "images" / "good_zero.nii")
    simple_series(root / "images" / "good_dicom", n=3)
    simple_series(root / "tmp_zip", n=3)
    with zipfile.ZipFile(root / "images" / "good_zip.zip", "w") as zf:
        for f in (root / "tmp_zip").iterdir():
            zf.write(f, f.name)
    _ct(root / "images" / "bad_label.nii.gz")
    _ct(root / "images" / "dup.nii.gz")
    _ct(root / "images" / "bad_mask.nii.gz")
    _mask(root / "masks" / "bad_mask.nii.gz", spacing=(0.8, 0.8, 2.5))
    _ct(root / "images" / "two_images.nii.gz")
    simple_series(root / "images" / "two_images", n=2)
    return root


def test_read_site_keeps_good_cases_and_reports_every_problem(site):
    data = read_site(site)
    by_id = {c.case_id: c for c in data.cases}
    assert sorted(by_id) == ["good_dicom", "good_nifti", "good_zero", "good_zip"]
    assert by_id["good_nifti"].label == 1 and by_id["good_zero"].label == 0
    assert by_id["good_dicom"].label == 1 and by_id["good_zip"].label == 0
    assert by_id["good_nifti"].mask_path == site / "masks" / "good_nifti.nii.gz"
    assert by_id["good_zero"].mask_path is None
    assert by_id["good_dicom"].image_path == site / "images" / "good_dicom"
    assert by_id["good_zip"].image_path == site / "images" / "good_zip.zip"
    assert by_id["good_nifti"].extra == {"age": "71"}

    problems = {p.case_id: p.message for p in data.problems}
    assert set(problems) == {"no_image", "bad_label", "dup", "bad_mask", "../escape", "two_images"}
    assert "no image" in problems["no_image"]
    assert "'maybe'" in problems["bad_label"] and "neoplastic" in problems["bad_label"]
    assert "duplicate case_id" in problems["dup"] and "8, 10" in problems["dup"]
    assert "geometry does not match" in problems["bad_mask"] and "spacing" in problems["bad_mask"]
    assert "case_id" in problems["../escape"]
    assert "several images" in problems["two_images"]


def test_site_cases_feed_ingestion(site):
    """Every case the reader accepts is one that ingestion can read."""
    for case in read_site(site).cases:
        img = read_image(case.image_path).image
        assert img.GetDimension() == 3
        if case.mask_path:
            assert read_mask(case.mask_path, img).GetPixelID() == sitk.sitkUInt8


def test_one_case_can_have_several_problems(tmp_path):
    (tmp_path / "cases.csv").write_text("case_id,label\nc1,unknown\n", encoding="utf-8")
    data = read_site(tmp_path)
    assert data.cases == []
    messages = [p.message for p in data.problems if p.case_id == "c1"]
    assert len(messages) == 2 and any("label" in m for m in messages) and any("no image" in m for m in messages)


def test_an_empty_label_is_an_unlabelled_case_only_for_a_federated_site(tmp_path):
    """A federated site keeps unlabelled cases (label None) for its BatchNorm statistics; every other
    reader (reference training) reports the empty label as a problem, and a bad label stays one."""
    (tmp_path / "cases.csv").write_text("case_id,label\nc1,1\nc2, \nc3,\nc4,maybe\n", encoding="utf-8")
    for cid in ("c1", "c2", "c3", "c4"):
        _ct(tmp_path / "images" / f"{cid}.nii.gz")
    fed = read_site(tmp_path, allow_unlabelled=True)
    assert [(c.case_id, c.label) for c in fed.cases] == [("c1", 1), ("c2", None), ("c3", None)]
    assert [c.case_id for c in fed.labelled] == ["c1"] and [c.case_id for c in fed.unlabelled] == ["c2", "c3"]
    assert [p.case_id for p in fed.problems] == ["c4"] and "or empty" in fed.problems[0].message
    strict = read_site(tmp_path)
    assert [c.case_id for c in strict.cases] == ["c1"] and strict.unlabelled == []
    assert {p.case_id: "empty label" in p.message for p in strict.problems} == {"c2": True, "c3": True, "c4": False}


def test_header_only_cases_csv_is_a_site_problem(tmp_path):
    (tmp_path / "cases.csv").write_text("case_id,label\n", encoding="utf-8")
    data = read_site(tmp_path)
    assert data.cases == [] and [p.case_id for p in data.problems] == [None]


@pytest.mark.parametrize(
    "content, fragment",
    [
        (None, "file not found"),
        ("id,diagnosis\nc1,1\n", "missing case_id, label"),
        ("case_id,label\nc1,1,extra\n", "more fields than the header"),
        ("case_id,label,label\nc1,1,0\n", "repeats a column"),
        (b"case_id,label\nc\xff1,1\n", "not UTF-8"),
        ('case_id,label\n"c1,1\n', "malformed CSV"),
    ],
)
def test_missing_or_malformed_cases_csv_names_the_file(tmp_path, content, fragment):
    csv_path = tmp_path / "cases.csv"
    if isinstance(content, bytes):
        csv_path.write_bytes(content)
    elif content is not None:
        csv_path.write_text(content, encoding="utf-8")
    with pytest.raises(IchfedError) as e:
        read_site(tmp_path)
    assert str(csv_path) in str(e.value) and fragment in str(e.value) and "\n" not in str(e.value)


def test_missing_site_folder(tmp_path):
    with pytest.raises(IchfedError, match="site folder not found"):
        read_site(tmp_path / "nowhere")


def test_read_mask_returns_uint8_on_the_image_grid(tmp_path):
    like = read_image(_ct(tmp_path / "ct.nii.gz")).image
    like.SetOrigin((10.123456789, -5.5, 3.0))  # e.g. DICOM-derived, float64
    # NIfTI's float32 storage rounds the origin; read_mask accepts that and adopts the image's grid.
    mask_path = _mask(tmp_path / "m.nii.gz", origin=(10.1234567, -5.5, 3.0), pixel=np.float32)
    mask = read_mask(mask_path, like)
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert mask.GetOrigin() == like.GetOrigin()
    arr = sitk.GetArrayFromImage(mask)
    assert (arr == 1).sum() == 1 and (arr == 2).sum() == 17


@pytest.mark.parametrize(
    "kind, fragment",
    [("size", "size"), ("spacing", "spacing"), ("origin", "origin"), ("values", "values [3]"), ("missing", "not found")],
)
def test_read_mask_rejects_bad_masks(tmp_path, kind, fragment):
    like = sitk.ReadImage(str(_ct(tmp_path / "ct.nii.gz")))
    path = tmp_path / "m.nii.gz"
    if kind == "size":
        _nifti(path, np.zeros((4, 8, 9), dtype=np.uint8))
    elif kind == "spacing":
        _mask(path, spacing=(0.8, 0.8, 4.0))
    elif kind == "origin":
        _mask(path, origin=(0.0, 0.0, 1.0))
    elif kind == "values":
        arr = np.zeros((4, 8, 8), dtype=np.uint8)
        arr[0, 0, 0] = 3
        _nifti(path, arr)
    with pytest.raises(IchfedError) as e:
        read_mask(path, like)
    assert str(path) in str(e.value) and fragment in str(e.value)


def test_dicom_cases_are_checked_from_headers(tmp_path):
    """A DICOM case's series and its mask's grid are checked without reading pixel data."""
    root = tmp_path / "site"
    root.mkdir()
    (root / "cases.csv").write_text("case_id,label\ntilted,1\nmr,0\nempty,1\noff_grid,0\n", encoding="utf-8")
    frame = tilted_frame(12.0)
    positions = [(0.0, 0.0, z) for z in (0.0, 3.0, 6.0, 8.0)]
    for cid in ("tilted", "off_grid"):
        write_series(root / "images" / cid, [np.zeros((8, 8))] * 4, positions, frame=frame)
    simple_series(root / "images" / "mr", modality="MR")
    (root / "images" / "empty").mkdir()
    # The good mask sits on the grid ingestion produces; the other on the raw slice grid.
    ingested = read_image(root / "images" / "tilted").image
    good = sitk.Image(ingested.GetSize(), sitk.sitkUInt8)
    good.CopyInformation(ingested)
    (root / "masks").mkdir()
    sitk.WriteImage(good, str(root / "masks" / "tilted.nii.gz"))
    off = sitk.Image((8, 8, 4), sitk.sitkUInt8)
    off.SetSpacing((0.8, 0.8, 2.0))
    sitk.WriteImage(off, str(root / "masks" / "off_grid.nii.gz"))

    data = read_site(root)
    assert [c.case_id for c in data.cases] == ["tilted"]
    problems = {p.case_id: p.message for p in data.problems}
    assert set(problems) == {"mr", "empty", "off_grid"}
    assert "no CT series" in problems["mr"] and "empty" in problems["empty"]
    assert "geometry does not match" in problems["off_grid"]
    assert read_mask(data.cases[0].mask_path, ingested).GetSize() == ingested.GetSize()
