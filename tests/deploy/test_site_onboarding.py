"""`ichfed site init` / `ichfed site check` on a real (tiny) site folder with real NIfTI files."""

from __future__ import annotations

import json
import stat

import numpy as np
import pytest
import SimpleITK as sitk

from client.site_config import load_site_config
from ichfed.cli import main
from shared.bundle import transport as T
from shared.plumbing.device import pick_device
from shared.security.keys import generate_keypair
from tests.shared.test_transport import _small_bundle


def _ct(path, seed):
    rng = np.random.default_rng(seed)
    hu = rng.normal(30, 10, size=(6, 24, 24))
    hu[:, :4, :] = -1000  # air, so the values look like a CT
    img = sitk.GetImageFromArray(hu.astype(np.int16))
    img.SetSpacing((0.5, 0.5, 5.0))
    sitk.WriteImage(img, str(path))


@pytest.fixture
def site_dir(tmp_path):
    root = tmp_path / "hospital"
    (root / "images").mkdir(parents=True)
    _ct(root / "images" / "c1.nii.gz", 1)
    _ct(root / "images" / "c2.nii.gz", 2)
    _ct(root / "images" / "c3.nii.gz", 3)
    (root / "images" / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    (root / "cases.csv").write_text(
        "case_id,label\nc1,neoplastic\nc2,non-neoplastic\nc3,0\nbroken,1\nmissing,0\nc4,maybe\n", encoding="utf-8")
    return root


def _init(tmp_path, site_dir, *extra):
    cfg = tmp_path / "site_configs" / "charite.toml"
    state = tmp_path / "state"
    argv = ["site", "init", "--name", "charite", "--data", str(site_dir), "--out", str(cfg),
            "--state-dir", str(state), "--local-epochs", "7", *extra]
    return main(argv), cfg, state


def test_init_writes_config_and_node_key(tmp_path, site_dir, capsys):
    _, public = generate_keypair(tmp_path / "coordinator")
    rc, cfg_path, state = _init(tmp_path, site_dir, "--public-key", str(public))
    assert rc == 0
    out = capsys.readouterr().out
    cfg = load_site_config(cfg_path)
    assert (cfg.name, cfg.data_dir, cfg.state_dir, cfg.public_key) == ("charite", site_dir.resolve(), state.resolve(), public.resolve())
    assert cfg.local_epochs == 7 and cfg.fine_tune_fraction == 0.2
    private, pub = state / "keys" / "charite", state / "keys" / "charite.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert pub.read_text(encoding="utf-8").startswith("ecdsa-sha2-nistp384 ")
    assert f"flwr supernode register {pub}" in out

    # Re-running refuses to clobber the config; --force rewrites it but keeps the registered key.
    key_before = private.read_bytes()
    rc, _, _ = _init(tmp_path, site_dir)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and "already exists" in err[-1]
    rc, _, _ = _init(tmp_path, site_dir, "--force")
    assert rc == 0 and private.read_bytes() == key_before
    rc, _, _ = _init(tmp_path, site_dir, "--force", "--new-key")
    assert rc == 0 and private.read_bytes() != key_before


@pytest.mark.parametrize(
    "extra, match",
    [(["--fine-tune-fraction", "1.5"], "fine_tune_fraction"), (["--public-key", "/nonexistent.pem"], "nonexistent")],
)
def test_init_rejects_bad_values(tmp_path, site_dir, capsys, extra, match):
    rc, cfg, _ = _init(tmp_path, site_dir, *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and match in err[-1]
    assert not cfg.exists()


def test_check_reports_counts_unusable_device_and_bundle(tmp_path, site_dir, capsys):
    private, public = generate_keypair(tmp_path / "coordinator")
    rc, cfg_path, state = _init(tmp_path, site_dir, "--public-key", str(public))
    capsys.readouterr()

    # Three usable cases are far too few to train (issue 22: such a site used to pass as "ready").
    assert main(["site", "check", str(cfg_path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["cases"] == {"listed": 6, "usable": 3, "unusable": 3, "neoplastic": 1, "non_neoplastic": 2, "with_mask": 0,
                               "unlabelled": 0, "images_opened": True}
    unusable = {u["case_id"]: u["message"] for u in report["unusable"]}
    assert set(unusable) == {"broken", "missing", "c4"}
    assert "broken.nii.gz" in unusable["broken"] and "no image" in unusable["missing"]
    assert report["device"]["selected"] == pick_device("auto").type
    assert report["bundles"] == [] and report["ready"] is False
    [why] = report["not_ready"]  # the split, with its fix, and nothing else
    assert "fine-tune case(s), fewer than the minimum of 5" in why and "fix: add" in why

    # A bundle the site received earlier shows up with its hash, verified against the site's key.
    bundle = _small_bundle(tmp_path, private)
    arrays, config = T.bundle_to_records(bundle)
    cached = T.bundle_from_records(arrays, config, T.bundle_cache_dir(state), public)
    assert main(["site", "check", str(cfg_path)]) == 1
    text = capsys.readouterr().out
    assert f"bundle      {cached.name}  transport-test 0.0.1  verified" in text
    assert "3 usable: 1 neoplastic, 2 non-neoplastic" in text and "unusable  missing: no image" in text

    # Damage the cached copy: the dry run says so and the site is not ready.
    (cached / "nnunet" / "plans.json").write_text("{}", encoding="utf-8")
    assert main(["site", "check", str(cfg_path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["bundles"][0]["status"].startswith("verification failed")
    assert report["ready"] is False and any("does not verify" in why for why in report["not_ready"])


def test_check_without_public_key_is_not_ready(tmp_path, site_dir, capsys):
    rc, cfg_path, _ = _init(tmp_path, site_dir)
    capsys.readouterr()
    assert main(["site", "check", str(cfg_path), "--headers-only"]) == 1
    out = capsys.readouterr().out
    assert "NOT READY" in out and "no public_key" in out
    assert "3 usable" in out and "unusable  broken" in out  # read_site checks image headers itself


def test_check_bad_config_is_one_line_exit_2(tmp_path, site_dir, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(f'name = "x"\ndata_dir = "{site_dir}"\nstate_dir = "s"\nlocal_epoch = 3\n', encoding="utf-8")
    assert main(["site", "check", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "local_epoch" in err[0]
    assert main(["site", "check", str(tmp_path / "nope.toml")]) == 2
    assert "file not found" in capsys.readouterr().err
