"""Open and verify one signed bundle (``load_bundle``, ``open_bundle``) and use its models (``Bundle``).

Loading checks the signature first, then that the files on disk are exactly those listed (nothing
changed, added or removed), then that the nnU-Net plans name only allow-listed code. Every model
file is read again at use from bytes checked against the manifest (``shared.plumbing.verified``).
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import logging
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from shared.bundle.manifest import (
    HEAD_KEYS,
    MANIFEST,
    NNUNET_DIR,
    SIGNATURE,
    Manifest,
    ThresholdSpec,
    check_files,
    check_plans_code_free,
    parse_manifest,
)
from shared.bundle.signature import (
    bundle_dir,
    check_signature,
)
from shared.bundle.weights import (
    check_bundle_weights,
    check_finite,
    check_head_state,
    check_state,
)
from shared.plumbing.config import CropSpec
from shared.plumbing.errors import BundleVerificationError, IchfedError
from shared.plumbing.verified import read_verified

log = logging.getLogger(__name__)



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
    def head_inputs(self):
        """What the head reads (``shared.models.head_inputs.HeadInputs``): the embedding, or embedding + volumes."""
        return self.manifest.head_inputs

    @property
    def model_kind(self) -> str:
        """The classifier a prediction reports: ``resnet34`` (the paper's head) or ``resnet34+volumes`` (hybrid)."""
        return "resnet34" if self.head_inputs.kind == "embedding" else "resnet34+volumes"

    @property
    def nnunet_dir(self) -> Path:
        """The nnU-Net v2 model folder (dataset.json, plans.json, fold_*)."""
        return self.path / NNUNET_DIR

    @property
    def classifier_path(self) -> Path:
        """The classifier weights file: the whole classifier (v1) or its backbone (v2)."""
        return self.path / self.manifest.classifier_file

    @property
    def head_path(self) -> Path | None:
        """The head weights file (v2), None in a v1 bundle."""
        head = self.manifest.head_file
        return None if head is None else self.path / head

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

    def head_weights(self) -> dict[str, Any]:
        """``{"fc.weight", "fc.bias"}`` tensors, verified at this call (v2 reads the small head file only)."""
        from shared.models.classifier import load_weights

        head = self.manifest.head_file
        if head is None:
            state = self.classifier_weights()
            return {k: state[k] for k in HEAD_KEYS}
        state = load_weights(self.path / head, data=self.read_verified(head))
        if sorted(state) != sorted(HEAD_KEYS):
            raise BundleVerificationError(f"{self.path / head}: holds {sorted(state)}, expected exactly {list(HEAD_KEYS)}")
        check_head_state(state, str(self.path / head), self.head_inputs.n_features)  # finite, shaped, bounded
        return state

    def classifier_weights(self) -> dict[str, Any]:
        """The whole classifier's state dict (v2: backbone and head merged), from bytes verified at this call."""
        from shared.models.classifier import load_weights

        rel = self.manifest.classifier_file
        state = load_weights(self.classifier_path, data=self.read_verified(rel))
        if self.manifest.head_file is None:
            check_state(state, str(self.classifier_path), self.head_inputs.n_features)  # finite, shaped, bounded
            return state
        clash = sorted(k for k in HEAD_KEYS if k in state)
        if clash:
            raise BundleVerificationError(f"{self.classifier_path}: the backbone file holds head tensors {clash}")
        check_finite(state, str(self.classifier_path))
        return {**state, **self.head_weights()}

    def build_classifier(self, device="cpu"):
        """The ResNet-34 with this bundle's weights (as verified at this call), on ``device``, in eval mode."""
        from shared.models.classifier import build_model

        model = build_model(self.head_inputs.n_features)
        try:
            model.load_state_dict(self.classifier_weights(), strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[0] if str(e) else "mismatch"
            raise IchfedError(f"{self.classifier_path}: weights do not fit the 3D ResNet-34 classifier ({first})") from None
        return model.to(device).eval()

    def describe(self) -> dict[str, Any]:
        """A short summary (name, version, hash, signer, threshold) for CLI output and logs."""
        return {
            "name": self.manifest.name,
            "version": self.manifest.version,
            "hash": self.hash,
            "signed_by": self.signed_by,
            "created_utc": self.manifest.created_utc,
            "threshold": dataclasses.asdict(self.manifest.threshold),
            "model": self.model_kind,
        }


def load_bundle(path: str | Path, public_key: str | Path | None, allow_unsigned: bool = False) -> Bundle:
    """Open a bundle (layout v1 or v2), refusing it unless its signature and every file hash check out.

    ``public_key`` is the Ed25519 public key PEM the manifest must be signed with. With
    ``allow_unsigned=True`` a missing signature or key is accepted with a WARNING (file hashes
    are still checked); a signature that is present and a key that is given are still verified.
    """
    root = bundle_dir(path)
    raw = (root / MANIFEST).read_bytes()
    signer: str | None = None
    has_sig = (root / SIGNATURE).is_file()
    if allow_unsigned and (public_key is None or not has_sig):
        log.warning("loading bundle %s WITHOUT signature verification (--allow-unsigned); file hashes are still checked", root)
    else:
        if public_key is None:
            raise BundleVerificationError(f"{root}: no public key given to verify the bundle signature")
        signer = check_signature(root, raw, Path(public_key))
    manifest = parse_manifest(raw, root / MANIFEST)
    check_files(root, manifest.files)
    check_plans_code_free(root, manifest, unsigned=signer is None)
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
    from shared.bundle.tar import unpack

    root = unpack(src, holder / "bundle")
    log.info("unpacked %s into %s", src, root)
    return load_bundle(root, public_key, allow_unsigned=allow_unsigned)


def check_weights(bundle: Bundle) -> None:
    """Every weight of ``bundle`` finite, its head (2, 512) and bounded, the state a ResNet-34's (``bundle verify``)."""
    m = bundle.manifest
    check_bundle_weights(bundle.path, m.files, m.classifier_file, m.head_file, m.head_inputs.n_features)


def verify_bundle(path: str | Path, public_key_path: str | Path) -> Manifest:
    """Check signature, files and weights against ``public_key_path``; returns the manifest or raises
    BundleVerificationError."""
    bundle = load_bundle(path, public_key_path)
    check_weights(bundle)
    return bundle.manifest

