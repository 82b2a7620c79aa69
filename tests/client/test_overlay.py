"""The site overlay: one validated reader for a site's threshold/calibration, used by predict,
the reader and the ClientApp."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from client.overlay import (
    SiteOverlay,
    load_overlay,
    overlay_path,
    read_overlay_file,
    save_overlay,
)
from shared.plumbing.errors import IchfedError

REPO = Path(__file__).resolve().parents[2]
H = "ab" * 32

BAD_THRESHOLDS = [
    ("NaN", "nan"),
    ("null", "null"),
    ('"0.3"', "must be a number"),
    ("true", "must be a number"),
    ("0", "strictly between 0 and 1"),
    ("1", "strictly between 0 and 1"),
    ("1.5", "strictly between 0 and 1"),
    ("-0.2", "strictly between 0 and 1"),
    ("Infinity", "inf"),
]


def _write_v0(state: Path, text: str, bundle_hash: str = H) -> Path:
    path = state / "thresholds" / f"{bundle_hash}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_overlay_roundtrip_and_v0_files(tmp_path):
    assert load_overlay(tmp_path, H) is None
    _write_v0(tmp_path, json.dumps({"threshold": 0.31, "source": "site-calibrated"}))
    v0 = load_overlay(tmp_path, H)
    assert (v0.version, v0.threshold, v0.bundle_hash, v0.calibration) == (0, 0.31, H, None)
    cal = {"kind": "identity"}
    path = save_overlay(tmp_path, SiteOverlay(bundle_hash=H, threshold=0.27, calibration=cal, site="a"))
    assert path == overlay_path(tmp_path, H)
    got = load_overlay(tmp_path, H)  # the v1 overlay wins over the v0 file
    assert (got.version, got.threshold, got.calibration, got.site) == (1, 0.27, cal, "a")
    with pytest.raises(IchfedError, match="threshold"):
        save_overlay(tmp_path, SiteOverlay(bundle_hash=H, threshold=float("nan")))


@pytest.mark.parametrize("text, match", BAD_THRESHOLDS)
def test_bad_threshold_is_a_one_line_error_naming_file_and_field(tmp_path, text, match):
    path = _write_v0(tmp_path, '{"threshold": ' + text + "}")
    with pytest.raises(IchfedError) as e:
        load_overlay(tmp_path, H)
    msg = str(e.value)
    assert "\n" not in msg and f"{path}: threshold" in msg and match in msg


@pytest.mark.parametrize("text, field", [
    ("not json", "not a readable site overlay"),
    ("[0.3]", "JSON object"),
    ("{}", "threshold"),
    (json.dumps({"threshold": 0.3, "bundle_hash": "cd" * 32}), "bundle_hash"),
    (json.dumps({"threshold": 0.3, "version": 7}), "version"),
    (json.dumps({"threshold": 0.3, "calibration": 3}), "calibration"),
])
def test_malformed_overlay_files(tmp_path, text, field):
    path = _write_v0(tmp_path, text)
    with pytest.raises(IchfedError, match=field):
        read_overlay_file(path, H)


def _ichfed(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "ichfed", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, encoding="utf-8")


def _site_with_bad_threshold(tmp_path: Path, tiny_bundle, text: str) -> Path:
    from shared.bundle import bundle_hash

    path = _write_v0(tmp_path / "state", '{"threshold": ' + text + "}", bundle_hash(tiny_bundle.path))
    (tmp_path / "site.toml").write_text(
        f'name = "s"\ndata_dir = "{tmp_path / "data"}"\nstate_dir = "state"\n'
        f'public_key = "{tiny_bundle.public_key}"\ndevice = "cpu"\n', encoding="utf-8")
    return path


def _assert_one_line(r: subprocess.CompletedProcess, must_name: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and must_name in lines[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_predict_site_config_with_nan_threshold_is_one_line_error(tiny_bundle, tmp_path):
    path = _site_with_bad_threshold(tmp_path, tiny_bundle, "NaN")
    r = _ichfed("predict", "--bundle", str(tiny_bundle.path), "--site-config", str(tmp_path / "site.toml"),
                str(tmp_path / "unused.nii.gz"))
    _assert_one_line(r, f"{path}: threshold")


@pytest.mark.slow
def test_reader_threshold_from_with_null_threshold_is_one_line_error(tiny_bundle, tmp_path):
    path = _site_with_bad_threshold(tmp_path, tiny_bundle, "null")
    r = _ichfed("reader", "--bundle", str(tiny_bundle.path), "--threshold-from", str(tmp_path / "site.toml"),
                "--port", "8765")
    _assert_one_line(r, f"{path}: threshold")


def _norm_stats():
    import torch

    from shared.models import batchnorm_stats
    from shared.models.classifier import backbone_and_head, build_model

    torch.manual_seed(0)
    backbone, _ = backbone_and_head(build_model().eval())
    crops = np.random.default_rng(0).random((4, 20, 16, 16)).astype(np.float32)
    return backbone, batchnorm_stats.estimate(backbone, crops, "cpu")


def test_overlay_keeps_the_site_norm_stats_beside_it_checked_by_sha256(tmp_path):
    from client.overlay import load_norm_stats, norm_stats_path
    from shared.models import batchnorm_stats

    backbone, stats = _norm_stats()
    path = save_overlay(tmp_path, SiteOverlay(bundle_hash=H, threshold=0.4), norm_stats=stats)
    overlay = load_overlay(tmp_path, H)
    assert overlay.norm_stats["file"] == norm_stats_path(tmp_path, H).name and overlay.norm_stats["n_cases"] == 4
    assert json.loads(path.read_text(encoding="utf-8"))["norm_stats"]["sha256"] == overlay.norm_stats["sha256"]
    back = load_norm_stats(tmp_path, overlay)
    assert back.sha256() == stats.sha256()
    batchnorm_stats.apply(backbone, back)  # fits the backbone
    assert load_norm_stats(tmp_path, SiteOverlay(bundle_hash=H, threshold=0.4)) is None
    # a changed statistics file is refused, naming the file
    target = norm_stats_path(tmp_path, H)
    target.write_bytes(target.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(IchfedError, match=f"{target.name}.*sha256"):
        load_norm_stats(tmp_path, overlay)


@pytest.mark.parametrize("entry, match", [
    ({"file": "../../etc/x.norm.safetensors", "sha256": "0" * 64, "n_cases": 3}, "file: must be"),
    ({"file": f"{H}.norm.safetensors", "sha256": "xyz", "n_cases": 3}, "sha256"),
    ({"file": f"{H}.norm.safetensors", "sha256": "0" * 64, "n_cases": -1}, "n_cases"),
    ({"file": f"{H}.norm.safetensors", "sha256": "0" * 64}, "exactly"),
    ("stats.safetensors", "exactly"),
])
def test_malformed_norm_stats_entries_are_one_line_errors(tmp_path, entry, match):
    path = overlay_path(tmp_path, H)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"version": 1, "bundle_hash": H, "threshold": 0.4, "norm_stats": entry}),
                    encoding="utf-8")
    with pytest.raises(IchfedError, match=f"norm_stats: .*{match}"):
        load_overlay(tmp_path, H)


def test_site_predictor_reads_threshold_calibration_and_norm_stats_through_the_overlay(tiny_bundle, tmp_path):
    """``ichfed predict --site-config`` and the reader load their model in ``open_predictor``: the
    site's overlay gives the threshold, the calibration and the BatchNorm statistics together."""
    from client.site_predictor import open_predictor
    from shared.bundle import bundle_hash
    from shared.evaluation.calibration import Calibration
    from shared.models import batchnorm_stats

    h = bundle_hash(tiny_bundle.path)
    (tmp_path / "site.toml").write_text(
        f'name = "s"\ndata_dir = "{tmp_path / "data"}"\nstate_dir = "state"\n'
        f'public_key = "{tiny_bundle.public_key}"\ndevice = "cpu"\n', encoding="utf-8")
    plain = open_predictor(tiny_bundle.path, site_config=tmp_path / "site.toml", device="cpu")
    assert (plain.threshold_source, plain.calibration_source, plain.norm_stats_source) == ("bundle",) * 3
    crops = np.random.default_rng(1).random((4, *tiny_bundle_crop(plain))).astype(np.float32)
    stats = batchnorm_stats.estimate(plain.backbone, crops, "cpu")
    cal = Calibration(kind="platt", slope=0.7, intercept=-0.1, n_pos=4, n_neg=4).to_dict()
    save_overlay(tmp_path / "state", SiteOverlay(bundle_hash=h, threshold=0.37, calibration=cal), norm_stats=stats)
    site = open_predictor(tiny_bundle.path, site_config=tmp_path / "site.toml", device="cpu")
    assert (site.threshold, site.calibration_source, site.norm_stats_source) == (0.37, "site", "site")
    assert site.calibration == Calibration.from_dict(cal)
    np.testing.assert_array_equal(batchnorm_stats.extract(site.backbone)["bn1.running_var"],
                                  stats.tensors["bn1.running_var"])
    assert not np.allclose(site.embed(crops), plain.embed(crops))


def tiny_bundle_crop(predictor) -> tuple[int, int, int]:
    x, y, z = predictor.crop_spec.size_xyz
    return (z, y, x)
