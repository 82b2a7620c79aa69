"""Keys and certificates for a federated deployment.

One coordinator runs ``ichfed pki init``; it yields

- a certificate authority (``ca.crt``/``ca.key``) whose certificate every SuperNode and the
  ``flwr`` CLI trust (``--root-certificates``);
- the SuperLink's TLS certificate (``server.pem``/``server.key``) with SANs for the server's
  host name, ``localhost`` and ``127.0.0.1``;
- one SuperNode authentication key pair per site (``nodes/<site>`` OpenSSH private key,
  ``nodes/<site>.pub`` OpenSSH public key), the format ``flwr supernode register`` and
  ``flower-supernode --auth-supernode-private-key`` read;
- the coordinator's Ed25519 bundle-signing key, made only when it does not exist yet, because
  replacing it would orphan every bundle already signed.

Private keys are written 0600, everything else 0644, each file atomically. Nothing existing is
overwritten unless ``force`` is given.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import logging
import os
import re
from pathlib import Path

from shared.plumbing.atomic import write_bytes, write_private_bytes
from shared.plumbing.errors import IchfedError
from shared.security import keys

log = logging.getLogger(__name__)

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclasses.dataclass(frozen=True)
class NodeKey:
    """One SuperNode's authentication key pair."""

    site: str
    private_key: Path
    public_key: Path


@dataclasses.dataclass(frozen=True)
class PkiLayout:
    """Where ``init_pki`` put each file."""

    root: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    signing_key: Path
    signing_public_key: Path
    nodes: tuple[NodeKey, ...]

    @classmethod
    def at(cls, root: str | os.PathLike, sites: tuple[str, ...] = ()) -> "PkiLayout":
        """The layout under ``root`` for ``sites`` (nothing is read or written)."""
        r = Path(root)
        return cls(
            root=r,
            ca_cert=r / "ca.crt",
            ca_key=r / "ca.key",
            server_cert=r / "server.pem",
            server_key=r / "server.key",
            signing_key=r / keys.PRIVATE_KEY_NAME,
            signing_public_key=r / keys.PUBLIC_KEY_NAME,
            nodes=tuple(NodeKey(s, r / "nodes" / s, r / "nodes" / f"{s}.pub") for s in sites),
        )


def check_site_name(name: str, field: str = "site") -> str:
    """Return ``name`` if it is usable as a file name and Flower node-config value, else raise."""
    if not isinstance(name, str) or not SITE_NAME.match(name):
        raise IchfedError(
            f"{field}: {name!r} is not a valid site name (letters, digits, '_', '-', '.'; "
            "starting with a letter or digit; at most 63 characters)"
        )
    return name


def init_pki(
    out_dir: str | os.PathLike,
    server_name: str,
    sites: tuple[str, ...] | list[str] = (),
    force: bool = False,
    valid_days: int = 825,
) -> PkiLayout:
    """Create the CA, the SuperLink certificate, node keys for ``sites`` and the signing key.

    Refuses (before writing anything) when a CA, server or node key already exists and
    ``force`` is false. The bundle-signing key is kept when present, even with ``force``.
    """
    sites = tuple(check_site_name(s, "--sites") for s in sites)
    if len(set(sites)) != len(sites):
        raise IchfedError(f"--sites: duplicate site name in {', '.join(sites)}")
    server_name = _check_server_name(server_name)
    if not 1 <= valid_days <= 3650:
        raise IchfedError(f"--days: must be between 1 and 3650, got {valid_days}")
    layout = PkiLayout.at(out_dir, sites)
    targets = [layout.ca_cert, layout.ca_key, layout.server_cert, layout.server_key]
    for node in layout.nodes:
        targets += [node.private_key, node.public_key]
    if not force:
        for t in targets:
            if t.exists():
                raise IchfedError(f"{t}: already exists (pass --force to replace it)")

    ca_key, ca_cert = make_ca(valid_days=valid_days)
    server_key, server_cert = make_server_cert(ca_key, ca_cert, server_name, valid_days=valid_days)
    _write_private(layout.ca_key, _pem_private(ca_key))
    _write_public(layout.ca_cert, _pem_cert(ca_cert))
    _write_private(layout.server_key, _pem_private(server_key))
    _write_public(layout.server_cert, _pem_cert(server_cert))
    for node in layout.nodes:
        write_node_keypair(node.private_key, node.public_key, force=True)
    ensure_signing_key(layout.root)
    log.info("PKI for %s with %d site key(s) written to %s", server_name, len(sites), layout.root)
    return layout


