"""Issue #11 parts 2 and 5 at the command line: corrupt inputs, careless paths, closed pipes.

Most tests run ``ichfed`` as a user does (a subprocess); the site checks call ``main`` in-process
on a real site folder of NIfTI files. The predict tests use the real tiny bundle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ichfed.cli import main

REPO = Path(__file__).resolve().parents[2]


def ichfed(*args: str, timeout: float = 300, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "ichfed", *args], cwd=REPO, env=env, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=timeout, encoding="utf-8")


def assert_one_line_error(r: subprocess.CompletedProcess, must_name: str) -> str:
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and must_name in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def _ct(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    hu = rng.normal(30, 10, size=(6, 24, 24))
    hu[:, :4, :] = -1000
    img = sitk.GetImageFromArray(hu.astype(np.int16))
    img.SetSpacing((0.5, 0.5, 5.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


# ----------------------------------------------------------------------------- part 5 items


@pytest.mark.parametrize("raw", [b'name = "caf\xe9"\n', "name = 'x'\n".encode("utf-16")])
def test_non_utf8_toml_is_a_one_line_error(tmp_path, raw):
    cfg = tmp_path / "site.toml"
    cfg.write_bytes(raw)
    line = assert_one_line_error(ichfed("site", "check", str(cfg)), str(cfg))
    assert "not UTF-8" in line


def test_ingest_does_not_create_missing_parent_folders(tmp_path):
    src = _ct(tmp_path / "ct.nii.gz")
    out = tmp_path / "typo" / "deeper" / "x.nii.gz"
    assert_one_line_error(ichfed("ingest", str(src), "-o", str(out)), "parent folder")
    assert not (tmp_path / "typo").exists()


def test_save_masks_onto_an_existing_file_fails_before_any_work(tmp_path):
    target = tmp_path / "masks"
    target.write_text("not a folder", encoding="utf-8")
    # The bundle does not even exist: the --save-masks error must come first (no bundle verification).
    r = ichfed("predict", "--bundle", str(tmp_path / "no-bundle"), "--allow-unsigned", "--save-masks", str(target),
               str(_ct(tmp_path / "ct.nii.gz")), timeout=60)
    assert_one_line_error(r, "--save-masks")
    assert target.read_text(encoding="utf-8") == "not a folder"


@pytest.mark.parametrize("argv", [["--help"], ["ingest", "CT", "-o", "OUT"]])
def test_a_closed_stdout_ends_quietly(tmp_path, argv):
    """`ichfed ... | head`: the reader is gone before ichfed writes; no traceback, no 'Exception ignored'."""
    argv = [str(_ct(tmp_path / "ct.nii.gz")) if a == "CT" else str(tmp_path / "o.nii.gz") if a == "OUT" else a
            for a in argv]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.Popen([sys.executable, "-m", "ichfed", *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # like `head` exiting: every write to stdout now fails with EPIPE
    _, err = p.communicate(timeout=120)
    # argparse swallows write errors for --help itself; a command's own output ends with 128 + SIGPIPE.
    assert p.returncode == (0 if argv == ["--help"] else 141), err
    assert b"Traceback" not in err and b"Exception ignored" not in err and b"BrokenPipe" not in err


@pytest.mark.parametrize("group, elem, value, tag", [(0x0028, 0x0030, "0\\0", "PixelSpacing (0028,0030)"),
                                                     (0x0020, 0x0037, "0\\0\\0\\0\\0\\0",
                                                      "ImageOrientationPatient (0020,0037)")])
def test_ingest_bad_dicom_geometry_is_one_line_exit_2(tmp_path, group, elem, value, tag):
    from tests.dicom_factory import patch_tag, series_with_tags

    series_with_tags(tmp_path / "s", {})
    for f in (tmp_path / "s").iterdir():
        patch_tag(f, group, elem, value)
    out = tmp_path / "o.nii.gz"
    assert_one_line_error(ichfed("-q", "ingest", str(tmp_path / "s"), "-o", str(out)), tag)
    assert not out.exists()


# ----------------------------------------------------------------------------- site check


@pytest.fixture
def site_cfg(tmp_path) -> Path:
    root = tmp_path / "hospital"
    for cid, seed in (("c1", 1), ("c2", 2), ("c3", 3), ("cut", 4), ("seven", 5), ("prob", 6)):
        _ct(root / "images" / f"{cid}.nii", seed)
    data = (root / "images" / "cut.nii").read_bytes()
    (root / "images" / "cut.nii").write_bytes(data[: len(data) * 2 // 3])
    like = sitk.ReadImage(str(root / "images" / "c1.nii"))
    for cid, value, dtype in (("c1", 1, np.uint8), ("seven", 7, np.uint8), ("prob", 0.6, np.float32)):
        arr = np.zeros((6, 24, 24), dtype=dtype)
        arr[2:4, 8:12, 8:12] = value
        m = sitk.GetImageFromArray(arr)
        m.CopyInformation(like)
        (root / "masks").mkdir(exist_ok=True)
        sitk.WriteImage(m, str(root / "masks" / f"{cid}.nii.gz"))
    (root / "cases.csv").write_text("case_id,label\nc1,1\nc2,0\nc3,1\ncut,0\nseven,1\nprob,0\n", encoding="utf-8")
    cfg = tmp_path / "site.toml"
    assert main(["site", "init", "--name", "h", "--data", str(root), "--out", str(cfg),
                 "--state-dir", str(tmp_path / "state")]) == 0
    return cfg


def test_site_check_opens_masks_and_reads_images_fully(site_cfg, capsys):
    capsys.readouterr()
    main(["site", "check", str(site_cfg), "--json"])
    report = json.loads(capsys.readouterr().out)
    unusable = {u["case_id"]: u["message"] for u in report["unusable"]}
    assert set(unusable) == {"cut", "seven", "prob"}, unusable
    assert "truncated NIfTI" in unusable["cut"]  # the .nii is refused already from its header size
    assert "values [7]" in unusable["seven"] and "non-integer values" in unusable["prob"]
    assert report["cases"]["usable"] == 3 and report["cases"]["with_mask"] == 1
    assert report["skipped"] is None


def test_site_check_headers_only_says_what_it_skipped(site_cfg, capsys):
    capsys.readouterr()
    main(["site", "check", str(site_cfg), "--headers-only"])
    out = capsys.readouterr().out
    assert "skipped     --headers-only: pixel data of 5 image(s) and 3 mask(s) not read" in out
    assert "unusable  cut:" in out and "truncated NIfTI" in out  # header-level size check still runs


# ----------------------------------------------------------------------------- predict


def test_predict_keeps_going_after_any_exception(tmp_path, monkeypatch, capsys):
    """Fault injection at the predictor boundary: IMG2 raises a non-ichfed error (e.g. from a library)."""
    from ichfed.commands import predict as cmd

    class FaultyPredictor:
        def predict(self, path, save_masks_dir=None, ingest_options=None):
            if "img2" in str(path):
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            from shared.prediction import BundleRef, PredictionResult

            return PredictionResult(source=str(path), lesion_found=False, threshold=0.5,
                                    bundle=BundleRef("b", "1", "0" * 64))

    monkeypatch.setattr(cmd, "load_predictor", lambda args: FaultyPredictor())
    imgs = [str(tmp_path / f"img{i}.nii.gz") for i in (1, 2, 3)]
    assert main(["predict", "--bundle", "b", "--allow-unsigned", "--json", *imgs]) == 2
    cap = capsys.readouterr()
    assert [json.loads(line)["source"] for line in cap.out.splitlines()] == [imgs[0], imgs[2]]
    errors = [line for line in cap.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and imgs[1] in errors[0] and "RuntimeError" in errors[0]


@pytest.mark.slow
def test_predict_on_a_truncated_scan_is_an_error_not_no_lesion(tiny_bundle, tmp_path):
    from tests.shared.test_pipeline import (
        UNSEEN_CASE,
        write_healthy_head,
        write_synthetic_case,
    )

    whole = tmp_path / "case.nii.gz"
    write_synthetic_case(UNSEEN_CASE, whole)
    cut = tmp_path / "case-cut.nii"
    raw = sitk.ReadImage(str(whole))
    sitk.WriteImage(raw, str(cut))  # int16, uncompressed, as exported
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    healthy = write_healthy_head(tmp_path / "healthy.nii.gz")
    r = ichfed("predict", "--bundle", str(tiny_bundle.path), "--pubkey", str(tiny_bundle.public_key), "--json",
               "--device", "cpu", str(cut), str(healthy))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(cut) in errors[0] and "truncated NIfTI" in errors[0]
    assert [json.loads(line)["source"] for line in r.stdout.splitlines()] == [str(healthy)]


def test_site_headers_only_still_refuses_a_cut_uncompressed_mask(site_cfg, capsys):
    from client.site_config import load_site_config

    masks = load_site_config(site_cfg).data_dir / "masks"
    good = masks / "c1.nii.gz"
    cut = masks / "c1.nii"
    sitk.WriteImage(sitk.ReadImage(str(good)), str(cut))
    good.unlink()
    cut.write_bytes(cut.read_bytes()[:400])
    capsys.readouterr()
    main(["site", "check", str(site_cfg), "--headers-only", "--json"])
    unusable = {u["case_id"]: u["message"] for u in json.loads(capsys.readouterr().out)["unusable"]}
    assert "masks/c1.nii: truncated NIfTI" in unusable["c1"]
