"""`ichfed demo` is what `make demo` runs; its steps live in `simulations/demo.py`.

The third step (a case read as a site reads it) is tested on a real federation in
``tests/simulations/test_flower_sim.py::test_the_demo_reads_its_case_through_the_site_overlay``; a
whole demo trains and federates for minutes and is left to `make demo`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ichfed.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_make_demo_runs_the_ichfed_demo_command(capsys):
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert "$(BIN)/ichfed demo --out $(DEMO_OUT)" in makefile
    assert main(["demo", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--cases-per-site" in text and "--rounds" in text and "its active model" in text


def test_a_missing_federation_is_a_one_line_error(tmp_path):
    from shared.plumbing.errors import IchfedError
    from simulations.demo import read_one_case

    with pytest.raises(IchfedError, match="no site configs; run the federation step first"):
        read_one_case(tmp_path / "federation", tmp_path / "bundle")


def test_the_demo_warns_in_one_line_each_about_a_near_chance_or_flag_heavy_reference(tiny_bundle):
    """Issue 19 item 6: a reference near chance, or whose segmenter flags more than a quarter of its
    validation cases, is named in one line each; a sound one gets none. The real ci bootstrap's report
    carries the validation summary the warnings read."""
    from simulations.demo import reference_warnings

    sound = {"validation": {"n_cases": 40, "n_scored": 38, "auc": 0.83, "n_flagged": 4, "flagged_share": 0.1}}
    assert reference_warnings(sound) == []
    chance = {"validation": {**sound["validation"], "auc": 0.52}}
    flags = {"validation": {**sound["validation"], "flagged_share": 0.4, "n_flagged": 16}}
    both = {"validation": {**sound["validation"], "auc": 0.52, "flagged_share": 0.4}}
    assert [len(reference_warnings(r)) for r in (chance, flags, both)] == [1, 1, 2]
    assert "near chance: validation AUC 0.52" in reference_warnings(chance)[0]
    assert "flags 40% of its 40 validation cases" in reference_warnings(flags)[0]
    assert all("\n" not in line for line in reference_warnings(both))

    val = tiny_bundle.report["validation"]
    assert val["n_cases"] >= val["n_scored"] >= 1 and 0 <= val["n_flagged"] <= val["n_cases"]
    assert val["flagged_share"] == val["n_flagged"] / val["n_cases"]
    assert val["auc"] is None or 0.0 <= val["auc"] <= 1.0
