"""The bootstrap report as Markdown: the paper's Table 2 for the held-out split, Dice, calibration, timings."""

from __future__ import annotations

import json
from typing import Any


def render_report(report: dict[str, Any]) -> str:
    """Markdown report shaped like the paper's Table 2, plus Dice per label."""
    from shared.evaluation.metrics import paper_table

    cls = report["test"]["classification"]
    lines = [
        f"# ichfed bootstrap report ({report['profile']})",
        "",
        f"Seed {report['seed']}; threshold p = {report['threshold']['p']:.4f} "
        f"(log p = {report['threshold']['log_p']:.3f}); split {json.dumps(report['cohort'].get('split', {}))}.",
        "",
        "## Classification (end-to-end, predicted masks, held-out test split)",
        "",
        paper_table([{"name": "Test set", **cls}]),
        "",
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


def _f(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"
