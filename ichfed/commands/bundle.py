"""`ichfed bundle`: make signing keys, build, sign, verify, upgrade, pack and unpack model bundles."""

from __future__ import annotations

import json
from pathlib import Path

from shared.plumbing.errors import IchfedError


def register(sub) -> None:
    """Add ``ichfed bundle`` and its actions to the CLI."""
    p = sub.add_parser(
        "bundle",
        help="create, sign, verify, pack and unpack signed model bundles",
        description="A bundle is a folder holding the nnU-Net model, the classifier weights and a signed "
        "manifest (sha256 of every file, crop spec, threshold, provenance).",
    )
    p.set_defaults(func=lambda args: _usage(p))
    actions = p.add_subparsers(dest="bundle_action", metavar="ACTION")

    k = actions.add_parser("keygen", help="create an Ed25519 signing key pair")
    k.add_argument("--out", required=True, metavar="DIR", help="folder for the key pair (private key mode 0600)")
    k.set_defaults(func=_keygen)

    s = actions.add_parser("sign", help="sign a bundle's manifest (its files must match it)")
    s.add_argument("bundle", metavar="BUNDLE")
    s.add_argument("--key", required=True, metavar="PEM", help="Ed25519 private key")
    s.set_defaults(func=_sign)

    v = actions.add_parser("verify", help="check a bundle's signature, every file hash and every weight")
    v.add_argument("bundle", metavar="BUNDLE", help="bundle folder or packed .tar")
    v.add_argument("--pubkey", metavar="PEM", help="trusted Ed25519 public key")
    v.add_argument("--allow-unsigned", action="store_true", help="accept an unsigned bundle (hashes still checked)")
    v.set_defaults(func=_verify)

    i = actions.add_parser("import", help="build a bundle from an nnU-Net model folder and classifier weights")
    i.add_argument("--nnunet-folder", required=True, metavar="DIR", help="trained nnU-Net v2 model folder")
    i.add_argument("--classifier", required=True, metavar="WEIGHTS", help="ResNet-34 weights (.safetensors)")
    i.add_argument("--threshold", required=True, type=float, metavar="P", help="decision threshold on p(neoplastic)")
    i.add_argument("--name", default="ichfed-imported", help="bundle name (default: %(default)s)")
    i.add_argument("--version", default="1.0.0", help="bundle version (default: %(default)s)")
    i.add_argument("--crop-config", metavar="TOML", help="crop spec TOML (top-level keys or a [crop] table)")
    i.add_argument("--cohort-json", metavar="JSON", help="JSON object describing the training cohort")
    i.add_argument("--out", required=True, metavar="DIR", help="new bundle folder")
    i.add_argument("--key", metavar="PEM", help="sign with this Ed25519 private key")
    i.set_defaults(func=_import)

    up = actions.add_parser("upgrade", help="rewrite a layout-v1 bundle as layout v2 (the head in its own file)",
                            description="Verify a v1 bundle and write the same models in layout v2 to a new folder. "
                            "The manifest changes, so the new bundle needs a new signature (--key).")
    up.add_argument("bundle", metavar="IN", help="the v1 bundle folder")
    up.add_argument("out", metavar="OUT", help="new folder for the v2 bundle")
    up.add_argument("--pubkey", metavar="PEM", help="trusted Ed25519 public key to verify IN")
    up.add_argument("--allow-unsigned", action="store_true", help="accept an unsigned IN (hashes still checked)")
    up.add_argument("--key", metavar="PEM", help="sign OUT with this Ed25519 private key")
    up.set_defaults(func=_upgrade)

    pk = actions.add_parser("pack", help="write a bundle as one .tar file")
    pk.add_argument("bundle", metavar="BUNDLE")
    pk.add_argument("-o", "--out", required=True, metavar="TAR")
    pk.set_defaults(func=_pack)

    u = actions.add_parser("unpack", help="safely extract a packed bundle")
    u.add_argument("tar", metavar="TAR")
    u.add_argument("-o", "--out", required=True, metavar="DIR", help="new folder for the bundle")
    u.add_argument("--pubkey", metavar="PEM", help="verify the unpacked bundle against this key")
    u.set_defaults(func=_unpack)


def _usage(parser) -> int:
    parser.print_help()
    return 2


def _keygen(args) -> int:
    from shared.security.keys import generate_keypair

    priv, pub = generate_keypair(args.out)
    print(json.dumps({"private_key": str(priv), "public_key": str(pub)}, indent=2))
    return 0


def _sign(args) -> int:
    from shared.bundle import sign_bundle

    digest = sign_bundle(args.bundle, args.key)
    print(json.dumps({"bundle": str(args.bundle), "hash": digest}, indent=2))
    return 0


def _verify(args) -> int:
    from shared.bundle import check_weights, open_bundle

    if args.pubkey is None and not args.allow_unsigned:
        raise IchfedError("--pubkey: a trusted public key is required to verify the bundle")
    bundle = open_bundle(args.bundle, args.pubkey, allow_unsigned=args.allow_unsigned)
    check_weights(bundle)  # every weight a number, the head a trained head's size
    print(json.dumps(bundle.describe(), indent=2))
    return 0


def _crop_spec(path: str | None):
    from shared.plumbing.config import CropSpec, from_dict, load_toml

    if path is None:
        return CropSpec()
    data = load_toml(path)
    if "crop" in data:
        return from_dict(CropSpec, data["crop"], source=path, prefix="crop")
    return from_dict(CropSpec, data, source=path)


def _cohort(path: str | None) -> dict:
    if path is None:
        return {"source": "imported"}
    from shared.plumbing.files import read_json

    return read_json(path)


def _import(args) -> int:
    from shared.bundle import bundle_hash, create_bundle

    path = create_bundle(
        args.out,
        classifier_state=Path(args.classifier),
        nnunet_dir=Path(args.nnunet_folder),
        threshold=args.threshold,
        crop_spec=_crop_spec(args.crop_config),
        cohort=_cohort(args.cohort_json),
        name=args.name,
        version=args.version,
        # File names only: the coordinator's folder layout is nobody else's business.
        lineage={"imported_from": {"classifier": Path(args.classifier).name, "nnunet_folder": Path(args.nnunet_folder).name}},
        private_key=args.key,
    )
    print(json.dumps({"bundle": str(path), "hash": bundle_hash(path), "signed": args.key is not None}, indent=2))
    return 0


def _upgrade(args) -> int:
    from shared.bundle import bundle_hash, upgrade_bundle

    if args.pubkey is None and not args.allow_unsigned:
        raise IchfedError("--pubkey: a trusted public key is required to verify the bundle")
    out = upgrade_bundle(args.bundle, args.out, args.pubkey, private_key=args.key, allow_unsigned=args.allow_unsigned)
    print(json.dumps({"bundle": str(out), "hash": bundle_hash(out), "format_version": 2,
                      "signed": args.key is not None}, indent=2))
    return 0


def _pack(args) -> int:
    from shared.bundle import bundle_hash, pack

    out = pack(args.bundle, args.out)
    print(json.dumps({"tar": str(out), "hash": bundle_hash(args.bundle)}, indent=2))
    return 0


def _unpack(args) -> int:
    from shared.bundle import bundle_hash, load_bundle, unpack

    out = unpack(args.tar, args.out)
    result = {"bundle": str(out), "hash": bundle_hash(out)}
    if args.pubkey:
        result.update(load_bundle(out, args.pubkey).describe())
    print(json.dumps(result, indent=2))
    return 0
