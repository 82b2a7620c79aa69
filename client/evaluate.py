"""Aggregate metrics of one arm on a site's held-out cases, as ``"<model>.<metric>"`` keys.

Everything returned is an aggregate the privacy allow-list (``client/privacy.py``) accepts:
counts, AUC with its DeLong variance, accuracy / sensitivity / specificity at the threshold,
the confusion counts (plus an intention-to-treat confusion in which cases with no segmented
lesion are predicted non-neoplastic), a ROC curve sampled at fixed FPRs, per-class score
histograms on fixed bins, paired DeLong AUC differences between arms on the same cases, and how
many held-out cases carry each segmentation quality flag (``shared.imaging.quality``).
Metrics that would describe fewer than ``min_cases`` cases are withheld with a reason code:

* fewer than ``min_cases`` held-out cases with a score: everything but ``withheld`` (``n`` too);
* a class with 1..``min_cases``-1 cases (e.g. 2 positives): its size (``n-pos`` and ``n-neg``, as one
  gives the other) and everything computed within the classes: AUC and its variance, accuracy,
  sensitivity, specificity, the confusion and intention-to-treat counts, the ROC, the score
  histograms and the paired AUC differences (with 2 positives they described those 2 patients);
* every count that leaves the site is 0 or at least ``min_cases`` (``n-no-lesion``, each quality
  flag count, ``n-flagged``; the site counts in ``client.features.SiteFeatures.counts``); the
  intention-to-treat counts go with ``n-no-lesion``, which they would give back;
* a mean Dice over fewer than ``min_cases`` cases with a reference mask.

Confusion counts inside classes that both meet the floor are sent as they are: they are
cross-classifications of those classes, like the bins of the score histograms (from which they
could be read back at a threshold on the histogram's bin edges), and withholding them only where
they are small would bias the pooled sensitivity toward the sites where the model errs most.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from shared.federation import protocol as P

GATED = ("auc", "auc-var", "accuracy", "sensitivity", "specificity", "threshold", "tp", "fp", "tn", "fn",
         "itt-tp", "itt-fp", "itt-tn", "itt-fn", P.ROC_TPR, P.HIST_NEG, P.HIST_POS, "dice-ich", "dice-phe",
         *P.QUALITY_METRICS)
#: everything computed within the two classes: withheld when either class has 1..min_cases-1 cases
WITHIN_CLASSES = ("n-pos", "n-neg", "auc", "auc-var", "accuracy", "sensitivity", "specificity", "tp", "fp", "tn",
                  "fn", "itt-tp", "itt-fp", "itt-tn", "itt-fn", P.ROC_TPR, P.HIST_NEG, P.HIST_POS)
ITT = ("itt-tp", "itt-fp", "itt-tn", "itt-fn")


def small_class(y: np.ndarray, min_cases: int) -> bool:
    """True when a class has 1..min_cases-1 cases: anything computed within it describes those few patients."""
    return any(0 < int((y == c).sum()) < min_cases for c in (0, 1))


def arm_metrics(model: str, part, p: np.ndarray, threshold: float, *, min_cases: int, seed: int = 0,
                threshold_reason: str | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Metrics of scores ``p`` at ``threshold`` on ``part`` (a ``client.features.Part``), floored as the module doc says."""
    from client.privacy import floor_counts

    k = lambda m: P.metric_key(model, m)  # noqa: E731
    y = np.asarray(part.labels, np.int64)
    metrics: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    if part.n < min_cases:
        metrics[k("withheld")] = 1
        reasons.update({k(m): P.REASON_TOO_FEW if part.n else P.REASON_NO_CASES for m in (*GATED, *WITHIN_CLASSES)})
        floor_counts({k("n"): part.n, k("n-no-lesion"): part.n_no_lesion}, min_cases, metrics, reasons)
        return metrics, reasons
    metrics[k("withheld")] = 0
    counts = {k("n"): part.n, k("n-no-lesion"): part.n_no_lesion, k(P.N_FLAGGED): int(getattr(part, "n_flagged", 0))}
    counts.update({k(f"flag-{name}"): int(n) for name, n in getattr(part, "flag_counts", {}).items()})
    floor_counts(counts, min_cases, metrics, reasons)
    metrics[k("threshold")] = float(threshold)
    if threshold_reason:
        reasons[k("threshold")] = threshold_reason
    _dice(model, part, min_cases, metrics, reasons)
    if small_class(y, min_cases):
        reasons.update({k(m): P.REASON_TOO_FEW for m in WITHIN_CLASSES})
        return metrics, reasons
    metrics.update({k("n-pos"): int((y == 1).sum()), k("n-neg"): int((y == 0).sum())})
    _within_classes(model, part, y, p, threshold, min_cases, seed, metrics, reasons)
    if k("n-no-lesion") not in metrics:  # the intention-to-treat counts would give n-no-lesion back
        for m in ITT:
            metrics.pop(k(m), None)
            reasons[k(m)] = P.REASON_TOO_FEW
    return metrics, reasons


