"""Train the reference models ("the Charité-trained models") and write a signed bundle.

``ichfed bootstrap`` generates the development cohort (``charite-like``) or takes a site folder,
splits it 90/10 (seeded, stratified, as in the paper), trains nnU-Net on the training cases,
trains the ResNet-34 on crops from *ground-truth* masks, picks the threshold on a validation
part of the training split from crops of *predicted* masks, and evaluates the end-to-end pipeline
on the held-out 10% with predicted masks — as the paper did.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from shared.atomic import write_json, write_text
from shared.config import CropSpec, to_dict
from shared.errors import IchfedError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BootstrapProfile:
    """Sizes of one bootstrap run: cohort, nnU-Net trainer, classifier schedule and crop."""

    name: str
    scale: str
    n_cases: int
    segmentation_profile: str
    classifier_profile: str
    crop: CropSpec
    test_fraction: float = 0.10
    # The paper chose the threshold on held-out data; we carve it from the training 90%.
    validation_fraction: float = 0.20
    # nnU-Net's cost is set by its iterations, not its case count, but planning and preprocessing
    # grow with the cases; past a hundred or so, more cases help the classifier far more.
    segmentation_max_cases: int | None = None


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
PROFILES: dict[str, BootstrapProfile] = {
    "paper": BootstrapProfile("paper", "paper", 291, "paper", "paper", CropSpec()),
    "demo": BootstrapProfile(
        "demo", "demo", 480, "demo", "demo", CropSpec(size_xyz=(32, 32, 20), spacing_mm=(2.8, 2.8, 5.0)),
        validation_fraction=0.08, segmentation_max_cases=150,
    ),
    "ci": BootstrapProfile(
        "ci", "ci", 16, "ci", "ci", CropSpec(size_xyz=(24, 24, 20), spacing_mm=(3.6, 3.6, 5.0))
    ),
}


def get_profile(name: str) -> BootstrapProfile:
    """Look up a bootstrap profile by name."""
    if name not in PROFILES:
        raise IchfedError(f"--profile: must be one of {', '.join(PROFILES)}, got {name!r}")
    return PROFILES[name]


@dataclasses.dataclass
class Split:
    train: list[Any]
    validation: list[Any]
    test: list[Any]

    def describe(self) -> dict[str, Any]:
        def counts(cases: list[Any]) -> dict[str, int]:
            return {"n": len(cases), "neoplastic": sum(c.label for c in cases)}

        return {"train": counts(self.train), "validation": counts(self.validation), "test": counts(self.test)}


def split_cases(cases: list[Any], test_fraction: float, validation_fraction: float, seed: int) -> Split:
    """Stratified, seeded train / validation / test split of site cases."""
    from sklearn.model_selection import train_test_split

    labels = [c.label for c in cases]
    if min(labels.count(0), labels.count(1)) < 3:
        raise IchfedError("cohort: need at least 3 cases of each class to split into train/validation/test")
    n_test = max(2, round(test_fraction * len(cases)))
    dev, test = train_test_split(cases, test_size=n_test, stratify=labels, random_state=seed)
    n_val = max(2, round(validation_fraction * len(dev)))
    train, val = train_test_split(dev, test_size=n_val, stratify=[c.label for c in dev], random_state=seed + 1)
    return Split(train=train, validation=val, test=test)


def bootstrap(
    profile: BootstrapProfile,
    out: Path,
    work_dir: Path,
    seed: int = 0,
    site_dir: Path | None = None,
    key_path: Path | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Run the whole reference training; returns the report dict (also written beside the bundle)."""
    from shared.bundle import create_bundle, sign_bundle
    from shared.classifier import save_weights
    from shared.classifier_history import plot_history
    from shared.classifier_training import ClassifierTrainConfig, train_classifier
    from shared.crop import make_crop
    from shared.ingest import read_image
    from shared.metrics import classification_metrics, dice, dice_summary
    from shared.quality import quality_flags
    from shared.volumetrics import measure
    from shared.segment import Segmenter
    from shared.segment_dataset import export_dataset
    from shared.segment_train import train
    from shared.signing import PRIVATE_KEY_NAME, generate_keypair
    from shared.sitedata import read_mask, read_site

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(out)
    if out.exists():
        # create_bundle would refuse it too, but only after minutes to hours of training.
        raise IchfedError(f"{out}: already exists; choose a new bundle folder")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)

    if site_dir is None:
        from simulations.cohort import write_cohort

        site_dir = work_dir / "cohort"
        if not (site_dir / "cases.csv").exists():
            log.info("generating the development cohort (charite-like, %d cases, %s scale)", profile.n_cases, profile.scale)
            write_cohort("charite-like", profile.n_cases, seed, site_dir, scale=profile.scale)
        cohort_desc = {"profile": "charite-like", "scale": profile.scale, "n_cases": profile.n_cases, "seed": seed}
    else:
        cohort_desc = {"site_dir": str(site_dir)}
    timings["cohort_s"] = time.perf_counter() - t_start

    site = read_site(site_dir)
    for p in site.problems:
        log.warning("skipping %s", p.message)
    cases = [c for c in site.cases if c.mask_path is not None]
    if len(cases) < 10:
        raise IchfedError(f"{site_dir}: need at least 10 usable cases with masks to bootstrap, found {len(cases)}")
    split = split_cases(cases, profile.test_fraction, profile.validation_fraction, seed)
    cohort_desc["split"] = split.describe()
    log.info("split: %s", json.dumps(split.describe()))

    # 1. Segmentation: nnU-Net's own planner and trainer on the training cases.
    t0 = time.perf_counter()
    raw_root = work_dir / "nnunet_raw"
    seg_cases = split.train[: profile.segmentation_max_cases] if profile.segmentation_max_cases else split.train
    cohort_desc["segmentation_training_cases"] = len(seg_cases)
    export_dataset(_subset(site, seg_cases), raw_root, dataset_id=501, name="ICH")
    model_dir = train(raw_root, 501, profile.segmentation_profile, work_dir / "nnunet", seed=seed)
    timings["segmentation_training_s"] = time.perf_counter() - t0

    # 2. Crops: ground truth for training, predicted masks for validation and test.
    t0 = time.perf_counter()
    segmenter = Segmenter(model_dir, device=device)
    crop_spec = profile.crop

    def crops_from_truth(batch: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        arrays, labels = [], []
        for c in tqdm(batch, desc="crops (ground truth)", disable=None):
            image = read_image(c.image_path).image
            crop = make_crop(image, read_mask(c.mask_path, image), crop_spec)
            if crop.lesion_found:
                arrays.append(crop.array)
                labels.append(c.label)
        return np.stack(arrays), np.asarray(labels)

    def segment_batch(batch: list[Any]) -> list[tuple[Any, Any, Any, Any]]:
        out = []
        for c in tqdm(batch, desc="segment", disable=None):
            image = read_image(c.image_path).image
            out.append((c, image, segmenter.predict(image), read_mask(c.mask_path, image)))
        return out

    def crops_from_prediction(segmented: list[tuple[Any, Any, Any, Any]]) -> dict[str, Any]:
        arrays, labels, dices, no_lesion, flags = [], [], {1: [], 2: []}, [], []
        for c, image, pred, truth in segmented:
            flags.append(quality_flags(image, pred, measure(image, pred)))
            for label in (1, 2):
                dices[label].append(dice(pred, truth, label))
            crop = make_crop(image, pred, crop_spec)
            if crop.lesion_found:
                arrays.append(crop.array)
                labels.append(c.label)
            else:
                no_lesion.append(c.label)
        return {
            "crops": np.stack(arrays) if arrays else np.zeros((0, *crop_spec.size_xyz[::-1]), np.float32),
            "labels": np.asarray(labels),
            "dice": dices,
            "no_lesion_labels": no_lesion,
            # Plausibility flags of the predicted masks (shared.quality), extracranial removal not counted.
            "quality": {"n_flagged": sum(bool(f) for f in flags),
                        "counts": {name: sum(name in f for f in flags) for name in sorted({n for f in flags for n in f})}},
        }

    train_x, train_y = crops_from_truth(split.train)
    val_segmented = segment_batch(split.validation)
    # nnU-Net-style postprocessing, chosen on the validation predictions and stored with the model.
    val_segmented, postprocessing = _choose_postprocessing(val_segmented, segmenter, model_dir)
    val = crops_from_prediction(val_segmented)
    test = crops_from_prediction(segment_batch(split.test))
    timings["crops_s"] = time.perf_counter() - t0

    # 3. Classifier.
    t0 = time.perf_counter()
    result = train_classifier(
        train_x,
        train_y,
        val["crops"],
        val["labels"],
        ClassifierTrainConfig.profile(profile.classifier_profile),
        device=device,
        seed=seed,
    )
    timings["classifier_training_s"] = time.perf_counter() - t0
    reports_dir = work_dir / "report"
    reports_dir.mkdir(parents=True, exist_ok=True)
    plot_history(result.history, reports_dir / "classifier_curves.png")
    write_json(reports_dir / "classifier_curves.json", result.history)

    # 4. End-to-end evaluation on the held-out test split.
    from shared.classifier import predict_log_probs

    from .bootstrap_calibration import calibrate_reference, reference_threshold

    def p_neoplastic(crops):
        return np.exp(predict_log_probs(result.model, crops, device)[:, 1]) if len(crops) else np.zeros(0)

    p_test = p_neoplastic(test["crops"])
    # Threshold and calibration from validation scores, the threshold midway between neighbours.
    p_val = p_neoplastic(val["crops"])
    threshold = reference_threshold(val["labels"], p_val, result.threshold)
    calibration, calibration_report = calibrate_reference(
        val["labels"], p_val, test["labels"], p_test, threshold.p, out.parent / f"{out.name}-reliability.png")
    cls = classification_metrics(test["labels"], p_test, threshold=threshold.p, seed=seed)
    seg = {name: dice_summary(test["dice"][label]) for label, name in ((1, "ich"), (2, "phe"))}

    # 5. Bundle, signed.
    weights = work_dir / "classifier.safetensors"
    save_weights(result.model, weights)
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
        threshold=threshold,
        crop_spec=crop_spec,
        cohort=cohort_desc,
        name=f"ichfed-reference-{profile.name}",
        version="1.0.0",
        calibration=calibration.to_dict(),
    )
    sign_bundle(bundle_path, key_path)
    timings["total_s"] = time.perf_counter() - t_start

    report = {
        "profile": profile.name,
        "seed": seed,
        "cohort": cohort_desc,
        "crop": to_dict(crop_spec),
        "threshold": {"p": threshold.p, "log_p": threshold.log_p, "rule": "midpoint on validation scores"},
        "calibration": calibration_report,
        "postprocessing": postprocessing,
        "test": {
            "classification": cls,
            "n_no_lesion": len(test["no_lesion_labels"]),
            "quality": test["quality"],
            "dice": seg,
        },
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "bundle": str(bundle_path),
        "signing_key": str(key_path),
    }
    write_json(out.parent / f"{out.name}-report.json", report)
    write_text(out.parent / f"{out.name}-report.md", render_report(report))
    return report


