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
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from .errors import BundleVerificationError, IchfedError

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
# Delta form (a bundle derived from one the site already holds, e.g. the federated bundle):
KEY_PARENT = "bundle-parent-hash"  # the cached bundle the missing files come from
KEY_FROM_PARENT = "bundle-from-parent"  # files byte-identical to the parent's, not sent
KEY_DERIVED = "bundle-derived"  # weight files rebuilt from the parent's with a few tensors replaced
KEY_TENSORS = "bundle-derived-tensors"  # JSON: {file: {tensor: {"shape": [...], "dtype": "float32"}}}
TENSOR_PREFIX = "bundle-tensor:"  # + "<file>:<tensor>": the replacement tensor's raw little-endian bytes

_HASH_RE = re.compile(r"^[0-9a-f]{64}$")
_SAFE_PART = re.compile(r"^[A-Za-z0-9_.+-]+$")
MAX_FILES = 10_000


def bundle_cache_dir(state_dir: str | os.PathLike) -> Path:
    """Where a site keeps the bundles it received: ``<state_dir>/bundles``."""
    return Path(state_dir) / "bundles"


def bundle_to_records(bundle_path: str | os.PathLike, parent=None):
    """Pack a bundle folder into ``(ArrayRecord, ConfigRecord)``, byte-exact.

    Every file travels as a ``uint8`` array, unless ``parent`` (a loaded ``Bundle`` that every
    receiver already holds) is given: then files byte-identical to the parent's are only listed,
    and a classifier whose tensors differ from the parent's in a few small tensors only (a new
    head) is sent as those tensors; the receiver rebuilds it and checks its sha256. The federated
    bundle thus costs a site kilobytes instead of the whole ResNet-34.

    The caller has verified the bundle (the ServerApp loads it with ``load_bundle`` first);
    the receiving site verifies it again, against its own copy of the public key.
    """
    from flwr.app import Array, ArrayRecord, ConfigRecord

    from .bundle import bundle_hash

    root = Path(bundle_path)
    if not root.is_dir():
        raise IchfedError(f"{root}: bundle folder not found")
    files = sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())
    if not files:
        raise IchfedError(f"{root}: bundle folder is empty")
    if len(files) > MAX_FILES:
        raise IchfedError(f"{root}: bundle has {len(files)} files (more than {MAX_FILES})")
    parent_root = Path(parent.path) if parent is not None else None
    arrays: dict[str, Any] = {}
    rel_paths: list[str] = []
    digests: list[str] = []
    from_parent: list[str] = []
    derived: list[str] = []
    tensors: dict[str, dict[str, np.ndarray]] = {}  # per derived file
    total = 0
    for p in files:
        if p.is_symlink():
            raise IchfedError(f"{p}: symbolic links are not allowed in a bundle")
        rel = p.relative_to(root).as_posix()
        check_relative_path(rel)
        data = p.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        rel_paths.append(rel)
        digests.append(digest)
        total += len(data)
        if parent_root is not None and rel not in ("manifest.json", "manifest.sig"):
            twin = parent_root / rel
            if twin.is_file() and _sha256_file(twin) == digest:
                from_parent.append(rel)
                continue
            changed = _changed_tensors(twin, p) if rel.endswith(".safetensors") and twin.is_file() else None
            if changed is not None and _rebuilds(twin, changed, digest):
                derived.append(rel)
                tensors[rel] = changed
                continue
        arrays[rel] = Array(np.frombuffer(data, dtype=np.uint8))
    manifest = (root / "manifest.json").read_text(encoding="utf-8") if (root / "manifest.json").is_file() else ""
    if not manifest:
        raise IchfedError(f"{root}: manifest.json is missing")
    sig_path = root / "manifest.sig"
    signature = sig_path.read_bytes() if sig_path.is_file() else b""
    fields: dict[str, Any] = {
        KEY_FORMAT: FORMAT,
        KEY_HASH: bundle_hash(root),
        KEY_MANIFEST: manifest,
        KEY_SIGNATURE: signature,
        KEY_FILES: rel_paths,
        KEY_SHA256: digests,
        KEY_TOTAL_BYTES: total,
    }
    if parent is not None:
        import json

        fields.update({
            KEY_PARENT: parent.hash,
            KEY_FROM_PARENT: from_parent,
            KEY_DERIVED: derived,
            KEY_TENSORS: json.dumps({f: {k: {"shape": list(v.shape), "dtype": "float32"} for k, v in ts.items()}
                                     for f, ts in tensors.items()}),
            **{f"{TENSOR_PREFIX}{f}:{k}": np.ascontiguousarray(v, dtype="<f4").tobytes()
               for f, ts in tensors.items() for k, v in ts.items()},
        })
    config = ConfigRecord(fields)
    sent = sum(a.numpy().nbytes for a in arrays.values())
    log.info("packed bundle %s: %d files, %.1f MB (%.1f MB sent%s)", root, len(rel_paths), total / 1e6, sent / 1e6,
             f"; {len(from_parent)} from the parent, {len(derived)} rebuilt from "
             f"{sum(len(t) for t in tensors.values())} tensors"
             if parent is not None else "")
    return ArrayRecord(array_dict=arrays), config


