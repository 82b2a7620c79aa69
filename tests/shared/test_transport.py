"""Bundle transport through Flower records: byte-exact round trips over Flower's own wire
serialization, refusal of tampered bundles and of path-traversal keys, and record sizes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from shared import bundle as B
from shared.bundle import transport as T
from shared.plumbing.errors import BundleVerificationError, IchfedError
from shared.security.keys import generate_keypair

log = logging.getLogger(__name__)


def _small_bundle(tmp_path, key, format_version=B.FORMAT_VERSION, name="bundle"):
    """A real signed bundle in E's format: tiny safetensors classifier and a small nnU-Net folder.

    ``create_bundle`` insists on full ResNet-34 weights (250 MB); the transport does not care
    what the bytes are, so the manifest is written with the same fields and ``sign_bundle``
    (which re-parses the manifest and re-hashes every file) is the judge of its validity.
    Layout v2 keeps the head in its own file; v1 has it inside the classifier file.
    """
    from safetensors.numpy import save_file

    root = tmp_path / name
    (root / "nnunet" / "fold_all").mkdir(parents=True)
    rng = np.random.default_rng(0)
    body = {"body": rng.normal(size=(64, 512)).astype(np.float32)}  # stands in for the frozen backbone
    head = {"fc.weight": rng.normal(size=(2, 512)).astype(np.float32), "fc.bias": np.zeros(2, np.float32)}
    classifier = {"file": B.CLASSIFIER_FILE, "format": "safetensors"}
    if format_version >= 2:
        save_file(body, str(root / B.CLASSIFIER_FILE))
        save_file(head, str(root / B.HEAD_FILE))
        classifier["head_file"] = B.HEAD_FILE
    else:
        save_file({**body, **head}, str(root / B.CLASSIFIER_FILE))
    (root / "nnunet" / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "ICH": 1, "PHE": 2}}), encoding="utf-8")
    (root / "nnunet" / "plans.json").write_text(json.dumps({"plans_name": "tiny"}), encoding="utf-8")
    (root / "nnunet" / "fold_all" / "checkpoint_final.pth").write_bytes(rng.bytes(300_000))
    (root / "nnunet" / "fold_all" / "empty.txt").write_bytes(b"")
    files = {p.relative_to(root).as_posix(): B.sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}
    manifest = {
        "format": B.FORMAT, "format_version": format_version, "name": "transport-test", "version": "0.0.1",
        "created_utc": "2026-01-01T00:00:00Z", "packages": {}, "cohort": {"n": 0},
        "crop": {"size_xyz": [200, 200, 20], "spacing_mm": [0.45, 0.45, 5.0], "hu_window": [-20.0, 120.0],
                 "lesion_policy": "largest"},
        "threshold": {"p": 0.5, "log_p": -0.6931471805599453},
        "classifier": classifier,
        "files": files, "lineage": {},
    }
    # Every required manifest field is written; optional ones (calibration, ...) may be absent.
    required = {f.name for f in dataclasses.fields(B.Manifest)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    assert required <= set(manifest) <= {f.name for f in dataclasses.fields(B.Manifest)}
    (root / B.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    B.sign_bundle(root, key)
    return root


@pytest.fixture
def keys(tmp_path):
    private, public = generate_keypair(tmp_path / "keys")
    return private, public


@pytest.fixture
def small_bundle(tmp_path, keys):
    return _small_bundle(tmp_path, keys[0])


def over_the_wire(arrays: ArrayRecord, config: ConfigRecord) -> tuple[ArrayRecord, ConfigRecord, int]:
    """Serialize the records exactly as Flower does for transport and rebuild them from the bytes."""
    content = RecordDict({"bundle-arrays": arrays, "bundle-config": config})
    wire = {oid: obj.deflate() for oid, obj in get_all_nested_objects(content).items()}
    size = sum(len(b) for b in wire.values())
    back = inflate_object_from_contents(content.object_id, dict(wire))
    return back["bundle-arrays"], back["bundle-config"], size


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_round_trip_is_byte_exact_and_verified(tmp_path, small_bundle, keys):
    arrays, config = T.bundle_to_records(small_bundle)
    assert config[T.KEY_HASH] == B.bundle_hash(small_bundle)
    assert sorted(arrays.keys()) == sorted(_tree(small_bundle))

    arrays2, config2, wire_bytes = over_the_wire(arrays, config)
    cache = tmp_path / "site" / "bundles"
    out = T.bundle_from_records(arrays2, config2, cache, keys[1])

    assert out == cache / config[T.KEY_HASH]
    assert _tree(out) == _tree(small_bundle)
    loaded = B.load_bundle(out, keys[1])
    assert loaded.hash == config[T.KEY_HASH]
    assert T.cached_bundle(cache, loaded.hash) == out
    assert not [p for p in cache.iterdir() if p.name.startswith(".")], "temporary folder left behind"

    raw = sum(len(b) for b in _tree(small_bundle).values())
    # What travels is the files plus npy headers, chunk framing and the manifest twice (file + config).
    overhead = wire_bytes - raw
    log.info("small bundle: %d file bytes, %d on the wire (overhead %d)", raw, wire_bytes, overhead)
    assert raw < wire_bytes < raw + 2 * len((small_bundle / B.MANIFEST).read_bytes()) + 4096 + 256 * len(arrays)
    assert T.records_size(RecordDict({"bundle-arrays": arrays, "bundle-config": config})) == wire_bytes

    # A second delivery of the same bundle is answered from the cache.
    again = T.bundle_from_records(arrays2, config2, cache, keys[1])
    assert again == out


def test_tampered_bytes_are_refused_and_not_cached(tmp_path, small_bundle, keys):
    arrays, config = T.bundle_to_records(small_bundle)
    key = "nnunet/fold_all/checkpoint_final.pth"
    data = bytearray(arrays[key].numpy().tobytes())
    data[1000] ^= 0xFF
    arrays[key] = Array(np.frombuffer(bytes(data), dtype=np.uint8))
    # An attacker who controls the records also fixes up the announced per-file digest;
    # only the signed manifest stops them.
    digests = list(config[T.KEY_SHA256])
    digests[list(config[T.KEY_FILES]).index(key)] = hashlib.sha256(bytes(data)).hexdigest()
    config[T.KEY_SHA256] = digests
    arrays2, config2, _ = over_the_wire(arrays, config)
    cache = tmp_path / "cache"
    with pytest.raises(BundleVerificationError, match="sha256 does not match manifest"):
        T.bundle_from_records(arrays2, config2, cache, keys[1])
    assert list(cache.iterdir()) == []
    assert T.cached_bundle(cache, config[T.KEY_HASH]) is None


def test_bundle_signed_by_another_key_is_refused(tmp_path, small_bundle, keys):
    _, other_public = generate_keypair(tmp_path / "other-keys")
    arrays, config = T.bundle_to_records(small_bundle)
    cache = tmp_path / "cache"
    with pytest.raises(BundleVerificationError, match="not by the given public key"):
        T.bundle_from_records(arrays, config, cache, other_public)
    assert list(cache.iterdir()) == []


def test_tampered_manifest_is_refused(tmp_path, small_bundle, keys):
    arrays, config = T.bundle_to_records(small_bundle)
    manifest = json.loads(config[T.KEY_MANIFEST])
    manifest["threshold"] = {"p": 0.01, "log_p": -4.605170185988091}
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    arrays[B.MANIFEST] = Array(np.frombuffer(text.encode(), dtype=np.uint8))
    config[T.KEY_MANIFEST] = text
    config[T.KEY_HASH] = hashlib.sha256(text.encode()).hexdigest()
    i = list(config[T.KEY_FILES]).index(B.MANIFEST)
    digests = list(config[T.KEY_SHA256])
    digests[i] = config[T.KEY_HASH]
    config[T.KEY_SHA256] = digests
    with pytest.raises(BundleVerificationError, match="signature does not match"):
        T.bundle_from_records(arrays, config, tmp_path / "cache", keys[1])
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize(
    "bad_key",
    ["../evil.py", "nnunet/../../evil", "/etc/passwd", "nnunet//x", "./manifest.json", "a\\..\\b", "C:/x", "nnunet/.."],
)
def test_path_traversal_keys_are_refused(tmp_path, small_bundle, keys, bad_key):
    arrays, config = T.bundle_to_records(small_bundle)
    arrays[bad_key] = Array(np.frombuffer(b"import os", dtype=np.uint8))
    config[T.KEY_FILES] = list(config[T.KEY_FILES]) + [bad_key]
    config[T.KEY_SHA256] = list(config[T.KEY_SHA256]) + [hashlib.sha256(b"import os").hexdigest()]
    with pytest.raises(BundleVerificationError, match="file key"):
        T.bundle_from_records(arrays, config, tmp_path / "cache", keys[1])
    assert not (tmp_path / "evil.py").exists() and not (tmp_path.parent / "evil").exists()
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


def test_extra_file_not_in_manifest_is_refused(tmp_path, small_bundle, keys):
    arrays, config = T.bundle_to_records(small_bundle)
    arrays["nnunet/fold_all/extra.py"] = Array(np.frombuffer(b"x = 1", dtype=np.uint8))
    config[T.KEY_FILES] = list(config[T.KEY_FILES]) + ["nnunet/fold_all/extra.py"]
    config[T.KEY_SHA256] = list(config[T.KEY_SHA256]) + [hashlib.sha256(b"x = 1").hexdigest()]
    with pytest.raises(BundleVerificationError, match="not listed in manifest"):
        T.bundle_from_records(arrays, config, tmp_path / "cache", keys[1])
    assert list((tmp_path / "cache").iterdir()) == []


def test_array_and_file_list_mismatch_and_bad_config(tmp_path, small_bundle, keys):
    arrays, config = T.bundle_to_records(small_bundle)
    del arrays[B.CLASSIFIER_FILE]
    with pytest.raises(BundleVerificationError, match="file list does not match"):
        T.bundle_from_records(arrays, config, tmp_path / "cache", keys[1])
    arrays, config = T.bundle_to_records(small_bundle)
    config[T.KEY_HASH] = "../" + "0" * 61
    with pytest.raises(BundleVerificationError, match="not a sha256"):
        T.bundle_from_records(arrays, config, tmp_path / "cache", keys[1])
    arrays, config = T.bundle_to_records(small_bundle)
    arrays[B.CLASSIFIER_FILE] = Array(np.zeros(4, np.float32))
    with pytest.raises(BundleVerificationError, match="1-D uint8"):
        T.bundle_from_records(arrays, config, tmp_path / "cache", keys[1])


def test_cached_bundle_checks_identity(tmp_path, small_bundle):
    h = B.bundle_hash(small_bundle)
    assert T.cached_bundle(tmp_path / "nothing", h) is None
    cache = tmp_path / "cache"
    cache.mkdir()
    (small_bundle).rename(cache / ("f" * 64))  # a folder whose name is not its manifest hash
    assert T.cached_bundle(cache, "f" * 64) is None
    with pytest.raises(IchfedError, match="not a sha256"):
        T.cached_bundle(cache, "../x")


def test_missing_bundle_folder_is_an_error(tmp_path):
    with pytest.raises(IchfedError, match="bundle folder not found"):
        T.bundle_to_records(tmp_path / "nope")


@pytest.mark.slow
def test_real_bundle_round_trip_size(tmp_path, tiny_bundle):
    """The bootstrap bundle (full ResNet-34 + nnU-Net) through the wire, with its size recorded."""
    import time

    t0 = time.perf_counter()
    arrays, config = T.bundle_to_records(tiny_bundle.path)
    arrays2, config2, wire_bytes = over_the_wire(arrays, config)
    out = T.bundle_from_records(arrays2, config2, tmp_path / "cache", tiny_bundle.public_key)
    elapsed = time.perf_counter() - t0
    raw = sum(len(b) for b in _tree(tiny_bundle.path).values())
    log.warning("real bundle: %d files, %d bytes on disk, %d bytes on the wire (+%d), round trip %.1f s",
                len(arrays), raw, wire_bytes, wire_bytes - raw, elapsed)
    assert _tree(out) == _tree(tiny_bundle.path)
    assert raw < wire_bytes < raw * 1.01 + 65536


def test_seed_bundle_puts_a_verifiable_copy_in_the_cache(tmp_path, small_bundle, keys):
    bundle = B.load_bundle(small_bundle, keys[1])
    cache = tmp_path / "site" / "bundles"
    seeded = T.seed_bundle(bundle, cache)
    assert seeded == cache / bundle.hash
    assert T.cached_bundle(cache, bundle.hash) == seeded
    assert _tree(seeded) == _tree(small_bundle)
    assert B.load_bundle(seeded, keys[1]).hash == bundle.hash
    assert not [p for p in cache.iterdir() if p.name.startswith(".seed-")]  # no temp folder left
    # idempotent, and a damaged copy under the hash is replaced by a good one
    assert T.seed_bundle(bundle, cache) == seeded
    (seeded / "manifest.json").unlink()
    assert T.cached_bundle(cache, bundle.hash) is None
    T.seed_bundle(bundle, cache)
    assert T.cached_bundle(cache, bundle.hash) == seeded


def _new_head(seed=1):
    from shared.models.head import Head

    rng = np.random.default_rng(seed)
    return Head(rng.normal(size=(2, 512)).astype(np.float32), np.array([0.5, -0.5], np.float32))


def test_v2_federated_bundle_sends_only_the_head_and_manifest(tmp_path, small_bundle, keys):
    """Layout v2: a derived bundle costs a site its head file and manifest; the rest is hard-linked."""
    parent = B.load_bundle(small_bundle, keys[1])
    child_root = B.derive_bundle(parent, tmp_path / "child", _new_head(), 0.4, version="0.0.1+fed2", private_key=keys[0])
    child = B.load_bundle(child_root, keys[1])
    arrays, config = T.bundle_to_records(child_root, parent=parent)
    assert set(arrays.keys()) == {B.HEAD_FILE, B.MANIFEST, B.SIGNATURE}
    assert sorted(config[T.KEY_FROM_PARENT]) == sorted(set(parent.manifest.files) - {B.HEAD_FILE})
    arrays2, config2, wire = over_the_wire(arrays, config)
    *_, full_wire = over_the_wire(*T.bundle_to_records(child_root))
    sent = sum(len((child_root / k).read_bytes()) for k in arrays.keys())
    # The bytes on the wire are those three files, the manifest again in the config, and framing.
    assert sent < wire < sent + len((child_root / B.MANIFEST).read_bytes()) + 4096 + 160 * len(config[T.KEY_FILES])
    assert wire < full_wire / 20

    cache = tmp_path / "site" / "bundles"
    with pytest.raises(BundleVerificationError, match="does not hold"):
        T.bundle_from_records(arrays2, config2, cache, keys[1])  # the site lacks the parent
    seeded = T.seed_bundle(parent, cache)
    out = T.bundle_from_records(arrays2, config2, cache, keys[1])
    assert out.name == child.hash and _tree(out) == _tree(child_root)
    # the backbone is the parent's file, not a copy
    assert (out / B.CLASSIFIER_FILE).stat().st_ino == (seeded / B.CLASSIFIER_FILE).stat().st_ino
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]
    got = B.load_bundle(out, keys[1]).head_weights()
    assert all(np.array_equal(got[k].numpy(), v) for k, v in _new_head().to_state_dict().items())


def test_a_tampered_head_or_damaged_parent_is_refused(tmp_path, small_bundle, keys):
    parent = B.load_bundle(small_bundle, keys[1])
    child_root = B.derive_bundle(parent, tmp_path / "child", _new_head(), 0.4, version="2", private_key=keys[0])
    arrays, config = T.bundle_to_records(child_root, parent=parent)
    # a head altered in transit, its announced digest fixed up: only the signed manifest stops it
    data = bytearray(arrays[B.HEAD_FILE].numpy().tobytes())
    data[-1] ^= 0x01
    arrays[B.HEAD_FILE] = Array(np.frombuffer(bytes(data), dtype=np.uint8))
    digests = list(config[T.KEY_SHA256])
    digests[list(config[T.KEY_FILES]).index(B.HEAD_FILE)] = hashlib.sha256(bytes(data)).hexdigest()
    config[T.KEY_SHA256] = digests
    cache = tmp_path / "site" / "bundles"
    seeded = T.seed_bundle(parent, cache)
    with pytest.raises(BundleVerificationError, match="sha256 does not match manifest"):
        T.bundle_from_records(*over_the_wire(arrays, config)[:2], cache, keys[1])
    assert T.cached_bundle(cache, B.bundle_hash(child_root)) is None
    # the site's cached parent damaged (a new inode: the test's own parent stays intact)
    arrays, config = T.bundle_to_records(child_root, parent=parent)
    ckpt = seeded / "nnunet" / "fold_all" / "checkpoint_final.pth"
    tmp = ckpt.with_name("x")
    tmp.write_bytes(ckpt.read_bytes()[:-1] + b"\0")
    tmp.replace(ckpt)
    with pytest.raises(BundleVerificationError, match="linked from the parent bundle, sha256 does not match"):
        T.bundle_from_records(*over_the_wire(arrays, config)[:2], cache, keys[1])
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]


def test_a_bundle_derived_from_a_v1_parent_carries_its_backbone_whole(tmp_path, keys):
    """v1 parents still transfer: the new backbone file differs from the v1 classifier, so it travels."""
    v1_root = _small_bundle(tmp_path, keys[0], format_version=1, name="v1")
    parent = B.load_bundle(v1_root, keys[1])
    assert parent.manifest.head_file is None
    child_root = B.derive_bundle(parent, tmp_path / "child", _new_head(), 0.4, version="2", private_key=keys[0])
    arrays, config = T.bundle_to_records(child_root, parent=parent)
    assert set(arrays.keys()) == {B.CLASSIFIER_FILE, B.HEAD_FILE, B.MANIFEST, B.SIGNATURE}
    cache = tmp_path / "cache"
    T.seed_bundle(parent, cache)
    out = T.bundle_from_records(*over_the_wire(arrays, config)[:2], cache, keys[1])
    assert _tree(out) == _tree(child_root)
    merged = B.load_bundle(out, keys[1]).classifier_weights()
    assert sorted(merged) == ["body", "fc.bias", "fc.weight"]
    assert np.array_equal(merged["body"].numpy(), parent.classifier_weights()["body"].numpy())


@pytest.mark.slow
def test_federated_bundle_reaches_a_site_as_its_head(tmp_path, tiny_bundle):
    """The server's derive path (new head on the real ResNet-34) rebuilt byte-exact at a site."""
    from shared.models.head import Head

    parent = B.load_bundle(tiny_bundle.path, tiny_bundle.public_key)
    if parent.head_path is None:  # a cached v1 reference bundle: what `ichfed bundle upgrade` makes of it
        up = B.upgrade_bundle(parent.path, tmp_path / "v2", tiny_bundle.public_key, private_key=tiny_bundle.private_key)
        parent = B.load_bundle(up, tiny_bundle.public_key)
    head = Head(np.random.default_rng(3).normal(size=(2, parent.head_inputs.n_features)), np.array([0.25, -0.25]))
    child_path = B.derive_bundle(parent, tmp_path / "fed", head, 0.4, version="1.0.0+fed2",
                                 private_key=tiny_bundle.private_key)
    arrays, config = T.bundle_to_records(child_path, parent=parent)
    arrays2, config2, wire = over_the_wire(arrays, config)
    assert wire < 64 * 1024, wire  # the whole bundle is hundreds of MB
    cache = tmp_path / "site" / "bundles"
    T.seed_bundle(parent, cache)
    out = T.bundle_from_records(arrays2, config2, cache, tiny_bundle.public_key)
    assert _tree(out) == _tree(child_path)
    assert B.load_bundle(out, tiny_bundle.public_key).threshold.p == pytest.approx(0.4)
