"""`ichfed pki`: the coordinator's keys and certificates for a TLS deployment."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    """Add ``ichfed pki init`` and ``ichfed pki fingerprint``."""
    p = sub.add_parser("pki", help="make the CA, SuperLink certificate, SuperNode keys and bundle-signing key")
    psub = p.add_subparsers(dest="pki_command", metavar="ACTION")
    init = psub.add_parser(
        "init",
        help="create a CA, a SuperLink TLS certificate, per-site SuperNode keys and the signing key",
        description=(
            "Writes ca.crt/ca.key, server.pem/server.key (SANs: HOST, localhost, 127.0.0.1), "
            "nodes/<site> + nodes/<site>.pub (EC P-384, OpenSSH) and, when absent, the Ed25519 "
            "bundle-signing key (bundle_signing_key.pem / .pub.pem). Private keys are 0600."
        ),
    )
    init.add_argument("--out", required=True, type=Path, help="folder for the keys and certificates")
    init.add_argument("--server-name", required=True, help="the SuperLink's host name or IP address")
    init.add_argument("--sites", default="", help="comma-separated site names to make SuperNode keys for")
    init.add_argument("--days", type=int, default=825, help="certificate validity in days (default 825)")
    init.add_argument("--force", action="store_true", help="replace an existing CA, server certificate or node keys")
    init.set_defaults(func=run_init)
    fp = psub.add_parser(
        "fingerprint",
        help="print the fingerprint of a certificate or key, for a check over the phone or by letter",
        description=(
            "Prints what each FILE is and its fingerprint: a certificate's SHA-256 (as 'openssl x509 -fingerprint "
            "-sha256' prints it), an Ed25519 bundle-signing key's SHA-256 of its raw key (as 'ichfed bundle verify' "
            "names the signer), an OpenSSH SuperNode key's SHA256:... (as 'ssh-keygen -lf' prints it). The "
            "coordinator reads the fingerprints of ca.crt and bundle_signing_key.pub.pem to each site, which "
            "compares them with its copies before trusting them."
        ),
    )
    fp.add_argument("files", nargs="+", type=Path, metavar="FILE", help="certificate or key file(s)")
    fp.add_argument("--json", action="store_true", help="print the fingerprints as JSON")
    fp.set_defaults(func=run_fingerprint)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_init(args) -> int:
    """Run ``ichfed pki init`` and print where each file went."""
    from shared.security.pki import init_pki

    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    layout = init_pki(args.out, args.server_name, sites, force=args.force, valid_days=args.days)
    print(f"CA certificate       {layout.ca_cert}   (give to every site and to the flwr CLI)")
    print(f"CA key               {layout.ca_key}   (keep offline)")
    print(f"SuperLink cert/key   {layout.server_cert}, {layout.server_key}")
    print(f"bundle signing key   {layout.signing_key}   public: {layout.signing_public_key}")
    for node in layout.nodes:
        print(f"site {node.site:<15} private {node.private_key}   register: flwr supernode register {node.public_key} <connection>")
    return 0


def run_fingerprint(args) -> int:
    """Print the fingerprint of each file (``ichfed pki fingerprint``)."""
    import json

    from shared.security.fingerprint import fingerprint_file

    found = [fingerprint_file(f) for f in args.files]
    if args.json:
        print(json.dumps([{"path": str(f.path), "kind": f.kind, "fingerprint": f.fingerprint, "private": f.private,
                           "subject": f.subject} for f in found], indent=2))
    else:
        print("\n".join(f.line() for f in found))
    return 0
