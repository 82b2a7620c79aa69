"""Train the reference models ("the Charité-trained models") and write a signed bundle.

``bootstrap`` is handed a site folder (the site data layout; ``ichfed bootstrap`` without ``--site``
first writes the synthetic development cohort with ``simulations.reference``). It splits the cases
90/10 (seeded, stratified, as in the paper), trains nnU-Net on the training cases, trains the
ResNet-34 on crops from *ground-truth* masks, picks the threshold on a validation part of the
training split from crops of *predicted* masks, and evaluates the end-to-end pipeline on the
held-out 10% with predicted masks — as the paper did. Predicted masks become crops through
``shared.pipeline.prepare`` and are scored by ``shared.models.head.Head``, as in ``ichfed predict``.

Stages: ``_read_split`` -> ``bootstrap_crops.train_segmenter`` -> ``bootstrap_crops.make_crops`` ->
``bootstrap_evaluation.train_classifier`` -> ``bootstrap_evaluation.evaluate`` (the CNN and the volume
baseline on the same cases) -> ``_write_bundle``; ``bootstrap`` runs them in order and times each.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from shared.plumbing.atomic import write_json, write_text
from shared.plumbing.config import CropSpec, to_dict
from shared.plumbing.errors import IchfedError

from .bootstrap_crops import fit_harmonisation, make_crops, train_segmenter
from .bootstrap_evaluation import evaluate, subset, train_classifier
from .bootstrap_head import reference_model, stacking_split
from .bootstrap_report import render_report

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BootstrapRecipe:
    """Sizes of one bootstrap run: nnU-Net and classifier recipes, crop and split fractions.

    ``scale`` and ``n_cases`` size the synthetic development cohort that ``simulations.reference``
    writes when no site folder is given; a given site is used as it is.
    """

    name: str
    scale: str
    n_cases: int
    segmenter_recipe: str  # shared.training.segment_train.RECIPES: nnU-Net trainer/plans recipe name
    classifier_recipe: str  # server.training.classifier_training.ClassifierTrainConfig.named(...)
    crop: CropSpec
    test_fraction: float = 0.10
    # The paper chose the threshold on held-out data; we carve it from the training 90%.
    validation_fraction: float = 0.20
    # nnU-Net's cost is set by its iterations, not its case count, but planning and preprocessing
    # grow with the cases; past a hundred or so, more cases help the classifier far more.
    segmentation_max_cases: int | None = None
    # The last layer: "embedding" (the paper's Linear(512, 2) as trained) or "hybrid" (refitted on the
    # embedding plus the lesion volumes, server/bootstrap_head.py; issue 19).
    head: str = "embedding"
    # Share of the training cases kept from the CNN to stack the hybrid head on.
    stacking_fraction: float = 0.2
    # The synthetic development site ``simulations.reference`` writes when no site folder is given.
    development_profile: str = "charite-like"
    # Smooth scans far noisier than the development scanner's before segmenting them
    # (shared/imaging/harmonise.py; issue 19). The paper recipe keeps nnU-Net as it is.
    harmonise: bool = False


# Demo and ci keep the paper's physical field of view (about 90 x 90 x 100 mm) at a coarser
# in-plane spacing: upsampling a 1.8 mm image to 0.45 mm adds no information, and on a CPU the
# classifier's cost grows with its voxels.
#
# Demo sizes come from a sweep of classifier recipes on an H100
# (benchmarks/bench_classifier_recipes.py, docs/bundle.md): a ResNet-34 trained from scratch
# stayed at chance (AUC ~0.5) with 58 training crops whatever the schedule, reached 0.56 with 150
# and 0.73-0.76 with 380. Distinct cases matter more than epochs, and synthetic cases cost 0.1 s
# each, so the demo cohort is large and its validation part just big enough for a threshold; the
# 32 x 32 x 20 crop at 2.8 mm is about 2x cheaper per step than 50 x 50 x 20 at 1.8 mm.
RECIPES: dict[str, BootstrapRecipe] = {
    "paper": BootstrapRecipe("paper", "paper", 291, "paper", "paper", CropSpec()),
    "demo": BootstrapRecipe(
        "demo", "demo", 480, "demo", "demo", CropSpec(size_xyz=(32, 32, 20), spacing_mm=(2.8, 2.8, 5.0)),
        validation_fraction=0.08, segmentation_max_cases=150, head="hybrid", harmonise=True,
        # A development cohort over several scanners (issue 19, docs/segmentation.md "Across scanners"):
        # the segmenter then holds at the smooth-kernel and noisy profiles where one scanner's did not.
        development_profile="charite-fleet",
    ),
    # ci builds what demo ships (a hybrid head), at the size of a test fixture. Harmonisation stays off: its
# sigmas are calibrated in mm at demo spacing, and at ci's 3.6 mm pixels they would smooth the tiny
# fixtures' external sites out of their lesions (tests/shared/test_harmonise.py fits it on ci data itself).
    "ci": BootstrapRecipe(
        "ci", "ci", 16, "ci", "ci", CropSpec(size_xyz=(24, 24, 20), spacing_mm=(3.6, 3.6, 5.0)), head="hybrid",
    ),
}


def get_recipe(name: str) -> BootstrapRecipe:
    """Look up a bootstrap recipe by name (the CLI's ``--profile``)."""
    if name not in RECIPES:
        raise IchfedError(f"--profile: must be one of {', '.join(RECIPES)}, got {name!r}")
    return RECIPES[name]


@dataclasses.dataclass
class BootstrapSplit:
    """The development cases split into training, validation (threshold) and test (report)."""

    train: list[Any]
    validation: list[Any]
    test: list[Any]

    def describe(self) -> dict[str, Any]:
        """Case and neoplastic counts per part (for the report)."""
        def counts(cases: list[Any]) -> dict[str, int]:
            return {"n": len(cases), "neoplastic": sum(c.label for c in cases)}

        return {"train": counts(self.train), "validation": counts(self.validation), "test": counts(self.test)}


def split_cases(cases: list[Any], test_fraction: float, validation_fraction: float, seed: int) -> BootstrapSplit:
    """Stratified, seeded train / validation / test split of site cases."""
    from sklearn.model_selection import train_test_split

    labels = [c.label for c in cases]
    if min(labels.count(0), labels.count(1)) < 3:
        raise IchfedError("cohort: need at least 3 cases of each class to split into train/validation/test")
    n_test = max(2, round(test_fraction * len(cases)))
    dev, test = train_test_split(cases, test_size=n_test, stratify=labels, random_state=seed)
    n_val = max(2, round(validation_fraction * len(dev)))
    train, val = train_test_split(dev, test_size=n_val, stratify=[c.label for c in dev], random_state=seed + 1)
    return BootstrapSplit(train=train, validation=val, test=test)


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = time.perf_counter() - t0


def bootstrap(
    recipe: BootstrapRecipe,
    *,
    site_dir: Path,
    out: Path,
    work_dir: Path,
    seed: int = 0,
    cohort: dict[str, Any] | None = None,
    key_path: Path | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Run the whole reference training on ``site_dir``; returns the report dict (also written beside the bundle).

    ``cohort`` describes where the site came from (the synthetic cohort's generator settings) for
    the report; by default the site folder's path.
    """
    t_start = time.perf_counter()
    out = check_out(out)
    work_dir = Path(work_dir)
    timings: dict[str, float] = {}
    site, split = _read_split(Path(site_dir), recipe, seed)
    cohort_desc = {**(cohort if cohort is not None else {"site_dir": str(site_dir)}), "split": split.describe()}
    work_dir.mkdir(parents=True, exist_ok=True)
    with _timed(timings, "segmentation_training_s"):
        model_dir, cohort_desc["segmentation_training_cases"] = train_segmenter(
            site, split.train, recipe.segmentation_max_cases, recipe.segmenter_recipe, work_dir, seed)
    if recipe.harmonise:
        cohort_desc["harmonisation"] = fit_harmonisation(split.train[:recipe.segmentation_max_cases or None],
                                                         model_dir)
    with _timed(timings, "crops_s"):
        crops = make_crops(split, model_dir, recipe.crop, device)
    with _timed(timings, "classifier_training_s"):
        result, ref = _train_reference(recipe, crops, work_dir, device, seed)
    cohort_desc["head"] = ref.fit or {"head": "embedding"}
    evaluation = evaluate(result, ref, crops, out, device, seed)
    bundle_path, key_path = _write_bundle(ref, evaluation, model_dir, recipe, cohort_desc, out, work_dir, key_path)
    timings["total_s"] = time.perf_counter() - t_start
    report = _report(recipe, seed, cohort_desc, evaluation, crops, timings, bundle_path, key_path)
    write_json(out.parent / f"{out.name}-report.json", report)
    write_text(out.parent / f"{out.name}-report.md", render_report(report))
    return report


def _train_reference(recipe: BootstrapRecipe, crops: Any, work_dir: Path, device: str, seed: int):
    """(the CNN's training result, the reference model): a hybrid head is stacked on training cases the
    CNN did not see (server/bootstrap_head.py)."""
    cnn_idx, stack_idx = (stacking_split(crops.train["labels"], recipe.stacking_fraction, seed)
                          if recipe.head == "hybrid" else (np.arange(len(crops.train["labels"])), None))
    result = train_classifier(subset(crops.train, cnn_idx), crops.val, recipe.classifier_recipe, work_dir,
                              device, seed)
    ref = reference_model(result.model, recipe.head, crops.train,
                          None if stack_idx is None else subset(crops.train, stack_idx), crops.val, device)
    return result, ref


def _report(recipe: BootstrapRecipe, seed: int, cohort_desc: dict[str, Any], evaluation: dict[str, Any],
            crops: Any, timings: dict[str, float], bundle_path: Path, key_path: Path) -> dict[str, Any]:
    """The bootstrap report (``<bundle>-report.json``, Table 2 style in its markdown twin)."""
    return {
        "profile": recipe.name,
        "seed": seed,
        "cohort": cohort_desc,
        "crop": to_dict(recipe.crop),
        "threshold": {"p": evaluation["threshold"].p, "log_p": evaluation["threshold"].log_p,
                      "rule": "midpoint on validation scores"},
        "calibration": evaluation["calibration_report"],
        "validation": evaluation["validation"],
        "postprocessing": crops.postprocessing,
        "test": {
            "classification": evaluation["classification"],
            "n_no_lesion": len(crops.test["no_lesion_labels"]),
            "quality": crops.test["quality"],
            "dice": {name: evaluation["dice"][name] for name in ("ich", "phe")},
            "comparison": evaluation["comparison"],
        },
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "bundle": str(bundle_path),
        "signing_key": str(key_path),
    }


def check_out(out: Path) -> Path:
    """``out`` as a Path; an existing folder is an error now rather than after hours of training
    (``create_bundle`` would refuse it too, but only at the end)."""
    out = Path(out)
    if out.exists():
        raise IchfedError(f"{out}: already exists; choose a new bundle folder")
    return out


def _read_split(site_dir: Path, recipe: BootstrapRecipe, seed: int) -> tuple[Any, BootstrapSplit]:
    """The site's labelled cases with masks, split; too few is an error before any training."""
    from shared.imaging.sitedata import read_site

    site = read_site(site_dir)
    for p in site.problems:
        log.warning("skipping %s", p.message)
    cases = [c for c in site.cases if c.mask_path is not None and c.label is not None]
    if len(cases) < 10:
        raise IchfedError(f"{site_dir}: need at least 10 usable cases with masks to bootstrap, found {len(cases)}")
    split = split_cases(cases, recipe.test_fraction, recipe.validation_fraction, seed)
    log.info("split: %s", json.dumps(split.describe()))
    return site, split


def _write_bundle(ref: Any, evaluation: dict[str, Any], model_dir: Path, recipe: BootstrapRecipe,
                  cohort_desc: dict[str, Any], out: Path, work_dir: Path, key_path: Path | None) -> tuple[Path, Path]:
    """Create and sign the bundle (a development key beside it when none is given); its path and the key's.

    The manifest names the model (``classifier.head_inputs`` for a hybrid head) and, under ``evaluation``,
    the baseline it was compared with on the same test cases (aggregate figures only)."""
    from shared.bundle import create_bundle, sign_bundle
    from shared.models.classifier import save_weights
    from shared.security.keys import PRIVATE_KEY_NAME, generate_keypair

    weights = work_dir / "classifier.safetensors"
    save_weights(ref.model, weights)
    if key_path is None:
        key_dir = out.parent / f"{out.name}-keys"
        key_path = key_dir / PRIVATE_KEY_NAME
        if not key_path.exists():
            generate_keypair(key_dir)
            log.warning("no --key given: generated a development signing key in %s", key_dir)
    bundle_path = create_bundle(
        out,
        classifier_state=weights,
        nnunet_dir=model_dir,
        threshold=evaluation["threshold"],
        crop_spec=recipe.crop,
        cohort=cohort_desc,
        name=f"ichfed-reference-{recipe.name}",
        version="1.0.0",
        calibration=evaluation["calibration"].to_dict(),
        head_inputs=ref.inputs,
        evaluation=_manifest_evaluation(evaluation),
    )
    sign_bundle(bundle_path, key_path)
    return bundle_path, Path(key_path)




def _manifest_evaluation(evaluation: dict[str, Any]) -> dict[str, Any]:
    """What the manifest says about how the model was chosen: its kind, its test AUC and the volume
    baseline's on the same cases, and their paired difference (no per-case value)."""
    c = evaluation["comparison"]
    d = c["model_minus_baseline"]
    return {"model": c["model"], "head_fit": c["head_fit"].get("head"), "compared_with": "volume baseline "
            "(logistic regression on log ICH ml, log PHE ml, log PHE/ICH)",
            "test_n": evaluation["classification"]["n"], "test_auc": evaluation["classification"]["auc"],
            "baseline_test_auc": c["volume_baseline"]["auc"], "auc_difference": d.get("estimate"),
            "auc_difference_ci": d.get("ci")}