def _choose_postprocessing(segmented: list[tuple[Any, Any, Any, Any]], segmenter: Any,
                           model_dir: Path) -> tuple[list[tuple[Any, Any, Any, Any]], dict[str, Any]]:
    """Pick the component rule with the best validation Dice, store it in ``model_dir``, apply it.

    Returns the validation predictions with the rule applied and what goes into the report.
    ``segmenter`` uses the rule from then on (the test split is segmented with it).
    """
    import SimpleITK as sitk

    from shared.intracranial import voxel_ml
    from shared.postprocess import apply_rule, choose_rule, write_rule

    arrays = [(sitk.GetArrayFromImage(pred), sitk.GetArrayFromImage(truth), voxel_ml(image))
              for _, image, pred, truth in segmented]
    rule, scores = choose_rule(arrays)
    write_rule(model_dir, rule, scores)
    segmenter.postprocessing = rule
    log.info("postprocessing chosen on %d validation cases: %s (mean Dice %s)", len(arrays), rule.name, scores)
    out = []
    for (c, image, pred, truth), (p, _, v) in zip(segmented, arrays):
        new = sitk.GetImageFromArray(apply_rule(p, rule, v))
        new.CopyInformation(pred)
        out.append((c, image, new, truth))
    return out, {"rule": rule.name, "validation_scores": scores}


