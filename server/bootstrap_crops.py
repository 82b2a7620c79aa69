"""Bootstrap stages 2 and 3: train the segmenter, then turn every case into what the classifiers read.

Training cases become crops and volumes from their *ground-truth* masks (what both the CNN and the volume
baseline train on); validation and test cases are segmented with the trained nnU-Net and become crops and
volumes from the *predicted* masks through ``shared.pipeline.prepare``, exactly as at inference. The test
cases are also cropped from their true masks: those figures are ceilings, never results.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from shared.plumbing.config import CropSpec

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SegmentedCase:
    """One validation or test case after segmentation: the image, ``Segmenter.segment_case``'s
    result (labels, intracranial mask, what was removed) and the ground-truth mask."""

    case: Any
    image: Any
    segmentation: Any  # shared.models.segment.Segmentation
    truth: Any


@dataclasses.dataclass
class CropSets:
    """Inputs of both classifiers per part. ``train``/``test_truth`` come from true masks, ``val``/``test`` from
    predicted ones; each part is a dict with ``crops``, ``labels`` and ``volumes`` ((n, 2): ICH ml, PHE ml)."""

    train: dict[str, Any]
    val: dict[str, Any]
    test: dict[str, Any]
    test_truth: dict[str, Any]
    postprocessing: dict[str, Any]


def train_segmenter(site: Any, train_cases: list[Any], max_cases: int | None, segmenter_recipe: str,
                    work_dir: Path, seed: int) -> tuple[Path, int]:
    """nnU-Net's own planner and trainer on (at most ``max_cases`` of) the training cases; the model
    folder and how many cases it saw."""
    from shared.training.segment_dataset import export_dataset
    from shared.training.segment_train import train

    raw_root = work_dir / "nnunet_raw"
    seg_cases = train_cases[:max_cases] if max_cases else train_cases
    export_dataset(dataclasses.replace(site, cases=list(seg_cases), problems=[]), raw_root, dataset_id=501,
                   name="ICH")
    return train(raw_root, 501, segmenter_recipe, work_dir / "nnunet", seed=seed), len(seg_cases)


def fit_harmonisation(cases: list[Any], model_dir: Path) -> dict[str, Any]:
    """Measure the development scanner's noise on the segmenter's training scans and store the noise
    harmonisation with the model (``shared.imaging.harmonise``; verified like the weights once in a bundle)."""
    import SimpleITK as sitk

    from shared.imaging.harmonise import Harmonisation, write_harmonisation
    from shared.imaging.ingest import read_image

    arrays = [sitk.GetArrayFromImage(read_image(c.image_path).image) for c in cases]
    h = Harmonisation.fit(arrays)
    write_harmonisation(model_dir, h)
    return {**h.to_dict(), "measured_on": len(arrays)}


def make_crops(split: Any, model_dir: Path, crop_spec: CropSpec, device: str) -> CropSets:
    """Ground-truth crops for training (and the test ceiling); predicted-mask crops for validation and test,
    after the postprocessing rule is chosen on the validation predictions (and stored with the model)."""
    from shared.models.segment import Segmenter

    segmenter = Segmenter(model_dir, device=device)
    val_segmented, postprocessing = _choose_postprocessing(_segment(split.validation, segmenter), segmenter, model_dir)
    return CropSets(train=_truth_crops(split.train, crop_spec), val=_predicted_crops(val_segmented, crop_spec),
                    test=_predicted_crops(_segment(split.test, segmenter), crop_spec),
                    test_truth=_truth_crops(split.test, crop_spec), postprocessing=postprocessing)


def _part(arrays: list[np.ndarray], labels: list[int], volumes: list[tuple[float, float]],
          crop_spec: CropSpec) -> dict[str, Any]:
    return {"crops": np.stack(arrays) if arrays else np.zeros((0, *crop_spec.size_xyz[::-1]), np.float32),
            "labels": np.asarray(labels, int), "volumes": np.asarray(volumes, np.float64).reshape(-1, 2)}


def _truth_crops(cases: list[Any], crop_spec: CropSpec) -> dict[str, Any]:
    from shared.imaging.ingest import read_image
    from shared.imaging.sitedata import read_mask
    from shared.pipeline import prepare

    arrays, labels, volumes = [], [], []
    for c in tqdm(cases, desc="crops (ground truth)", disable=None):
        image = read_image(c.image_path).image
        prepared = prepare(image, crop_spec, mask=read_mask(c.mask_path, image))
        if prepared.crop.lesion_found:
            arrays.append(prepared.crop.array)
            labels.append(c.label)
            volumes.append((prepared.volumetrics.ich_ml, prepared.volumetrics.phe_ml))
    return _part(arrays, labels, volumes, crop_spec)


def _segment(cases: list[Any], segmenter: Any) -> list[SegmentedCase]:
    from shared.imaging.ingest import read_image
    from shared.imaging.sitedata import read_mask

    out = []
    for c in tqdm(cases, desc="segment", disable=None):
        image = read_image(c.image_path).image
        out.append(SegmentedCase(c, image, segmenter.segment_case(image), read_mask(c.mask_path, image)))
    return out


def _predicted_crops(segmented: list[SegmentedCase], crop_spec: CropSpec) -> dict[str, Any]:
    """Crops and volumes of the predicted masks (``shared.pipeline.prepare``, as at inference), Dice against
    the truth, the labels of cases with no segmented lesion, and the quality flags' counts."""
    from shared.evaluation.metrics import dice
    from shared.pipeline import prepare

    arrays, labels, volumes, dices, no_lesion, flags = [], [], [], {1: [], 2: []}, [], []
    for s in segmented:
        prepared = prepare(s.image, crop_spec, segmentation=s.segmentation)
        flags.append(prepared.quality_flags)
        for label in (1, 2):
            dices[label].append(dice(s.segmentation.labels, s.truth, label))
        if prepared.crop.lesion_found:
            arrays.append(prepared.crop.array)
            labels.append(s.case.label)
            volumes.append((prepared.volumetrics.ich_ml, prepared.volumetrics.phe_ml))
        else:
            no_lesion.append(s.case.label)
    return {
        **_part(arrays, labels, volumes, crop_spec),
        "dice": dices,
        "no_lesion_labels": no_lesion,
        "quality": {"n_flagged": sum(bool(f) for f in flags),
                    "counts": {name: sum(name in f for f in flags) for name in sorted({n for f in flags for n in f})}},
    }


