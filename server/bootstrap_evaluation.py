"""Bootstrap stages 4 and 5: train the CNN and the volume baseline on the same training cases, choose each
one's threshold on the validation part, and report both on the same held-out test cases.

Both thresholds come from validation scores of predicted-mask crops, which neither model trained on. The
paired difference CNN - baseline (DeLong for correlated ROC curves) is on the test cases where segmentation
found a lesion (both models need one). The true-mask test figures are ceilings: what each model would do
with a perfect segmenter.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from shared.plumbing.atomic import write_json

from .bootstrap_crops import CropSets
from .bootstrap_head import ReferenceModel

log = logging.getLogger(__name__)
Z95 = 1.959963984540054


def train_classifier(train: dict[str, Any], val: dict[str, Any], classifier_recipe: str, work_dir: Path, device: str,
                     seed: int):
    """The ResNet-34 from scratch on ground-truth crops (``train``), its epoch kept by the validation
    part's predicted-mask crops (``val``); curves to work_dir/report."""
    from server.training.classifier_history import plot_history
    from server.training.classifier_training import ClassifierTrainConfig
    from server.training.classifier_training import train_classifier as train_cnn

    result = train_cnn(train["crops"], train["labels"], val["crops"], val["labels"],
                       ClassifierTrainConfig.named(classifier_recipe), device=device, seed=seed)
    reports_dir = work_dir / "report"
    reports_dir.mkdir(parents=True, exist_ok=True)
    plot_history(result.history, reports_dir / "classifier_curves.png")
    write_json(reports_dir / "classifier_curves.json", result.history)
    return result


def subset(part: dict[str, Any], idx: np.ndarray) -> dict[str, Any]:
    """The cases ``idx`` of a part (its per-case arrays)."""
    return {k: v[idx] for k, v in part.items() if k in ("crops", "labels", "volumes")}


def evaluate(result: Any, ref: ReferenceModel, crops: CropSets, out: Path, device: str, seed: int) -> dict[str, Any]:
    """Threshold and calibration from validation scores (the threshold midway between neighbours), the
    end-to-end metrics and Dice on the held-out test split, and the volume baseline beside the model."""
    from shared.evaluation.metrics import classification_metrics, dice_summary

    from .bootstrap_calibration import calibrate_reference, reference_threshold

    p_val = ref.p_neoplastic(crops.val, device)
    p_test = ref.p_neoplastic(crops.test, device)
    threshold = reference_threshold(crops.val["labels"], p_val, result.threshold)
    calibration, calibration_report = calibrate_reference(
        crops.val["labels"], p_val, crops.test["labels"], p_test, threshold.p, out.parent / f"{out.name}-reliability.png")
    return {
        "threshold": threshold,
        "calibration": calibration,
        "calibration_report": calibration_report,
        "classification": classification_metrics(crops.test["labels"], p_test, threshold=threshold.p, seed=seed),
        "dice": {name: dice_summary(crops.test["dice"][label]) for label, name in ((1, "ich"), (2, "phe"))},
        "comparison": compare_with_volume_baseline(result, ref, crops, p_test, threshold.p, device, seed),
        "validation": validation_summary(crops.val, p_val),
    }


def validation_summary(val: dict[str, Any], p_val: np.ndarray) -> dict[str, Any]:
    """How the reference did on its validation part (predicted masks): AUC of the cases with a lesion, and the
    share of cases the plausibility checks flagged. ``ichfed demo`` warns from these (near chance, many flags)."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(val["labels"], int)
    n_cases = len(labels) + len(val.get("no_lesion_labels", []))
    n_flagged = int(val.get("quality", {}).get("n_flagged", 0))
    auc = float(roc_auc_score(labels, p_val)) if len(set(labels.tolist())) == 2 else None
    return {"n_cases": n_cases, "n_scored": int(len(labels)), "auc": auc, "n_flagged": n_flagged,
            "flagged_share": n_flagged / n_cases if n_cases else None}


def compare_with_volume_baseline(result: Any, ref: ReferenceModel, crops: CropSets, p_test: np.ndarray,
                                 model_threshold: float, device: str, seed: int) -> dict[str, Any]:
    """The volume baseline fitted on the model's training cases; both models on the same test cases, their
    paired AUC difference, and both again on true-mask test crops (ceilings)."""
    from shared.evaluation.metrics import classification_metrics
    from shared.models.volume_baseline import VolumeBaseline

    from .bootstrap_calibration import reference_threshold

    train, val, test, truth = crops.train, crops.val, crops.test, crops.test_truth
    baseline = VolumeBaseline.fit(train["volumes"][:, 0], train["volumes"][:, 1], train["labels"])
    pb_val = baseline.p_neoplastic(val["volumes"][:, 0], val["volumes"][:, 1])
    pb_test = baseline.p_neoplastic(test["volumes"][:, 0], test["volumes"][:, 1])
    b_threshold = reference_threshold(val["labels"], pb_val, result.threshold)
    out: dict[str, Any] = {
        "model": "resnet34" if ref.inputs.kind == "embedding" else "resnet34+volumes",
        "head_fit": ref.fit or {"head": "embedding"},
        "baseline": baseline.to_dict(),
        "baseline_threshold": b_threshold.p,
        "volume_baseline": classification_metrics(test["labels"], pb_test, threshold=b_threshold.p, seed=seed),
        "model_minus_baseline": _paired(test["labels"], p_test, pb_test),
        "ceiling_true_masks": {
            "n": int(len(truth["labels"])),
            "model": classification_metrics(truth["labels"], ref.p_neoplastic(truth, device),
                                            threshold=model_threshold, seed=seed),
            "volume_baseline": classification_metrics(
                truth["labels"], baseline.p_neoplastic(truth["volumes"][:, 0], truth["volumes"][:, 1]),
                threshold=b_threshold.p, seed=seed),
        },
    }
    return out


def _paired(y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray) -> dict[str, Any]:
    """AUC(a) - AUC(b) on the same cases with its DeLong 95 % CI (None where one class is missing)."""
    from shared.evaluation.rocstats import delong_paired

    y = np.asarray(y)
    if min(int((y == 1).sum()), int((y == 0).sum())) < 2:  # DeLong's variance needs two cases per class
        return {"n": int(len(y)), "estimate": None, "ci": None, "reason": "fewer than 2 test cases of a class"}
    d = delong_paired(y, p_a, p_b)
    se = math.sqrt(d.variance)
    return {"n": int(len(y)), "estimate": d.estimate, "ci": [d.estimate - Z95 * se, d.estimate + Z95 * se],
            "method": "DeLong paired, normal 95 % CI"}


