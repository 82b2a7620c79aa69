"""Connected-component postprocessing of predicted labels, chosen on validation cases.

nnU-Net's own ``determine_postprocessing`` compares "keep only the largest component" against
raw predictions on its cross-validation outputs, which our short trainers do not write. This is
the same idea on ichfed's validation split (``server/bootstrap.py``): each candidate rule is
applied to the validation predictions (after the intracranial mask) and the rule with the best
mean ICH + PHE Dice is kept, with "none" winning ties, so a rule is only ever adopted when the
validation data say it helps. The choice is written as ``postprocessing.json`` in the bundle's
nnU-Net folder, where it is hashed and signed with the weights, and ``Segmenter`` applies it.

Rules (``kind``):

- ``none``: labels unchanged.
- ``largest``: keep the largest ICH component and the PHE components that touch it (as the
  crop's ``largest`` lesion policy does); a scan has one spontaneous bleed far more often than
  several.
- ``min_ml``: drop ICH components smaller than ``min_ml`` millilitres, and PHE components that
  touch no kept ICH (speckle from an unfamiliar kernel).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from shared.plumbing.errors import IchfedError
from shared.plumbing.files import read_json

log = logging.getLogger(__name__)

FILE_NAME = "postprocessing.json"
KINDS = ("none", "largest", "min_ml")
# Candidates tried on validation; small thresholds, as real lesions are rarely under 0.5 ml.
CANDIDATES: tuple[tuple[str, float], ...] = (("none", 0.0), ("largest", 0.0), ("min_ml", 0.1), ("min_ml", 0.5),
                                             ("min_ml", 1.0))
_FACE = ndimage.generate_binary_structure(3, 1)
_FULL = ndimage.generate_binary_structure(3, 3)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One postprocessing rule; ``min_ml`` only matters for ``kind == "min_ml"``."""

    kind: str = "none"
    min_ml: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise IchfedError(f"{FILE_NAME}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not (isinstance(self.min_ml, (int, float)) and self.min_ml >= 0):
            raise IchfedError(f"{FILE_NAME}: min_ml must be a number >= 0, got {self.min_ml!r}")

    @property
    def name(self) -> str:
        """Short name for reports: ``none``, ``largest`` or ``min_ml:0.5``."""
        return f"min_ml:{self.min_ml:g}" if self.kind == "min_ml" else self.kind


def apply_rule(labels: np.ndarray, rule: Rule, voxel_ml: float) -> np.ndarray:
    """Apply ``rule`` to a (z, y, x) label array (0/1 ICH/2 PHE); returns a new or the same array."""
    if rule.kind == "none" or not (labels == 1).any():
        return labels
    comp, n = ndimage.label(labels == 1, structure=_FACE)
    sizes = np.bincount(comp.ravel(), minlength=n + 1)[1:]
    if rule.kind == "largest":
        keep_ids = [int(np.argmax(sizes)) + 1]
    else:
        keep_ids = [i + 1 for i, s in enumerate(sizes) if s * voxel_ml >= rule.min_ml]
    kept_ich = np.isin(comp, keep_ids)
    out = np.zeros_like(labels)
    out[kept_ich] = 1
    # PHE components survive when they touch kept ICH, diagonals included.
    phe_comp, n_phe = ndimage.label(labels == 2, structure=_FACE)
    if n_phe and kept_ich.any():
        near = ndimage.binary_dilation(kept_ich, structure=_FULL)
        touching = np.unique(phe_comp[near & (phe_comp > 0)])
        out[np.isin(phe_comp, touching[touching > 0])] = 2
    return out


def choose_rule(cases: Sequence[tuple[np.ndarray, np.ndarray, float]],
                candidates: Iterable[tuple[str, float]] = CANDIDATES) -> tuple[Rule, dict[str, float]]:
    """The candidate with the best mean (ICH Dice + PHE Dice) / 2 over ``(pred, truth, voxel_ml)`` cases.

    Returns the rule and every candidate's score (for the bootstrap report). "none" wins ties and
    is returned for an empty list.
    """
    scores: dict[str, float] = {}
    best, best_score = Rule(), -1.0
    for kind, min_ml in candidates:
        rule = Rule(kind, float(min_ml))
        if not cases:
            break
        values = [_mean_dice(apply_rule(p, rule, v), t) for p, t, v in cases]
        score = float(np.mean(values))
        scores[rule.name] = round(score, 4)
        if score > best_score + 1e-9:
            best, best_score = rule, score
    return best, scores


def _mean_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    values = []
    for label in (1, 2):
        p, t = pred == label, truth == label
        denom = int(p.sum()) + int(t.sum())
        # Both empty: perfect agreement; counts as 1 so a rule that removes a false label is rewarded.
        values.append(1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom)
    return float(np.mean(values))


def write_rule(model_dir: Path, rule: Rule, scores: dict[str, float] | None = None) -> Path:
    """Write ``postprocessing.json`` into an nnU-Net model folder (atomically)."""
    from shared.plumbing.atomic import write_json

    path = Path(model_dir) / FILE_NAME
    write_json(path, {"kind": rule.kind, "min_ml": rule.min_ml, "chosen_on": "validation",
                      "validation_scores": scores or {}})
    return path


def read_rule(model_dir: Path, data: bytes | None = None) -> Rule:
    """The rule stored in ``model_dir`` (``none`` when the folder has no ``postprocessing.json``).

    ``data``: the file's bytes already read and checked against a bundle manifest (the file on
    disk is then not read again, so it cannot be swapped after verification).
    """
    path = Path(model_dir) / FILE_NAME
    if data is None and not path.is_file():
        return Rule()
    parsed = read_json(path, data)
    return Rule(str(parsed.get("kind", "none")), parsed.get("min_ml", 0.0))
