"""benchmarks/bench_segmenter_federation.py at tiny scale with the cached test bundle, so it cannot rot: the
real server strategy aggregates the real site fine-tunes, every segmenter is judged on the held-out cases
(with the bundle head's AUC), the issue's target is checked, and the timing and bytes are kept (the lead
runs it at full scale on a quiet machine)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

pytestmark = pytest.mark.slow


def test_tiny_run_judges_reference_federated_and_local_only(tiny_bundle, tmp_path, flwr_task):
    import bench_segmenter_federation as bench

    out = tmp_path / "segfed.json"
    argv = ["--bundle", str(tiny_bundle.path), "--public-key", str(tiny_bundle.public_key),
            "--profiles", "hamburg-like", "lowdose-mobile", "--fine-tune-cases", "5", "--held-out-cases", "4",
            "--rounds", "1", "--trainable", "decoder", "--epochs", "1", "--iterations", "2", "--learning-rate", "1e-4",
            "--scale", "ci", "--work", str(tmp_path / "work"), "--out", str(out)]
    assert bench.main(argv) == 0
    r = json.loads(out.read_text(encoding="utf-8"))
    assert [s["profile"] for s in r["sites"].values()] == ["hamburg-like", "lowdose-mobile"]
    for s in r["sites"].values():
        for arm in (s["reference"], s["decoder"]["federated"], s["decoder"]["local_only"]):
            assert arm["n"] == 4 and 0.0 <= arm["mean_ich_dice"] <= 1.0 and 0.0 <= arm["flagged_share"] <= 1.0
            assert "median_ich_dice" in arm and "median_components" in arm
        assert len(s["decoder"]["seconds_per_round"]) == 1 and s["decoder"]["target"].keys() >= {"applies"}
    run = r["runs"]["decoder"]
    assert [row["status"] for row in run["rounds"][0]["train"]["sites"]] == ["accepted", "accepted"]
    b = run["bytes_per_site_per_round"]
    assert b["segmenter_round_sent"] > 100 * b["head_record_with_5_fold_heads"]
    assert (tmp_path / "segfed.md").read_text(encoding="utf-8").count("| hamburg-like |") == 3
    assert r["load_average_start"] and r["settings"]["rounds"] == 1
