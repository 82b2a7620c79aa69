"""Probability calibration of the classifier's p(neoplastic), and reliability summaries.

The head's softmax output is a score, not a validated probability: a head fitted on a dozen
cases is over-confident. :class:`Calibration` is Platt scaling on ``logit(p)`` (a two-parameter
logistic regression fitted with scikit-learn), using Platt's (1999) smoothed targets
``(n+ + 1)/(n+ + 2)`` and ``1/(n- + 2)`` so that perfectly separated scores still give a finite,
moderate slope instead of a step function. It is fitted on out-of-sample scores only:
validation in bootstrap, out-of-fold fine-tune scores at a site.

:func:`reliability_from_histograms` turns per-class score counts (what a site may send) into
a reliability diagram, and :func:`operating_point_summary` states what the data support at a
threshold (PPV/NPV), which is what a reader can honestly show next to a prediction.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.special import expit
from sklearn.linear_model import LogisticRegression

from shared.plumbing import rules
from shared.plumbing.errors import IchfedError

KINDS = ("platt", "identity")
# logit(0) and logit(1) are infinite; clip so a saturated softmax still maps to a finite value.
_EPS = 1e-6
# Platt scaling has two parameters; fewer cases per class than this and it is noise.
MIN_PER_CLASS = 2


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, _EPS, 1.0 - _EPS)
    return np.log(q) - np.log1p(-q)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """``p_cal = sigmoid(slope * logit(p) + intercept)``; kind "identity" leaves p unchanged.

    ``validation`` optionally holds what the fitting data support at the operating threshold
    (:func:`operating_point_summary`: PPV, NPV and the counts), for a reader to quote.
    """

    kind: str = "identity"
    slope: float = 1.0
    intercept: float = 0.0
    n_pos: int = 0
    n_neg: int = 0
    reason: str | None = None
    validation: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise IchfedError(f"calibration.kind: must be one of {KINDS}, got {self.kind!r}")
        # The rules (shared.plumbing.rules): positive, bounded slope; bounded intercept.
        rules.calibration_slope(self.slope, "calibration.slope")
        rules.calibration_intercept(self.intercept, "calibration.intercept")

    @classmethod
    def fit(cls, y_true: Sequence[int], p: Sequence[float]) -> "Calibration":
        """Platt-scale ``p`` against ``y_true``; identity (with ``reason``) when a class is too small."""
        y = np.asarray(y_true, dtype=np.int64)
        s = np.asarray(p, dtype=np.float64)
        if y.shape != s.shape or y.ndim != 1:
            raise IchfedError(f"y_true/p: need 1-D arrays of equal length, got {y.shape} and {s.shape}")
        if y.size and not np.isin(y, (0, 1)).all():
            raise IchfedError("y_true: labels must be 0 or 1")
        if not np.isfinite(s).all() or (s.size and (s.min() < 0 or s.max() > 1)):
            raise IchfedError("p: probabilities must be finite and lie in [0, 1]")
        n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
        if min(n_pos, n_neg) < MIN_PER_CLASS:
            return cls(n_pos=n_pos, n_neg=n_neg, reason=f"needs {MIN_PER_CLASS} cases of each class")
        t_pos, t_neg = (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0)
        target = np.where(y == 1, t_pos, t_neg)
        # Soft targets as two weighted copies of every case (label 1 with weight t, 0 with 1 - t).
        x = np.tile(_logit(s), 2)[:, None]
        labels = np.r_[np.ones(y.size), np.zeros(y.size)]
        weights = np.r_[target, 1.0 - target]
        model = LogisticRegression(C=np.inf, solver="lbfgs", max_iter=1000)  # unpenalised
        model.fit(x, labels, sample_weight=weights)
        slope, intercept = float(model.coef_[0, 0]), float(model.intercept_[0])
        try:
            return cls("platt", slope, intercept, n_pos, n_neg)
        except IchfedError as e:
            # Scores that rank the classes the wrong way round (slope <= 0) or that a step would
            # separate (slope > the bound) are not calibrated by a logistic curve: p stays as it is.
            return cls(n_pos=n_pos, n_neg=n_neg, reason=f"Platt fit refused: {e}")

    def __call__(self, p: Any) -> np.ndarray:
        """Calibrated probabilities for ``p`` (array-like or scalar; returns an array)."""
        s = np.asarray(p, dtype=np.float64)
        if self.kind == "identity":
            return s.copy()
        return expit(self.slope * _logit(s) + self.intercept)

    def to_dict(self) -> dict:
        """JSON-ready dict, the bundle manifest's ``calibration`` entry."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "Calibration":
        """Inverse of :meth:`to_dict`; None or {} (an older bundle) is the identity."""
        if not d:
            return cls(reason="no calibration stored")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise IchfedError(f"calibration: unknown fields {sorted(unknown)}")
        try:
            return cls(
                kind=str(d.get("kind", "identity")),
                # Numbers as stored: a string "0.5" is as malformed as a slope of -50.
                slope=rules.calibration_slope(d.get("slope", 1.0), "calibration.slope"),
                intercept=rules.calibration_intercept(d.get("intercept", 0.0), "calibration.intercept"),
                n_pos=int(d.get("n_pos", 0)),
                n_neg=int(d.get("n_neg", 0)),
                reason=None if d.get("reason") is None else str(d["reason"]),
                validation=None if d.get("validation") is None else dict(d["validation"]),
            )
        except (TypeError, ValueError) as exc:
            raise IchfedError(f"calibration: malformed entry ({exc})") from None


