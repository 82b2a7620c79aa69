"""A site's fine-tune / held-out split, and the cross-fit folds inside its fine-tune part.

Both depend only on case IDs, labels and seeds, so they are stable across rounds, restarts and
bundle versions. Neither ever leaves the site.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from shared.plumbing.atomic import write_json


@dataclasses.dataclass(frozen=True)
class SiteSplit:
    """Case IDs of a site's fine-tune and held-out parts. Never leaves the site."""

    fine_tune: tuple[str, ...]
    held_out: tuple[str, ...]

    def write(self, path: str | Path, *, seed: int, fraction: float) -> None:
        """Record the split (with how it was drawn) for audit, atomically."""
        write_json(Path(path), {"seed": seed, "fine_tune_fraction": fraction,
                                "fine_tune": list(self.fine_tune), "held_out": list(self.held_out)})


def stratified_split(labels: Mapping[str, int], fraction: float, seed: int) -> SiteSplit:
    """Seeded split with ``fraction`` of each class (rounded, at least one when a class has two or
    more cases, never all of them) in the fine-tune part; the rest is held out.

    Parameters
    ----------
    labels : case ID -> 0 / 1
    fraction : share of each class in the fine-tune part
    seed : ``client.seeds.split_seed`` of the site
    """
    rng = np.random.default_rng(seed)
    fine: list[str] = []
    held: list[str] = []
    for label in sorted(set(labels.values())):
        ids = sorted(c for c, y in labels.items() if y == label)
        rng.shuffle(ids)
        k = int(round(fraction * len(ids)))
        k = min(max(k, 1), len(ids) - 1) if len(ids) >= 2 else 0
        fine += ids[:k]
        held += ids[k:]
    return SiteSplit(fine_tune=tuple(sorted(fine)), held_out=tuple(sorted(held)))


def assign_folds(case_ids: Sequence[str], labels: Sequence[int], n_folds: int, seed: int) -> np.ndarray:
    """Fold index (0..``n_folds``-1) of each case: seeded and stratified.

    Within each class the cases are shuffled and dealt round-robin, so every fold gets
    ``n/K`` (rounded) of each class, and a class with fewer than K cases leaves some folds
    without it. Depends only on the IDs, labels and seed, not on their order.

    Parameters
    ----------
    case_ids, labels : the cases (same length)
    n_folds : K, at least 2
    seed : ``client.seeds.cross_fit_seed`` of the site
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    rng = np.random.default_rng(seed)
    folds = np.zeros(len(case_ids), np.int64)
    index = {c: i for i, c in enumerate(case_ids)}
    start = 0
    for label in sorted(set(int(y) for y in labels)):
        ids = sorted(c for c, y in zip(case_ids, labels) if int(y) == label)
        rng.shuffle(ids)
        for j, c in enumerate(ids):
            # continue the deal where the last class stopped, so small classes don't all land in fold 0
            folds[index[c]] = (start + j) % n_folds
        start = (start + len(ids)) % n_folds
    return folds
