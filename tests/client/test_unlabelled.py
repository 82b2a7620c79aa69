"""Unlabelled cases (empty label in cases.csv): counted by ``site check``, used for the site's
BatchNorm statistics, never for training the head or for metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ichfed.cli import main


def _ct(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    img = sitk.GetImageFromArray(rng.normal(30, 10, size=(6, 24, 24)).astype(np.int16))
    img.SetSpacing((0.5, 0.5, 5.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def test_site_check_counts_unlabelled_cases_apart(tmp_path, capsys):
    root = tmp_path / "hospital"
    for i, cid in enumerate(("p1", "n1", "u1", "u2")):
        _ct(root / "images" / f"{cid}.nii", i)
    (root / "cases.csv").write_text("case_id,label\np1,neoplastic\nn1,0\nu1,\nu2,\n", encoding="utf-8")
    cfg = tmp_path / "site.toml"
    assert main(["site", "init", "--name", "h", "--data", str(root), "--out", str(cfg),
                 "--state-dir", str(tmp_path / "state")]) == 0
    capsys.readouterr()
    main(["site", "check", str(cfg), "--json"])
    cases = json.loads(capsys.readouterr().out)["cases"]
    assert (cases["usable"], cases["neoplastic"], cases["non_neoplastic"], cases["unlabelled"]) == (4, 1, 1, 2)
    assert cases["unusable"] == 0
    main(["site", "check", str(cfg)])
    assert "2 unlabelled (normalisation statistics only)" in capsys.readouterr().out