def _within_classes(model: str, part, y: np.ndarray, p: np.ndarray, threshold: float, min_cases: int, seed: int,
                    metrics: dict, reasons: dict) -> None:
    """AUC, rates, confusion and intention-to-treat counts, ROC and histograms (both classes meet the floor)."""
    from shared.evaluation.metrics import classification_metrics

    k = lambda m: P.metric_key(model, m)  # noqa: E731
    cm = classification_metrics(y, p, threshold, n_boot=0, seed=seed)
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


def _dice(model: str, part, min_cases: int, metrics: dict, reasons: dict) -> None:
    """Mean Dice per label, over at least ``min_cases`` cases with a reference mask (else one case's Dice shows)."""
    for m, values in (("dice-ich", part.dice_ich), ("dice-phe", part.dice_phe)):
        key = P.metric_key(model, m)
        if len(values) >= min_cases:
            metrics[key] = float(np.mean(values))
        elif values:
            reasons[key] = P.REASON_TOO_FEW
        else:
            reasons[key] = P.REASON_NO_MASKS if not part.has_masks else P.REASON_NO_LESION


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
        if len(y) < min_cases or small_class(y, min_cases):
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


def segmenter_arm_metrics(model: str, part, p: np.ndarray, threshold: float, *, min_cases: int,
                          seed: int = 0) -> tuple[dict[str, Any], dict[str, str]]:
    """A segmenter arm (``protocol.SEGMENTER_ARMS``) on ``part``, the held-out cases segmented by it:
    ``arm_metrics`` with the bundle's head (the end-to-end AUC this segmenter gives, no-lesion and flag
    counts), and over the masked cases (``part.seg_scores``, lesion found or not) their number, mean Dice,
    the mean number of ICH components and the share whose largest ICH component lies on the lesion, each
    over at least ``min_cases`` masked cases.
    """
    from client.privacy import floor_counts

    metrics, reasons = arm_metrics(model, part, p, threshold, min_cases=min_cases, seed=seed)
    # Dice is over the masked cases, lesion found or not: a segmenter that finds too few lesions for the
    # head's metrics still has its Dice reported
    for m in ("dice-ich", "dice-phe"):
        reasons.pop(P.metric_key(model, m), None)
    metrics.pop(P.metric_key(model, "threshold"), None)  # the bundle's own, which the server holds
    _dice(model, part, min_cases, metrics, reasons)
    scores = list(getattr(part, "seg_scores", {}).values())
    floor_counts({P.metric_key(model, "n-masked"): len(scores)}, min_cases, metrics, reasons)
    for m, values in (("ich-components", [s.ich_components for s in scores]),
                      ("largest-on-lesion", [bool(s.largest_on_lesion) for s in scores])):
        key = P.metric_key(model, m)
        if len(values) >= min_cases:
            metrics[key] = float(np.mean(values))
        else:
            reasons[key] = P.REASON_TOO_FEW if values else P.REASON_NO_MASKS
    return metrics, reasons
