"""Reading a bundle file as the bytes whose hash was verified ("verify at use").

A file swapped between ``load_bundle`` and its use must never be used under the verified hash, so
every model file (classifier weights, nnU-Net plans, checkpoints, postprocessing rule) is read into
memory once, checked against the manifest's sha256, and deserialised from those bytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping

from shared.plumbing.errors import BundleVerificationError


def read_verified(root: Path, rel: str, listed: Mapping[str, str]) -> bytes:
    """Read ``root/rel`` into memory once and check it against ``listed[rel]`` (its sha256)."""
    path = Path(root) / rel
    if rel not in listed:
        raise BundleVerificationError(f"{path}: not listed in the bundle manifest")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BundleVerificationError(f"{path}: unreadable ({e.strerror})") from None
    if hashlib.sha256(data).hexdigest() != listed[rel]:
        raise BundleVerificationError(f"{path}: sha256 no longer matches the verified manifest (file changed after loading)")
    return data
