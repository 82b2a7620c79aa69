"""The bundle manifest: its typed form, parsing and checks, and the files it lists.

Layout v2 (``format_version`` 2)::

    manifest.json            name, version, crop spec, threshold, cohort, lineage, package versions,
                             and the sha256 of every other file
    manifest.sig             Ed25519 signature of the exact manifest.json bytes
    classifier.safetensors   the 3D ResNet-34 without its last layer (the backbone)
    head.safetensors         the last layer: ``fc.weight`` (2, 512), ``fc.bias`` (2,)
    nnunet/...               the nnU-Net v2 model folder

A v1 bundle (``format_version`` 1) has the whole ResNet-34 in ``classifier.safetensors`` and no head
file; it still loads. The bundle hash is the sha256 of the manifest bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

from shared.plumbing import rules
from shared.plumbing.config import CropSpec, from_dict
from shared.plumbing.errors import BundleVerificationError, IchfedError
from shared.plumbing.files import read_json, sha256_file
from shared.plumbing.verified import read_verified

log = logging.getLogger(__name__)

FORMAT = "ichfed-bundle"
FORMAT_VERSION = 2  # what this ichfed writes
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
CLASSIFIER_FILE = "classifier.safetensors"  # v1: the whole classifier; v2: the backbone
HEAD_FILE = "head.safetensors"  # v2 only
HEAD_KEYS = ("fc.weight", "fc.bias")
NNUNET_DIR = "nnunet"
ARCHITECTURE = "monai.networks.nets.resnet34(spatial_dims=3, n_input_channels=1, num_classes=2); log_softmax"
_PACKAGES = ("ichfed", "torch", "monai", "nnunetv2", "SimpleITK", "numpy", "safetensors")


@dataclasses.dataclass(frozen=True)
class ThresholdSpec:
    """Decision threshold on the neoplastic class: probability ``p`` and its natural log ``log_p``."""

    p: float = dataclasses.field(metadata={"rule": rules.threshold})  # strictly inside (0, 1)
    log_p: float


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The typed content of ``manifest.json``.

    ``lineage`` is free-form for later stages (parent bundle hash, federation rounds, number of
    sites, aggregate metrics); ``cohort`` describes the training data in words and counts only.
    ``calibration`` is optional (``shared.evaluation.calibration.Calibration.to_dict()``, fitted on
    validation); a bundle without it reads as the identity. ``classifier`` names the weight files:
    ``file`` (v1 whole classifier, v2 backbone) and, in v2, ``head_file``.
    """

    format: str
    format_version: int
    name: str
    version: str
    created_utc: str
    packages: dict[str, Any]
    cohort: dict[str, Any]
    crop: CropSpec
    threshold: ThresholdSpec
    classifier: dict[str, Any]
    files: dict[str, Any]
    lineage: dict[str, Any] = dataclasses.field(default_factory=dict)
    calibration: dict[str, Any] = dataclasses.field(default_factory=dict)
    # How the bundle's model was chosen: its kind and the baseline it was compared with on the same test
    # cases (bootstrap's comparison, aggregate figures only). Empty for bundles made elsewhere.
    evaluation: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def classifier_file(self) -> str:
        """Relative path of the classifier weights (v1) or of the backbone weights (v2)."""
        return self.classifier.get("file", CLASSIFIER_FILE)

    @property
    def head_inputs(self):
        """What the head reads (``shared.models.head_inputs.HeadInputs``): the embedding, or embedding + volumes."""
        from shared.models.head_inputs import HeadInputs

        return HeadInputs.from_dict(self.classifier.get("head_inputs"), "manifest classifier")

    @property
    def head_file(self) -> str | None:
        """Relative path of the head weights (v2), None in a v1 bundle."""
        return self.classifier.get("head_file", HEAD_FILE) if self.format_version >= 2 else None


def bundle_hash(path: str | Path) -> str:
    """sha256 of the bundle's manifest bytes (covers every file through its listed hash).

    This reads the manifest only; use ``load_bundle`` to check that the files match it.
    """
    m = Path(path) / MANIFEST
    if not m.is_file():
        raise BundleVerificationError(f"{m}: missing; not a bundle")
    return hashlib.sha256(m.read_bytes()).hexdigest()


def scan_files(root: Path) -> dict[str, Path]:
    """Every file under ``root`` except the manifest and signature, by POSIX relative path."""
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        for name in dirnames:
            if (d / name).is_symlink():
                raise BundleVerificationError(f"{d / name}: symbolic link inside bundle")
        for name in filenames:
            p = d / name
            rel = p.relative_to(root).as_posix()
            if rel in (MANIFEST, SIGNATURE):
                continue
            if p.is_symlink() or not p.is_file():
                raise BundleVerificationError(f"{p}: not a regular file inside bundle")
            found[rel] = p
    return found


