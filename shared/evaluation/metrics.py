"""Classification and segmentation metrics, as reported by Nawabi et al.

Conventions
-----------
- ``y_true``: 1 neoplastic (positive), 0 non-neoplastic. ``p``: probability of the positive
  class. A case is predicted positive when ``p >= threshold``; this is the same rule that
  ``sklearn.metrics.roc_curve`` uses, so its thresholds are exactly the operating points.
- The operating threshold maximises sensitivity x specificity over roc_curve's candidates
  (ties: the highest threshold, i.e. the fewest positive calls). It is reported as a
  probability and as ``ln p``, the scale of the classifier's log-softmax output (the paper's
  -1.5 and -0.075).
- A metric that is undefined (AUC with one class, sensitivity with no positives, ...) is
  ``None`` and ``reasons[name]`` says why; never a silent 0 or 0.5.
- Bootstrap CIs: percentile 95 % intervals over ``n_boot`` case resamples drawn with a seeded
  ``numpy`` generator, at the fixed threshold (it is not re-optimised per resample). A resample
  on which a metric is undefined (e.g. one class only, for AUC) is skipped for that metric;
  ``ci_n[name]`` counts the resamples used.
- Dice: ``2|P∩T| / (|P|+|T|)``; 0.0 when exactly one mask is empty; ``None`` when both are
  empty (there is nothing to overlap, and scoring it 1.0 would flatter a model on lesion-free
  labels). ``dice_summary`` leaves those out and counts them as ``n_both_empty``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score, roc_curve

from shared.plumbing import rules
from shared.plumbing.errors import IchfedError

# Smallest positive float: ln(threshold) stays finite (and JSON-safe) for a threshold of 0.
_TINY = np.finfo(np.float64).tiny
CI_METRICS = ("auc", "accuracy", "sensitivity", "specificity")


@dataclasses.dataclass(frozen=True)
class Threshold:
    """The operating point maximising sensitivity x specificity.

    ``p`` is the probability threshold, ``log_p = ln(p)`` the same on the log-softmax scale.
    All fields are None (and ``reason`` says why) when ``y_true`` lacks a class.
    """

    p: float | None
    log_p: float | None
    sensitivity: float | None
    specificity: float | None
    reason: str | None = None

    def to_dict(self) -> dict:
        """Plain JSON-ready dict of every field."""
        return dataclasses.asdict(self)


def _validate(y_true: Any, p: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    s = np.asarray(p, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise IchfedError(f"y_true/p: must be 1-D, got shapes {y.shape} and {s.shape}")
    if y.shape != s.shape:
        raise IchfedError(f"y_true/p: lengths differ ({y.size} labels, {s.size} probabilities)")
    if y.size and not np.isin(y, (0, 1)).all():
        raise IchfedError(f"y_true: labels must be 0 or 1, got {sorted(set(np.unique(y).tolist()) - {0, 1})[:5]}")
    if not np.isfinite(s).all():
        raise IchfedError("p: probabilities must be finite (got NaN or inf)")
    if s.size and (s.min() < 0.0 or s.max() > 1.0):
        raise IchfedError(f"p: probabilities must lie in [0, 1], got range [{s.min():g}, {s.max():g}]")
    return y.astype(np.int64), s


def _one_class_reason(y: np.ndarray) -> str | None:
    if y.size == 0:
        return "no cases"
    if not (y == 1).any():
        return "no positive cases"
    if not (y == 0).any():
        return "no negative cases"
    return None


def best_threshold(y_true: Sequence[int], p: Sequence[float]) -> Threshold:
    """The threshold on ``p`` that maximises sensitivity x specificity (predict 1 when p >= it)."""
    y, s = _validate(y_true, p)
    reason = _one_class_reason(y)
    if reason is not None:
        return Threshold(None, None, None, None, reason=f"{reason}: a threshold needs both classes")
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    # roc_curve's first point is the "nobody positive" threshold (inf or max+1), not a score.
    keep = thresholds <= s.max()
    fpr, tpr, thresholds = fpr[keep], tpr[keep], thresholds[keep]
    product = tpr * (1.0 - fpr)
    # Ties within rounding (2/3 x 1 vs 1 x (1 - 1/3)) go to the first, i.e. highest, threshold.
    i = int(np.flatnonzero(product >= product.max() - 1e-12)[0])
    t = float(thresholds[i])
    return Threshold(
        p=t,
        log_p=math.log(max(t, _TINY)),
        sensitivity=float(tpr[i]),
        specificity=float(1.0 - fpr[i]),
    )


def midpoint_threshold(y_true: Sequence[int], p: Sequence[float]) -> Threshold:
    """The sensitivity x specificity-maximising cut, placed midway between neighbouring scores.

    :func:`best_threshold` puts the cut *on* the lowest-scoring case it calls positive; on
    scores a model was fitted to, that case is usually the weakest positive and the cut is
    far too strict on new cases. Halfway to the next lower distinct score (or to 0 below the
    lowest) classifies the given cases identically, so ``sensitivity``/``specificity`` are
    unchanged, and no observed score sits on the boundary. Use it on out-of-sample scores.
    """
    best = best_threshold(y_true, p)
    if best.p is None:
        return best
    s = np.unique(np.asarray(p, dtype=np.float64))
    below = s[s < best.p]
    lower = float(below[-1]) if below.size else 0.0
    t = (best.p + lower) / 2.0
    return dataclasses.replace(best, p=t, log_p=math.log(max(t, _TINY)))


def snap_threshold(p: float, grid: float = 0.01) -> float:
    """Round a probability threshold to a fixed grid, kept strictly inside (0, 1).

    A threshold that leaves a site is rounded so its trailing digits cannot carry an
    individual case's score.
    """
    if not 0.0 < grid < 0.5:
        raise IchfedError(f"grid: must lie in (0, 0.5), got {grid!r}")
    p = rules.probability(p, "threshold")
    steps = round(p / grid)
    n_max = int(round(1.0 / grid))
    steps = min(max(steps, 1), n_max - 1)
    return round(steps * grid, 10)


def classification_metrics(
    y_true: Sequence[int],
    p: Sequence[float],
    threshold: float | None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """AUC, accuracy, sensitivity, specificity, confusion matrix and bootstrap 95 % CIs.

    Returns a JSON-ready dict with keys ``n, n_pos, n_neg, auc, accuracy, sensitivity,
    specificity, confusion {tp, fp, tn, fn}, ci {auc: [lo, hi] | None, ...}, ci_n, threshold,
    threshold_log_p, n_boot, seed, reasons``. ``threshold`` None (no threshold could be chosen)
    leaves the threshold-dependent metrics None.
    """
    y, s = _validate(y_true, p)
    if n_boot < 0:
        raise IchfedError(f"n_boot: must be >= 0, got {n_boot}")
    if threshold is not None:
        threshold = rules.probability(threshold, "threshold")
    reasons: dict[str, str] = {}
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    out: dict[str, Any] = {
        "n": int(y.size),
        "n_pos": n_pos,
        "n_neg": n_neg,
        "threshold": None if threshold is None else float(threshold),
        "threshold_log_p": None if threshold is None else math.log(max(float(threshold), _TINY)),
        "n_boot": int(n_boot),
        "seed": int(seed),
    }

    one_class = _one_class_reason(y)
    if one_class is None:
        out["auc"] = float(roc_auc_score(y, s))
    else:
        out["auc"] = None
        reasons["auc"] = f"{one_class}: AUC needs both classes"

    if threshold is None:
        for name in ("accuracy", "sensitivity", "specificity", "confusion"):
            out[name] = None
            reasons[name] = "no threshold"
    else:
        pred = s >= threshold
        tp = int(((y == 1) & pred).sum())
        fn = int(((y == 1) & ~pred).sum())
        tn = int(((y == 0) & ~pred).sum())
        fp = int(((y == 0) & pred).sum())
        out["confusion"] = {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
        out["accuracy"] = _ratio(tp + tn, y.size, "accuracy", "no cases", reasons)
        out["sensitivity"] = _ratio(tp, tp + fn, "sensitivity", "no positive cases", reasons)
        out["specificity"] = _ratio(tn, tn + fp, "specificity", "no negative cases", reasons)

    out["ci"], out["ci_n"] = _bootstrap(y, s, threshold, n_boot, seed, reasons)
    out["reasons"] = reasons
    return out


def _ratio(num: int, den: int, name: str, why: str, reasons: dict[str, str]) -> float | None:
    if den == 0:
        reasons[name] = why
        return None
    return num / den


def _bootstrap(
    y: np.ndarray, s: np.ndarray, threshold: float | None, n_boot: int, seed: int, reasons: dict[str, str]
) -> tuple[dict[str, list[float] | None], dict[str, int]]:
    ci: dict[str, list[float] | None] = {name: None for name in CI_METRICS}
    ci_n = {name: 0 for name in CI_METRICS}
    if n_boot == 0 or y.size == 0:
        for name in CI_METRICS:
            reasons[f"ci.{name}"] = "no bootstrap requested" if n_boot == 0 else "no cases"
        return ci, ci_n
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, y.size, size=(n_boot, y.size))
    yb, sb = y[idx], s[idx]
    pos = (yb == 1).sum(axis=1)
    neg = yb.shape[1] - pos
    with np.errstate(invalid="ignore", divide="ignore"):
        values = {"auc": _auc_rows(yb, sb, pos, neg)}
        if threshold is not None:
            pred = sb >= threshold
            tp = ((yb == 1) & pred).sum(axis=1)
            tn = ((yb == 0) & ~pred).sum(axis=1)
            values["accuracy"] = (tp + tn) / yb.shape[1]
            values["sensitivity"] = np.where(pos > 0, tp / pos, np.nan)
            values["specificity"] = np.where(neg > 0, tn / neg, np.nan)
    for name in CI_METRICS:
        v = values.get(name)
        if v is None:
            reasons[f"ci.{name}"] = "no threshold"
            continue
        v = v[np.isfinite(v)]
        ci_n[name] = int(v.size)
        if v.size < 2:
            reasons[f"ci.{name}"] = f"only {v.size} of {n_boot} resamples had the metric defined"
            continue
        lo, hi = np.percentile(v, [2.5, 97.5])
        ci[name] = [float(lo), float(hi)]
    return ci, ci_n


def _auc_rows(yb: np.ndarray, sb: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUC of every bootstrap row at once via the Mann-Whitney rank sum (NaN for one class).

    With mid-ranks for ties this equals sklearn's trapezoidal ROC AUC exactly, and avoids
    calling roc_auc_score a thousand times.
    """
    ranks = rankdata(sb, axis=1)
    rank_sum_pos = np.where(yb == 1, ranks, 0.0).sum(axis=1)
    auc = (rank_sum_pos - pos * (pos + 1) / 2.0) / (pos * neg)
    return np.where((pos > 0) & (neg > 0), auc, np.nan)


