"""Signed model bundles: the segmentation model, the classifier and everything needed to use them.

A bundle is a directory::

    manifest.json            what this is (name, version, crop spec, threshold, cohort, lineage,
                             package versions) and the sha256 of every other file
    manifest.sig             Ed25519 signature of the exact manifest.json bytes
    classifier.safetensors   the 3D ResNet-34 weights
    nnunet/...               the nnU-Net v2 model folder (dataset.json, plans.json, fold_*/...)

The bundle hash is the sha256 of the manifest bytes; since the manifest lists the hash of every
file, it identifies the whole bundle. Loading checks the signature first, then that the files
on disk are exactly those listed (nothing changed, added or removed). ``pack``/``unpack`` give a
``.tar`` form for transport; unpacking refuses absolute paths, ``..`` and links.
"""

from __future__ import annotations

import atexit
import base64
import dataclasses
import datetime as _dt
import hashlib
import io
import json
import logging
import math
import numbers
import os
import shutil
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

from . import signing
from .atomic import atomic_path, write_bytes
from .config import CropSpec, from_dict, to_dict
from .errors import BundleVerificationError, IchfedError
from .verified import read_verified

log = logging.getLogger(__name__)

FORMAT = "ichfed-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
CLASSIFIER_FILE = "classifier.safetensors"
NNUNET_DIR = "nnunet"
ARCHITECTURE = "monai.networks.nets.resnet34(spatial_dims=3, n_input_channels=1, num_classes=2); log_softmax"
_PACKAGES = ("ichfed", "torch", "monai", "nnunetv2", "SimpleITK", "numpy", "safetensors")
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class ThresholdSpec:
    """Decision threshold on the neoplastic class: probability ``p`` and its natural log ``log_p``."""

    p: float = dataclasses.field(metadata={"range": (0.0, 1.0)})
    log_p: float


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The typed content of ``manifest.json``.

    ``lineage`` is free-form for later stages (parent bundle hash, federation rounds, number of
    sites, aggregate metrics); ``cohort`` describes the training data in words and counts only.
    ``calibration`` is optional (``shared.calibration.Calibration.to_dict()``, fitted on
    validation); a bundle without it reads as the identity.
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


@dataclasses.dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: Manifest
    hash: str
    signed_by: str | None  # fingerprint of the verifying public key; None when loaded unsigned

    @property
    def crop_spec(self) -> CropSpec:
        """How images become classifier input for this model."""
        return self.manifest.crop

    @property
    def threshold(self) -> ThresholdSpec:
        """Decision threshold on p(neoplastic)."""
        return self.manifest.threshold

    @property
    def nnunet_dir(self) -> Path:
        """The nnU-Net v2 model folder (dataset.json, plans.json, fold_*)."""
        return self.path / NNUNET_DIR

    @property
    def classifier_path(self) -> Path:
        """The classifier weights (safetensors)."""
        return self.path / self.manifest.classifier.get("file", CLASSIFIER_FILE)

    @property
    def nnunet_file_hashes(self) -> dict[str, str]:
        """sha256 of every nnU-Net model file by path relative to ``nnunet_dir`` (for ``Segmenter``)."""
        prefix = NNUNET_DIR + "/"
        return {rel[len(prefix):]: h for rel, h in self.manifest.files.items() if rel.startswith(prefix)}

    def read_verified(self, rel: str) -> bytes:
        """The bytes of bundle file ``rel``, read once and checked against the manifest now.

        Use these bytes, not the file: a file swapped after ``load_bundle`` is refused here.
        """
        return read_verified(self.path, rel, self.manifest.files)

    def classifier_weights(self) -> dict[str, Any]:
        """The classifier state dict, deserialised from bytes verified against the manifest at this call."""
        from .classifier import load_weights

        rel = self.manifest.classifier.get("file", CLASSIFIER_FILE)
        return load_weights(self.classifier_path, data=self.read_verified(rel))

    def build_classifier(self, device="cpu"):
        """The ResNet-34 with this bundle's weights (as verified at this call), on ``device``, in eval mode."""
        from .classifier import load_classifier

        rel = self.manifest.classifier.get("file", CLASSIFIER_FILE)
        return load_classifier(self.classifier_path, device, data=self.read_verified(rel))

    def describe(self) -> dict[str, Any]:
        """A short summary (name, version, hash, signer, threshold) for CLI output and logs."""
        return {
            "name": self.manifest.name,
            "version": self.manifest.version,
            "hash": self.hash,
            "signed_by": self.signed_by,
            "created_utc": self.manifest.created_utc,
            "threshold": dataclasses.asdict(self.manifest.threshold),
        }


