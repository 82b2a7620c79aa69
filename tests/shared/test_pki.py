"""PKI for a TLS deployment: real keys and certificates, checked by real TLS handshakes."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from ichfed.cli import main
from shared.plumbing.errors import IchfedError
from shared.security.pki import (
    PkiLayout,
    init_pki,
    load_certificate,
    load_node_public_key,
    write_node_keypair,
)


def _mode(p) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_init_writes_ca_server_cert_node_keys_and_signing_key(tmp_path):
    layout = init_pki(tmp_path / "pki", "fl.hospital.example", ["charite", "site-b"])

    ca = load_certificate(layout.ca_cert)
    server = load_certificate(layout.server_cert)
    server.verify_directly_issued_by(ca)  # raises if the chain is wrong
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["fl.hospital.example", "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]

    for private in (layout.ca_key, layout.server_key, layout.signing_key):
        assert _mode(private) == 0o600, private
    for public in (layout.ca_cert, layout.server_cert, layout.signing_public_key):
        assert _mode(public) == 0o644, public

    assert [n.site for n in layout.nodes] == ["charite", "site-b"]
    for node in layout.nodes:
        assert _mode(node.private_key) == 0o600
        assert node.private_key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        assert node.public_key.read_text(encoding="utf-8").startswith("ecdsa-sha2-nistp384 ")
        priv = serialization.load_ssh_private_key(node.private_key.read_bytes(), password=None)
        pub = load_node_public_key(node.public_key)
        assert isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp384r1"
        # The registered public key must belong to the private key the SuperNode signs with.
        sig = priv.sign(b"challenge", ec.ECDSA(hashes.SHA256()))
        pub.verify(sig, b"challenge", ec.ECDSA(hashes.SHA256()))
    a, b = (n.public_key.read_bytes() for n in layout.nodes)
    assert a != b

    signing = serialization.load_pem_private_key(layout.signing_key.read_bytes(), password=None)
    assert isinstance(signing, ed25519.Ed25519PrivateKey)
    signing_pub = serialization.load_pem_public_key(layout.signing_public_key.read_bytes())
    signing_pub.verify(signing.sign(b"manifest"), b"manifest")


def test_ip_server_name_becomes_ip_san(tmp_path):
    layout = init_pki(tmp_path, "10.1.2.3")
    sans = load_certificate(layout.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("127.0.0.1")]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]


def test_refuses_to_overwrite_without_force_and_keeps_signing_key(tmp_path):
    first = init_pki(tmp_path, "localhost", ["a"])
    ca_before = first.ca_cert.read_bytes()
    signing_before = first.signing_key.read_bytes()
    with pytest.raises(IchfedError, match=r"ca\.crt: already exists"):
        init_pki(tmp_path, "localhost", ["a"])
    assert first.ca_cert.read_bytes() == ca_before

    second = init_pki(tmp_path, "localhost", ["a"], force=True)
    assert second.ca_cert.read_bytes() != ca_before
    # Rotating the signing key would orphan every signed bundle, so --force leaves it alone.
    assert second.signing_key.read_bytes() == signing_before

    with pytest.raises(IchfedError, match="already exists"):
        write_node_keypair(second.nodes[0].private_key, second.nodes[0].public_key)


@pytest.mark.parametrize(
    "server, sites, match",
    [
        ("", [], "--server-name"),
        ("bad host!", [], "--server-name"),
        ("localhost", ["../evil"], "--sites"),
        ("localhost", ["a", "a"], "duplicate"),
    ],
)
def test_bad_arguments_are_one_line_errors(tmp_path, server, sites, match):
    with pytest.raises(IchfedError, match=match) as err:
        init_pki(tmp_path, server, sites)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "ca.key").exists()


def _tls_server(layout: PkiLayout):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(layout.server_cert, layout.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        for _ in range(2):
            conn, _ = listener.accept()
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return listener, port, t


def test_server_certificate_passes_a_real_tls_handshake(tmp_path):
    layout = init_pki(tmp_path / "pki", "fl.hospital.example")
    other = init_pki(tmp_path / "other", "fl.hospital.example")
    listener, port, thread = _tls_server(layout)
    try:
        good = ssl.create_default_context(cafile=str(layout.ca_cert))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with good.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.recv(2) == b"ok"
        # A client trusting a different CA must refuse the server.
        wrong = ssl.create_default_context(cafile=str(other.ca_cert))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with pytest.raises(ssl.SSLCertVerificationError):
                wrong.wrap_socket(raw, server_hostname="localhost")
    finally:
        thread.join(timeout=10)
        listener.close()


def test_cli_pki_init_and_refusal(tmp_path, capsys):
    out = tmp_path / "pki"
    assert main(["pki", "init", "--out", str(out), "--server-name", "localhost", "--sites", "a,b"]) == 0
    printed = capsys.readouterr().out
    assert "flwr supernode register" in printed and str(out / "nodes" / "b.pub") in printed
    assert (out / "nodes" / "a").is_file() and (out / "nodes" / "b.pub").is_file()

    assert main(["pki", "init", "--out", str(out), "--server-name", "localhost"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "already exists" in err[-1]