def check_files(root: Path, listed: dict[str, Any]) -> None:
    """Refuse a bundle folder whose files are not exactly those listed, with the listed sha256."""
    on_disk = scan_files(root)
    for rel in sorted(listed):
        if rel not in on_disk:
            raise BundleVerificationError(f"{root / rel}: listed in manifest but missing")
    for rel in sorted(on_disk):
        if rel not in listed:
            raise BundleVerificationError(f"{root / rel}: not listed in manifest (file added)")
    for rel in sorted(listed):
        if sha256_file(on_disk[rel]) != listed[rel]:
            raise BundleVerificationError(f"{root / rel}: sha256 does not match manifest (file changed)")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a bundle's models depend on (for the manifest)."""
    out: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The canonical manifest bytes (sorted keys, indented, no NaN); their sha256 is the bundle hash."""
    try:
        return (json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
    except (TypeError, ValueError) as e:
        raise IchfedError(f"bundle: cohort/lineage must be JSON-serialisable ({e})") from None


def parse_manifest(raw: bytes, where: Path) -> Manifest:
    """Parse and check manifest bytes: format and version, field types, safe file paths, threshold."""
    data = read_json(where, raw, error=BundleVerificationError)
    if data.get("format") != FORMAT:
        raise BundleVerificationError(f"{where}: not an ichfed bundle manifest (format must be {FORMAT!r})")
    if data.get("format_version") not in READABLE_VERSIONS or isinstance(data.get("format_version"), bool):
        raise BundleVerificationError(
            f"{where}: format_version {data.get('format_version')!r} is not supported "
            f"(this ichfed reads {', '.join(map(str, READABLE_VERSIONS))})")
    known = {f.name for f in dataclasses.fields(Manifest)}
    extra = sorted(k for k in data if k not in known)
    if extra:
        # Later ichfed versions add optional entries; they are covered by the signature, never executed.
        log.debug("%s: ignoring manifest entries this ichfed does not use: %s", where, ", ".join(extra))
        data = {k: v for k, v in data.items() if k in known}
    try:
        manifest = from_dict(Manifest, data, source=str(where))
    except BundleVerificationError:
        raise
    except IchfedError as e:
        raise BundleVerificationError(str(e)) from None
    for rel, digest in manifest.files.items():
        parts = PurePosixPath(rel).parts
        if rel.startswith("/") or ".." in parts or rel in (MANIFEST, SIGNATURE) or not parts:
            raise BundleVerificationError(f"{where}: 'files' has an unsafe path {rel!r}")
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise BundleVerificationError(f"{where}: 'files.{rel}' is not a sha256 hex digest")
    if manifest.classifier_file not in manifest.files:
        raise BundleVerificationError(f"{where}: the classifier file is not listed in 'files'")
    head = manifest.head_file
    if head is not None and (head not in manifest.files or head == manifest.classifier_file):
        raise BundleVerificationError(f"{where}: the head file {head!r} is not listed in 'files' apart from the backbone")
    check_threshold(manifest.threshold, where)
    try:
        manifest.head_inputs  # noqa: B018 - parsed here so a malformed layout is refused at load, not at use
    except IchfedError as e:
        raise BundleVerificationError(f"{where}: {e}") from None
    return manifest


def check_threshold(t: ThresholdSpec, where: Path) -> None:
    """p and log p are both written so either scale can be used; they must say the same thing."""
    expected = math.log(max(t.p, sys.float_info.min))
    if not (math.isfinite(t.log_p) and math.isclose(t.log_p, expected, rel_tol=1e-9, abs_tol=1e-9)):
        raise BundleVerificationError(f"{where}: threshold.log_p {t.log_p!r} does not match threshold.p {t.p!r} "
                                      f"(expected {expected!r})")


def threshold_spec(threshold: Any) -> ThresholdSpec:
    """A ``ThresholdSpec`` from a probability or anything with ``.p`` (``shared.evaluation.metrics.Threshold``)."""
    p = rules.threshold(getattr(threshold, "p", threshold), "threshold")
    return ThresholdSpec(p=p, log_p=math.log(p))


def check_plans_code_free(root: Path, manifest: Manifest, unsigned: bool) -> None:
    """Refuse a bundle whose nnU-Net plans name anything but the allow-listed network parts."""
    from shared.models.model_policy import check_plans

    rel = f"{NNUNET_DIR}/plans.json"
    if rel not in manifest.files:
        return
    plans = read_json(root / rel, read_verified(root, rel, manifest.files), error=BundleVerificationError)
    try:
        check_plans(plans, root / rel)
    except IchfedError as e:
        suffix = " (refused even with --allow-unsigned)" if unsigned else ""
        raise BundleVerificationError(f"{e}{suffix}") from None
