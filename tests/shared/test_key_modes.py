"""Issue 11 part 5: public keys, bundles and reports are world-readable (0644); private keys stay 0600."""

from __future__ import annotations

import contextlib
import json
import os
import stat

import pytest

from shared.plumbing import atomic
from shared.security import keys
from shared.security.pki import init_pki


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_signing_keys_private_0600_public_0644(tmp_path):
    with _umask(0o022):
        priv, pub = keys.generate_keypair(tmp_path / "keys")
    assert _mode(priv) == 0o600
    assert _mode(pub) == 0o644
    # Even a strict umask leaves the public half readable by the sites' service accounts.
    with _umask(0o077):
        _, pub2 = keys.generate_keypair(tmp_path / "strict")
    assert _mode(pub2) == 0o644


def test_pki_private_keys_0600_certificates_and_public_keys_0644(tmp_path):
    with _umask(0o022):
        layout = init_pki(tmp_path / "pki", "fl.hospital.example", ["site-a"])
    assert _mode(layout.ca_key) == _mode(layout.server_key) == 0o600
    assert _mode(layout.ca_cert) == _mode(layout.server_cert) == 0o644
    (node,) = layout.nodes
    assert _mode(node.private_key) == 0o600 and _mode(node.public_key) == 0o644
    assert _mode(layout.root / keys.PRIVATE_KEY_NAME) == 0o600
    assert _mode(layout.root / keys.PUBLIC_KEY_NAME) == 0o644


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_writes_follow_the_umask_like_open(tmp_path, mask, expected):
    """Reports and caches get what a plain open() would give, not mkstemp's 0600."""
    with _umask(mask):
        atomic.write_json(tmp_path / "report.json", {"auc": 0.9})
        with open(tmp_path / "plain.txt", "w", encoding="utf-8") as f:
            f.write("x")
    assert _mode(tmp_path / "report.json") == expected == _mode(tmp_path / "plain.txt")


def test_private_write_is_0600_before_any_byte_lands(tmp_path, monkeypatch):
    seen = []
    real_open = open

    def spy(path, *a, **k):
        if ".tmp" in os.path.basename(str(path)):
            seen.append(_mode(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", spy)
    with _umask(0o000):
        atomic.write_private_bytes(tmp_path / "secret.pem", b"-----BEGIN PRIVATE KEY-----\n")
    monkeypatch.undo()
    assert seen == [0o600]
    assert _mode(tmp_path / "secret.pem") == 0o600


def test_bundle_files_are_readable_by_other_accounts(tiny_bundle, tmp_path):
    """Weights and signature were written 0600 (mkstemp), so a reader service account could not load a bundle."""
    torch = pytest.importorskip("torch")
    from shared import bundle as B
    from shared.models.classifier import save_weights

    with _umask(0o022):
        save_weights({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
        root = tmp_path / "b"
        root.mkdir()
        for rel in [B.MANIFEST, *json.loads((tiny_bundle.path / B.MANIFEST).read_text("utf-8"))["files"]]:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(tiny_bundle.path / rel, root / rel)  # signing reads only; nothing is written in place
        B.sign_bundle(root, tiny_bundle.private_key)
    assert _mode(tmp_path / "w.safetensors") == 0o644
    assert _mode(root / B.SIGNATURE) == 0o644
