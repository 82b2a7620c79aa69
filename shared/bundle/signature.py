"""Signing a bundle's manifest and checking its signature (Ed25519, ``manifest.sig``).

The signature covers the exact manifest bytes; the manifest lists the sha256 of every file (the
v2 backbone and head files included), so one signature covers the whole bundle.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from pathlib import Path

from shared.bundle.manifest import MANIFEST, SIGNATURE, check_files, parse_manifest
from shared.bundle.weights import check_bundle_weights
from shared.plumbing.atomic import write_bytes
from shared.plumbing.errors import BundleVerificationError
from shared.security import keys

log = logging.getLogger(__name__)


def signature_blob(manifest_bytes: bytes, key) -> bytes:
    """The ``manifest.sig`` content for ``manifest_bytes`` signed with private ``key``."""
    blob = {
        "algorithm": "ed25519",
        "key_fingerprint": keys.fingerprint(key.public_key()),
        "signature": base64.b64encode(keys.sign(manifest_bytes, key)).decode("ascii"),
    }
    return (json.dumps(blob, indent=2, sort_keys=True) + "\n").encode("utf-8")


def check_signature(root: Path, manifest_bytes: bytes, public_key_path: Path) -> str:
    """Verify manifest.sig against ``public_key_path``; returns the key fingerprint."""
    key = keys.load_public_key(public_key_path)
    sig_path = root / SIGNATURE
    if not sig_path.is_file():
        raise BundleVerificationError(f"{root}: bundle is unsigned ({SIGNATURE} missing)")
    try:
        blob = json.loads(sig_path.read_text("utf-8"))
        if blob.get("algorithm") != "ed25519":
            raise ValueError(f"algorithm {blob.get('algorithm')!r}")
        signature = base64.b64decode(blob["signature"], validate=True)
        signer = str(blob.get("key_fingerprint", ""))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise BundleVerificationError(f"{sig_path}: malformed signature file ({e})") from None
    expected = keys.fingerprint(key)
    if signer and signer != expected:
        raise BundleVerificationError(
            f"{sig_path}: signed by key {signer[:16]}…, not by the given public key {expected[:16]}… ({public_key_path})"
        )
    keys.verify(manifest_bytes, signature, key, str(sig_path))
    return expected


def sign_bundle(path: str | Path, private_key_path: str | Path) -> str:
    """Sign (or re-sign) a bundle's manifest after checking its files and weights; returns the bundle hash."""
    root = bundle_dir(path)
    key = keys.load_private_key(private_key_path)
    raw = (root / MANIFEST).read_bytes()
    manifest = parse_manifest(raw, root / MANIFEST)
    # Never put a signature on files that no longer match what the manifest says,
    # nor on weights that are not numbers (NaN, a 1e30 head, a (5, 512) head).
    check_files(root, manifest.files)
    check_bundle_weights(root, manifest.files, manifest.classifier_file, manifest.head_file,
                         manifest.head_inputs.n_features)
    write_bytes(root / SIGNATURE, signature_blob(raw, key))
    digest = hashlib.sha256(raw).hexdigest()
    log.info("signed bundle %s (%s) with key %s", root, digest[:16], keys.fingerprint(key.public_key())[:16])
    return digest


def bundle_dir(path: str | Path) -> Path:
    """``path`` as a bundle folder (with a manifest); a packed ``.tar`` or a missing folder is refused."""
    import tarfile

    root = Path(path)
    if root.is_file() and tarfile.is_tarfile(root):
        raise BundleVerificationError(f"{root}: is a packed bundle; run 'ichfed bundle unpack' first")
    if not root.is_dir():
        raise BundleVerificationError(f"{root}: bundle directory not found")
    if not (root / MANIFEST).is_file():
        raise BundleVerificationError(f"{root}: not a bundle ({MANIFEST} missing)")
    return root

