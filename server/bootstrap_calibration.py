"""Reference threshold and probability calibration for bootstrap, both from validation scores.

The validation split is the only data the reference head did not train on before the test
split, so the threshold and the Platt calibration are fitted there (the same out-of-sample
rule a site uses on out-of-fold scores): the sensitivity x specificity cut placed midway
between neighbouring validation scores, and Platt scaling of p(neoplastic). The test split
then shows how well both transfer: a reliability diagram (raw and calibrated) and the PPV /
NPV a reader may quote at the threshold.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from server.report_arms import plot_reliability
from shared.evaluation.calibration import (
    Calibration,
    calibration_error,
    reliability_points,
)
from shared.evaluation.metrics import (
    Threshold,
    classification_metrics,
    midpoint_threshold,
)

log = logging.getLogger(__name__)

# Ten bins: with tens of test cases, finer bins hold one or two cases each and show only noise.
RELIABILITY_BINS = 10
# Below this many test cases the bootstrap report shows no figure, only "too few cases (n = k)"
# (an AUC's 95 % CI on ten cases already spans about half of [0, 1]).
MIN_REPORT_CASES = 10


def reference_threshold(y_val: Sequence[int], p_val: Sequence[float], fallback: Threshold) -> Threshold:
    """The midpoint sensitivity x specificity cut on validation scores (``fallback`` if undefined)."""
    t = midpoint_threshold(y_val, p_val)
    if t.p is None:
        log.warning("validation threshold undefined (%s); keeping the classifier's", t.reason)
        return fallback
    # The training log's "threshold p=..." is this cut placed *on* the lowest validation score it
    # calls neoplastic (best_threshold); the bundle's sits midway to the next lower score. Both
    # classify the validation cases alike; the numbers differ (0.6071 vs 0.5810 in issue 22).
    log.info("bundle threshold p=%.4f: the sensitivity x specificity cut midway between neighbouring validation "
             "scores (the classifier's log line p=%.4f is the same cut on the observed score)", t.p,
             fallback.p if fallback.p is not None else float("nan"))
    return t


def calibrate_reference(
    y_val: Sequence[int], p_val: Sequence[float], y_test: Sequence[int], p_test: Sequence[float],
    threshold: float, png_path: Path,
) -> tuple[Calibration, dict[str, Any]]:
    """Fit Platt scaling on validation; reliability on test (PNG at ``png_path`` + table data) and
    the PPV/NPV at ``threshold`` on validation."""
    operating_point = _operating_point(y_val, p_val, threshold)
    cal = dataclasses.replace(Calibration.fit(y_val, p_val), validation=operating_point)
    y_t = np.asarray(y_test, dtype=np.int64)
    p_t = np.asarray(p_test, dtype=np.float64)
    out: dict[str, Any] = {"calibration": cal.to_dict(), "bins": RELIABILITY_BINS,
                           "validation_operating_point": operating_point}
    if y_t.size == 0:
        out["reliability"] = None
        return cal, out
    raw = reliability_points(y_t, p_t, bins=RELIABILITY_BINS)
    calibrated = reliability_points(y_t, cal(p_t), bins=RELIABILITY_BINS)
    out["reliability"] = {"raw": [list(r) for r in raw], "calibrated": [list(r) for r in calibrated],
                          "ece_raw": calibration_error(raw), "ece_calibrated": calibration_error(calibrated)}
    png_path.parent.mkdir(parents=True, exist_ok=True)
    if plot_reliability({"raw p": raw, f"{cal.kind}-calibrated p": calibrated}, png_path,
                        "Reliability on the test split"):
        out["png"] = str(png_path)
    return cal, out


def _operating_point(y: Sequence[int], p: Sequence[float], threshold: float) -> dict[str, Any]:
    """PPV / NPV at ``threshold`` on the (local) validation scores, exactly."""
    conf = classification_metrics(y, p, threshold, n_boot=0)["confusion"]
    tp, fp, tn, fn = conf["tp"], conf["fp"], conf["tn"], conf["fn"]
    return {"threshold": float(threshold), "ppv": tp / (tp + fp) if tp + fp else None,
            "npv": tn / (tn + fn) if tn + fn else None, "n_called_positive": tp + fp, "n_called_negative": tn + fn}


def render_calibration(section: dict[str, Any] | None) -> list[str]:
    """Markdown lines for the bootstrap report (empty for a report without the section)."""
    if not section:
        return []
    cal = section.get("calibration") or {}
    op = section.get("validation_operating_point") or {}
    lines = ["", "## Calibration (fitted on validation)", "",
             f"- kind: {cal.get('kind')}; slope {cal.get('slope', 1.0):.3f}, intercept {cal.get('intercept', 0.0):.3f}"
             + (f" ({cal['reason']})" if cal.get("reason") else ""),
             f"- on validation at the threshold: PPV {_pct(op.get('ppv'))}, NPV {_pct(op.get('npv'))} "
             f"({op.get('n_called_positive', 0)} called neoplastic, {op.get('n_called_negative', 0)} non-neoplastic)"]
    rel = section.get("reliability")
    if not rel:
        return lines + ["- reliability: n/a (no test cases)"]
    n_test = sum(int(r[2]) for r in rel.get("raw") or [])
    if n_test < MIN_REPORT_CASES:
        return lines + [f"- reliability and calibration error on test: too few cases (n = {n_test})"]
    lines += [f"- expected calibration error on test: raw {_num(rel.get('ece_raw'))}, "
              f"calibrated {_num(rel.get('ece_calibrated'))}", "", f"![Reliability]({Path(section['png']).name})"
              if section.get("png") else "", "",
              "| predicted p (raw) | observed | n | predicted p (calibrated) | observed | n |", "|---:|---:|---:|---:|---:|---:|"]
    raw, calibrated = rel["raw"], rel["calibrated"]
    for i in range(max(len(raw), len(calibrated))):
        a = raw[i] if i < len(raw) else None
        b = calibrated[i] if i < len(calibrated) else None
        lines.append("| " + " | ".join(_cells(a) + _cells(b)) + " |")
    return lines


def _cells(row: Sequence[Any] | None) -> list[str]:
    return ["", "", ""] if row is None else [f"{row[0]:.2f}", f"{row[1]:.2f}", str(row[2])]


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"