def _subset(site: Any, cases: list[Any]) -> Any:
    return dataclasses.replace(site, cases=list(cases), problems=[])


def render_report(report: dict[str, Any]) -> str:
    """Markdown report shaped like the paper's Table 2, plus Dice per label."""
    from shared.metrics import paper_table

    cls = report["test"]["classification"]
    lines = [
        f"# ichfed bootstrap report ({report['profile']})",
        "",
        f"Seed {report['seed']}; threshold p = {report['threshold']['p']:.4f} "
        f"(log p = {report['threshold']['log_p']:.3f}); split {json.dumps(report['cohort'].get('split', {}))}.",
        "",
        "## Classification (end-to-end, predicted masks, held-out test split)",
        "",
        paper_table([{"name": "Test set", **cls}]),
        "",
        f"Cases with no segmented lesion (not classified): {report['test']['n_no_lesion']}",
        "",
        f"Postprocessing (chosen on validation): {report.get('postprocessing', {}).get('rule', 'none')}; "
        f"test cases with quality flags: {report['test'].get('quality', {}).get('n_flagged', 'n/a')}",
        "",
        "## Segmentation (Dice on the test split)",
        "",
        "| label | mean | SD | median | min | max | n |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in report["test"]["dice"].items():
        lines.append(
            f"| {name.upper()} | {_f(s.get('mean'))} | {_f(s.get('sd'))} | {_f(s.get('median'))} | "
            f"{_f(s.get('min'))} | {_f(s.get('max'))} | {s.get('n')} |"
        )
    from .bootstrap_calibration import render_calibration

    lines += render_calibration(report.get("calibration"))
    lines += ["", "## Timings (s)", "", *(f"- {k}: {v}" for k, v in report["timings"].items()), ""]
    return "\n".join(lines)


def _f(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"
