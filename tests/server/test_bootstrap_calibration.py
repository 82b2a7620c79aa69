"""Bootstrap's out-of-sample reference threshold and Platt calibration, stored in the bundle."""

from __future__ import annotations

import numpy as np
import pytest

from server.bootstrap_calibration import (
    calibrate_reference,
    reference_threshold,
    render_calibration,
)
from shared.bundle import load_bundle
from shared.evaluation.calibration import Calibration
from shared.evaluation.metrics import Threshold, best_threshold

PNG = b"\x89PNG\r\n\x1a\n"


def test_reference_threshold_is_a_midpoint_and_falls_back_when_undefined():
    y, p = [0, 0, 1, 1], [0.1, 0.3, 0.7, 0.9]
    assert reference_threshold(y, p, Threshold(0.42, -0.87, None, None)).p == pytest.approx(0.5)
    fallback = Threshold(0.42, -0.87, None, None)
    assert reference_threshold([1, 1], [0.3, 0.6], fallback) is fallback


def test_calibrate_reference_writes_reliability_and_validation_ppv_npv(tmp_path):
    rng = np.random.default_rng(0)
    def draw(n):
        y = rng.integers(0, 2, n)
        return y, 1 / (1 + np.exp(-8.0 * (rng.normal(size=n) + 2.0 * y - 1.0)))  # 4x over-confident
    (yv, pv), (yt, pt) = draw(300), draw(300)
    t = best_threshold(yv, pv).p
    cal, section = calibrate_reference(yv, pv, yt, pt, t, tmp_path / "out" / "rel.png")
    assert cal.kind == "platt" and 0.15 < cal.slope < 0.4  # truth: 0.25
    assert (tmp_path / "out" / "rel.png").read_bytes()[:8] == PNG
    assert section["reliability"]["ece_calibrated"] < 0.7 * section["reliability"]["ece_raw"]
    op = section["validation_operating_point"]
    assert 0.5 < op["ppv"] <= 1.0 and op["n_called_positive"] + op["n_called_negative"] == 300
    assert cal.validation == op and Calibration.from_dict(cal.to_dict()) == cal  # stored for the reader
    md = "\n".join(render_calibration(section))
    assert "PPV" in md and "![Reliability](rel.png)" in md and "| predicted p (raw) |" in md
    assert render_calibration(None) == []


@pytest.mark.slow
def test_bundle_stores_the_validation_calibration_and_report_shows_reliability(tiny_bundle):
    bundle = load_bundle(tiny_bundle.path, tiny_bundle.public_key)
    cal = Calibration.from_dict(bundle.manifest.calibration)
    assert cal == Calibration.from_dict(tiny_bundle.report["calibration"]["calibration"])
    assert tiny_bundle.report["threshold"]["rule"] == "midpoint on validation scores"
    md = (tiny_bundle.path.parent / f"{tiny_bundle.path.name}-report.md").read_text(encoding="utf-8")
    assert "## Calibration (fitted on validation)" in md
    png = tiny_bundle.path.parent / f"{tiny_bundle.path.name}-reliability.png"
    assert png.read_bytes()[:8] == PNG


@pytest.mark.slow
def test_a_tampered_calibration_fails_the_bundle_signature(tiny_bundle, tmp_path):
    import json
    import shutil

    from shared.plumbing.errors import BundleVerificationError

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, copy)
    manifest = json.loads((copy / "manifest.json").read_text(encoding="utf-8"))
    manifest["calibration"] = {**manifest.get("calibration", {}), "kind": "platt", "slope": 5.0}
    (copy / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(BundleVerificationError):
        load_bundle(copy, tiny_bundle.public_key)
