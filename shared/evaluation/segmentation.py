"""How good one predicted ICH/PHE label map is, and a summary over cases: one vocabulary for every place
that judges a segmenter (the per-profile benchmark, bootstrap's test split, a site's masked held-out cases).

What matters downstream decides the measures. The crop is centred on the largest ICH component, so a
segmenter that finds the lesion but adds specks elsewhere can still give the right crop
(``largest_on_lesion``) while a wrong largest component moves the crop off the lesion; spurious ICH
inflates the volumes the classifier and the volume baseline read (``false_ich_ml``).

Example
-------
>>> import numpy as np
>>> truth = np.zeros((4, 8, 8), np.uint8); truth[1:3, 2:6, 2:6] = 1; truth[1:3, 1, 2:6] = 2
>>> pred = truth.copy(); pred[0, 7, 7] = 1
>>> s = score_labels(pred, truth, voxel_ml=0.001)
>>> (s.ich_components, s.largest_on_lesion, round(s.ich_dice, 3), s.phe_dice)
(2, True, 0.985, 1.0)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

ICH, PHE = 1, 2


@dataclasses.dataclass(frozen=True)
class SegmentationScore:
    """One case: Dice per label (None when both maps lack it), ICH components and where the largest lies.

    ``false_ich_ml`` is predicted ICH outside the true lesion (ICH or PHE); ``ich_ml_error`` the signed
    relative ICH volume error (None without true ICH).
    """

    ich_dice: float | None
    phe_dice: float | None
    ich_components: int
    largest_on_lesion: bool | None  # None: no ICH predicted
    pred_ich_ml: float
    true_ich_ml: float
    false_ich_ml: float
    ich_ml_error: float | None


def _dice(pred: np.ndarray, truth: np.ndarray) -> float | None:
    denom = int(pred.sum()) + int(truth.sum())
    return None if denom == 0 else 2.0 * float(np.logical_and(pred, truth).sum()) / denom


def score_labels(pred: np.ndarray, truth: np.ndarray, voxel_ml: float) -> SegmentationScore:
    """Score predicted labels ``pred`` against ``truth`` (same-shape integer arrays, 0/1 ICH/2 PHE)."""
    from scipy import ndimage

    if pred.shape != truth.shape:
        raise ValueError(f"score_labels: shapes differ {pred.shape} vs {truth.shape}")
    p_ich, t_ich = pred == ICH, truth == ICH
    comp, n = ndimage.label(p_ich)
    largest_on: bool | None = None
    if n:
        sizes = np.bincount(comp.ravel())[1:]
        largest_on = bool(t_ich[comp == int(np.argmax(sizes)) + 1].any())
    pred_ml, true_ml = float(p_ich.sum()) * voxel_ml, float(t_ich.sum()) * voxel_ml
    return SegmentationScore(
        ich_dice=_dice(p_ich, t_ich),
        phe_dice=_dice(pred == PHE, truth == PHE),
        ich_components=int(n),
        largest_on_lesion=largest_on,
        pred_ich_ml=pred_ml,
        true_ich_ml=true_ml,
        false_ich_ml=float(np.logical_and(p_ich, truth == 0).sum()) * voxel_ml,
        ich_ml_error=None if true_ml == 0 else (pred_ml - true_ml) / true_ml,
    )


def _median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.median(vals)) if vals else None


def summarise(scores: Sequence[SegmentationScore], flagged: Sequence[bool] | None = None) -> dict[str, float | int | None]:
    """Medians and shares over cases, the figures a segmenter is judged by.

    ``largest_on_lesion_share`` counts a case without predicted ICH as a miss (its crop cannot be
    centred on the lesion); ``false_ich_share`` is the pooled share of predicted ICH ml that lies
    outside every true lesion; ``flagged_share`` the share of cases with a plausibility flag.
    """
    n = len(scores)
    pred_ml = sum(s.pred_ich_ml for s in scores)
    out: dict[str, float | int | None] = {
        "n": n,
        "median_ich_dice": _median([s.ich_dice for s in scores]),
        "median_phe_dice": _median([s.phe_dice for s in scores]),
        "median_components": _median([float(s.ich_components) for s in scores]),
        "largest_on_lesion_share": (sum(bool(s.largest_on_lesion) for s in scores) / n) if n else None,
        "false_ich_share": (sum(s.false_ich_ml for s in scores) / pred_ml) if pred_ml > 0 else None,
        "median_abs_ich_ml_error": _median([abs(s.ich_ml_error) for s in scores if s.ich_ml_error is not None]),
    }
    if flagged is not None:
        out["flagged_share"] = (sum(bool(f) for f in flagged) / len(flagged)) if flagged else None
    return out
