"""Aggregate metrics of one arm on a site's held-out cases, as ``"<model>.<metric>"`` keys.

Everything returned is an aggregate the privacy allow-list (``client/privacy.py``) accepts:
counts, AUC with its DeLong variance, accuracy / sensitivity / specificity at the threshold,
the confusion counts (plus an intention-to-treat confusion in which cases with no segmented
lesion are predicted non-neoplastic), a ROC curve sampled at fixed FPRs, per-class score
histograms on fixed bins, paired DeLong AUC differences between arms on the same cases, and how
many held-out cases carry each segmentation quality flag (``shared.imaging.quality``).
Metrics that would describe fewer than ``min_cases`` cases are withheld with a reason code.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from shared.federation import protocol as P

GATED = ("auc", "auc-var", "accuracy", "sensitivity", "specificity", "threshold", "tp", "fp", "tn", "fn",
         "itt-tp", "itt-fp", "itt-tn", "itt-fn", P.ROC_TPR, P.HIST_NEG, P.HIST_POS, "dice-ich", "dice-phe",
         *P.QUALITY_METRICS)


def arm_metrics(model: str, part, p: np.ndarray, threshold: float, *, min_cases: int, seed: int = 0,
                threshold_reason: str | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Metrics of scores ``p`` at ``threshold`` on ``part`` (a ``client.features.Part``)."""
    from shared.evaluation.metrics import classification_metrics

    k = lambda m: P.metric_key(model, m)  # noqa: E731
    y = np.asarray(part.labels, np.int64)
    metrics: dict[str, Any] = {k("n"): part.n, k("n-pos"): int((y == 1).sum()), k("n-neg"): int((y == 0).sum()),
                               k("n-no-lesion"): part.n_no_lesion}
    reasons: dict[str, str] = {}
    if part.n < min_cases:
        metrics[k("withheld")] = 1
        reasons.update({k(m): P.REASON_TOO_FEW if part.n else P.REASON_NO_CASES for m in GATED})
        return metrics, reasons
    metrics[k("withheld")] = 0
    metrics[k(P.N_FLAGGED)] = int(getattr(part, "n_flagged", 0))
    metrics.update({k(f"flag-{name}"): int(n) for name, n in getattr(part, "flag_counts", {}).items()})
    cm = classification_metrics(y, p, threshold, n_boot=0, seed=seed)
    metrics[k("threshold")] = float(threshold)
    if threshold_reason:
        reasons[k("threshold")] = threshold_reason
    for m in ("auc", "accuracy", "sensitivity", "specificity"):
        metrics[k(m)] = cm[m]
        if cm[m] is None:
            reasons[k(m)] = P.REASON_ONE_CLASS
    conf = cm["confusion"]
    for m in ("tp", "fp", "tn", "fn"):
        metrics[k(m)] = conf[m]
    # Intention to treat: a case the segmenter found no lesion in gets no score and is, in
    # practice, not called neoplastic.
    no_pos = int(getattr(part, "n_no_lesion_pos", 0))
    metrics.update({k("itt-tp"): conf["tp"], k("itt-fp"): conf["fp"],
                    k("itt-tn"): conf["tn"] + part.n_no_lesion - no_pos, k("itt-fn"): conf["fn"] + no_pos})
    _auc_var(model, y, p, metrics, reasons)
    _roc(model, y, p, metrics, reasons)
    _histograms(model, y, p, min_cases, metrics, reasons)
    for m, values in (("dice-ich", part.dice_ich), ("dice-phe", part.dice_phe)):
        if values:
            metrics[k(m)] = float(np.mean(values))
        else:
            reasons[k(m)] = P.REASON_NO_MASKS if not part.has_masks else P.REASON_NO_LESION
    return metrics, reasons


def paired_metrics(model: str, labels: np.ndarray, p: np.ndarray, others: Mapping[str, np.ndarray], *,
                   min_cases: int) -> tuple[dict[str, Any], dict[str, str]]:
    """``<model>.auc-minus-<other>`` and its DeLong variance (correlated ROC curves, same cases) per other arm.

    ``others`` maps ``"reference"`` / ``"local"`` to that arm's scores on the same cases.
    """
    from shared.evaluation.rocstats import delong_paired

    y = np.asarray(labels, np.int64)
    metrics: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    for other, q in others.items():
        key = P.metric_key(model, f"auc-minus-{other}")
        if len(y) < min_cases:
            reasons[key] = reasons[key + "-var"] = P.REASON_TOO_FEW if len(y) else P.REASON_NO_CASES
        elif _delong_undefined(y):
            reasons[key] = reasons[key + "-var"] = _delong_undefined(y)
        else:
            d = delong_paired(y, p, q)
            metrics[key], metrics[key + "-var"] = float(d.estimate), float(d.variance)
    return metrics, reasons


def _auc_var(model: str, y: np.ndarray, p: np.ndarray, metrics: dict, reasons: dict) -> None:
    from shared.evaluation.rocstats import delong_auc

    key = P.metric_key(model, "auc-var")
    why = _delong_undefined(y)
    if why:
        reasons[key] = why
    else:
        metrics[key] = float(delong_auc(y, p).variance)


def _delong_undefined(y: np.ndarray) -> str | None:
    """Why DeLong's variance cannot be computed on these labels (it needs two cases of each class), or None."""
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if min(n_pos, n_neg) == 0:
        return P.REASON_ONE_CLASS
    return P.REASON_TOO_FEW if min(n_pos, n_neg) < 2 else None


def _roc(model: str, y: np.ndarray, p: np.ndarray, metrics: dict, reasons: dict) -> None:
    from shared.evaluation.metrics import roc_points

    fpr, tpr = roc_points(y, p)
    key = P.metric_key(model, P.ROC_TPR)
    if fpr:
        # the best sensitivity reachable at each fixed false-positive rate (a step ROC curve)
        f, t = np.asarray(fpr), np.asarray(tpr)
        metrics[key] = [float(t[f <= x + 1e-12].max()) for x in P.ROC_FPR_GRID]
    else:
        reasons[key] = P.REASON_ONE_CLASS


def _histograms(model: str, y: np.ndarray, p: np.ndarray, min_cases: int, metrics: dict, reasons: dict) -> None:
    """Per-class score counts on SCORE_BINS fixed bins, only when every class has ``min_cases`` cases:
    a class of one or two cases would show where those patients' scores lie."""
    from shared.evaluation.rocstats import score_histogram

    keys = (P.metric_key(model, P.HIST_NEG), P.metric_key(model, P.HIST_POS))
    if min(int((y == 0).sum()), int((y == 1).sum())) < min_cases:
        for key in keys:
            reasons[key] = P.REASON_TOO_FEW
        return
    neg, pos = score_histogram(y, p, bins=P.SCORE_BINS)
    metrics[keys[0]], metrics[keys[1]] = [int(v) for v in neg], [int(v) for v in pos]
