"""`ichfed bootstrap` at the command line: --site trains on the given folder, without it the CLI writes the
development cohort first (simulations/reference.py); both stop with one error line before any training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _ichfed(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "ichfed", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, encoding="utf-8")


def _one_error_line(r: subprocess.CompletedProcess, must_name: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and must_name in lines[0], r.stderr


def test_existing_bundle_folder_stops_before_the_cohort_is_written(tmp_path):
    (tmp_path / "bundle").mkdir()
    r = _ichfed("bootstrap", "--profile", "ci", "--out", str(tmp_path / "bundle"))
    _one_error_line(r, "already exists")
    assert not (tmp_path / "bundle-work" / "cohort").exists()


def test_site_folder_is_used_as_given_and_no_cohort_is_generated(tmp_path):
    from simulations.cohort import write_cohort

    write_cohort("charite-like", 4, 0, tmp_path / "site", scale="ci")
    r = _ichfed("bootstrap", "--profile", "ci", "--site", str(tmp_path / "site"), "--out", str(tmp_path / "b"),
                "--work", str(tmp_path / "work"))
    _one_error_line(r, "need at least 10 usable cases")
    assert not (tmp_path / "work" / "cohort").exists() and not (tmp_path / "b").exists()
