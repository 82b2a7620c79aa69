"""The bootstrap report as Markdown: the paper's Table 2 for the held-out split, Dice, calibration, timings."""

from __future__ import annotations

import json
from typing import Any


def render_report(report: dict[str, Any]) -> str:
    """Markdown report shaped like the paper's Table 2, plus Dice per label."""
    from shared.evaluation.metrics import paper_table

    cls = report["test"]["classification"]
    n_test = int(cls.get("n") or 0)
    lines = [
        f"# ichfed bootstrap report ({report['profile']})",
        "",
        f"Seed {report['seed']}; threshold p = {report['threshold']['p']:.4f} "
        f"(log p = {report['threshold']['log_p']:.3f}); split {json.dumps(report['cohort'].get('split', {}))}.",
        "",
        "## Classification (end-to-end, predicted masks, held-out test split)",
        "",
        _table(paper_table([{"name": "Test set", **cls}]), n_test),
        "",
        *_comparison(cls, report["test"].get("comparison")),
        f"Cases with no segmented lesion (not classified): {report['test']['n_no_lesion']}",
        "",
        f"Postprocessing (chosen on validation): {report.get('postprocessing', {}).get('rule', 'none')}; "
        f"test cases with quality flags: {report['test'].get('quality', {}).get('n_flagged', 'n/a')}",
        "",
        "## Segmentation (Dice on the test split)",
        "",
        "| label | mean | SD | median | min | max | n |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in report["test"]["dice"].items():
        lines.append(
            f"| {name.upper()} | {_f(s.get('mean'))} | {_f(s.get('sd'))} | {_f(s.get('median'))} | "
            f"{_f(s.get('min'))} | {_f(s.get('max'))} | {s.get('n')} |"
        )
    from .bootstrap_calibration import (
        render_calibration,  # scipy and plotting: only when a report is rendered
    )

    lines += render_calibration(report.get("calibration"))
    lines += ["", "## Timings (s)", "", *(f"- {k}: {v}" for k, v in report["timings"].items()), ""]
    return "\n".join(lines)


def _table(table: str, n: int) -> str:
    """The paper table, its figures replaced by "too few cases (n = k)" below ``MIN_REPORT_CASES``:
    an AUC of 1.00 (1.00–1.00) on two cases says nothing, and reads as if it did."""
    from .bootstrap_calibration import MIN_REPORT_CASES

    if n >= MIN_REPORT_CASES:
        return table
    head = table.splitlines()[:2]
    n_figures = head[0].count("|") - 3  # Cohort and n come first
    row = f"| Test set | {n} | " + " | ".join([too_few(n)] * n_figures) + " |"
    return "\n".join([*head, row, "", f"Figures on fewer than {MIN_REPORT_CASES} test cases are not shown: their "
                      "confidence intervals span most of the possible range. Use a larger --profile or --site."]) + "\n"


def too_few(n: int) -> str:
    """How a figure computed on too few cases is shown."""
    return f"too few cases (n = {n})"


def _comparison(cnn: dict[str, Any], c: dict[str, Any] | None) -> list[str]:
    """The bundle's model beside the volume baseline on the same test cases, their paired difference, and the
    ceilings."""
    from shared.evaluation.metrics import paper_table

    if not c:
        return []
    from .bootstrap_calibration import MIN_REPORT_CASES

    d = c["model_minus_baseline"]
    diff = (too_few(d["n"]) if d["n"] < MIN_REPORT_CASES else "not defined: " + d.get("reason", "")
            if d.get("estimate") is None else
            f"{d['estimate']:+.3f} (95 % CI {d['ci'][0]:+.3f} to {d['ci'][1]:+.3f}; {d['method']}; n = {d['n']})")
    ceiling = c["ceiling_true_masks"]
    return [
        "### Compared with the volume baseline (same test cases)",
        "",
        "The baseline is a logistic regression on log ICH ml, log PHE ml and log(PHE/ICH) of the same training "
        "cases, its threshold chosen the same way on the validation part.",
        "",
        _table(paper_table([{"name": f"{c.get('model', 'resnet34')} (the bundle's model)", **cnn},
                            {"name": "Volume baseline", **c["volume_baseline"]}]), int(cnn.get("n") or 0)),
        "",
        f"AUC, {c.get('model', 'resnet34')} minus volume baseline: {diff}",
        "",
        f"Ceilings with true masks (a perfect segmenter; not results), n = {ceiling['n']}:",
        "",
        _table(paper_table([{"name": f"{c.get('model', 'resnet34')}, true masks", **ceiling["model"]},
                            {"name": "Volume baseline, true masks", **ceiling["volume_baseline"]}]), ceiling["n"]),
        "",
    ]


def _f(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"
