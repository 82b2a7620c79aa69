"""Ed25519 keys and signatures for model bundles.

A bundle's manifest is signed by whoever releases the model (the coordinating centre); sites
hold only the public key. Keys are PEM files: the private key unencrypted PKCS#8 with mode
0600, the public key SubjectPublicKeyInfo.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from shared.plumbing.atomic import write_bytes, write_private_bytes
from shared.plumbing.errors import BundleVerificationError, IchfedError

PRIVATE_KEY_NAME = "bundle_signing_key.pem"
PUBLIC_KEY_NAME = "bundle_signing_key.pub.pem"


def generate_keypair(out_dir: str | Path) -> tuple[Path, Path]:
    """Create a new Ed25519 key pair in ``out_dir``; returns (private_key_path, public_key_path).

    Refuses to overwrite an existing key, because losing a signing key orphans every bundle
    signed with it.
    """
    out = Path(out_dir)
    priv_path, pub_path = out / PRIVATE_KEY_NAME, out / PUBLIC_KEY_NAME
    for p in (priv_path, pub_path):
        if p.exists():
            raise IchfedError(f"{p}: already exists; refusing to overwrite a key")
    out.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    priv_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    write_private_bytes(priv_path, priv_pem)
    write_bytes(pub_path, pub_pem, mode=0o644)  # handed to every site
    return priv_path, pub_path


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Read an Ed25519 private key PEM; a missing, malformed or non-Ed25519 key is an IchfedError."""
    p = Path(path)
    if not p.is_file():
        raise IchfedError(f"{p}: private key file not found")
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise IchfedError(f"{p}: not an unencrypted PEM private key ({_first_line(e)})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IchfedError(f"{p}: not an Ed25519 private key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Read an Ed25519 public key PEM; a missing, malformed or non-Ed25519 key is an IchfedError."""
    p = Path(path)
    if not p.is_file():
        raise IchfedError(f"{p}: public key file not found")
    try:
        key = serialization.load_pem_public_key(p.read_bytes())
    except (ValueError, TypeError) as e:
        raise IchfedError(f"{p}: not a PEM public key ({_first_line(e)})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise IchfedError(f"{p}: not an Ed25519 public key")
    return key


def fingerprint(public_key: Ed25519PublicKey) -> str:
    """sha256 (hex) of the raw 32-byte public key: a short name for a key in logs and signatures."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def sign(data: bytes, private_key: Ed25519PrivateKey) -> bytes:
    """Ed25519 signature (64 bytes) of ``data``."""
    return private_key.sign(data)


def verify(data: bytes, signature: bytes, public_key: Ed25519PublicKey, what: str) -> None:
    """Raise BundleVerificationError (naming ``what``) unless ``signature`` is valid for ``data``."""
    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        raise BundleVerificationError(f"{what}: signature does not match (tampered, or signed by another key)") from None


def _first_line(e: Exception) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__
