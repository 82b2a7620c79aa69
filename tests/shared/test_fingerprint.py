"""`ichfed pki fingerprint FILE`: the fingerprints a site checks over the phone (issue 22 item 4),
each equal to what the standard tool for that file prints."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from ichfed.cli import main
from shared.security.fingerprint import fingerprint_file
from shared.security.pki import init_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return init_pki(tmp_path_factory.mktemp("pki"), "fl.example.org", ["charite"])


def test_each_kind_and_its_standard_tool(pki):
    cert = fingerprint_file(pki.ca_cert)
    assert cert.kind == "certificate" and "ichfed federation CA" in cert.subject
    if shutil.which("openssl"):
        out = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(pki.ca_cert)],
                             capture_output=True, text=True, encoding="utf-8", check=True).stdout
        assert out.strip().split("=", 1)[1] == cert.fingerprint
    node = fingerprint_file(pki.nodes[0].public_key)
    assert node.kind == "SuperNode key (EC secp384r1)" and node.fingerprint.startswith("SHA256:")
    assert fingerprint_file(pki.nodes[0].private_key).fingerprint == node.fingerprint
    assert fingerprint_file(pki.nodes[0].private_key).private
    if shutil.which("ssh-keygen"):
        out = subprocess.run(["ssh-keygen", "-lf", str(pki.nodes[0].public_key)], capture_output=True, text=True,
                             encoding="utf-8", check=True).stdout
        assert out.split()[1] == node.fingerprint


def test_bundle_key_fingerprint_is_the_signers_name_in_a_signed_bundle(pki, tmp_path):
    """What `ichfed bundle verify` names as the signer is what the site read over the phone."""
    from shared.bundle import load_bundle
    from tests.shared.test_transport import _small_bundle

    key = fingerprint_file(pki.signing_public_key)
    assert key.kind == "bundle-signing key (Ed25519)" and not key.private
    assert fingerprint_file(pki.signing_key).fingerprint == key.fingerprint
    bundle = _small_bundle(tmp_path, pki.signing_key)
    assert load_bundle(bundle, pki.signing_public_key).signed_by == key.fingerprint


def test_cli_prints_every_file_and_refuses_others(pki, tmp_path, capsys):
    assert main(["pki", "fingerprint", str(pki.ca_cert), str(pki.signing_public_key), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert [f["kind"] for f in found] == ["certificate", "bundle-signing key (Ed25519)"]
    assert main(["pki", "fingerprint", str(pki.signing_key)]) == 0
    assert "PRIVATE key: never send this file" in capsys.readouterr().out
    junk = tmp_path / "notes.txt"
    junk.write_text("hello", encoding="utf-8")
    for bad, why in ((junk, "not a PEM certificate"), (tmp_path / "missing.pem", "file not found")):
        assert main(["pki", "fingerprint", str(bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0]
