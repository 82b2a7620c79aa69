"""The end-to-end predictor (`shared.pipeline.Predictor`) with the real tiny bundle.

Volumes are checked in two ways. With the ground-truth mask, ``preprocess`` must reproduce the
cohort's recorded volumes (this checks measurement and units, independent of model quality).
Through segmentation, the tiny ``ci`` model is the limit: it finds the bleed but cannot yet tell
edema from blood (its PHE Dice is about 0), so the predicted ICH swallows part of the PHE. Measured
on 16 unseen ``charite-like`` ci cases it over-estimates ICH by +25..+65 % on large
hemorrhage-dominated bleeds (several hundred percent on small or edema-dominated ones, where
3.6 mm voxels blur the edges). The segmentation test therefore uses one large, unseen
hemorrhage-dominated case (measured: ICH +25 %, ICH+PHE -29 %) with a 50 % tolerance. The
paper's 10 % end-to-end target is checked on the demo bundle by ``benchmarks/bench_predict.py``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from shared.plumbing.errors import IchfedError
from shared.prediction import PredictionResult

RESULT_KEYS = {
    "source", "lesion_found", "n_components", "ich_ml", "phe_ml", "ich_mean_hu", "phe_mean_hu", "p_neoplastic",
    "log_p_neoplastic", "threshold", "threshold_source", "label", "timings", "bundle",
    "quality_flags", "extracranial_ml_removed", "postprocessing",
    "p_calibrated", "calibration_source", "norm_stats_source", "ingest_notes",
}
# A fresh case of the development population (the bootstrap cohort holds indices 0..15 only).
UNSEEN_CASE = 103


@pytest.fixture(scope="module")
def predictor(tiny_bundle):
    from shared.bundle import load_bundle
    from shared.pipeline import Predictor

    return Predictor(load_bundle(tiny_bundle.path, tiny_bundle.public_key), device="cpu")


def write_synthetic_case(index: int, path: Path):
    """Write case ``index`` of the charite-like ci cohort (seed 0) as NIfTI; returns its CaseRecord."""
    from simulations.cohort import make_case, write_nifti

    case = make_case("charite-like", index, 0, scale="ci")
    image, _ = case.images()
    write_nifti(image, path)
    return case.record


def write_healthy_head(path: Path) -> Path:
    """A simulated head with no lesion inserted."""
    from simulations.cohort import write_healthy_head as write

    return write(path, seed=11)


def test_truth_mask_reproduces_recorded_volumes(predictor, tiny_bundle):
    """Measurement and units: ml from the ground-truth mask match cases.csv within 10 %."""
    from shared.imaging.ingest import read_image
    from shared.imaging.sitedata import read_mask

    rows = list(csv.DictReader((tiny_bundle.cohort_dir / "cases.csv").open(encoding="utf-8")))
    assert len(rows) >= 10
    spec = predictor.crop_spec
    for row in rows:
        image = read_image(tiny_bundle.cohort_dir / "images" / f"{row['case_id']}.nii.gz").image
        truth = read_mask(tiny_bundle.cohort_dir / "masks" / f"{row['case_id']}.nii.gz", image)
        prepared = predictor.preprocess(image, mask=truth)
        vol = prepared.volumetrics
        assert vol.ich_ml == pytest.approx(float(row["ich_ml"]), rel=0.10), row["case_id"]
        assert vol.phe_ml == pytest.approx(float(row["phe_ml"]), rel=0.10), row["case_id"]
        # blood is denser than edema on non-contrast CT; both are in HU, not raw stored values
        assert 40.0 < vol.ich_mean_hu < 100.0, (row["case_id"], vol.ich_mean_hu)
        assert vol.phe_mean_hu < vol.ich_mean_hu
        crop = prepared.crop
        assert crop.lesion_found and crop.array.dtype == np.float32
        assert crop.array.shape == tuple(spec.size_xyz[::-1])
        assert sitk.GetArrayViewFromImage(prepared.mask).max() == 2


def test_predict_unseen_synthetic_case_finds_the_bleed(predictor, tmp_path):
    record = write_synthetic_case(UNSEEN_CASE, tmp_path / "case.nii.gz")
    assert record.ich_ml > 50 and record.ich_ml > record.phe_ml  # large, hemorrhage-dominated
    typed = predictor.predict(tmp_path / "case.nii.gz")
    result = typed.to_dict()  # the JSON of `ichfed predict --json`: its keys are a contract
    assert isinstance(typed, PredictionResult) and set(result) == RESULT_KEYS
    assert list(result) == [f.name for f in dataclasses.fields(PredictionResult) if f.name != "mask_path"]
    assert result["lesion_found"] is True and result["n_components"] >= 1
    # The ci segmenter is trained for seconds and mixes up blood and edema from run to run, so
    # only the whole lesion (ICH + PHE) is held to a tolerance here; the 10% per-label target is
    # measured on the demo bundle by benchmarks/bench_predict.py.
    total = result["ich_ml"] + result["phe_ml"]
    assert total == pytest.approx(record.ich_ml + record.phe_ml, rel=0.50)
    assert 30.0 < result["ich_mean_hu"] < 100.0
    p = result["p_neoplastic"]
    assert 0.0 <= p <= 1.0
    assert result["log_p_neoplastic"] == pytest.approx(math.log(p), abs=1e-5)
    assert result["label"] == ("neoplastic" if p >= result["threshold"] else "non-neoplastic")
    assert result["threshold_source"] == "bundle"
    assert result["bundle"]["hash"] == predictor.bundle.hash
    assert set(result["timings"]) == {"ingest", "segmentation", "crop", "classification"}
    assert all(v >= 0 for v in result["timings"].values())
    json.dumps(result, allow_nan=False)  # the JSON of `ichfed predict`


def test_predict_equals_the_stages_run_by_hand(predictor, tmp_path):
    """`predict` is exactly segment -> crop/measure -> embed (+ volumes for a hybrid head) -> head, as the site
    runtime calls them."""
    from shared.imaging.ingest import read_image

    path = tmp_path / "case.nii.gz"
    write_synthetic_case(UNSEEN_CASE, path)
    result = predictor.predict(path).to_dict()
    image = read_image(path).image
    prepared = predictor.preprocess(image)
    p = float(predictor.p_neoplastic(predictor.head_features(prepared.crop.array[None], [prepared.volumetrics]))[0])
    assert result["p_neoplastic"] == pytest.approx(p, abs=1e-5)
    assert result["ich_ml"] == pytest.approx(prepared.volumetrics.ich_ml, abs=1e-3)
    assert result["phe_ml"] == pytest.approx(prepared.volumetrics.phe_ml, abs=1e-3)


def test_predict_healthy_head_is_not_classified(predictor, tmp_path):
    result = predictor.predict(write_healthy_head(tmp_path / "healthy.nii.gz")).to_dict()
    assert result["lesion_found"] is False
    assert result["n_components"] == 0
    assert result["label"] is None and result["p_neoplastic"] is None and result["log_p_neoplastic"] is None
    assert result["ich_ml"] == 0.0
    assert "classification" not in result["timings"]


def test_predict_saves_the_mask_on_the_image_grid(predictor, tmp_path):
    path = tmp_path / "case.nii.gz"
    write_synthetic_case(UNSEEN_CASE, path)
    result = predictor.predict(path, save_masks_dir=tmp_path / "masks").to_dict()
    saved = Path(result["mask_path"])
    assert saved == tmp_path / "masks" / "case_mask.nii.gz"
    mask, image = sitk.ReadImage(str(saved)), sitk.ReadImage(str(path))
    assert mask.GetSize() == image.GetSize()
    assert mask.GetSpacing() == pytest.approx(image.GetSpacing())
    assert mask.GetOrigin() == pytest.approx(image.GetOrigin())
    labels = sitk.GetArrayFromImage(mask)
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    assert (labels == 1).sum() * voxel_ml == pytest.approx(result["ich_ml"], abs=1e-3)


def test_predict_bad_file_is_a_one_line_error(predictor, tmp_path):
    bad = tmp_path / "not-a-scan.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file")
    with pytest.raises(IchfedError) as e:
        predictor.predict(bad)
    assert "not-a-scan.nii.gz" in str(e.value) and "\n" not in str(e.value)