# A "small" changed tensor: a classifier head is 2 x 512; anything bulkier is sent whole.
_MAX_DERIVED_ELEMENTS = 1_000_000


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _changed_tensors(parent_file: Path, new_file: Path) -> dict[str, np.ndarray] | None:
    """The float32 tensors of ``new_file`` that differ from ``parent_file``'s, if few and small.

    None when the two files do not have the same tensor names, shapes and dtypes, or when the
    changes are too big to be worth rebuilding (then the whole file is sent).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(parent_file), "np") as a, safe_open(str(new_file), "np") as b:
            if sorted(a.keys()) != sorted(b.keys()):
                return None
            changed: dict[str, np.ndarray] = {}
            for k in b.keys():
                x, y = a.get_tensor(k), b.get_tensor(k)
                if x.shape != y.shape or x.dtype != y.dtype:
                    return None
                if not np.array_equal(x, y):
                    if y.dtype != np.float32 or y.size > _MAX_DERIVED_ELEMENTS:
                        return None
                    changed[k] = y
    except Exception:  # not a safetensors file after all: send it whole
        return None
    return changed


def _rebuilds(parent_file: Path, tensors: dict[str, np.ndarray], digest: str) -> bool:
    """Whether a site would rebuild exactly the file with sha256 ``digest`` (weights written elsewhere
    or by another safetensors version may differ in their header); if not, the file is sent whole."""
    with tempfile.TemporaryDirectory() as d:
        target = Path(d) / "rebuilt.safetensors"
        try:
            _rebuild_derived(parent_file, target, tensors)
        except (BundleVerificationError, IchfedError):
            return False
        return _sha256_file(target) == digest


def _rebuild_derived(parent_file: Path, target: Path, tensors: dict[str, np.ndarray]) -> None:
    """Write ``parent_file`` with ``tensors`` replaced to ``target``, the way bundles write weights."""
    import torch

    from .classifier import load_weights, save_weights

    state = load_weights(parent_file)
    for k, v in tensors.items():
        if k not in state or tuple(state[k].shape) != v.shape or state[k].dtype != torch.float32:
            raise BundleVerificationError(f"bundle records: derived tensor {k!r} does not fit {parent_file.name}")
        state[k] = torch.from_numpy(v.copy())
    save_weights(state, target)


def _read_tensors(config) -> dict[str, dict[str, np.ndarray]]:
    """The replacement tensors of each derived file, from the ConfigRecord."""
    import json

    try:
        spec = json.loads(config[KEY_TENSORS]) if KEY_TENSORS in config else {}
        out: dict[str, dict[str, np.ndarray]] = {}
        for rel, names in spec.items():
            out[rel] = {}
            for name, meta in names.items():
                shape = tuple(int(d) for d in meta["shape"])
                raw = config[f"{TENSOR_PREFIX}{rel}:{name}"]
                if meta.get("dtype") != "float32" or not isinstance(raw, bytes) or len(raw) != 4 * int(np.prod(shape)):
                    raise ValueError(name)
                out[rel][name] = np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)
        return out
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BundleVerificationError(f"bundle records: derived tensors are malformed ({e})") from None


def bundle_from_records(arrays, config, cache_dir: str | os.PathLike, public_key: str | os.PathLike | None) -> Path:
    """Rebuild a bundle from records into ``cache_dir/<bundle_hash>/`` and verify it.

    Returns the cached folder. Raises ``BundleVerificationError`` when a key is unsafe, a file
    is missing, extra or altered, the signature does not verify against ``public_key``, or the
    manifest hash is not the announced one; nothing is cached then.
    """
    from .bundle import bundle_hash, load_bundle

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
    local = set(meta["from_parent"]) | set(meta["derived"])
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
    tensors = _read_tensors(config) if meta["derived"] else {}

    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".incoming-{announced[:12]}-", dir=cache))
    try:
        for rel, digest in zip(meta["files"], meta["sha256"]):
            if rel in local:
                derived = tensors.get(rel, {}) if rel in meta["derived"] else None
                _file_from_parent(rel, digest, parent_dir, tmp, derived)
                continue
            data = _array_bytes(arrays[rel], rel)
            if hashlib.sha256(data).hexdigest() != digest:
                raise BundleVerificationError(f"bundle records: {rel}: sha256 does not match the announced one")
            target = tmp.joinpath(*PurePosixPath(rel).parts)
            # Belt and braces after check_relative_path: the resolved target must stay inside tmp.
            if not target.resolve().is_relative_to(tmp.resolve()):
                raise BundleVerificationError(f"bundle records: {rel}: path leaves the bundle folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "xb") as f:
                f.write(data)
        manifest_path = tmp / "manifest.json"
        if not manifest_path.is_file() or manifest_path.read_text(encoding="utf-8") != meta["manifest"]:
            raise BundleVerificationError("bundle records: manifest.json differs from the announced manifest")
        got = bundle_hash(tmp)
        if got != announced:
            raise BundleVerificationError(
                f"bundle records: bundle hash {got[:12]}… is not the announced {announced[:12]}…"
            )
        try:
            load_bundle(tmp, Path(public_key) if public_key is not None else None)
        except BundleVerificationError:
            raise
        except IchfedError as e:
            raise BundleVerificationError(f"bundle records: {e}") from None
        final = cache / announced
        _fsync_tree(tmp)
        if final.exists() and cached_bundle(cache, announced) is None:
            # A damaged leftover under this name (e.g. edited by hand); the verified copy replaces it.
            log.warning("replacing damaged cached bundle %s", final)
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process cached the same bundle meanwhile; both copies verified, keep theirs.
            if cached_bundle(cache, announced) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("received and verified bundle %s into %s", announced[:12], final)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def seed_bundle(bundle, cache_dir: str | os.PathLike) -> Path:
    """Put a verified bundle (``shared.bundle.load_bundle``) into a site's cache, out of band.

    For a site that got the bundle some other way (a disk, a download from the coordinator, a
    simulation's shared folder), so that the run does not send it again. Files are hard-linked
    when the cache is on the same file system (bundles are never modified in place), else copied;
    the folder appears under ``<cache_dir>/<hash>`` only when complete. Idempotent.
    """
    cache = Path(cache_dir)
    existing = cached_bundle(cache, bundle.hash)
    if existing is not None:
        return existing
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".seed-{bundle.hash[:12]}-", dir=cache))
    try:
        src = Path(bundle.path)
        for f in sorted(src.rglob("*")):
            if not f.is_file():
                continue
            target = tmp / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(f, target)
        final = cache / bundle.hash
        if final.exists():
            shutil.rmtree(final)  # a damaged leftover: cached_bundle above did not accept it
        os.rename(tmp, final)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cached_bundle(cache_dir: str | os.PathLike, bundle_hash: str) -> Path | None:
    """Return ``cache_dir/<bundle_hash>`` when it holds that bundle (manifest hash matches), else None.

    This is a cheap identity check; the full signature and file-hash check is
    ``shared.bundle.load_bundle``, which the site runs when it loads the bundle.
    """
    from .bundle import bundle_hash as compute_hash

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
           "parent": None, "from_parent": [], "derived": []}
    if KEY_PARENT in config:
        parent = get(KEY_PARENT, str)
        if not _HASH_RE.match(parent):
            raise BundleVerificationError(f"bundle records: parent hash {parent!r} is not a sha256 hex digest")
        out["parent"] = parent
        out["from_parent"] = list(get(KEY_FROM_PARENT, list))
        out["derived"] = list(get(KEY_DERIVED, list))
        for f in out["from_parent"] + out["derived"]:
            check_relative_path(f)
    return out


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link a bundle file (bundles are never modified in place), or copy it across file systems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _file_from_parent(rel: str, digest: str, parent_dir: Path, tmp: Path, tensors: dict | None) -> None:
    """Link (or copy) an unchanged file from the cached parent, or rebuild a derived one; check its sha256."""
    source = parent_dir.joinpath(*PurePosixPath(rel).parts)
    target = tmp.joinpath(*PurePosixPath(rel).parts)
    if not source.is_file():
        raise BundleVerificationError(f"bundle records: {rel}: not in the parent bundle")
    target.parent.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        _link_or_copy(source, target)
    else:
        try:
            _rebuild_derived(source, target, tensors)
        except BundleVerificationError:
            raise
        except IchfedError as e:  # e.g. the cached parent's weights are damaged
            raise BundleVerificationError(f"bundle records: {rel}: cannot rebuild from the parent bundle ({e})") from None
    if _sha256_file(target) != digest:
        raise BundleVerificationError(f"bundle records: {rel}: rebuilt from the parent bundle, sha256 does not match")


def _array_bytes(array, rel: str) -> memoryview:
    try:
        nd = array.numpy()
    except Exception as e:  # a malformed array is the sender's fault, not ours
        raise BundleVerificationError(f"bundle records: {rel}: not a numpy array ({type(e).__name__})") from None
    if nd.dtype != np.uint8 or nd.ndim != 1:
        raise BundleVerificationError(f"bundle records: {rel}: expected a 1-D uint8 array, got {nd.dtype} {nd.shape}")
    # A view, not a copy: classifier weights are a quarter of a gigabyte.
    return memoryview(np.ascontiguousarray(nd)).cast("B")


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f, contextlib.suppress(OSError):
                os.fsync(f.fileno())
