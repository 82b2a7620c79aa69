"""Signed model bundles: open and verify one, and use its models (``Bundle``).

A bundle is a folder holding the segmentation model, the classifier and everything needed to use
them; its layout (v1 and v2) is described in ``shared.bundle.manifest``. Loading checks the
signature first, then that the files on disk are exactly those listed (nothing changed, added or
removed), then that the nnU-Net plans name only allow-listed code. Every model file is read again at
use from bytes checked against the manifest (``shared.plumbing.verified``).

This package's ``__init__`` is the bundle API callers import (``from shared.bundle import load_bundle``);
each job lives in one module: opening and verifying (``load``), the typed manifest and its checks
(``manifest``), signatures (``signature``), creating, deriving and upgrading (``create``), tar
packing (``tar``) and a bundle as Flower records (``transport``, imported on its own).
"""

from shared.bundle.create import create_bundle, derive_bundle, upgrade_bundle
from shared.bundle.load import (
    Bundle,
    check_weights,
    load_bundle,
    open_bundle,
    verify_bundle,
)
from shared.bundle.manifest import (
    ARCHITECTURE,
    CLASSIFIER_FILE,
    FORMAT,
    FORMAT_VERSION,
    HEAD_FILE,
    HEAD_KEYS,
    MANIFEST,
    NNUNET_DIR,
    READABLE_VERSIONS,
    SIGNATURE,
    Manifest,
    ThresholdSpec,
    bundle_hash,
    check_files,
    check_plans_code_free,
    manifest_bytes,
    parse_manifest,
    scan_files,
)
from shared.bundle.signature import (
    bundle_dir,
    check_signature,
    sign_bundle,
    signature_blob,
)
from shared.bundle.tar import pack, unpack
from shared.plumbing.files import sha256_file

__all__ = [
    "ARCHITECTURE", "CLASSIFIER_FILE", "FORMAT", "FORMAT_VERSION", "HEAD_FILE", "HEAD_KEYS", "MANIFEST", "NNUNET_DIR",
    "READABLE_VERSIONS", "SIGNATURE", "Bundle", "Manifest", "ThresholdSpec", "bundle_hash", "create_bundle",
    "derive_bundle", "load_bundle", "open_bundle", "pack", "sha256_file", "sign_bundle", "unpack", "upgrade_bundle",
    "verify_bundle", "check_weights", "bundle_dir", "check_files", "check_plans_code_free", "check_signature",
    "manifest_bytes", "parse_manifest", "scan_files", "signature_blob",
]

# Older private names, kept for the tests that build hostile bundles by hand.
_scan_files, _manifest_bytes, _signature_blob = scan_files, manifest_bytes, signature_blob
