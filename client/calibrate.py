"""A site's threshold and probability calibration, chosen on scores the head did not train on.

A head with 1,026 parameters separates a dozen fine-tune cases perfectly, so a threshold chosen
on the scores of the cases it trained on lands on the lowest-scoring positive and is far too
strict on new cases. Here the scores come from k-fold training inside the fine-tune split
(5-fold, or leave-one-out below ``LOO_BELOW`` cases): each case is scored by a head that never
saw it. The threshold is the sensitivity x specificity-maximising cut placed at the midpoint
between neighbouring scores (``shared.evaluation.metrics.midpoint_threshold``), then rounded to the fixed
grid ``protocol.THRESHOLD_GRID`` and kept off every observed score, so the value that leaves the
site is not any case's score. The site's probability calibration is re-fitted on the same
out-of-fold scores. Everything here stays at the site.

These site-local folds serve the heads a site trains alone (the local-only arm). The federated
head's out-of-fold scores come from the cross-fit fold heads of the federation itself
(``client.cross_fit``), which no site trained on the scored cases.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import numpy as np

from shared.federation import protocol as P
from shared.models.head import Head

from .seeds import out_of_fold_seed

log = logging.getLogger(__name__)

LOO_BELOW = 10  # fewer fine-tune cases than this: leave-one-out instead of 5-fold
FOLDS = 5

TrainFn = Callable[[Head, np.ndarray, np.ndarray, int], Head]
"""``train(start, features, labels, seed) -> head``: how the site trains one head."""


@dataclasses.dataclass(frozen=True)
class SiteThreshold:
    """The site's threshold for one head; ``reason`` is set when it fell back to the bundle's."""

    p: float
    reason: str | None = None
    calibration: dict[str, Any] | None = None  # ``shared.evaluation.calibration.Calibration.to_dict()``


def out_of_fold_scores(start: Head, features: np.ndarray, labels: np.ndarray, train: TrainFn, *,
                       seed: int) -> np.ndarray:
    """p(neoplastic) of every fine-tune case from a head trained from ``start`` on the other folds.

    Stratified 5-fold (scikit-learn), or leave-one-out below ``LOO_BELOW`` cases. A case whose
    fold left its training part with no cases keeps the score of ``start``.

    Parameters
    ----------
    start : the head every fold starts from
    features, labels : the fine-tune split
    train : ``train(start, x, y, seed) -> head``, the site's training of one head
    seed : the folds' seed; fold k trains with ``client.seeds.out_of_fold_seed(seed, k)``
    """
    from sklearn.model_selection import KFold, LeaveOneOut, StratifiedKFold

    y = np.asarray(labels, np.int64)
    x = np.asarray(features, np.float32)
    n = len(y)
    oof = start.p_neoplastic(x) if n else np.zeros(0)
    if n < 2:
        return oof
    counts = np.bincount(y, minlength=2)
    if n < LOO_BELOW:
        splitter = LeaveOneOut()
    elif counts.min() >= 2:
        splitter = StratifiedKFold(n_splits=min(FOLDS, int(counts.min())), shuffle=True, random_state=seed)
    else:
        splitter = KFold(n_splits=FOLDS, shuffle=True, random_state=seed)
    for k, (train_idx, test_idx) in enumerate(splitter.split(x, y)):
        head = train(start, x[train_idx], y[train_idx], out_of_fold_seed(seed, k))
        oof[test_idx] = head.p_neoplastic(x[test_idx])
    return oof


def site_threshold(labels: np.ndarray, scores: np.ndarray, fallback: float) -> SiteThreshold:
    """Threshold (midpoint rule, on the grid, off every score) and calibration from out-of-sample scores.

    Falls back to the bundle's threshold (rounded to the grid, reason ``threshold-from-bundle``)
    when ``labels`` lack a class.
    """
    from shared.evaluation.metrics import midpoint_threshold

    y = np.asarray(labels, np.int64)
    s = np.asarray(scores, np.float64)
    t = midpoint_threshold(y, s) if len(y) else None
    if t is None or t.p is None:
        return SiteThreshold(p=on_grid(float(fallback), s), reason=P.REASON_THRESHOLD_FROM_BUNDLE)
    return SiteThreshold(p=on_grid(float(t.p), s), calibration=fit_calibration(y, s))


def on_grid(p: float, scores: np.ndarray) -> float:
    """``p`` rounded to ``THRESHOLD_GRID`` inside (0, 1), moved one grid step up while it equals a score."""
    from shared.evaluation.metrics import snap_threshold

    q = snap_threshold(p, P.THRESHOLD_GRID)
    observed = set(np.asarray(scores, np.float64).tolist())
    while q in observed and q + P.THRESHOLD_GRID < 1.0:
        q = round(q + P.THRESHOLD_GRID, 10)
    return float(q)


def fit_calibration(labels: np.ndarray, scores: np.ndarray) -> dict[str, Any] | None:
    """The site's Platt calibration re-fitted on out-of-fold scores, as a dict; None when it cannot be fitted."""
    try:
        from shared.evaluation.calibration import Calibration
    except ImportError:  # calibration is optional: the threshold stands without it
        return None
    try:
        return Calibration.fit(np.asarray(labels), np.asarray(scores)).to_dict()
    except Exception as e:  # e.g. one class: the site keeps the bundle's calibration
        log.info("site calibration not re-fitted: %s", e)
        return None
