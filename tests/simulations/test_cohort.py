"""The cohort writer: site layout, determinism, geometry, truth in cases.csv."""

from __future__ import annotations

import csv
import hashlib

import numpy as np
import pytest
import SimpleITK as sitk

from shared.plumbing.errors import IchfedError
from simulations.cohort import CSV_COLUMNS, make_case, write_cohort
from simulations.profiles import load_profile
from simulations.scanner import Grid, get_scale


def _digests(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _rows(folder):
    with open(folder / "cases.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_layout_and_cases_csv(ci_cohort):
    out, summary = ci_cohort
    rows = _rows(out)
    assert list(rows[0].keys()) == CSV_COLUMNS
    assert [r["case_id"] for r in rows] == [f"charite-like-{k:05d}" for k in range(4)]
    assert summary.n_cases == 4 and summary.n_neoplastic + summary.n_non_neoplastic == 4
    for r in rows:
        assert r["label"] in ("neoplastic", "non-neoplastic")
        assert r["ivh"] in ("yes", "no")
        assert r["profile"] == "charite-like"
        assert int(r["n_lesions"]) >= 1
        assert (out / "images" / f"{r['case_id']}.nii.gz").is_file()
        assert (out / "masks" / f"{r['case_id']}.nii.gz").is_file()
    assert sum(r["label"] == "neoplastic" for r in rows) == summary.n_neoplastic
    # No temporary files are left behind by the atomic writes.
    assert not [p for p in out.rglob(".*")]


def test_image_and_mask_share_geometry_and_types(ci_cohort):
    out, _ = ci_cohort
    grid = Grid.for_profile("ci", load_profile("charite-like").scanner)
    for r in _rows(out):
        img = sitk.ReadImage(str(out / "images" / f"{r['case_id']}.nii.gz"))
        msk = sitk.ReadImage(str(out / "masks" / f"{r['case_id']}.nii.gz"))
        assert img.GetPixelID() == sitk.sitkInt16
        assert msk.GetPixelID() == sitk.sitkUInt8
        assert img.GetSize() == msk.GetSize() == grid.shape_zyx[::-1]
        assert np.allclose(img.GetSpacing(), msk.GetSpacing()) and np.allclose(img.GetSpacing(), grid.spacing_xyz)
        assert np.allclose(img.GetOrigin(), msk.GetOrigin())
        assert np.allclose(img.GetDirection(), msk.GetDirection())
        m = sitk.GetArrayFromImage(msk)
        assert set(np.unique(m)) <= {0, 1, 2} and (m == 1).any() and (m == 2).any()
        # cases.csv volumes are the mask's voxel counts times the voxel volume.
        voxel_ml = float(np.prod(msk.GetSpacing())) / 1000
        assert float(r["ich_ml"]) == pytest.approx((m == 1).sum() * voxel_ml, abs=1e-3)
        assert float(r["phe_ml"]) == pytest.approx((m == 2).sum() * voxel_ml, abs=1e-3)


def test_same_seed_same_bytes_and_case_k_independent_of_n(tmp_path, ci_cohort):
    out, _ = ci_cohort
    again = tmp_path / "again"
    write_cohort("charite-like", 4, 11, again, scale="ci")
    assert _digests(again) == _digests(out)
    fewer = tmp_path / "fewer"
    write_cohort("charite-like", 2, 11, fewer, scale="ci")
    a, b = _digests(out), _digests(fewer)
    for k in range(2):
        for sub in ("images", "masks"):
            name = f"{sub}/charite-like-{k:05d}.nii.gz"
            assert a[name] == b[name]
    other = tmp_path / "other"
    write_cohort("charite-like", 2, 12, other, scale="ci")
    assert _digests(other)["images/charite-like-00000.nii.gz"] != a["images/charite-like-00000.nii.gz"]


def test_rewriting_a_cohort_replaces_it_and_foreign_folders_are_refused(tmp_path):
    out = tmp_path / "site"
    write_cohort("charite-like", 3, 1, out, scale="ci")
    write_cohort("hamburg-like", 2, 1, out, scale="ci")
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == ["hamburg-like-00000.nii.gz", "hamburg-like-00001.nii.gz"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(IchfedError, match="not empty"):
        write_cohort("charite-like", 1, 1, foreign, scale="ci")


@pytest.mark.parametrize("kwargs, needle", [
    ({"n_cases": 0}, "cases"), ({"scale": "huge"}, "scale"), ({"background": "mri"}, "background"),
])
def test_bad_arguments_are_user_errors(tmp_path, kwargs, needle):
    args = {"profile": "charite-like", "n_cases": 1, "seed": 0, "out": tmp_path / "x", "scale": "ci"}
    args.update(kwargs)
    with pytest.raises(IchfedError, match=needle):
        write_cohort(**args)


@pytest.mark.parametrize("scale, shape, spacing", [
    ("paper", (30, 512, 512), (0.45, 0.45, 5.0)),
    ("demo", (24, 128, 128), (1.8, 1.8, 5.0)),
    ("ci", (16, 64, 64), (3.6, 3.6, 5.0)),
])
def test_scales_of_the_development_site(scale, shape, spacing):
    grid = Grid.for_profile(scale, load_profile("charite-like").scanner)
    assert grid.shape_zyx == shape
    assert np.allclose(grid.spacing_xyz, spacing)
    assert get_scale(scale).n_slices == shape[0]


def test_profile_modulates_the_grid_but_keeps_physical_sizes():
    thin = Grid.for_profile("demo", load_profile("oncology-referral").scanner)  # 2.5 mm, 0.43 mm, 220 mm FOV
    dev = Grid.for_profile("demo", load_profile("charite-like").scanner)
    assert thin.spacing_xyz[2] == pytest.approx(dev.spacing_xyz[2] / 2)
    assert thin.shape_zyx[0] == 2 * dev.shape_zyx[0]  # same z coverage
    assert thin.spacing_xyz[0] == pytest.approx(1.8 * 0.43 / 0.45)
    assert thin.shape_zyx[2] * thin.spacing_xyz[0] == pytest.approx(220.0, abs=thin.spacing_xyz[0])


def test_lesions_are_several_voxels_at_ci_scale():
    sizes = []
    for k in range(12):
        case = make_case("charite-like", k, 3, scale="ci", mask_only=True)
        sizes.append(int((case.mask == 1).sum()))
        assert case.image is None
    assert min(sizes) >= 3
    assert np.median(sizes) >= 20