# ----------------------------------------------------------------------------- hashing


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks (nnU-Net checkpoints are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def bundle_hash(path: str | Path) -> str:
    """sha256 of the bundle's manifest bytes (covers every file through its listed hash).

    This reads the manifest only; use ``load_bundle`` to check that the files match it.
    """
    m = Path(path) / MANIFEST
    if not m.is_file():
        raise BundleVerificationError(f"{m}: missing; not a bundle")
    return hashlib.sha256(m.read_bytes()).hexdigest()


def _scan_files(root: Path) -> dict[str, Path]:
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


def _check_files(root: Path, listed: dict[str, Any]) -> None:
    on_disk = _scan_files(root)
    for rel in sorted(listed):
        if rel not in on_disk:
            raise BundleVerificationError(f"{root / rel}: listed in manifest but missing")
    for rel in sorted(on_disk):
        if rel not in listed:
            raise BundleVerificationError(f"{root / rel}: not listed in manifest (file added)")
    for rel in sorted(listed):
        if sha256_file(on_disk[rel]) != listed[rel]:
            raise BundleVerificationError(f"{root / rel}: sha256 does not match manifest (file changed)")


# ----------------------------------------------------------------------------- manifest


def _package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def _parse_manifest(raw: bytes, where: Path) -> Manifest:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleVerificationError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleVerificationError(f"{where}: not an ichfed bundle manifest (format must be {FORMAT!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise BundleVerificationError(
            f"{where}: format_version {data.get('format_version')!r} is not supported (this ichfed reads {FORMAT_VERSION})"
        )
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
    if manifest.classifier.get("file", CLASSIFIER_FILE) not in manifest.files:
        raise BundleVerificationError(f"{where}: the classifier file is not listed in 'files'")
    _check_threshold(manifest.threshold, where)
    return manifest


def _check_threshold(t: ThresholdSpec, where: Path) -> None:
    # p and log p are both written so either scale can be used; they must say the same thing.
    expected = math.log(max(t.p, sys.float_info.min))
    if not (math.isfinite(t.log_p) and math.isclose(t.log_p, expected, rel_tol=1e-9, abs_tol=1e-9)):
        raise BundleVerificationError(f"{where}: threshold.log_p {t.log_p!r} does not match threshold.p {t.p!r} "
                                      f"(expected {expected!r})")


def _check_plans_code_free(root: Path, manifest: Manifest, unsigned: bool) -> None:
    """Refuse a bundle whose nnU-Net plans name anything but the allow-listed network parts."""
    from .model_policy import check_plans

    rel = f"{NNUNET_DIR}/plans.json"
    if rel not in manifest.files:
        return
    raw = read_verified(root, rel, manifest.files)
    try:
        plans = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleVerificationError(f"{root / rel}: not valid JSON ({e})") from None
    if not isinstance(plans, dict):
        raise BundleVerificationError(f"{root / rel}: expected a JSON object")
    try:
        check_plans(plans, root / rel)
    except IchfedError as e:
        suffix = " (refused even with --allow-unsigned)" if unsigned else ""
        raise BundleVerificationError(f"{e}{suffix}") from None


# ----------------------------------------------------------------------------- signing


def _signature_blob(manifest_bytes: bytes, key) -> bytes:
    blob = {
        "algorithm": "ed25519",
        "key_fingerprint": signing.fingerprint(key.public_key()),
        "signature": base64.b64encode(signing.sign(manifest_bytes, key)).decode("ascii"),
    }
    return (json.dumps(blob, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _check_signature(root: Path, manifest_bytes: bytes, public_key_path: Path) -> str:
    """Verify manifest.sig against ``public_key_path``; returns the key fingerprint."""
    key = signing.load_public_key(public_key_path)
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
    expected = signing.fingerprint(key)
    if signer and signer != expected:
        raise BundleVerificationError(
            f"{sig_path}: signed by key {signer[:16]}…, not by the given public key {expected[:16]}… ({public_key_path})"
        )
    signing.verify(manifest_bytes, signature, key, str(sig_path))
    return expected


def sign_bundle(path: str | Path, private_key_path: str | Path) -> str:
    """Sign (or re-sign) a bundle's manifest after checking that its files match; returns the bundle hash."""
    root = _bundle_dir(path)
    key = signing.load_private_key(private_key_path)
    raw = (root / MANIFEST).read_bytes()
    manifest = _parse_manifest(raw, root / MANIFEST)
    # Never put a signature on files that no longer match what the manifest says.
    _check_files(root, manifest.files)
    write_bytes(root / SIGNATURE, _signature_blob(raw, key))
    log.info("signed bundle %s (%s) with key %s", root, hashlib.sha256(raw).hexdigest()[:16], signing.fingerprint(key.public_key())[:16])
    return hashlib.sha256(raw).hexdigest()


# ----------------------------------------------------------------------------- load / verify


def _bundle_dir(path: str | Path) -> Path:
    root = Path(path)
    if root.is_file() and tarfile.is_tarfile(root):
        raise BundleVerificationError(f"{root}: is a packed bundle; run 'ichfed bundle unpack' first")
    if not root.is_dir():
        raise BundleVerificationError(f"{root}: bundle directory not found")
    if not (root / MANIFEST).is_file():
        raise BundleVerificationError(f"{root}: not a bundle ({MANIFEST} missing)")
    return root


def load_bundle(path: str | Path, public_key: str | Path | None, allow_unsigned: bool = False) -> Bundle:
    """Open a bundle, refusing it unless its signature and every file hash check out.

    ``public_key`` is the Ed25519 public key PEM the manifest must be signed with. With
    ``allow_unsigned=True`` a missing signature or key is accepted with a WARNING (file hashes
    are still checked); a signature that is present and a key that is given are still verified.
    """
    root = _bundle_dir(path)
    raw = (root / MANIFEST).read_bytes()
    signer: str | None = None
    has_sig = (root / SIGNATURE).is_file()
    if allow_unsigned and (public_key is None or not has_sig):
        log.warning("loading bundle %s WITHOUT signature verification (--allow-unsigned); file hashes are still checked", root)
    else:
        if public_key is None:
            raise BundleVerificationError(f"{root}: no public key given to verify the bundle signature")
        signer = _check_signature(root, raw, Path(public_key))
    manifest = _parse_manifest(raw, root / MANIFEST)
    _check_files(root, manifest.files)
    _check_plans_code_free(root, manifest, unsigned=signer is None)
    return Bundle(path=root, manifest=manifest, hash=hashlib.sha256(raw).hexdigest(), signed_by=signer)


def open_bundle(path: str | Path, public_key: str | Path | None, allow_unsigned: bool = False) -> Bundle:
    """``load_bundle`` for a bundle folder or a packed ``.tar`` (unpacked, safely, into a private temp folder).

    The temporary copy lives until the process exits: the returned ``Bundle`` reads its files
    again at use (``Bundle.read_verified``).
    """
    src = Path(path)
    if not (src.is_file() and tarfile.is_tarfile(src)):
        return load_bundle(src, public_key, allow_unsigned=allow_unsigned)
    holder = Path(tempfile.mkdtemp(prefix="ichfed-bundle-"))
    atexit.register(shutil.rmtree, holder, True)
    root = unpack(src, holder / "bundle")
    log.info("unpacked %s into %s", src, root)
    return load_bundle(root, public_key, allow_unsigned=allow_unsigned)


def verify_bundle(path: str | Path, public_key_path: str | Path) -> Manifest:
    """Check signature and files against ``public_key_path``; returns the manifest or raises BundleVerificationError."""
    return load_bundle(path, public_key_path).manifest


# ----------------------------------------------------------------------------- create


def _threshold_spec(threshold: Any) -> ThresholdSpec:
    raw = getattr(threshold, "p", threshold)
    if raw is None or isinstance(raw, bool) or not isinstance(raw, numbers.Real) or not (0.0 <= float(raw) <= 1.0):
        raise IchfedError(f"threshold: must be a probability in [0, 1], got {raw!r}")
    p = float(raw)
    # A threshold of exactly 0 stays finite (and JSON-safe) on the log scale.
    return ThresholdSpec(p=p, log_p=math.log(max(p, sys.float_info.min)))


def _classifier_state(classifier_state: Any) -> dict[str, Any]:
    from .classifier import build_model, load_weights

    if isinstance(classifier_state, str | os.PathLike):
        state = load_weights(classifier_state)
        where = str(classifier_state)
    else:
        state = classifier_state.state_dict() if hasattr(classifier_state, "state_dict") else classifier_state
        where = "classifier"
    try:
        build_model().load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise IchfedError(f"{where}: weights do not fit the 3D ResNet-34 classifier ({str(e).splitlines()[0]})") from None
    return state


def _check_nnunet_dir(nnunet_dir: Path) -> None:
    if not nnunet_dir.is_dir():
        raise IchfedError(f"{nnunet_dir}: nnU-Net model folder not found")
    for name in ("dataset.json", "plans.json"):
        if not (nnunet_dir / name).is_file():
            raise IchfedError(f"{nnunet_dir}: not an nnU-Net model folder ({name} missing)")
    folds = [d for d in nnunet_dir.glob("fold_*") if d.is_dir() and any(f.is_file() for f in d.rglob("*"))]
    if not folds:
        raise IchfedError(f"{nnunet_dir}: no trained fold (fold_*/ with a checkpoint) in the nnU-Net model folder")


def _copy_tree(src: Path, dst: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(src):
        d = Path(dirpath)
        for name in dirnames + filenames:
            if (d / name).is_symlink():
                raise IchfedError(f"{d / name}: symbolic links are not allowed in a bundle")
        target = dst / d.relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in filenames:
            shutil.copyfile(d / name, target / name)


def create_bundle(
    out_dir: str | Path,
    classifier_state: Any,
    nnunet_dir: str | Path,
    threshold: Any,
    crop_spec: CropSpec,
    cohort: dict[str, Any],
    name: str,
    version: str,
    lineage: dict[str, Any] | None = None,
    private_key: str | Path | None = None,
    calibration: dict[str, Any] | None = None,
) -> Path:
    """Build a bundle directory at ``out_dir`` (which must not exist) and return its path.

    ``classifier_state`` is a module, a state dict or a safetensors path; it must load strictly
    into the ResNet-34. ``threshold`` is a probability or anything with ``.p`` (e.g.
    ``shared.metrics.Threshold``). The bundle is assembled in a temporary folder beside
    ``out_dir`` and renamed into place, so a reader never sees half a bundle. With
    ``private_key`` it is signed before the rename.
    """
    from .classifier import save_weights

    out = Path(out_dir)
    if out.exists():
        raise IchfedError(f"{out}: already exists; choose a new bundle folder")
    if not name or not version:
        raise IchfedError("bundle: 'name' and 'version' must not be empty")
    if not isinstance(cohort, dict):
        raise IchfedError("bundle: 'cohort' must be a dict")
    src = Path(nnunet_dir)
    _check_nnunet_dir(src)
    spec = _threshold_spec(threshold)
    state = _classifier_state(classifier_state)
    key = signing.load_private_key(private_key) if private_key is not None else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_weights(state, tmp / CLASSIFIER_FILE)
        _copy_tree(src, tmp / NNUNET_DIR)
        files = {rel: sha256_file(p) for rel, p in sorted(_scan_files(tmp).items())}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": name,
            "version": version,
            "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "packages": _package_versions(),
            "cohort": cohort,
            "crop": to_dict(crop_spec),
            "threshold": dataclasses.asdict(spec),
            "classifier": {"file": CLASSIFIER_FILE, "architecture": ARCHITECTURE, "format": "safetensors"},
            "files": files,
            "lineage": dict(lineage or {}),
            # Only when given, so manifests without calibration keep their bytes (and hashes).
            **({"calibration": dict(calibration)} if calibration else {}),
        }
        try:
            raw = _manifest_bytes(manifest)
        except (TypeError, ValueError) as e:
            raise IchfedError(f"bundle: cohort/lineage must be JSON-serialisable ({e})") from None
        (tmp / MANIFEST).write_bytes(raw)
        if key is not None:
            (tmp / SIGNATURE).write_bytes(_signature_blob(raw, key))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a bundle holds no secrets
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("created bundle %s %s at %s (hash %s)", name, version, out, hashlib.sha256(raw).hexdigest()[:16])
    return out


def derive_bundle(
    parent: Bundle,
    out_dir: str | Path,
    classifier_state: Any,
    threshold: Any,
    version: str,
    lineage: dict[str, Any] | None = None,
    name: str | None = None,
    cohort: dict[str, Any] | None = None,
    private_key: str | Path | None = None,
) -> Path:
    """A new bundle with the parent's nnU-Net model and crop spec but new classifier weights.

    ``lineage`` gets ``parent_hash``, ``parent_name`` and ``parent_version`` added, so a
    fine-tuned bundle always says which bundle it came from.
    """
    lin = {
        "parent_hash": parent.hash,
        "parent_name": parent.manifest.name,
        "parent_version": parent.manifest.version,
        **(lineage or {}),
    }
    out = create_bundle(
        out_dir,
        classifier_state,
        parent.nnunet_dir,
        threshold,
        parent.crop_spec,
        parent.manifest.cohort if cohort is None else cohort,
        name or parent.manifest.name,
        version,
        lineage=lin,
        private_key=private_key,
    )
    # The nnU-Net files were copied from disk: sign nothing that differs from what the parent verified.
    new_files = json.loads((out / MANIFEST).read_bytes())["files"]
    prefix = NNUNET_DIR + "/"
    if {k: v for k, v in new_files.items() if k.startswith(prefix)} != {
            k: v for k, v in parent.manifest.files.items() if k.startswith(prefix)}:
        shutil.rmtree(out, ignore_errors=True)
        raise BundleVerificationError(f"{parent.nnunet_dir}: changed since the parent bundle was verified; "
                                      "nothing derived from it was kept")
    return out


# ----------------------------------------------------------------------------- tar form


def pack(path: str | Path, tar_path: str | Path) -> Path:
    """Write the bundle as an uncompressed, reproducible ``.tar`` (sorted, zero mtimes/owners).

    The files are checked against the manifest first, so a broken bundle is not shipped.
    """
    root = _bundle_dir(path)
    manifest = _parse_manifest((root / MANIFEST).read_bytes(), root / MANIFEST)
    _check_files(root, manifest.files)
    names = [MANIFEST] + ([SIGNATURE] if (root / SIGNATURE).is_file() else []) + sorted(manifest.files)
    out = Path(tar_path)
    with atomic_path(out, suffix=".tar") as tmp:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for rel in names:
                data = (root / rel).read_bytes()
                info = tarfile.TarInfo(rel)
                info.size = len(data)
                info.mode = 0o644
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
    return out


def unpack(tar_path: str | Path, out_dir: str | Path) -> Path:
    """Extract a packed bundle into ``out_dir`` (must not exist); returns ``out_dir``.

    Only regular files with relative paths are accepted: absolute paths, ``..`` components,
    links and device files are refused before anything is written. The result is not verified
    here; open it with ``load_bundle``.
    """
    src = Path(tar_path)
    out = Path(out_dir)
    if not src.is_file():
        raise IchfedError(f"{src}: file not found")
    if out.exists():
        raise IchfedError(f"{out}: already exists; choose a new folder to unpack into")
    try:
        tar = tarfile.open(src, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise BundleVerificationError(f"{src}: not a tar archive ({e})") from None
    with tar:
        members = tar.getmembers()
        for m in members:
            p = PurePosixPath(m.name)
            if m.name.startswith(("/", "\\")) or p.is_absolute() or ".." in p.parts or "\\" in m.name or ":" in m.name:
                raise BundleVerificationError(f"{src}: unsafe path in archive: {m.name!r}")
            if not (m.isfile() or m.isdir()):
                raise BundleVerificationError(f"{src}: archive member {m.name!r} is a link or special file")
        if not any(PurePosixPath(m.name) == PurePosixPath(MANIFEST) and m.isfile() for m in members):
            raise BundleVerificationError(f"{src}: not a packed bundle ({MANIFEST} missing)")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            # The 'data' filter is a second line of defence behind the checks above.
            tar.extractall(tmp, members=members, filter="data")
            os.chmod(tmp, 0o755)
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out