def reliability_from_histograms(
    neg: Sequence[int], pos: Sequence[int], calibration: Calibration | None = None
) -> list[tuple[float, float, int]]:
    """``(mean predicted p, observed fraction positive, n)`` per non-empty score bin.

    ``neg``/``pos`` are per-class counts in equal bins of [0, 1] (as sites send them). The
    predicted p of a bin is its midpoint, passed through ``calibration`` when given.
    """
    if len(neg) != len(pos) or not len(neg):
        raise IchfedError(f"histograms: need two non-empty lists of equal length, got {len(neg)} and {len(pos)}")
    bins = len(neg)
    mids = (np.arange(bins) + 0.5) / bins
    if calibration is not None:
        mids = calibration(mids)
    out = []
    for mid, n0, n1 in zip(mids, neg, pos):
        n = int(n0) + int(n1)
        if n > 0:
            out.append((float(mid), int(n1) / n, n))
    return out


def reliability_points(y_true: Sequence[int], p: Sequence[float], bins: int = 10) -> list[tuple[float, float, int]]:
    """``(mean predicted p, observed fraction positive, n)`` per non-empty equal-width bin.

    For data held locally (bootstrap); the predicted value is the bins' mean score, which
    is what :func:`sklearn.calibration.calibration_curve` uses, plus the count it omits.
    """
    y = np.asarray(y_true, dtype=np.int64)
    s = np.asarray(p, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise IchfedError(f"y_true/p: need 1-D arrays of equal length, got {y.shape} and {s.shape}")
    idx = np.minimum((s * bins).astype(np.int64), bins - 1)
    out = []
    for b in range(bins):
        sel = idx == b
        if sel.any():
            out.append((float(s[sel].mean()), float(y[sel].mean()), int(sel.sum())))
    return out


def calibration_error(points: Sequence[tuple[float, float, int]]) -> float | None:
    """Expected calibration error: case-weighted mean of |observed - predicted| over bins."""
    n = sum(c for _, _, c in points)
    if n == 0:
        return None
    return float(sum(c * abs(obs - pred) for pred, obs, c in points) / n)


def operating_point_summary(neg: Sequence[int], pos: Sequence[int], threshold: float) -> dict[str, Any]:
    """PPV and NPV at ``threshold`` from binned scores (bins whose lower edge is >= it count positive).

    This is what the reader may state next to a call ("on validation, PPV x% / NPV y%"),
    instead of an uncalibrated distance from the threshold.
    """
    if len(neg) != len(pos) or not len(neg):
        raise IchfedError("histograms: need two non-empty lists of equal length")
    bins = len(neg)
    first = int(math.ceil(threshold * bins - 1e-9))
    tp, fp = int(sum(pos[first:])), int(sum(neg[first:]))
    fn, tn = int(sum(pos[:first])), int(sum(neg[:first]))
    return {
        "threshold": float(first / bins),
        "ppv": tp / (tp + fp) if tp + fp else None,
        "npv": tn / (tn + fn) if tn + fn else None,
        "n_called_positive": tp + fp,
        "n_called_negative": tn + fn,
    }
