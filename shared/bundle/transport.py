"""Carry a signed model bundle through Flower messages.

A Flower App Bundle (FAB) is capped at 10 MB, so weights never travel in it. A site that
lacks the bundle receives it as records instead: every file of the bundle folder as a
``uint8`` array in an ``ArrayRecord`` keyed by its relative POSIX path, and the manifest, its
signature, the bundle hash and each file's sha256 in a ``ConfigRecord``. Flower splits large
arrays into chunks on the wire, so a 100 MB classifier is fine.

The receiving site trusts nothing in the records: keys are checked against path traversal,
files are rebuilt in a temporary folder, and the folder only becomes
``<cache_dir>/<bundle_hash>/`` after ``shared.bundle.load_bundle`` has verified the Ed25519
signature and every file hash against the coordinator's public key.

A bundle derived from one the site holds (the federated bundle) is sent against that parent: files
the parent's signed manifest lists with the same sha256 are named, not sent, and hard-linked from
the site's cached parent. With bundle layout v2 that leaves the head file and the manifest.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from shared.plumbing.errors import BundleVerificationError, IchfedError
from shared.plumbing.files import link_or_copy, sha256_file, staged_dir

log = logging.getLogger(__name__)

FORMAT = "ichfed-bundle-records/1"
# ConfigRecord keys (kept here, next to the code that writes and reads them).
KEY_FORMAT = "bundle-format"
KEY_HASH = "bundle-hash"
KEY_MANIFEST = "bundle-manifest"
KEY_SIGNATURE = "bundle-signature"
KEY_FILES = "bundle-files"
KEY_SHA256 = "bundle-file-sha256"
KEY_TOTAL_BYTES = "bundle-total-bytes"
# Against a parent (a bundle derived from one the site already holds, e.g. the federated bundle):
KEY_PARENT = "bundle-parent-hash"  # the cached bundle the files not sent come from
KEY_FROM_PARENT = "bundle-from-parent"  # files byte-identical to the parent's, not sent: hard-linked there

_HASH_RE = re.compile(r"^[0-9a-f]{64}$")
_SAFE_PART = re.compile(r"^[A-Za-z0-9_.+-]+$")
MAX_FILES = 10_000


def bundle_cache_dir(state_dir: str | os.PathLike) -> Path:
    """Where a site keeps the bundles it received: ``<state_dir>/bundles``."""
    return Path(state_dir) / "bundles"


def bundle_to_records(bundle_path: str | os.PathLike, parent=None):
    """Pack a bundle folder into ``(ArrayRecord, ConfigRecord)``, byte-exact.

    Every file travels as a ``uint8`` array, unless ``parent`` (a loaded ``Bundle`` that every
    receiver already holds) is given: then files the parent's manifest lists with the same sha256
    are only named, and the receiver hard-links them from its copy of the parent. A layout-v2
    federated bundle (``shared.bundle.derive_bundle``) differs from its parent only by
    ``head.safetensors`` and the manifest, so a site receives kilobytes instead of the ResNet-34;
    one derived from a v1 parent carries its backbone file whole.

    The caller has verified the bundle (the ServerApp loads it with ``load_bundle`` first);
    the receiving site verifies it again, against its own copy of the public key.
    """
    from flwr.app import Array, ArrayRecord, ConfigRecord

    from shared.bundle import bundle_hash

    root = Path(bundle_path)
    files = _bundle_files(root)
    parent_files = dict(parent.manifest.files) if parent is not None else {}
    arrays: dict[str, Any] = {}
    rel_paths: list[str] = []
    digests: list[str] = []
    from_parent: list[str] = []
    total = 0
    for p in files:
        if p.is_symlink():
            raise IchfedError(f"{p}: symbolic links are not allowed in a bundle")
        rel = p.relative_to(root).as_posix()
        check_relative_path(rel)
        digest = sha256_file(p)
        rel_paths.append(rel)
        digests.append(digest)
        total += p.stat().st_size
        if parent_files.get(rel) == digest:  # the manifest and signature are never listed there
            from_parent.append(rel)
            continue
        arrays[rel] = Array(np.frombuffer(p.read_bytes(), dtype=np.uint8))
    manifest = (root / "manifest.json").read_text(encoding="utf-8") if (root / "manifest.json").is_file() else ""
    if not manifest:
        raise IchfedError(f"{root}: manifest.json is missing")
    sig_path = root / "manifest.sig"
    fields: dict[str, Any] = {
        KEY_FORMAT: FORMAT,
        KEY_HASH: bundle_hash(root),
        KEY_MANIFEST: manifest,
        KEY_SIGNATURE: sig_path.read_bytes() if sig_path.is_file() else b"",
        KEY_FILES: rel_paths,
        KEY_SHA256: digests,
        KEY_TOTAL_BYTES: total,
    }
    if parent is not None:
        fields.update({KEY_PARENT: parent.hash, KEY_FROM_PARENT: from_parent})
    sent = sum(a.numpy().nbytes for a in arrays.values())
    log.info("packed bundle %s: %d files, %.1f MB (%.3f MB sent%s)", root, len(rel_paths), total / 1e6, sent / 1e6,
             f"; {len(from_parent)} linked from the parent" if parent is not None else "")
    return ArrayRecord(array_dict=arrays), ConfigRecord(fields)


def _bundle_files(root: Path) -> list[Path]:
    """Every file (and link, refused by the caller) of the bundle folder ``root``, sorted."""
    if not root.is_dir():
        raise IchfedError(f"{root}: bundle folder not found")
    files = sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())
    if not files:
        raise IchfedError(f"{root}: bundle folder is empty")
    if len(files) > MAX_FILES:
        raise IchfedError(f"{root}: bundle has {len(files)} files (more than {MAX_FILES})")
    return files


def bundle_from_records(arrays, config, cache_dir: str | os.PathLike, public_key: str | os.PathLike | None) -> Path:
    """Rebuild a bundle from records into ``cache_dir/<bundle_hash>/`` and verify it.

    Files named as the parent's are hard-linked from the cached parent (which must be here).
    Returns the cached folder. Raises ``BundleVerificationError`` when a key is unsafe, a file
    is missing, extra or altered, the signature does not verify against ``public_key``, or the
    manifest hash is not the announced one; nothing is cached then.
    """
    meta = _read_config(config)
    announced = meta["hash"]
    cache = Path(cache_dir)
    cached = cached_bundle(cache, announced)
    if cached is not None:
        log.info("bundle %s already cached at %s", announced[:12], cached)
        return cached
    keys = list(arrays.keys())
    for k in keys:
        check_relative_path(k)
    local = set(meta["from_parent"])
    if sorted(keys) != sorted(set(meta["files"]) - local) or not local <= set(meta["files"]):
        missing = sorted(set(meta["files"]) - set(keys) - local)
        extra = sorted(set(keys) - set(meta["files"]))
        raise BundleVerificationError(
            f"bundle records: file list does not match the arrays (missing {missing[:3]}, extra {extra[:3]})"
        )
    parent_dir = None
    if meta["parent"] is not None:
        parent_dir = cached_bundle(cache, meta["parent"])
        if parent_dir is None:
            raise BundleVerificationError(
                f"bundle records: sent as changes to bundle {meta['parent'][:12]}, which this site does not hold")
    final = cache / announced
    try:
        with staged_dir(final, prefix=f".incoming-{announced[:12]}-") as tmp:
            for rel, digest in zip(meta["files"], meta["sha256"]):
                if rel in local:
                    _file_from_parent(rel, digest, parent_dir, tmp)
                else:
                    _file_from_array(rel, digest, arrays[rel], tmp)
            _verify_received(tmp, meta, public_key)
            if final.exists() and cached_bundle(cache, announced) is None:
                # A damaged leftover under this name (e.g. edited by hand); the verified copy replaces it.
                log.warning("replacing damaged cached bundle %s", final)
                shutil.rmtree(final)
    except OSError:
        # Another process cached the same bundle meanwhile (the rename failed); both verified, keep theirs.
        if cached_bundle(cache, announced) is None:
            raise
    log.info("received and verified bundle %s into %s", announced[:12], final)
    return final


def _file_from_array(rel: str, digest: str, array, tmp: Path) -> None:
    """Write a sent file into the staged folder after checking its sha256 and that it stays inside."""
    data = _array_bytes(array, rel)
    if hashlib.sha256(data).hexdigest() != digest:
        raise BundleVerificationError(f"bundle records: {rel}: sha256 does not match the announced one")
    target = tmp.joinpath(*PurePosixPath(rel).parts)
    # Belt and braces after check_relative_path: the resolved target must stay inside tmp.
    if not target.resolve().is_relative_to(tmp.resolve()):
        raise BundleVerificationError(f"bundle records: {rel}: path leaves the bundle folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "xb") as f:
        f.write(data)


def _verify_received(tmp: Path, meta: dict[str, Any], public_key) -> None:
    """The staged bundle is the announced one (manifest bytes and hash) and verifies (signature, files)."""
    from shared.bundle import bundle_hash, load_bundle

    manifest_path = tmp / "manifest.json"
    if not manifest_path.is_file() or manifest_path.read_text(encoding="utf-8") != meta["manifest"]:
        raise BundleVerificationError("bundle records: manifest.json differs from the announced manifest")
    got = bundle_hash(tmp)
    if got != meta["hash"]:
        raise BundleVerificationError(f"bundle records: bundle hash {got[:12]}… is not the announced {meta['hash'][:12]}…")
    try:
        load_bundle(tmp, Path(public_key) if public_key is not None else None)
    except BundleVerificationError:
        raise
    except IchfedError as e:
        raise BundleVerificationError(f"bundle records: {e}") from None


def seed_bundle(bundle, cache_dir: str | os.PathLike) -> Path:
    """Put a verified bundle (``shared.bundle.load_bundle``) into a site's cache, out of band.

    For a site that got the bundle some other way (a disk, a download from the coordinator, a
    simulation's shared folder), so that the run does not send it again. Files are hard-linked
    when the cache is on the same file system (bundles are never modified in place), else copied;
    the folder appears under ``<cache_dir>/<hash>`` only when complete. Idempotent; a damaged
    leftover under the hash (``cached_bundle`` refused it) is replaced.
    """
    cache = Path(cache_dir)
    existing = cached_bundle(cache, bundle.hash)
    if existing is not None:
        return existing
    final = cache / bundle.hash
    with staged_dir(final, replace=True, prefix=f".seed-{bundle.hash[:12]}-") as tmp:
        src = Path(bundle.path)
        for f in sorted(src.rglob("*")):
            if not f.is_file():
                continue
            target = tmp / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(f, target)
    return final


def cached_bundle(cache_dir: str | os.PathLike, bundle_hash: str) -> Path | None:
    """Return ``cache_dir/<bundle_hash>`` when it holds that bundle (manifest hash matches), else None.

    This is a cheap identity check; the full signature and file-hash check is
    ``shared.bundle.load_bundle``, which the site runs when it loads the bundle.
    """
    from shared.bundle import bundle_hash as compute_hash

    if not isinstance(bundle_hash, str) or not _HASH_RE.match(bundle_hash):
        raise IchfedError(f"bundle hash: {bundle_hash!r} is not a sha256 hex digest")
    path = Path(cache_dir) / bundle_hash
    if not (path / "manifest.json").is_file():
        return None
    try:
        if compute_hash(path) != bundle_hash:
            log.warning("cached bundle %s does not match its hash; ignoring it", path)
            return None
    except IchfedError:
        return None
    return path


def check_relative_path(key: str) -> str:
    """Refuse a record key that is not a plain relative path inside the bundle folder."""
    if not isinstance(key, str) or not key or len(key) > 512:
        raise BundleVerificationError(f"bundle records: bad file key {key!r}")
    if "\\" in key or "\x00" in key or key.startswith("/") or re.match(r"^[A-Za-z]:", key):
        raise BundleVerificationError(f"bundle records: file key {key!r} is not a relative POSIX path")
    parts = key.split("/")
    for part in parts:
        if part in ("", ".", "..") or not _SAFE_PART.match(part):
            raise BundleVerificationError(f"bundle records: file key {key!r} has an unsafe path component {part!r}")
    return key


def records_size(*records) -> int:
    """Bytes the records take on the wire: the sum of their serialized Flower objects."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    seen: dict[str, int] = {}
    for rec in records:
        for oid, obj in get_all_nested_objects(rec).items():
            seen[oid] = len(obj.deflate())
    return sum(seen.values())


def message_size(message) -> int:
    """Bytes a Flower ``Message`` takes on the wire: metadata plus every content object.

    Flower sends a message as content-addressed objects (the message, its RecordDict, records,
    arrays and array chunks), each serialized by ``deflate``; this is their total.
    """
    return records_size(message)


# -- internals ---------------------------------------------------------------------------------


def _read_config(config) -> dict[str, Any]:
    def get(key: str, kind: type | tuple[type, ...]):
        if key not in config:
            raise BundleVerificationError(f"bundle records: config key '{key}' is missing")
        value = config[key]
        if not isinstance(value, kind):
            raise BundleVerificationError(f"bundle records: config key '{key}' has the wrong type")
        return value

    fmt = get(KEY_FORMAT, str)
    if fmt != FORMAT:
        raise BundleVerificationError(f"bundle records: format {fmt!r} is not {FORMAT!r}")
    h = get(KEY_HASH, str)
    if not _HASH_RE.match(h):
        raise BundleVerificationError(f"bundle records: bundle hash {h!r} is not a sha256 hex digest")
    files = list(get(KEY_FILES, list))
    digests = list(get(KEY_SHA256, list))
    if len(files) != len(digests) or len(set(files)) != len(files) or len(files) > MAX_FILES:
        raise BundleVerificationError("bundle records: file list and digests do not match")
    for f in files:
        check_relative_path(f)
    out = {"hash": h, "manifest": get(KEY_MANIFEST, str), "files": files, "sha256": digests,
           "parent": None, "from_parent": []}
    if KEY_PARENT in config:
        parent = get(KEY_PARENT, str)
        if not _HASH_RE.match(parent):
            raise BundleVerificationError(f"bundle records: parent hash {parent!r} is not a sha256 hex digest")
        out["parent"] = parent
        out["from_parent"] = list(get(KEY_FROM_PARENT, list))
        for f in out["from_parent"]:
            check_relative_path(f)
    return out


def _file_from_parent(rel: str, digest: str, parent_dir: Path, tmp: Path) -> None:
    """Link (or copy) an unchanged file from the cached parent and check its sha256."""
    source = parent_dir.joinpath(*PurePosixPath(rel).parts)
    target = tmp.joinpath(*PurePosixPath(rel).parts)
    if not source.is_file():
        raise BundleVerificationError(f"bundle records: {rel}: not in the parent bundle")
    target.parent.mkdir(parents=True, exist_ok=True)
    link_or_copy(source, target)
    if sha256_file(target) != digest:
        raise BundleVerificationError(f"bundle records: {rel}: linked from the parent bundle, sha256 does not match")


def _array_bytes(array, rel: str) -> memoryview:
    try:
        nd = array.numpy()
    except Exception as e:  # a malformed array is the sender's fault, not ours
        raise BundleVerificationError(f"bundle records: {rel}: not a numpy array ({type(e).__name__})") from None
    if nd.dtype != np.uint8 or nd.ndim != 1:
        raise BundleVerificationError(f"bundle records: {rel}: expected a 1-D uint8 array, got {nd.dtype} {nd.shape}")
    # A view, not a copy: classifier weights are a quarter of a gigabyte.
    return memoryview(np.ascontiguousarray(nd)).cast("B")
