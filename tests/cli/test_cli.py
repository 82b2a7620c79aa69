"""The `ichfed` command as a user runs it: a real subprocess, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ichfed.cli import COMMANDS
from tests.dicom_factory import BAD_INPUTS, simple_series, tilted_frame, write_series

REPO = Path(__file__).resolve().parents[2]
REAL_TILT = REPO / ".." / "shared" / "data" / "ct" / "ge-hispeed-head-tilt"


def ichfed(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python -m ichfed ARGS`` from the repository root."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "ichfed", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, encoding="utf-8")


def assert_one_line_error(result: subprocess.CompletedProcess, must_name: str) -> str:
    """Exit 2, stderr exactly one line ``error: ...`` naming ``must_name``, no traceback."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    assert must_name in lines[0]
    return lines[0]


# ------------------------------------------------------------------------------ CLI-wide


def test_help_lists_every_subcommand():
    result = ichfed("--help")
    assert result.returncode == 0
    listed = result.stdout.split("positional arguments:")[1].split("options:")[0]
    for name in COMMANDS:
        assert f"    {name} " in listed or f"    {name}\n" in listed, name
    assert set(COMMANDS) >= {"ingest", "predict", "federate", "reader", "site", "bundle"}


@pytest.mark.parametrize("name", COMMANDS)
def test_every_subcommand_has_help(name):
    result = ichfed(name, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: ichfed {name}")


def test_no_subcommand_prints_help_and_exits_2():
    result = ichfed()
    assert result.returncode == 2
    assert "usage: ichfed" in result.stdout


def test_unknown_file_is_one_line_error(tmp_path):
    missing = tmp_path / "no-such-scan.nii.gz"
    assert_one_line_error(ichfed("ingest", str(missing), "-o", str(tmp_path / "out.nii.gz")), str(missing))
    assert not (tmp_path / "out.nii.gz").exists()


def test_debug_shows_the_traceback(tmp_path):
    missing = tmp_path / "no-such-scan.nii.gz"
    result = ichfed("--debug", "ingest", str(missing), "-o", str(tmp_path / "out.nii.gz"))
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "IchfedError" in result.stderr and str(missing) in result.stderr


# ------------------------------------------------------------------------------ ichfed ingest


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_ingest_bad_input_exits_2_with_one_line(tmp_path, case):
    build, fragment = BAD_INPUTS[case]
    path = build(tmp_path)
    line = assert_one_line_error(ichfed("ingest", str(path), "-o", str(tmp_path / "out.nii.gz")), str(path))
    assert fragment in line
    assert not (tmp_path / "out.nii.gz").exists()


def test_ingest_refuses_an_output_that_is_not_nifti(tmp_path):
    simple_series(tmp_path / "ct", n=3)
    out = tmp_path / "out.png"
    assert_one_line_error(ichfed("ingest", str(tmp_path / "ct"), "-o", str(out)), str(out))


def test_ingest_writes_volume_and_prints_json(tmp_path):
    frame = tilted_frame(15.0)
    positions = [(0.0, 0.0, z) for z in (0.0, 2.0, 4.0, 5.0, 8.0)]
    slices = [np.full((10, 12), 40 + 10 * k) for k in range(5)]
    write_series(tmp_path / "ct", slices, positions, frame=frame)
    out = tmp_path / "nested" / "ct.nii.gz"
    out.parent.mkdir()  # ingest does not create missing parent folders (issue #11)

    result = ichfed("ingest", str(tmp_path / "ct"), "-o", str(out))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)  # exactly one JSON object on stdout
    assert set(info) >= {"shape", "spacing", "origin", "direction", "modality", "hu_min", "hu_max",
                         "corrections", "source_slices"}
    assert info["modality"] == "CT" and info["source_slices"] == 5
    assert set(info["corrections"]) == {"gantry_tilt", "nonuniform_spacing"}

    written = sitk.ReadImage(str(out))
    assert written.GetPixelID() == sitk.sitkFloat32
    assert list(written.GetSize()) == info["shape"]
    assert written.GetSpacing() == pytest.approx(info["spacing"], abs=1e-5)
    assert written.GetOrigin() == pytest.approx(info["origin"], abs=1e-4)
    assert written.GetDirection() == pytest.approx(info["direction"], abs=1e-5)
    arr = sitk.GetArrayFromImage(written)
    assert (float(arr.min()), float(arr.max())) == (info["hu_min"], info["hu_max"])
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp file left behind


@pytest.mark.skipif(not REAL_TILT.is_dir(), reason=f"real tilted CT not found at {REAL_TILT} (shared/ beside the repo)")
def test_ingest_real_tilted_ct(tmp_path):
    out = tmp_path / "real.nii.gz"
    result = ichfed("ingest", str(REAL_TILT), "-o", str(out))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["shape"] == [512, 611, 37] and info["source_slices"] == 28
    assert set(info["corrections"]) == {"gantry_tilt", "nonuniform_spacing"}
    assert info["spacing"][2] == pytest.approx(4.0019, abs=1e-3)
    assert sitk.ReadImage(str(out)).GetSize() == (512, 611, 37)