def make_ca(common_name: str = "ichfed federation CA", valid_days: int = 825):
    """Return ``(private_key, certificate)`` of a self-signed EC P-384 CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(ca_key, ca_cert, server_name: str, valid_days: int = 825):
    """Return ``(private_key, certificate)`` for the SuperLink, signed by the CA.

    SANs: the server name (DNS or IP), ``DNS:localhost`` and ``IP:127.0.0.1``, so the same
    certificate serves a loopback test and the real host.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.SubjectAlternativeName(server_sans(server_name)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=True,
                data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def server_sans(server_name: str) -> list:
    """The subject alternative names of the SuperLink certificate, without duplicates."""
    from cryptography import x509

    names: list = []
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(server_name)))
    except ValueError:
        names.append(x509.DNSName(server_name))
    for extra in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        if extra not in names:
            names.append(extra)
    return names


def write_node_keypair(private_path: str | os.PathLike, public_path: str | os.PathLike, force: bool = False) -> str:
    """Write a SuperNode EC P-384 key pair (OpenSSH formats); return the public key line.

    Flower authenticates SuperNodes by this key: the coordinator registers the public key with
    ``flwr supernode register``; the site keeps the private key (0600, unencrypted because the
    SuperNode reads it unattended).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    priv_p, pub_p = Path(private_path), Path(public_path)
    if not force:
        for p in (priv_p, pub_p):
            if p.exists():
                raise IchfedError(f"{p}: already exists (pass --force to replace it)")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_private(priv_p, private)
    _write_public(pub_p, public + b"\n")
    return public.decode("ascii")


def ensure_signing_key(out_dir: str | os.PathLike) -> bool:
    """Make the coordinator's Ed25519 bundle-signing key pair in ``out_dir`` unless one exists.

    Uses ``shared.security.keys`` so the files are exactly what ``sign_bundle``/``load_bundle`` read.
    Returns True when a new key was made.
    """
    out = Path(out_dir)
    if (out / keys.PRIVATE_KEY_NAME).exists():
        keys.load_private_key(out / keys.PRIVATE_KEY_NAME)  # fail early on a damaged key
        log.info("keeping existing bundle-signing key %s", out / keys.PRIVATE_KEY_NAME)
        return False
    keys.generate_keypair(out)  # the public half is written 0644: it is handed to every site
    return True


def load_certificate(path: str | os.PathLike):
    """Read a PEM certificate, with a one-line error naming the file."""
    from cryptography import x509

    p = Path(path)
    try:
        return x509.load_pem_x509_certificate(p.read_bytes())
    except FileNotFoundError:
        raise IchfedError(f"{p}: file not found") from None
    except ValueError as e:
        raise IchfedError(f"{p}: not a PEM certificate ({e})") from None


def load_node_public_key(path: str | os.PathLike):
    """Read a SuperNode OpenSSH public key and check it is EC P-384."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    p = Path(path)
    try:
        key = serialization.load_ssh_public_key(p.read_bytes())
    except FileNotFoundError:
        raise IchfedError(f"{p}: file not found") from None
    except (ValueError, TypeError) as e:
        raise IchfedError(f"{p}: not an OpenSSH public key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise IchfedError(f"{p}: SuperNode keys must be EC P-384 (secp384r1)")
    return key


# -- internals ---------------------------------------------------------------------------------


def _check_server_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise IchfedError("--server-name: must not be empty")
    name = name.strip()
    try:
        ipaddress.ip_address(name)
        return name
    except ValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*", name):
        raise IchfedError(f"--server-name: {name!r} is neither a DNS host name nor an IP address")
    return name


def _pem_private(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_cert(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _write_private(path: Path, data: bytes) -> None:
    # 0600 is set on the empty temporary file, so the key is never readable by others, even briefly.
    write_private_bytes(path, data)


def _write_public(path: Path, data: bytes) -> None:
    write_bytes(path, data, mode=0o644)
