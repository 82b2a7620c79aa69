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
