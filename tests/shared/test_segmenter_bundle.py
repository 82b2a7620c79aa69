"""Issue 24: the bundle carries a federated segmenter. ``derive_bundle(..., segmenter=)`` writes one new
nnU-Net checkpoint beside the parent's other files, signed as every bundle; the transport against the
parent sends that checkpoint, the manifest and the head, nothing else; ``Segmenter`` runs the new weights;
non-finite or wrong-shape weights never make it into a bundle."""

from __future__ import annotations

import numpy as np
import pytest

from shared import bundle as B
from shared.bundle import transport as T
from shared.models.head import Head
from shared.models.segment_weights import SegmenterNetwork, SegmenterWeights
from shared.plumbing.errors import IchfedError
from tests.shared.test_transport import _tree, over_the_wire


@pytest.fixture(scope="module")
def parent(tiny_bundle):
    return B.load_bundle(tiny_bundle.path, tiny_bundle.public_key)


def _moved(parent, scale=0.01, part="decoder"):
    w = SegmenterNetwork(parent.nnunet_dir, parent.nnunet_file_hashes).weights(part)
    rng = np.random.default_rng(1)
    return SegmenterWeights({k: (a + rng.normal(0, scale, a.shape)).astype(np.float32) for k, a in w.arrays.items()})


def test_segmenter_bundle_is_signed_and_sent_as_its_checkpoint(tmp_path, parent, tiny_bundle):
    weights = _moved(parent)
    child = B.derive_bundle(parent, tmp_path / "seg", Head.from_bundle(parent), parent.threshold, "1.0.0+seg1",
                            private_key=tiny_bundle.private_key, segmenter=weights,
                            lineage={"federated_segmenter": {"rounds": 1}})
    loaded = B.load_bundle(child, tiny_bundle.public_key)  # the signature and every file hash
    changed = sorted(rel for rel, h in loaded.manifest.files.items() if parent.manifest.files.get(rel) != h)
    assert changed == ["nnunet/fold_all/checkpoint_final.pth"]
    assert loaded.manifest.lineage["parent_hash"] == parent.hash
    # the network in the new bundle holds exactly the weights set, the rest is the parent's
    got = SegmenterNetwork(loaded.nnunet_dir, loaded.nnunet_file_hashes)
    assert all(np.array_equal(got.weights("decoder").arrays[k], a) for k, a in weights.arrays.items())
    ref = SegmenterNetwork(parent.nnunet_dir, parent.nnunet_file_hashes).weights("all")
    assert all(np.array_equal(got.weights("all").arrays[k], ref.arrays[k]) for k in ref.arrays if k.startswith("encoder."))
    # only the checkpoint and the manifest travel (the head file is the parent's here)
    arrays, config = T.bundle_to_records(child, parent=parent)
    assert sorted(arrays.keys()) == ["manifest.json", "manifest.sig", "nnunet/fold_all/checkpoint_final.pth"]
    arrays2, config2, wire = over_the_wire(arrays, config)
    ckpt_bytes = (child / "nnunet/fold_all/checkpoint_final.pth").stat().st_size
    assert wire < ckpt_bytes + 64 * 1024
    cache = tmp_path / "site" / "bundles"
    T.seed_bundle(parent, cache)
    out = T.bundle_from_records(arrays2, config2, cache, tiny_bundle.public_key)
    assert _tree(out) == _tree(child)


def test_the_segmenter_bundle_segments_with_its_weights(tmp_path, parent, tiny_bundle, tiny_nnunet_model):
    """A segmenter whose output layer was zeroed and biased to background finds nothing; the parent does."""
    import SimpleITK as sitk

    from shared.imaging.sitedata import read_site
    from shared.models.segment import Segmenter

    w = SegmenterNetwork(parent.nnunet_dir, parent.nnunet_file_hashes).weights("decoder")
    blind = {k: np.zeros_like(a) for k, a in w.arrays.items() if ".seg_layers." in k}
    for k in blind:
        if k.endswith(".bias"):
            blind[k][0] = 10.0  # background wins everywhere
    child = B.derive_bundle(parent, tmp_path / "blind", Head.from_bundle(parent), parent.threshold, "x",
                            private_key=tiny_bundle.private_key, segmenter=SegmenterWeights(blind))
    loaded = B.load_bundle(child, tiny_bundle.public_key)
    case = next(c for c in read_site(tiny_nnunet_model.site_dir).cases if c.case_id in tiny_nnunet_model.test_ids)
    image = sitk.ReadImage(str(case.image_path), sitk.sitkFloat32)
    before = Segmenter(parent.nnunet_dir, device="cpu", file_hashes=parent.nnunet_file_hashes).predict(image)
    after = Segmenter(loaded.nnunet_dir, device="cpu", file_hashes=loaded.nnunet_file_hashes).predict(image)
    assert sitk.GetArrayViewFromImage(before).any() and not sitk.GetArrayViewFromImage(after).any()


@pytest.mark.parametrize("damage", ["nan", "inf", "shape", "unknown", "float64"])
def test_non_finite_or_wrong_shape_segmenter_weights_are_refused(tmp_path, parent, tiny_bundle, damage):
    w = dict(_moved(parent).arrays)
    key = sorted(w)[0]
    if damage == "nan":
        w[key] = w[key].copy()
        w[key].flat[0] = np.nan
    elif damage == "inf":
        w[key] = np.full_like(w[key], np.inf)
    elif damage == "shape":
        w[key] = np.zeros(w[key].shape + (1,), np.float32)
    elif damage == "unknown":
        w["decoder.backdoor.weight"] = np.zeros(3, np.float32)
    else:
        w[key] = w[key].astype(np.float64)
    with pytest.raises(IchfedError):
        B.derive_bundle(parent, tmp_path / "bad", Head.from_bundle(parent), parent.threshold, "x",
                        private_key=tiny_bundle.private_key, segmenter=SegmenterWeights(w))
    assert not (tmp_path / "bad").exists()