def roc_points(y_true: Sequence[int], p: Sequence[float]) -> tuple[list[float], list[float]]:
    """ROC curve as ``(fpr, tpr)`` lists for plotting; empty lists when a class is missing."""
    y, s = _validate(y_true, p)
    if _one_class_reason(y) is not None:
        return [], []
    fpr, tpr, _ = roc_curve(y, s)
    return [float(v) for v in fpr], [float(v) for v in tpr]


def dice(pred: Any, truth: Any, label: int) -> float | None:
    """Dice of ``label`` between two label maps (numpy arrays or SimpleITK images).

    0.0 when exactly one of them contains the label, None when neither does.
    """
    a = _label_array(pred, "pred") == label
    b = _label_array(truth, "truth") == label
    if a.shape != b.shape:
        raise IchfedError(f"pred/truth: shapes differ ({a.shape} vs {b.shape})")
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return None
    return 2.0 * int((a & b).sum()) / total


def _label_array(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "GetPixelID"):  # a SimpleITK image; imported lazily so metrics stays light
        import SimpleITK as sitk

        return sitk.GetArrayViewFromImage(x)
    arr = np.asarray(x)
    if arr.ndim == 0:
        raise IchfedError(f"{name}: expected a label map, got a scalar")
    return arr


def dice_summary(values: Iterable[float | None]) -> dict[str, Any]:
    """Mean, sample SD (ddof=1), median, min and max of per-case Dice values.

    ``None`` entries (both masks empty) are excluded and counted in ``n_both_empty``; ``n`` is
    the number of values summarised. Undefined statistics are None with ``reasons``.
    """
    vals = list(values)
    both_empty = sum(v is None for v in vals)
    arr = np.array([v for v in vals if v is not None], dtype=np.float64)
    out: dict[str, Any] = {"n": int(arr.size), "n_both_empty": both_empty}
    reasons: dict[str, str] = {}
    if arr.size == 0:
        for k in ("mean", "sd", "median", "min", "max"):
            out[k] = None
            reasons[k] = "no cases with the label in either mask"
    else:
        out.update(
            mean=float(arr.mean()),
            median=float(np.median(arr)),
            min=float(arr.min()),
            max=float(arr.max()),
            sd=float(arr.std(ddof=1)) if arr.size >= 2 else None,
        )
        if arr.size < 2:
            reasons["sd"] = "needs at least 2 cases"
    out["reasons"] = reasons
    return out


