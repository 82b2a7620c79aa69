"""`ichfed cohort ...` end to end through the real CLI entry point."""

from __future__ import annotations

import csv
import json

from ichfed.cli import main


def test_cohort_make_preview_profiles_baseline(tmp_path, capsys):
    out = tmp_path / "site"
    assert main(["-q", "cohort", "make", "--profile", "hamburg-like", "--cases", "3", "--seed", "4",
                 "--out", str(out), "--scale", "ci"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_cases"] == 3 and summary["profile"] == "hamburg-like" and summary["scale"] == "ci"
    assert summary["n_neoplastic"] + summary["n_non_neoplastic"] == 3
    with open(out / "cases.csv", newline="", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 3
    assert main(["-q", "cohort", "preview", str(out), "-o", str(tmp_path / "p.png"), "--cases", "2"]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["cohort", "profiles"]) == 0
    assert "charite-like" in capsys.readouterr().out
    assert main(["cohort", "baseline", "--profile", "charite-like", "--cases", "400"]) == 0
    assert 0.6 < json.loads(capsys.readouterr().out)["auc"] < 0.95


def test_cohort_errors_are_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[scanner]\nnoise_sd = 99\n", encoding="utf-8")
    assert main(["cohort", "make", "--profile", str(bad), "--cases", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {bad}: 'scanner.noise_sd' must be between 3.0 and 15.0, got 99.0"]
    assert main(["cohort", "make", "--profile", "atlantis", "--cases", "1", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("error: profile: unknown profile 'atlantis'")
    assert main(["cohort", "preview", str(tmp_path), "-o", str(tmp_path / "p.png")]) == 2
    assert "cases.csv" in capsys.readouterr().err
