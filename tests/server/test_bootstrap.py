"""Reference-model training (`server.bootstrap`): the report, the signed bundle, the curves and the split.

The expensive part is the session fixture ``tiny_bundle`` (a real ``ci`` bootstrap: nnU-Net and
ResNet-34 training, signing); these tests read what it left behind.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from server.bootstrap import RECIPES, bootstrap, get_recipe, split_cases
from shared.imaging.sitedata import CaseRef
from shared.plumbing.errors import BundleVerificationError, IchfedError


def _cases(n_pos: int, n_neg: int) -> list[CaseRef]:
    labels = [1] * n_pos + [0] * n_neg
    return [CaseRef(f"case-{i:03d}", label, Path(f"{i}.nii.gz"), None, {}) for i, label in enumerate(labels)]


def _ids(cases) -> list[str]:
    return [c.case_id for c in cases]


# ------------------------------------------------------------------------------ the report


def test_report_has_dice_threshold_seed_and_split(tiny_bundle):
    r = tiny_bundle.report
    assert r["profile"] == "ci" and r["seed"] == 0
    for name in ("ich", "phe"):
        d = r["test"]["dice"][name]
        assert d["n"] >= 1
        assert d["mean"] is not None and 0.0 <= d["mean"] <= 1.0
        assert d["min"] <= d["median"] <= d["max"]
    # The tiny model must have learnt something about blood, even if PHE is beyond it.
    assert r["test"]["dice"]["ich"]["mean"] > 0.2
    p = r["threshold"]["p"]
    assert 0.0 < p < 1.0
    assert r["threshold"]["log_p"] == pytest.approx(math.log(p))
    cls = r["test"]["classification"]
    assert cls["threshold"] == pytest.approx(p)
    assert cls["n"] + r["test"]["n_no_lesion"] == r["cohort"]["split"]["test"]["n"]
    split = r["cohort"]["split"]
    assert sum(split[part]["n"] for part in ("train", "validation", "test")) == r["cohort"]["n_cases"]
    assert all(split[part]["n"] >= 2 for part in ("train", "validation", "test"))
    assert r["crop"]["size_xyz"] == list(RECIPES["ci"].crop.size_xyz)
    assert set(r["timings"]) >= {"segmentation_training_s", "classifier_training_s", "total_s"}


def test_report_compares_the_cnn_with_the_volume_baseline_on_the_same_cases(tiny_bundle):
    """Issue 19: every bootstrap fits the volume baseline beside the CNN and reports both, and the true-mask
    figures as ceilings; figures on too few cases say so instead of a number."""
    c = tiny_bundle.report["test"]["comparison"]
    cls = tiny_bundle.report["test"]["classification"]
    # The ci recipe ships the hybrid head (embedding + volumes); the report names the model it compares.
    assert c["model"] == "resnet34+volumes" and tiny_bundle.report["cohort"]["head"]["head"] == "hybrid"
    assert c["baseline"]["features"] == ["log_ich_ml", "log_phe_ml", "log_phe_ich_ratio"]
    assert c["volume_baseline"]["n"] == cls["n"] == c["model_minus_baseline"]["n"]  # the same test cases
    assert 0.0 < c["baseline_threshold"] < 1.0
    assert set(c["ceiling_true_masks"]) == {"n", "model", "volume_baseline"}
    md = (tiny_bundle.path.parent / f"{tiny_bundle.path.name}-report.md").read_text(encoding="utf-8")
    assert "Compared with the volume baseline" in md and "Ceilings with true masks" in md


def test_report_split_is_reproducible_from_its_seed(tiny_bundle):
    """The recorded split counts are what ``split_cases`` gives for the cohort and the recorded seed."""
    from shared.imaging.sitedata import read_site

    r = tiny_bundle.report
    cases = [c for c in read_site(tiny_bundle.cohort_dir).cases if c.mask_path is not None]
    recipe = get_recipe(r["profile"])
    split = split_cases(cases, recipe.test_fraction, recipe.validation_fraction, r["seed"])
    assert split.describe() == r["cohort"]["split"]


def test_report_markdown_is_written_beside_the_bundle(tiny_bundle):
    md = (tiny_bundle.path.parent / f"{tiny_bundle.path.name}-report.md").read_text(encoding="utf-8")
    assert md.startswith("# ichfed bootstrap report (ci)")
    assert "| ICH |" in md and "| PHE |" in md
    assert f"{tiny_bundle.report['threshold']['p']:.4f}" in md


def test_training_curves_png_and_json_in_work_dir(tiny_bundle):
    report_dir = tiny_bundle.path.parent / "work" / "report"
    png = report_dir / "classifier_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 5_000  # a real plot, not an empty canvas
    history = json.loads((report_dir / "classifier_curves.json").read_text(encoding="utf-8"))
    assert [h["epoch"] for h in history] == list(range(1, len(history) + 1))
    assert len(history) >= 1
    for h in history:
        assert math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"])


# ------------------------------------------------------------------------------ the bundle


def test_bundle_verifies_with_its_key_and_carries_the_report_threshold(tiny_bundle):
    from shared.bundle import load_bundle, verify_bundle

    manifest = verify_bundle(tiny_bundle.path, tiny_bundle.public_key)
    assert manifest.threshold.p == pytest.approx(tiny_bundle.report["threshold"]["p"])
    assert manifest.crop == RECIPES["ci"].crop
    assert manifest.cohort["split"] == tiny_bundle.report["cohort"]["split"]
    assert manifest.name == "ichfed-reference-ci"
    bundle = load_bundle(tiny_bundle.path, tiny_bundle.public_key)
    assert bundle.signed_by is not None
    assert (bundle.nnunet_dir / "plans.json").is_file()


def test_bundle_is_refused_with_another_key(tiny_bundle, tmp_path):
    from shared.bundle import verify_bundle
    from shared.security.keys import PUBLIC_KEY_NAME, generate_keypair

    generate_keypair(tmp_path)
    with pytest.raises(BundleVerificationError, match="manifest.sig"):
        verify_bundle(tiny_bundle.path, tmp_path / PUBLIC_KEY_NAME)


# ------------------------------------------------------------------------------ the split


def test_split_same_seed_same_split_other_seed_other_split():
    cases = _cases(16, 24)
    a = split_cases(cases, 0.1, 0.2, seed=3)
    b = split_cases(cases, 0.1, 0.2, seed=3)
    assert (_ids(a.train), _ids(a.validation), _ids(a.test)) == (_ids(b.train), _ids(b.validation), _ids(b.test))
    others = [split_cases(cases, 0.1, 0.2, seed=s) for s in (4, 5)]
    assert any(set(_ids(o.test)) != set(_ids(a.test)) for o in others)
    assert any(set(_ids(o.validation)) != set(_ids(a.validation)) for o in others)


def test_split_is_stratified_disjoint_and_complete():
    cases = _cases(20, 30)  # 40 % neoplastic, the development cohort's prevalence
    split = split_cases(cases, 0.1, 0.2, seed=0)
    parts = {"train": split.train, "validation": split.validation, "test": split.test}
    all_ids = [cid for part in parts.values() for cid in _ids(part)]
    assert sorted(all_ids) == sorted(_ids(cases))  # disjoint and complete
    assert len(split.test) == 5  # 10 % of 50
    assert len(split.validation) == 9  # 20 % of the remaining 45
    for name, part in parts.items():
        n_pos = sum(c.label for c in part)
        # stratified: each part's neoplastic count is within one case of 40 %
        assert abs(n_pos - 0.4 * len(part)) <= 1, (name, n_pos, len(part))


def test_split_refuses_a_class_with_too_few_cases():
    with pytest.raises(IchfedError, match="at least 3 cases of each class"):
        split_cases(_cases(2, 20), 0.1, 0.2, seed=0)


def test_unknown_recipe_is_a_one_line_error_naming_the_cli_flag():
    with pytest.raises(IchfedError, match="--profile"):
        get_recipe("huge")


def test_bootstrap_refuses_a_site_with_too_few_cases(tmp_path):
    """A user's --site with 4 cases stops with a one-line error before any training starts."""
    from simulations.cohort import write_cohort

    write_cohort("charite-like", 4, 0, tmp_path / "site", scale="ci")
    with pytest.raises(IchfedError, match="need at least 10 usable cases") as e:
        bootstrap(get_recipe("ci"), out=tmp_path / "bundle", work_dir=tmp_path / "work", site_dir=tmp_path / "site")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "bundle").exists()
    assert not (tmp_path / "work" / "nnunet").exists()


def test_bootstrap_refuses_an_existing_bundle_folder_before_training(tmp_path):
    from simulations.reference import bootstrap_development

    (tmp_path / "bundle").mkdir()
    with pytest.raises(IchfedError, match="already exists"):
        bootstrap(get_recipe("ci"), out=tmp_path / "bundle", work_dir=tmp_path / "work", site_dir=tmp_path / "site")
    with pytest.raises(IchfedError, match="already exists"):
        bootstrap_development(get_recipe("ci"), out=tmp_path / "bundle", work_dir=tmp_path / "work")
    assert not (tmp_path / "work").exists()  # nothing generated, nothing trained