def _choose_postprocessing(segmented: list[SegmentedCase], segmenter: Any,
                           model_dir: Path) -> tuple[list[SegmentedCase], dict[str, Any]]:
    """Pick the component rule with the best validation Dice, store it in ``model_dir``, apply it.

    Returns the validation predictions with the rule applied and what goes into the report.
    ``segmenter`` uses the rule from then on (the test split is segmented with it).
    """
    import SimpleITK as sitk

    from shared.imaging.intracranial import voxel_ml
    from shared.models.postprocess import apply_rule, choose_rule, write_rule

    arrays = [(sitk.GetArrayFromImage(s.segmentation.labels), sitk.GetArrayFromImage(s.truth), voxel_ml(s.image))
              for s in segmented]
    rule, scores = choose_rule(arrays)
    write_rule(model_dir, rule, scores)
    segmenter.postprocessing = rule
    log.info("postprocessing chosen on %d validation cases: %s (mean Dice %s)", len(arrays), rule.name, scores)
    out = []
    for s, (p, _, v) in zip(segmented, arrays):
        new = sitk.GetImageFromArray(apply_rule(p, rule, v))
        new.CopyInformation(s.segmentation.labels)
        seg = dataclasses.replace(s.segmentation, labels=new, postprocessing=rule.name)
        out.append(dataclasses.replace(s, segmentation=seg))
    return out, {"rule": rule.name, "validation_scores": scores}
