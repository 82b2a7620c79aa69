"""Fingerprints of the keys and certificates a site receives, for a check over another channel.

A site that receives the CA certificate and the coordinator's bundle-signing public key (by
e-mail, in a site kit) reads their fingerprints to the coordinator over the phone, or compares
them with a letter; a match shows nobody swapped a file on the way. Each fingerprint is the
one the standard tool for that file prints, so either side can check without ichfed:

==========================  ==================================  ===============================================
file                        fingerprint                         the same with
==========================  ==================================  ===============================================
X.509 certificate (PEM)     SHA-256 of the DER, ``AB:CD:…``     ``openssl x509 -noout -fingerprint -sha256 -in F``
Ed25519 bundle key (PEM)    SHA-256 of the raw 32-byte key      ``ichfed bundle verify`` (``signed_by``); the
                            (hex), as manifest.sig names it     manifest's ``key_fingerprint``
OpenSSH public key          ``SHA256:<base64>``                 ``ssh-keygen -lf F``
==========================  ==================================  ===============================================

A private key is accepted too: the fingerprint is its public half's, and ``private`` says so.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from pathlib import Path

from shared.plumbing.errors import IchfedError


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What a file is and its fingerprint."""

    path: Path
    kind: str  # "certificate", "bundle-signing key (Ed25519)", "SuperNode key (EC P-384)", ...
    fingerprint: str
    private: bool = False  # the file holds a private key (never send it)
    subject: str | None = None  # a certificate's subject

    def line(self) -> str:
        """One line: path, kind, fingerprint."""
        what = self.kind + (", PRIVATE key: never send this file" if self.private else "")
        subject = f" {self.subject}" if self.subject else ""
        return f"{self.path}  {what}{subject}\n  {self.fingerprint}"


def fingerprint_file(path: str | Path) -> Fingerprint:
    """The fingerprint of a PEM certificate, an Ed25519 bundle key or an OpenSSH key in ``path``.

    Raises ``IchfedError`` (naming the file) for anything else.
    """
    p = Path(path)
    if not p.is_file():
        raise IchfedError(f"{p}: file not found")
    data = p.read_bytes()
    for reader in (_certificate, _pem_key, _openssh_key):
        found = reader(p, data)
        if found is not None:
            return found
    raise IchfedError(f"{p}: not a PEM certificate, a PEM public or private key, or an OpenSSH key")


def _certificate(p: Path, data: bytes) -> Fingerprint | None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    if b"-----BEGIN CERTIFICATE-----" not in data:
        return None
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise IchfedError(f"{p}: not a readable PEM certificate ({e})") from None
    digest = cert.fingerprint(hashes.SHA256()).hex().upper()
    return Fingerprint(p, "certificate", ":".join(digest[i:i + 2] for i in range(0, len(digest), 2)),
                       subject=cert.subject.rfc4514_string())


def _pem_key(p: Path, data: bytes) -> Fingerprint | None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if b"-----BEGIN OPENSSH PRIVATE KEY-----" in data or b"-----BEGIN" not in data:
        return None
    private = b"PRIVATE KEY-----" in data
    try:
        key = (serialization.load_pem_private_key(data, password=None).public_key() if private
               else serialization.load_pem_public_key(data))
    except (ValueError, TypeError) as e:
        raise IchfedError(f"{p}: not a readable unencrypted PEM key ({str(e).splitlines()[0]})") from None
    if isinstance(key, Ed25519PublicKey):
        from shared.security.keys import fingerprint

        return Fingerprint(p, "bundle-signing key (Ed25519)", fingerprint(key), private=private)
    return Fingerprint(p, f"{_algorithm(key)} key (PEM)", _ssh_style(key), private=private)


def _algorithm(key) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    return "RSA" if isinstance(key, rsa.RSAPublicKey) else "public"


def _openssh_key(p: Path, data: bytes) -> Fingerprint | None:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = b"-----BEGIN OPENSSH PRIVATE KEY-----" in data
    try:
        key = (serialization.load_ssh_private_key(data, password=None).public_key() if private
               else serialization.load_ssh_public_key(data))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    if isinstance(key, ec.EllipticCurvePublicKey):
        kind = f"SuperNode key (EC {key.curve.name})"
    else:
        kind = "OpenSSH key"
    return Fingerprint(p, kind, _ssh_style(key), private=private)


def _ssh_style(public_key) -> str:
    """``SHA256:<base64 without padding>`` of the OpenSSH wire blob, as ``ssh-keygen -lf`` prints it."""
    from cryptography.hazmat.primitives import serialization

    line = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    blob = base64.b64decode(line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")
