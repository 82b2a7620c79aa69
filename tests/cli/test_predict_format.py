"""The human-readable `ichfed predict` summary: a flagged case never reads as a confident label."""

from __future__ import annotations

import dataclasses

from ichfed.result_text import format_result
from shared.prediction import BundleRef, PredictionResult

BASE = PredictionResult(
    source="case.nii.gz", lesion_found=True, ich_ml=4.5, ich_mean_hu=58.0, n_components=1, phe_ml=9.0,
    phe_mean_hu=22.0, p_neoplastic=0.71, threshold=0.5, threshold_source="bundle", label="neoplastic",
    timings={"ingest": 0.1}, bundle=BundleRef(name="b", version="1", hash="0" * 64),
    quality_flags=(), extracranial_ml_removed=0.0,
)


def test_plausible_case_shows_the_label():
    text = format_result(BASE)
    assert "->  neoplastic" in text and "quality flags" not in text and "outside the skull" not in text


def test_flagged_case_is_not_reliable_and_names_its_flags():
    text = format_result(dataclasses.replace(BASE, quality_flags=("many_components", "extracranial_removed"),
                                             extracranial_ml_removed=64.2))
    assert "->  neoplastic" not in text
    assert "not reliable, review (model: neoplastic)" in text
    assert "quality flags: many_components, extracranial_removed" in text
    assert "removed outside the skull: 64.2 ml" in text


def test_no_lesion_case_is_not_classified():
    text = format_result(dataclasses.replace(BASE, lesion_found=False, p_neoplastic=None, label=None))
    assert "no hemorrhage found (not classified)" in text and "p(neoplastic)" not in text


def test_json_keeps_the_keys_the_reader_reads_in_their_order():
    """``to_dict`` is what `ichfed predict --json` prints and the reader's JavaScript reads."""
    d = BASE.to_dict()
    assert list(d)[:4] == ["source", "lesion_found", "n_components", "ich_ml"]
    assert list(d)[-2:] == ["timings", "bundle"] and "mask_path" not in d
    assert d["bundle"] == {"name": "b", "version": "1", "hash": "0" * 64, "model": "resnet34"} and d["quality_flags"] == []
    assert dataclasses.replace(BASE, mask_path="m.nii.gz").to_dict()["mask_path"] == "m.nii.gz"
