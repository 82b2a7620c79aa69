"""Cross-fitted federation at a site: K fold heads beside the main head, and out-of-fold scores.

The server's HEAD record (``shared.models.head.HeadSet``) holds the main head and K fold heads. A site
trains the main head on all its fine-tune cases and fold head k on its fine-tune cases outside
its own fold k (seeded, stratified: ``client.split.assign_folds``). FedAvg averages every key, so
the aggregated fold head k never saw any site's fold-k cases, and scoring each fine-tune case
with its own fold's aggregated head gives out-of-fold scores of the *federated* model: the
federated arm's threshold and calibration are chosen on them (``client.calibrate``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from shared.models.head import Head, HeadSet

from .split import assign_folds

TrainFn = Callable[[Head, np.ndarray, np.ndarray, int], tuple[Head, float]]
"""``train(start, features, labels, fold) -> (head, loss)``; ``fold`` is -1 for the main head."""


def case_folds(part, n_folds: int, seed: int) -> np.ndarray:
    """The cross-fit fold of each feature row of ``part`` (by case ID and label; ``client.split.assign_folds``)."""
    ids = part.case_ids if part.case_ids else tuple(f"row-{i:06d}" for i in range(part.n))
    return assign_folds(ids, part.labels, n_folds, seed)


def train_head_set(heads: HeadSet, part, folds: np.ndarray, train: TrainFn) -> tuple[HeadSet, float]:
    """Train the main head on every row of ``part`` and fold head k on the rows with ``folds != k``.

    Returns the trained heads and the main head's training loss.
    """
    main, loss = train(heads.main, part.features, part.labels, -1)
    trained = []
    for k, start in enumerate(heads.folds):
        keep = folds != k  # fold head k never sees this site's fold-k cases
        trained.append(train(start, part.features[keep], part.labels[keep], k)[0])
    return HeadSet(main=main, folds=tuple(trained)), loss


def cross_fit_scores(heads: HeadSet, part, folds: np.ndarray, device: str = "cpu") -> np.ndarray:
    """p(neoplastic) of each row of ``part`` from the fold head of its own fold (that never trained on it)."""
    scores = np.zeros(part.n, np.float64)
    for k, head in enumerate(heads.folds):
        rows = folds == k
        if rows.any():
            scores[rows] = head.p_neoplastic(part.features[rows], device)
    return scores
