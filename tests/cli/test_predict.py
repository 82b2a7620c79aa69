"""`ichfed predict` as a user runs it: a real subprocess, the real tiny bundle, real images.

The expensive run (synthetic case, corrupt file, healthy head and the real GE head CT in one
call) is made once per module and several tests read its output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

from tests.shared.test_pipeline import (
    RESULT_KEYS,
    UNSEEN_CASE,
    write_healthy_head,
    write_synthetic_case,
)

REPO = Path(__file__).resolve().parents[2]
SEGMENTER_LOADED = "nnU-Net segmenter "  # logged once per Segmenter (shared/models/segment.py)


def ichfed(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m ichfed ARGS`` from the repository root."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "ichfed", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, encoding="utf-8")


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def assert_one_line_error(result: subprocess.CompletedProcess, must_name: str) -> str:
    """Exit 2, stderr a single ``error: ...`` line naming ``must_name``, no traceback."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and must_name in lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


def linked_copy(src: Path, dst: Path) -> Path:
    """Copy a bundle folder with hard links (the classifier is ~250 MB); replace files, never edit them."""
    try:
        shutil.copytree(src, dst, copy_function=os.link)
    except OSError:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
    return dst


def replace_file(path: Path, data: bytes) -> None:
    """Write new bytes without touching a hard-linked original."""
    path.unlink()
    path.write_bytes(data)


@pytest.fixture(scope="module")
def case_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict_cases")
    write_synthetic_case(UNSEEN_CASE, root / "synthetic.nii.gz")
    write_healthy_head(root / "healthy.nii.gz")
    (root / "corrupt.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    return {"synthetic": root / "synthetic.nii.gz", "healthy": root / "healthy.nii.gz",
            "corrupt": root / "corrupt.nii.gz", "root": root}


@dataclasses.dataclass(frozen=True)
class MultiRun:
    result: subprocess.CompletedProcess
    records: list[dict]
    masks_dir: Path


@pytest.fixture(scope="module")
def multi_run(tiny_bundle, case_files, ge_series) -> MultiRun:
    """One `ichfed predict --json --save-masks` over four inputs, the corrupt one second."""
    masks_dir = case_files["root"] / "masks"
    result = ichfed("predict", "--bundle", str(tiny_bundle.path), "--pubkey", str(tiny_bundle.public_key),
                    "--json", "--save-masks", str(masks_dir), "--device", "cpu",
                    str(case_files["synthetic"]), str(case_files["corrupt"]), str(case_files["healthy"]),
                    str(ge_series))
    records = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    return MultiRun(result, records, masks_dir)


@pytest.mark.slow
def test_several_images_one_bad_one_error_line_others_printed(multi_run, case_files, ge_series):
    r = multi_run.result
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    errors = error_lines(r)
    assert len(errors) == 1 and "corrupt.nii.gz" in errors[0], r.stderr
    assert [rec["source"] for rec in multi_run.records] == [
        str(case_files["synthetic"]), str(case_files["healthy"]), str(ge_series)]


@pytest.mark.slow
def test_several_images_load_the_model_once(multi_run):
    assert multi_run.result.stderr.count(SEGMENTER_LOADED) == 1, multi_run.result.stderr
    assert len({rec["bundle"]["hash"] for rec in multi_run.records}) == 1


@pytest.mark.slow
def test_json_has_every_key_for_every_image(multi_run, tiny_bundle):
    for rec in multi_run.records:
        assert set(rec) == RESULT_KEYS | {"mask_path"}, rec["source"]
        assert rec["bundle"]["name"] == "ichfed-reference-ci"
        assert rec["threshold"] == pytest.approx(tiny_bundle.report["threshold"]["p"], abs=1e-6)
        assert rec["threshold_source"] == "bundle"
        assert rec["timings"]["segmentation"] > 0


@pytest.mark.slow
def test_real_ge_head_ct_runs_end_to_end(multi_run, ge_series):
    """The real tilted GE series: ingest corrects the tilt, the pipeline runs and gives valid numbers."""
    rec = multi_run.records[2]
    assert rec["source"] == str(ge_series)
    assert isinstance(rec["lesion_found"], bool)
    assert rec["ich_ml"] >= 0 and rec["phe_ml"] >= 0
    if rec["lesion_found"]:
        assert 0.0 <= rec["p_neoplastic"] <= 1.0
        assert rec["label"] in ("neoplastic", "non-neoplastic")
    else:
        assert rec["label"] is None and rec["p_neoplastic"] is None
    assert rec["timings"]["ingest"] > 0


@pytest.mark.slow
def test_healthy_head_is_not_a_crash(multi_run):
    rec = multi_run.records[1]
    assert rec["lesion_found"] is False
    assert rec["label"] is None and rec["p_neoplastic"] is None and rec["log_p_neoplastic"] is None


@pytest.mark.slow
def test_save_masks_have_the_image_geometry(multi_run, case_files):
    from shared.imaging.ingest import read_image

    saved = sorted(p.name for p in multi_run.masks_dir.iterdir())
    assert saved == ["ge-hispeed-head-tilt_mask.nii.gz", "healthy_mask.nii.gz", "synthetic_mask.nii.gz"]
    for rec in multi_run.records:
        mask = sitk.ReadImage(rec["mask_path"])
        image = read_image(rec["source"]).image  # the grid the pipeline segmented (tilt-corrected for GE)
        assert mask.GetSize() == image.GetSize()
        assert mask.GetSpacing() == pytest.approx(image.GetSpacing())
        assert mask.GetOrigin() == pytest.approx(image.GetOrigin())
        assert mask.GetDirection() == pytest.approx(image.GetDirection())
        labels = sitk.GetArrayViewFromImage(mask)
        assert set(labels.ravel().tolist()) <= {0, 1, 2}
        assert bool((labels == 1).any()) == rec["lesion_found"]