def segmentation_summary(
    pairs: Iterable[tuple[Any, Any]], labels: Mapping[str, int] | None = None
) -> dict[str, dict[str, Any]]:
    """Dice summaries per label over ``(pred, truth)`` pairs; default labels ICH=1, PHE=2."""
    labels = dict(labels or {"ich": 1, "phe": 2})
    per_label: dict[str, list[float | None]] = {name: [] for name in labels}
    for pred, truth in pairs:
        for name, value in labels.items():
            per_label[name].append(dice(pred, truth, value))
    return {name: dice_summary(v) for name, v in per_label.items()}


_TABLE_COLUMNS = (("auc", "AUC"), ("accuracy", "Accuracy"), ("sensitivity", "Sensitivity"), ("specificity", "Specificity"))


def paper_table(rows: Iterable[Mapping[str, Any] | tuple[str, Mapping[str, Any]]]) -> str:
    """A Markdown table shaped like the paper's Table 2.

    Each row is ``(name, metrics)`` or a mapping with a ``name`` key plus the keys of
    :func:`classification_metrics`. Cells read ``0.85 (0.71–0.96)``; ``n/a`` where undefined.
    """
    lines = [
        "| Cohort | n | " + " | ".join(title for _, title in _TABLE_COLUMNS) + " |",
        "|---|---:|" + "---:|" * len(_TABLE_COLUMNS),
    ]
    for row in rows:
        if isinstance(row, tuple):
            name, m = row
        else:
            name, m = row.get("name", ""), row
        ci = m.get("ci") or {}
        cells = [_cell(m.get(key), ci.get(key)) for key, _ in _TABLE_COLUMNS]
        n = m.get("n")
        lines.append(f"| {name} | {'' if n is None else n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: float | None, ci: Sequence[float] | None) -> str:
    if value is None:
        return "n/a"
    if ci is None:
        return f"{value:.2f}"
    return f"{value:.2f} ({ci[0]:.2f}–{ci[1]:.2f})"
