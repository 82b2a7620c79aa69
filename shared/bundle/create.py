"""Making bundles: ``create_bundle`` (from trained models), ``derive_bundle`` (a parent with a new head,
and optionally a new segmenter checkpoint) and ``upgrade_bundle`` (layout v1 to v2).

Every bundle is assembled in a temporary folder beside its target and renamed into place
(``shared.plumbing.files.staged_dir``), so a reader never sees half a bundle. A derived or upgraded bundle
hard-links the parent's unchanged files (copies them across file systems) and checks each against the
sha256 the parent was verified with, so nothing swapped after the parent was loaded gets signed.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.bundle.manifest import (
    ARCHITECTURE,
    CLASSIFIER_FILE,
    FORMAT,
    FORMAT_VERSION,
    HEAD_FILE,
    HEAD_KEYS,
    MANIFEST,
    NNUNET_DIR,
    SIGNATURE,
    manifest_bytes,
    package_versions,
    scan_files,
    threshold_spec,
)
from shared.bundle.signature import signature_blob
from shared.bundle.weights import check_bundle_weights, check_state
from shared.models.head import Head
from shared.models.head_inputs import HeadInputs
from shared.plumbing.config import CropSpec, to_dict
from shared.plumbing.errors import BundleVerificationError, IchfedError
from shared.plumbing.files import link_or_copy, read_json, sha256_file, staged_dir
from shared.security import keys

if TYPE_CHECKING:
    from shared.bundle.load import Bundle

log = logging.getLogger(__name__)

_CLASSIFIER_ENTRY = {"file": CLASSIFIER_FILE, "head_file": HEAD_FILE, "architecture": ARCHITECTURE, "format": "safetensors"}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _full_state(classifier_state: Any, n_features: int = 512) -> dict[str, Any]:
    """A module, state dict or safetensors path, checked to load strictly into the ResNet-34 (its head reading
    ``n_features``: 512, or 515 for a hybrid head)."""
    from shared.models.classifier import build_model, load_weights

    if isinstance(classifier_state, str | os.PathLike):
        state = load_weights(classifier_state)
        where = str(classifier_state)
    else:
        state = classifier_state.state_dict() if hasattr(classifier_state, "state_dict") else classifier_state
        where = "classifier"
    try:
        build_model(n_features).load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise IchfedError(f"{where}: weights do not fit the 3D ResNet-34 classifier ({str(e).splitlines()[0]})") from None
    check_state(state, where, n_features)  # every weight finite, the head bounded
    return state


def _write_split(state: Mapping[str, Any], folder: Path) -> None:
    """Write the backbone (everything but the head) and the head to their two files in ``folder``."""
    from shared.models.classifier import save_weights

    save_weights({k: v for k, v in state.items() if k not in HEAD_KEYS}, folder / CLASSIFIER_FILE)
    save_weights({k: state[k] for k in HEAD_KEYS}, folder / HEAD_FILE)


def _finish(tmp: Path, manifest: dict[str, Any], key) -> bytes:
    """Write the manifest (and its signature with private ``key``) into the staged folder; returns its bytes."""
    raw = manifest_bytes(manifest)
    (tmp / MANIFEST).write_bytes(raw)
    if key is not None:
        (tmp / SIGNATURE).write_bytes(signature_blob(raw, key))
    return raw


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
    head_inputs: Any = None,
    evaluation: dict[str, Any] | None = None,
) -> Path:
    """Build a layout-v2 bundle at ``out_dir`` (which must not exist) and return its path.

    ``classifier_state`` is a module, a state dict or a safetensors path; it must load strictly
    into the ResNet-34 (it is stored as backbone and head files). ``threshold`` is a probability or
    anything with ``.p`` (e.g. ``shared.evaluation.metrics.Threshold``). With ``private_key`` the bundle is
    signed before it appears at ``out_dir``. ``head_inputs`` (``shared.models.head_inputs.HeadInputs``) says
    what the head reads (default: the embedding only, the paper's head); ``evaluation`` how the model was
    chosen (bootstrap's comparison with the volume baseline, aggregate figures only).
    """
    out = Path(out_dir)
    if out.exists():
        raise IchfedError(f"{out}: already exists; choose a new bundle folder")
    if not name or not version:
        raise IchfedError("bundle: 'name' and 'version' must not be empty")
    if not isinstance(cohort, dict):
        raise IchfedError("bundle: 'cohort' must be a dict")
    src = Path(nnunet_dir)
    _check_nnunet_dir(src)
    spec = threshold_spec(threshold)
    inputs = head_inputs if head_inputs is not None else HeadInputs()
    state = _full_state(classifier_state, inputs.n_features)
    key = keys.load_private_key(private_key) if private_key is not None else None
    with staged_dir(out) as tmp:
        _write_split(state, tmp)
        _copy_tree(src, tmp / NNUNET_DIR)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "version": version,
            "created_utc": _now(), "packages": package_versions(), "cohort": cohort,
            "crop": to_dict(crop_spec), "threshold": dataclasses.asdict(spec),
            "classifier": _classifier_entry(inputs),
            "files": {rel: sha256_file(p) for rel, p in sorted(scan_files(tmp).items())},
            "lineage": dict(lineage or {}),
            # Only when given, so manifests without them keep their bytes (and hashes).
            **({"calibration": dict(calibration)} if calibration else {}),
            **({"evaluation": dict(evaluation)} if evaluation else {}),
        }
        raw = _finish(tmp, manifest, key)
    log.info("created bundle %s %s at %s (hash %s)", name, version, out, hashlib.sha256(raw).hexdigest()[:16])
    return out


def _link_verified(parent: Bundle, tmp: Path, rels: list[str]) -> None:
    """Hard-link (or copy) the parent's files ``rels`` into ``tmp``; each must still have its verified sha256."""
    for rel in rels:
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(parent.path / rel, target)
        if sha256_file(target) != parent.manifest.files[rel]:
            raise BundleVerificationError(f"{parent.path / rel}: changed since the parent bundle was verified; "
                                          "nothing derived from it was kept")


def _classifier_entry(inputs: HeadInputs) -> dict[str, Any]:
    """The manifest's ``classifier``: the weight files, and (hybrid only) what the head reads."""
    extra = inputs.to_dict()
    return {**_CLASSIFIER_ENTRY, **({"head_inputs": extra} if extra else {})}


def _head_state(head: Head, n_features: int) -> dict[str, Any]:
    """The new head as float32 tensors ``fc.weight`` / ``fc.bias``: it must fit the parent's ResNet-34."""
    import torch

    if not isinstance(head, Head):
        raise IchfedError(f"head: expected a shared.models.head.Head, got {type(head).__name__}")
    why = head.problem(n_features=n_features)  # every bundle's classifier is the ResNet-34 of shared.models.classifier
    if why:
        raise IchfedError(why)
    out = {k: torch.from_numpy(v) for k, v in head.to_state_dict().items()}
    check_state(out, "head", n_features)  # within the bound a trained head stays in
    return out


def derive_bundle(
    parent: Bundle,
    out_dir: str | Path,
    head: Head,
    threshold: Any,
    version: str,
    lineage: dict[str, Any] | None = None,
    name: str | None = None,
    cohort: dict[str, Any] | None = None,
    private_key: str | Path | None = None,
    segmenter=None,
) -> Path:
    """A layout-v2 bundle with the parent's models but a new ``head`` and ``threshold``.

    ``head`` is a ``shared.models.head.Head`` (finite, of the ResNet-34's shape). Every other file
    is hard-linked from ``parent`` (a v2 parent) or, for a v1 parent, the backbone is written from its
    verified classifier; only ``head.safetensors``, the manifest and the signature are new. ``lineage``
    gets ``parent_hash``, ``parent_name`` and ``parent_version``, so a bundle says where it came from.

    ``segmenter`` (``shared.models.segment_weights.SegmenterWeights``, any part of the parent's nnU-Net
    network; finite, the parent's names and shapes) replaces the weights of the parent's first fold
    (``SegmenterNetwork``'s choice): the bundle carries that one fold's new slim checkpoint and no other
    fold; ``plans.json``, ``dataset.json`` and the postprocessing rule stay the parent's (issue 24).
    """
    out = Path(out_dir)
    if out.exists():
        raise IchfedError(f"{out}: already exists; choose a new bundle folder")
    new_head = _head_state(head, parent.head_inputs.n_features)
    spec = threshold_spec(threshold)
    key = keys.load_private_key(private_key) if private_key is not None else None
    m = parent.manifest
    lin = {"parent_hash": parent.hash, "parent_name": m.name, "parent_version": m.version, **(lineage or {})}
    checkpoint = _segmenter_checkpoint(parent, segmenter) if segmenter is not None else None
    with staged_dir(out) as tmp:
        v2 = m.head_file is not None
        keep = [rel for rel in m.files if rel not in (m.classifier_file, m.head_file)] + ([m.classifier_file] if v2 else [])
        if checkpoint is not None:  # the parent's fold checkpoints give way to the one new one
            keep = [rel for rel in keep if not rel.startswith(f"{NNUNET_DIR}/fold_")]
            (tmp / checkpoint[0]).parent.mkdir(parents=True)
            (tmp / checkpoint[0]).write_bytes(checkpoint[1])
        _link_verified(parent, tmp, sorted(keep))
        if not v2:  # a v1 parent holds no backbone file: write it from the verified classifier
            _write_split({**parent.classifier_weights(), **new_head}, tmp)
        else:
            from shared.models.classifier import save_weights

            save_weights(new_head, tmp / HEAD_FILE)
        files = {rel: parent.manifest.files[rel] for rel in keep}
        files.update({rel: sha256_file(tmp / rel) for rel in (CLASSIFIER_FILE, HEAD_FILE) if rel not in files})
        if checkpoint is not None:
            files[checkpoint[0]] = sha256_file(tmp / checkpoint[0])
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "name": name or m.name, "version": version,
            "created_utc": _now(), "packages": package_versions(), "cohort": m.cohort if cohort is None else cohort,
            "crop": to_dict(m.crop), "threshold": dataclasses.asdict(spec), "classifier": _classifier_entry(parent.head_inputs),
            "files": dict(sorted(files.items())), "lineage": lin,
        }
        raw = _finish(tmp, manifest, key)
    log.info("derived bundle %s from %s at %s", hashlib.sha256(raw).hexdigest()[:16], parent.hash[:16], out)
    return out


def _segmenter_checkpoint(parent: Bundle, weights) -> tuple[str, bytes]:
    """(relative path, bytes) of the parent's first nnU-Net fold with ``weights`` set (checked first)."""
    from shared.models.segment_weights import SegmenterNetwork

    network = SegmenterNetwork(parent.nnunet_dir, parent.nnunet_file_hashes)
    network.load(weights)  # names, shapes, finite, bounded: or a one-line IchfedError
    return f"{NNUNET_DIR}/fold_{network.fold}/checkpoint_final.pth", network.checkpoint_bytes()


def upgrade_bundle(src: str | Path, out_dir: str | Path, public_key: str | Path | None,
                   private_key: str | Path | None = None, allow_unsigned: bool = False) -> Path:
    """Write the layout-v2 form of the v1 bundle ``src`` at ``out_dir``; same models, same numbers.

    ``src`` is verified with ``public_key`` first. The manifest keeps every entry, with
    ``format_version`` 2, the head file listed and ``lineage.upgraded_from`` the v1 hash; it is signed
    with ``private_key`` when given (the v1 signature does not cover the new manifest).
    """
    from shared.bundle.load import load_bundle

    parent = load_bundle(src, public_key, allow_unsigned=allow_unsigned)
    out = Path(out_dir)
    if parent.manifest.head_file is not None:
        raise IchfedError(f"{parent.path}: already format_version {parent.manifest.format_version}; nothing to upgrade")
    if out.exists():
        raise IchfedError(f"{out}: already exists; choose a new bundle folder")
    raw_v1 = (parent.path / MANIFEST).read_bytes()
    if hashlib.sha256(raw_v1).hexdigest() != parent.hash:
        raise BundleVerificationError(f"{parent.path / MANIFEST}: changed since the bundle was verified")
    manifest = read_json(parent.path / MANIFEST, raw_v1, error=BundleVerificationError)
    key = keys.load_private_key(private_key) if private_key is not None else None
    with staged_dir(out) as tmp:
        keep = sorted(rel for rel in parent.manifest.files if rel != parent.manifest.classifier_file)
        _link_verified(parent, tmp, keep)
        _write_split(parent.classifier_weights(), tmp)
        files = {rel: parent.manifest.files[rel] for rel in keep}
        files.update({rel: sha256_file(tmp / rel) for rel in (CLASSIFIER_FILE, HEAD_FILE)})
        check_bundle_weights(tmp, files, CLASSIFIER_FILE, HEAD_FILE)  # the checks of 'bundle sign'
        manifest.update({
            "format_version": FORMAT_VERSION, "files": dict(sorted(files.items())),
            "classifier": {**manifest.get("classifier", {}), **_CLASSIFIER_ENTRY},
            "lineage": {**manifest.get("lineage", {}), "upgraded_from": parent.hash},
        })
        raw = _finish(tmp, manifest, key)
    if key is None:
        log.warning("upgraded bundle %s is unsigned: sign it with 'ichfed bundle sign' before sites can load it", out)
    log.info("upgraded bundle %s (v1) to %s (v2) at %s", parent.hash[:16], hashlib.sha256(raw).hexdigest()[:16], out)
    return out
