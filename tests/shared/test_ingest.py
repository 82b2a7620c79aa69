"""Ingestion of NIfTI, DICOM folders and zips into HU volumes, with real SimpleITK I/O."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from shared.imaging.ingest import describe, read_geometry, read_image
from shared.plumbing.errors import IchfedError
from tests.dicom_factory import (
    BAD_INPUTS,
    new_uid,
    simple_series,
    tilted_frame,
    write_series,
)

REPO = Path(__file__).resolve().parents[2]
REAL_TILT = REPO / ".." / "shared" / "data" / "ct" / "ge-hispeed-head-tilt"


def _array(img: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(img)


def _world(img: sitk.Image) -> np.ndarray:
    """World coordinates (z, y, x, 3) of every voxel centre."""
    nx, ny, nz = img.GetSize()
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    idx = np.stack([i, j, k], axis=-1) * np.asarray(img.GetSpacing())
    direction = np.asarray(img.GetDirection()).reshape(3, 3)
    return np.asarray(img.GetOrigin()) + idx @ direction.T


# ------------------------------------------------------------------------------------ real data


@pytest.mark.skipif(not REAL_TILT.is_dir(), reason=f"real tilted CT not found at {REAL_TILT} (shared/ beside the repo)")
def test_real_tilted_uneven_ct_is_regularised_and_keeps_geometry():
    ing = read_image(REAL_TILT)
    img = ing.image
    info = describe(ing)

    assert ing.modality == "CT" and ing.source_slices == 28
    assert set(ing.corrections) == {"gantry_tilt", "nonuniform_spacing"}
    assert img.GetPixelID() == sitk.sitkFloat32
    # Slices are 4.00 / 1.08 / 7.00 mm apart along the normal; the output uses the median gap.
    assert img.GetSpacing() == pytest.approx((0.4882812, 0.4882812, 4.0019), abs=1e-3)
    # 144.1 mm of coverage along the normal at 4.0 mm -> 37 planes; the tilt widens the column axis.
    assert info["shape"] == [512, 611, 37]
    cos, sin = 0.9483237, 0.3173047
    assert img.GetDirection() == pytest.approx((1, 0, 0, 0, cos, sin, 0, -sin, cos), abs=1e-5)
    # The series pads outside the reconstruction circle with PixelPaddingValue -1500 (issue #11):
    # padded voxels become air, so nothing is darker than air.
    assert info["hu_min"] == pytest.approx(-1024, abs=1) and info["hu_max"] > 1500  # air ... bone

    # Sample the output at the world position of every original pixel (inside the head,
    # away from the first and last slices) and compare with the original HU.
    ours, naive = [], []
    itk_reader = sitk.ImageSeriesReader()
    itk_reader.SetFileNames(itk_reader.GetGDCMSeriesFileNames(str(REAL_TILT)))
    itk_volume = sitk.Cast(itk_reader.Execute(), sitk.sitkFloat32)  # trusts the first two slices' gap
    files = sorted(REAL_TILT.glob("*.dcm"))
    for f in files[2:-2]:
        original = sitk.ReadImage(str(f), sitk.sitkFloat32)
        a = _array(original)[0]
        b = _array(sitk.Resample(img, original, sitk.Transform(), sitk.sitkLinear, -5000.0))[0]
        c = _array(sitk.Resample(itk_volume, original, sitk.Transform(), sitk.sitkLinear, -5000.0))[0]
        inside = (a > -500) & (b > -4000)
        assert inside.sum() > 50_000, f.name
        ours.append(np.abs(a[inside] - b[inside]))
        naive.append(np.abs(a[inside] - c[inside]))
    assert np.median(np.concatenate(ours)) < 20  # measured: 1.2 HU
    # Near the vertex, 7 mm apart, linear blending mixes in neighbours (per-slice medians up to
    # ~64 HU on slices 25-27); everywhere else each slice is reproduced closely.
    per_slice = np.array([np.median(e) for e in ours])
    assert np.mean(per_slice < 20) >= 0.8, per_slice.round(1)
    # The same check flags a volume that assumes uniform spacing, so it can fail.
    assert np.median(np.concatenate(naive)) > 40


# ------------------------------------------------------------------------------------ synthetic DICOM


def test_tilted_uneven_series_reproduces_a_linear_field_exactly(tmp_path):
    """A linear HU field sampled on tilted, unevenly spaced slices comes back exact (up to int16 rounding)."""
    frame = tilted_frame(20.0)
    table_z = np.cumsum([0.0, 3.0, 3.0, 3.0, 1.0, 5.0, 5.0])
    positions = [np.array([-12.0, -12.0, z]) for z in table_z]
    n, spacing = 24, (1.0, 1.0)

    def field(x):
        return 2.0 * x[..., 0] + 3.0 * x[..., 1] + 5.0 * x[..., 2]

    slices = []
    for p in positions:
        jj, ii = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        world = p + ii[..., None] * spacing[0] * frame[:, 0] + jj[..., None] * spacing[1] * frame[:, 1]
        slices.append(np.round(field(world)))
    write_series(tmp_path / "ct", slices, positions, spacing=spacing, frame=frame, file_order=[3, 6, 0, 5, 1, 4, 2])

    ing = read_image(tmp_path / "ct")
    img = ing.image
    assert set(ing.corrections) == {"gantry_tilt", "nonuniform_spacing"}
    assert ing.source_slices == 7
    depth_gaps = np.diff(table_z) * np.cos(np.radians(20.0))
    assert img.GetSpacing() == pytest.approx((1.0, 1.0, np.median(depth_gaps)), abs=1e-4)
    assert np.asarray(img.GetDirection()) == pytest.approx(frame.ravel(), abs=1e-6)
    assert img.GetSize()[2] == round((table_z[-1] * np.cos(np.radians(20.0))) / np.median(depth_gaps)) + 1

    world = _world(img)
    u, v = world @ frame[:, 0], world @ frame[:, 1]
    us = [p @ frame[:, 0] for p in positions]
    vs = [p @ frame[:, 1] for p in positions]
    # Voxels every source slice covers in-plane (outside, air fill blends in by design).
    d = world @ frame[:, 2]
    depths = [p @ frame[:, 2] for p in positions]
    # The last output plane may sit up to half a step past the last slice (it repeats that slice).
    covered = (u >= max(us)) & (u <= min(us) + n - 1) & (v >= max(vs)) & (v <= min(vs) + n - 1) & (d <= max(depths))
    assert covered.sum() > 1000
    err = np.abs(_array(img) - field(world))[covered]
    assert err.max() < 0.6


def test_gantry_tilt_tag_alone_is_reported(tmp_path):
    write_series(tmp_path / "ct", [np.zeros((8, 8))] * 3, [(0, 0, 0), (0, 0, 2), (0, 0, 4)], gantry_tilt=12.0)
    assert read_image(tmp_path / "ct").corrections == ["gantry_tilt"]


def test_regular_series_round_trips_with_rescale_and_shuffled_names(tmp_path):
    rng = np.random.default_rng(1)
    vol = rng.integers(-1000, 1000, size=(5, 12, 10)) * 2  # even, so slope 2 stores it exactly
    positions = [(-10.0, 4.0, 30.0 + 2.5 * k) for k in range(5)]
    write_series(tmp_path / "ct", list(vol), positions, spacing=(0.7, 0.9), slope=2.0, intercept=-1024.0,
                 file_order=[4, 2, 0, 3, 1])
    ing = read_image(tmp_path / "ct")
    assert ing.corrections == [] and ing.notes == []
    assert ing.image.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(_array(ing.image), vol, rtol=0, atol=1e-4)
    assert ing.image.GetOrigin() == pytest.approx((-10.0, 4.0, 30.0))
    assert ing.image.GetSpacing() == pytest.approx((0.7, 0.9, 2.5))
    info = describe(ing)
    assert set(info) >= {"shape", "spacing", "origin", "direction", "modality", "hu_min", "hu_max",
                         "corrections", "source_slices"}
    assert info["shape"] == [10, 12, 5]
    assert (info["hu_min"], info["hu_max"]) == (float(vol.min()), float(vol.max()))


def test_zip_of_series_equals_folder(tmp_path):
    vol = simple_series(tmp_path / "ct", n=3)
    archive = tmp_path / "ct.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted((tmp_path / "ct").iterdir()):
            zf.write(f, f"study/series/{f.name}")
    ing = read_image(archive)
    np.testing.assert_array_equal(_array(ing.image), vol.astype(np.float32))
    assert ing.source == str(archive)


def test_nifti_is_read_as_float32_with_geometry(tmp_path):
    arr = np.random.default_rng(2).integers(-1024, 2000, size=(4, 6, 5)).astype(np.int16)
    src = sitk.GetImageFromArray(arr)
    src.SetSpacing((0.5, 0.6, 5.0))
    src.SetOrigin((1.0, 2.0, 3.0))
    sitk.WriteImage(src, str(tmp_path / "ct.nii.gz"))
    ing = read_image(tmp_path / "ct.nii.gz")
    assert ing.image.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(_array(ing.image), arr.astype(np.float32))
    assert ing.image.GetSpacing() == pytest.approx((0.5, 0.6, 5.0))
    assert ing.image.GetOrigin() == pytest.approx((1.0, 2.0, 3.0))


def test_ct_beside_mr_picks_ct_and_notes_it(tmp_path):
    ct = simple_series(tmp_path / "mixed", n=3, prefix="ct", seed=3)
    simple_series(tmp_path / "mixed", n=6, modality="MR", prefix="mr", seed=4)
    ing = read_image(tmp_path / "mixed")
    assert ing.source_slices == 3
    np.testing.assert_array_equal(_array(ing.image), ct.astype(np.float32))
    assert any("MR series with 6" in n for n in ing.notes)


def test_two_ct_series_pick_the_one_with_most_slices_and_note_it(tmp_path, caplog):
    simple_series(tmp_path / "two", n=3, prefix="a", seed=5, series_uid=new_uid())
    big = simple_series(tmp_path / "two", n=5, prefix="b", seed=6, series_uid=new_uid())
    ing = read_image(tmp_path / "two")
    assert ing.source_slices == 5
    np.testing.assert_array_equal(_array(ing.image), big.astype(np.float32))
    assert any("2 CT series found" in n and "5 slices" in n for n in ing.notes)
    assert any("2 CT series found" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_error_naming_the_path(tmp_path, case):
    build, fragment = BAD_INPUTS[case]
    path = build(tmp_path)
    with pytest.raises(IchfedError) as e:
        read_image(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(path) in msg
    assert fragment in msg


def test_multiframe_file_is_read_as_a_volume(tmp_path):
    vol = np.random.default_rng(7).integers(-1000, 1000, size=(5, 8, 8)).astype(np.int16)
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.5, 0.5, 2.0))
    img.SetOrigin((1.0, 2.0, 3.0))
    img.SetMetaData("0008|0060", "CT")
    (tmp_path / "mf").mkdir()
    sitk.WriteImage(img, str(tmp_path / "mf" / "volume.dcm"))
    ing = read_image(tmp_path / "mf")
    np.testing.assert_array_equal(_array(ing.image), vol.astype(np.float32))
    assert ing.image.GetSpacing() == pytest.approx((0.5, 0.5, 2.0))


@pytest.mark.parametrize("kind", ["tilted_dicom", "nifti"])
def test_read_geometry_predicts_the_ingested_grid(tmp_path, kind):
    if kind == "tilted_dicom":
        path = tmp_path / "ct"
        write_series(path, [np.zeros((6, 7))] * 4, [(0, 0, z) for z in (0.0, 2.0, 4.0, 7.0)], frame=tilted_frame(10.0))
    else:
        path = tmp_path / "ct.nii.gz"
        src = sitk.GetImageFromArray(np.zeros((3, 5, 4), dtype=np.int16))
        src.SetOrigin((1.5, -2.0, 7.0))
        sitk.WriteImage(src, str(path))
    geometry = read_geometry(path)
    img = read_image(path).image
    assert geometry["size"] == img.GetSize()
    assert geometry["spacing"] == pytest.approx(img.GetSpacing())
    assert geometry["origin"] == pytest.approx(img.GetOrigin())
    assert geometry["direction"] == pytest.approx(img.GetDirection())


# ------------------------------------------------------------------------------ scanner metadata


def test_scanner_metadata_is_read_from_dicom_tags_and_unknown_for_nifti(tmp_path):
    """Manufacturer, model, kernel and slice thickness come from the tags; tilt from tag or geometry."""
    from tests.dicom_factory import series_with_tags

    series_with_tags(tmp_path / "s", {"0008|0070": "ACME Medical", "0008|1090": "Scan 64",
                                      "0018|1210": "H30s", "0018|0050": "2.5"})
    scanner = read_image(tmp_path / "s").scanner
    assert (scanner.manufacturer, scanner.model, scanner.kernel) == ("ACME Medical", "Scan 64", "H30s")
    assert scanner.slice_thickness_mm == pytest.approx(2.5) and scanner.tilt_deg == pytest.approx(0.0, abs=1e-3)
    assert describe(read_image(tmp_path / "s"))["scanner"]["kernel"] == "H30s"

    series_with_tags(tmp_path / "bare", {})  # no scanner tags at all
    bare = read_image(tmp_path / "bare").scanner
    assert (bare.manufacturer, bare.kernel, bare.slice_thickness_mm) == ("unknown", "unknown", None)

    img = sitk.GetImageFromArray(np.zeros((4, 8, 8), np.int16) - 1000)
    sitk.WriteImage(img, str(tmp_path / "x.nii.gz"))
    nifti = read_image(tmp_path / "x.nii.gz").scanner
    assert (nifti.manufacturer, nifti.model, nifti.slice_thickness_mm, nifti.tilt_deg) == ("unknown", "unknown", None, None)


def test_gantry_tilt_measured_from_slice_positions_is_the_scanner_tilt(tmp_path):
    frame = tilted_frame(12.0)
    normal = frame[:, 2]
    positions = [tuple(np.array([0.0, 0.0, 0.0]) + k * 3.0 * np.array([0.0, 0.0, 1.0])) for k in range(4)]
    write_series(tmp_path / "t", [np.zeros((8, 8))] * 4, positions, frame=frame)
    assert float(np.dot(normal, [0, 0, 1])) < 0.999  # the stacking axis is not the slice normal
    assert read_image(tmp_path / "t").scanner.tilt_deg == pytest.approx(12.0, abs=0.2)


@pytest.mark.skipif(not REAL_TILT.is_dir(), reason=f"real tilted CT not found at {REAL_TILT} (shared/ beside the repo)")
def test_real_ge_series_scanner_metadata():
    scanner = read_image(REAL_TILT).scanner
    assert (scanner.manufacturer, scanner.model, scanner.kernel) == ("GE MEDICAL SYSTEMS", "HiSpeed Dual", "STD+")
    assert scanner.slice_thickness_mm == pytest.approx(4.0)
    assert scanner.tilt_deg == pytest.approx(18.5, abs=0.1)  # the tilt the slice positions show (cos 0.948)
