"""Component postprocessing chosen on validation (`shared.models.postprocess`, bootstrap's choice, Segmenter's use)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from shared.models.postprocess import (
    FILE_NAME,
    Rule,
    apply_rule,
    choose_rule,
    read_rule,
    write_rule,
)
from shared.plumbing.errors import IchfedError


def _case(rng: np.random.Generator, specks: int) -> tuple[np.ndarray, np.ndarray]:
    """A truth with one bleed + rim of edema, and a prediction that adds ``specks`` one-voxel false ICH."""
    truth = np.zeros((12, 40, 40), np.uint8)
    truth[3:9, 10:30, 10:30] = 2
    truth[4:8, 14:26, 14:26] = 1
    pred = truth.copy()
    for _ in range(specks):
        z, y, x = rng.integers(0, 12), rng.integers(32, 40), rng.integers(0, 40)
        pred[z, y, x] = 1
    pred[0, 0:3, 0:3] = 2  # a stray PHE blob touching no ICH
    return pred, truth


def test_rules_remove_what_they_say():
    pred, truth = _case(np.random.default_rng(0), specks=6)
    v = 0.05  # ml per voxel
    assert apply_rule(pred, Rule(), v) is pred
    largest = apply_rule(pred, Rule("largest"), v)
    assert np.array_equal(largest, truth)  # specks and the stray PHE gone, the bleed and its edema kept
    big = pred.copy()
    big[0:2, 36:40, 36:40] = 1  # a second real-sized (1.6 ml) ICH with no edema
    kept = apply_rule(big, Rule("min_ml", 0.5), v)
    assert (kept[0:2, 36:40, 36:40] == 1).all()
    assert ndimage.label(kept == 1)[1] == 2 and not kept[0, 0:3, 0:3].any()
    assert pred[0, 0, 0] == 2  # inputs are not modified


def test_choice_on_validation_prefers_none_unless_a_rule_helps():
    rng = np.random.default_rng(1)
    clean = [(t.copy(), t, 0.05) for _, t in (_case(rng, 0) for _ in range(3))]
    rule, scores = choose_rule(clean)
    assert rule == Rule() and scores["none"] == 1.0
    noisy = [(*_case(rng, 8), 0.05) for _ in range(3)]
    rule, scores = choose_rule(noisy)
    assert rule.kind != "none" and scores[rule.name] > scores["none"]
    assert choose_rule([]) == (Rule(), {})


def test_rule_file_round_trip_and_validation(tmp_path):
    assert read_rule(tmp_path) == Rule()
    write_rule(tmp_path, Rule("min_ml", 0.5), {"none": 0.7, "min_ml:0.5": 0.8})
    assert read_rule(tmp_path) == Rule("min_ml", 0.5)
    assert json.loads((tmp_path / FILE_NAME).read_text(encoding="utf-8"))["chosen_on"] == "validation"
    (tmp_path / FILE_NAME).write_text('{"kind": "biggest"}', encoding="utf-8")
    with pytest.raises(IchfedError, match="postprocessing.json: kind must be one of"):
        read_rule(tmp_path)
    (tmp_path / FILE_NAME).write_text("[1]", encoding="utf-8")
    with pytest.raises(IchfedError, match="expected a JSON object"):
        read_rule(tmp_path)


def test_bootstrap_choice_is_stored_with_the_model_and_used_by_the_segmenter(tiny_nnunet_model, tmp_path):
    """Bootstrap's step: choose on validation, write into the model folder, the Segmenter applies it."""
    from server.bootstrap_crops import SegmentedCase, _choose_postprocessing
    from shared.models.segment import Segmentation, Segmenter
    from shared.models.segment_model import copy_model_folder
    from simulations.cohort import make_case

    model = copy_model_folder(tiny_nnunet_model.model_dir, tmp_path / "model")
    segmenter = Segmenter(model, device="cpu")
    assert segmenter.postprocessing == Rule()
    rng = np.random.default_rng(2)
    segmented = []
    for k in range(3):
        image, truth = make_case("charite-like", 200 + k, 0, scale="ci").images()
        noisy = sitk.GetArrayFromImage(truth)
        for _ in range(10):  # one-voxel false "ICH" specks
            noisy[tuple(rng.integers(0, s) for s in noisy.shape)] = 1
        pred = sitk.GetImageFromArray(noisy)
        pred.CopyInformation(truth)
        segmented.append(SegmentedCase(None, image, Segmentation(pred, pred, 0.0, "none"), truth))
    cleaned, report = _choose_postprocessing(segmented, segmenter, model)
    assert report["rule"] != "none" and report["validation_scores"][report["rule"]] > report["validation_scores"]["none"]
    assert segmenter.postprocessing.name == report["rule"]
    assert cleaned[0].segmentation.postprocessing == report["rule"]
    assert ndimage.label(sitk.GetArrayFromImage(cleaned[0].segmentation.labels) == 1)[1] < ndimage.label(
        sitk.GetArrayFromImage(segmented[0].segmentation.labels) == 1)[1]
    # The rule travels with the model folder (and so is hashed and signed in a bundle).
    reloaded = Segmenter(copy_model_folder(model, tmp_path / "copy"), device="cpu")
    assert reloaded.postprocessing == segmenter.postprocessing
    image, _ = make_case("charite-like", 210, 0, scale="ci").images()
    seg = reloaded.segment_case(image)
    assert seg.postprocessing == report["rule"]
    labels = sitk.GetArrayFromImage(seg.labels)
    if reloaded.postprocessing.kind == "largest":
        assert ndimage.label(labels == 1)[1] <= 1


def test_rule_from_verified_bytes_ignores_the_file_on_disk(tmp_path):
    write_rule(tmp_path, Rule("largest"))
    verified = (tmp_path / FILE_NAME).read_bytes()
    write_rule(tmp_path, Rule())  # swapped after verification
    assert read_rule(tmp_path, verified) == Rule("largest")


def test_rule_file_is_verified_like_the_weights(tiny_nnunet_model, tmp_path):
    """With a bundle's verified hashes, a swapped or unlisted postprocessing.json is refused, not used."""
    import hashlib

    from shared.models.segment import Segmenter
    from shared.models.segment_model import copy_model_folder
    from shared.plumbing.errors import BundleVerificationError

    model = copy_model_folder(tiny_nnunet_model.model_dir, tmp_path / "model")

    def hashes() -> dict[str, str]:
        return {str(p.relative_to(model)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in model.rglob("*") if p.is_file()}

    write_rule(model, Rule("largest"))
    unlisted = {rel: digest for rel, digest in hashes().items() if rel != "postprocessing.json"}
    with pytest.raises(BundleVerificationError, match="postprocessing.json: not listed"):
        Segmenter(model, device="cpu", file_hashes=unlisted)
    verified = hashes()
    assert Segmenter(model, device="cpu", file_hashes=verified).postprocessing == Rule("largest")
    write_rule(model, Rule())  # swapped after verification
    with pytest.raises(BundleVerificationError, match="postprocessing.json: sha256 no longer matches"):
        Segmenter(model, device="cpu", file_hashes=verified)
