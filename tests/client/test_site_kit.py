"""`ichfed site kit`: one folder per site, written from the coordinator's PKI (issue 22 item 5).
The kit against a real SuperLink is tests/deploy/test_preflight.py and test_quickstart.py."""

from __future__ import annotations

import configparser
import shutil
import stat
import subprocess

import pytest

from client.site_config import load_site_config
from client.site_kit import read_env, write_kit
from ichfed.cli import main
from shared.security.fingerprint import fingerprint_file
from shared.security.pki import init_pki


@pytest.fixture
def pki(tmp_path):
    return init_pki(tmp_path / "pki", "fl.example.org", ["charite", "site-b"])


def test_kit_holds_config_certificate_key_fingerprints_script_and_unit(pki, tmp_path, capsys):
    assert main(["site", "kit", "--pki", str(pki.root), "--sites", "charite,site-b",
                 "--superlink", "fl.example.org:9093", "--out", str(tmp_path / "kits")]) == 0
    out = capsys.readouterr().out
    kit = tmp_path / "kits" / "charite"
    assert (tmp_path / "kits" / "site-b" / "site.toml").is_file()
    # The shared files are the coordinator's, and the printed fingerprints are theirs.
    assert (kit / "ca.crt").read_bytes() == pki.ca_cert.read_bytes()
    assert (kit / "bundle_signing_key.pub.pem").read_bytes() == pki.signing_public_key.read_bytes()
    for name in ("ca.crt", "bundle_signing_key.pub.pem"):
        fp = fingerprint_file(kit / name).fingerprint
        assert fp in out and fp in (kit / "FINGERPRINTS.txt").read_text(encoding="utf-8")
    key = kit / "state" / "keys" / "charite"
    assert key.read_bytes() == pki.nodes[0].private_key.read_bytes()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # The config resolves inside the kit wherever the kit is moved.
    moved = shutil.copytree(kit, tmp_path / "elsewhere" / "charite")
    cfg = load_site_config(moved / "site.toml")
    assert (cfg.name, cfg.data_dir, cfg.state_dir) == ("charite", moved / "data", moved / "state")
    assert cfg.public_key == moved / "bundle_signing_key.pub.pem" and cfg.fine_tune_fraction == 0.2
    env = read_env(kit / "supernode.env")
    assert env == {"SUPERLINK": "fl.example.org:9093", "ROOT_CERTIFICATES": "ca.crt",
                   "NODE_KEY": "state/keys/charite", "SITE_CONFIG": "site.toml", "SUPERNODE_PORT": "9094"}


def test_start_script_runs_flower_supernode_with_the_kits_files(pki, tmp_path):
    """The script, run for real with a stand-in `flower-supernode` that prints its arguments."""
    kit = write_kit(pki.root, "charite", "fl.example.org:9093", tmp_path / "kits").folder
    fake = tmp_path / "bin" / "flower-supernode"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n', encoding="utf-8")
    fake.chmod(0o755)
    script = kit / "start-supernode.sh"
    assert script.stat().st_mode & stat.S_IXUSR
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "SUPERNODE_PORT": "9200"}
    argv = subprocess.run([str(script), "--max-retries", "3"], env=env, capture_output=True, text=True,
                          encoding="utf-8", check=True).stdout.splitlines()
    k = str(kit.resolve())
    assert argv == ["--superlink", "fl.example.org:9093", "--root-certificates", f"{k}/ca.crt",
                    "--auth-supernode-private-key", f"{k}/state/keys/charite",
                    "--node-config", f"site-config='{k}/site.toml'", "--port", "9200", "--max-retries", "3"]


def test_systemd_unit_runs_the_script_and_kills_the_group(pki, tmp_path):
    kit = write_kit(pki.root, "charite", "fl.example.org:9093", tmp_path / "kits", install_dir="/opt/ichfed/charite",
                    venv="/opt/ichfed/.venv").folder
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(kit / "ichfed-supernode-charite.service", encoding="utf-8")
    service = unit["Service"]
    assert service["ExecStart"] == "/opt/ichfed/charite/start-supernode.sh"
    assert service["KillMode"] == "control-group" and service["Restart"] == "on-failure"
    assert "PATH=/opt/ichfed/.venv/bin:" in service["Environment"] or any(
        line.startswith("Environment=PATH=/opt/ichfed/.venv/bin")
        for line in (kit / "ichfed-supernode-charite.service").read_text(encoding="utf-8").splitlines())
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    if shutil.which("systemd-analyze"):  # where systemd exists, its own checker reads the unit
        here = write_kit(pki.root, "charite", "fl.example.org:9093", tmp_path / "here", force=True,
                         install_dir=str(tmp_path / "here" / "charite")).folder  # ExecStart must exist
        r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(here / "ichfed-supernode-charite.service")],
                           capture_output=True, text=True, encoding="utf-8")
        assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def test_site_with_only_a_public_key_gets_a_kit_without_a_private_key(pki, tmp_path):
    pki.nodes[1].private_key.unlink()  # site-b made its own key and sent only the .pub
    kit = write_kit(pki.root, "site-b", "fl.example.org:9093", tmp_path / "kits")
    assert not kit.has_private_key and not (kit.folder / "state" / "keys" / "site-b").exists()
    assert "put your private key" in (kit.folder / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("argv, message", [
    (["--sites", "nobody"], "nodes/nobody.pub: not found"),
    (["--sites", "charite", "--superlink", "fl.example.org"], "--superlink: must be HOST:PORT"),
    (["--sites", "bad name"], "not a valid site name"),
    (["--sites", "charite", "--install-dir", "relative/path"], "--install-dir: must be an absolute path"),
])
def test_bad_input_is_one_line_exit_2(pki, tmp_path, capsys, argv, message):
    base = {"--superlink": "fl.example.org:9093"}
    args = ["site", "kit", "--pki", str(pki.root), "--out", str(tmp_path / "kits")]
    for flag, value in base.items():
        if flag not in argv:
            args += [flag, value]
    assert main(args + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_existing_kit_is_kept_unless_force(pki, tmp_path):
    write_kit(pki.root, "charite", "fl.example.org:9093", tmp_path / "kits")
    from shared.plumbing.errors import IchfedError

    with pytest.raises(IchfedError, match="already exists"):
        write_kit(pki.root, "charite", "fl.example.org:9093", tmp_path / "kits")
    write_kit(pki.root, "charite", "fl.example.org:9443", tmp_path / "kits", force=True)
    assert read_env(tmp_path / "kits" / "charite" / "supernode.env")["SUPERLINK"] == "fl.example.org:9443"