def test_save_masks_refuses_two_images_with_the_same_name(tiny_bundle, case_files, tmp_path):
    """Their masks would overwrite each other; refused before the model is loaded."""
    other = tmp_path / "elsewhere" / "healthy.nii.gz"
    other.parent.mkdir()
    shutil.copyfile(case_files["healthy"], other)
    r = ichfed("predict", "--bundle", str(tiny_bundle.path), "--pubkey", str(tiny_bundle.public_key),
               "--save-masks", str(tmp_path / "masks"), str(case_files["healthy"]), str(other))
    assert "healthy_mask.nii.gz" in assert_one_line_error(r, "--save-masks")
    assert not (tmp_path / "masks").exists()


# ------------------------------------------------------------------------------ trust


@pytest.mark.parametrize("step", ["0", "1.5"])
def test_bad_tile_step_is_a_one_line_error(tiny_bundle, case_files, step):
    r = ichfed("predict", "--bundle", str(tiny_bundle.path), "--pubkey", str(tiny_bundle.public_key),
               "--tile-step-size", step, str(case_files["healthy"]))
    assert_one_line_error(r, "--tile-step-size")


@pytest.mark.slow
def test_coarser_tiling_and_explicit_mirroring_still_segment(multi_run, tiny_bundle, case_files):
    """nnU-Net's step size and mirroring reach its predictor; the lesion is still found, volumes close."""
    r = ichfed("predict", "--bundle", str(tiny_bundle.path), "--pubkey", str(tiny_bundle.public_key), "--json",
               "--device", "cpu", "--tile-step-size", "1", "--mirroring", "on", str(case_files["synthetic"]))
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.splitlines()[0])
    base = multi_run.records[0]
    assert rec["lesion_found"] and base["lesion_found"]
    assert "mirroring on" in r.stderr
    assert rec["ich_ml"] == pytest.approx(base["ich_ml"], rel=0.5)


def test_missing_pubkey_is_a_one_line_error(tiny_bundle, case_files):
    r = ichfed("predict", "--bundle", str(tiny_bundle.path), str(case_files["healthy"]))
    assert_one_line_error(r, "--pubkey")


@pytest.mark.parametrize("tamper", ["nnunet/plans.json", "manifest.json"])
def test_tampered_bundle_is_a_one_line_error(tiny_bundle, case_files, tmp_path, tamper):
    bundle = linked_copy(tiny_bundle.path, tmp_path / "bundle")
    target = bundle / tamper
    data = target.read_bytes()
    replace_file(target, data.replace(b"}", b" }", 1))
    r = ichfed("-q", "predict", "--bundle", str(bundle), "--pubkey", str(tiny_bundle.public_key),
               str(case_files["healthy"]))
    line = assert_one_line_error(r, str(bundle))
    assert not r.stdout
    if tamper == "nnunet/plans.json":
        assert "plans.json" in line and "sha256" in line
    # the original bundle is untouched
    assert (tiny_bundle.path / tamper).read_bytes() == data


def test_allow_unsigned_on_an_unsigned_bundle_warns_and_runs(tiny_bundle, case_files, tmp_path):
    bundle = linked_copy(tiny_bundle.path, tmp_path / "bundle")
    (bundle / "manifest.sig").unlink()
    r = ichfed("-q", "predict", "--bundle", str(bundle), "--pubkey", str(tiny_bundle.public_key),
               str(case_files["healthy"]), "--json")
    assert "unsigned" in assert_one_line_error(r, str(bundle))
    # without --json: the human-readable summary
    r = ichfed("predict", "--bundle", str(bundle), "--allow-unsigned", str(case_files["healthy"]))
    assert r.returncode == 0, r.stderr
    assert "WARNING" in r.stderr and "WITHOUT signature verification" in r.stderr
    assert r.stdout.startswith(str(case_files["healthy"]))
    assert "no hemorrhage found (not classified)" in r.stdout
    assert "bundle ichfed-reference-ci 1.0.0" in r.stdout
    assert (tiny_bundle.path / "manifest.sig").is_file()


def test_site_config_threshold_is_used(tiny_bundle, case_files, tmp_path):
    """A site's locally calibrated threshold for this exact bundle replaces the bundle's own."""
    from shared.bundle import bundle_hash

    state = tmp_path / "state"
    (state / "thresholds").mkdir(parents=True)
    site_threshold = 0.01  # the lowest grid point, below any plausible p: the case must be called neoplastic
    (state / "thresholds" / f"{bundle_hash(tiny_bundle.path)}.json").write_text(
        json.dumps({"threshold": site_threshold}), encoding="utf-8")
    (tmp_path / "site.toml").write_text(
        'name = "test-site"\n'
        f'data_dir = "{tmp_path / "data"}"\n'
        'state_dir = "state"\n'
        f'public_key = "{tiny_bundle.public_key}"\n'
        'device = "cpu"\n', encoding="utf-8")
    r = ichfed("predict", "--bundle", str(tiny_bundle.path), "--site-config", str(tmp_path / "site.toml"),
               "--json", str(case_files["synthetic"]))
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["threshold_source"] == "site"
    assert rec["threshold"] == pytest.approx(site_threshold)
    assert rec["lesion_found"] is True
    assert rec["label"] == ("neoplastic" if rec["p_neoplastic"] >= site_threshold else "non-neoplastic")
    assert rec["label"] == "neoplastic"

