"""The coordinator's view of a run: ``events.jsonl`` in the server's state folder and a bar of rounds.

The bar (``disable=None``: off when stderr is not a terminal) shows round k of R, the sites that
answered / were expected / refused in the last stage, elapsed time and tqdm's estimate of the
time remaining. Each ``round_finished`` event carries :func:`round_metrics`, which
``server/report.py`` plots in ``rounds.png``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from shared.federation import protocol as P
from shared.plumbing.progress import EVENTS_NAME, EventLog


class RunProgress:
    """The coordinator's view of a run: events plus a bar of rounds."""

    def __init__(self, folder: str | os.PathLike, total_rounds: int, *, first_round: int = 1,
                 desc: str = "federation") -> None:
        from tqdm import tqdm

        self.events = EventLog(Path(folder) / EVENTS_NAME)
        self.total_rounds = total_rounds
        self.bar = tqdm(total=total_rounds, initial=max(0, first_round - 1), desc=desc, unit="round",
                        disable=None, dynamic_ncols=True, leave=True)
        self.events.write("run_started", total_rounds=total_rounds, first_round=first_round)

    def event(self, event: str, **fields: Any) -> None:
        """Any other event (bundle distribution, final evaluation)."""
        self.events.write(event, **fields)

    def round_started(self, r: int, expected: int) -> None:
        """Round ``r`` asks ``expected`` sites to train."""
        self.bar.set_description(f"round {r}/{self.total_rounds}")
        self.bar.set_postfix_str(f"training at {expected} sites")
        self.events.write("round_started", round=r, expected=expected)

    def stage_replies(self, r: int, stage: str, rows: list[dict[str, Any]]) -> dict[str, int]:
        """Count the replies of one stage (``train`` / ``evaluate``) from the strategy's rows."""
        counts = reply_counts(rows)
        self.bar.set_postfix_str(f"{stage}: {counts['answered']}/{counts['expected']} answered, "
                                 f"{counts['refused']} refused")
        self.events.write(f"{stage}_replies", round=r, **counts)
        return counts

    def round_finished(self, r: int, record: dict[str, Any]) -> dict[str, Any]:
        """Round ``r`` is over: write its metrics (see :func:`round_metrics`) and advance the bar."""
        metrics = round_metrics(record)
        self.events.write("round_finished", round=r, **metrics)
        self.bar.update(1)
        auc = metrics.get("global_pooled_auc")
        self.bar.set_postfix_str(f"answered {metrics['train']['answered']}/{metrics['train']['expected']}, "
                                 f"refused {metrics['train']['refused']}"
                                 + (f", pooled AUC {auc:.3f}" if auc is not None else ""))
        return metrics

    def close(self, **fields: Any) -> None:
        """End of the run (``run_finished`` with ``fields``)."""
        self.events.write("run_finished", **fields)
        self.bar.close()


def reply_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """expected / answered / refused / missing from a stage's per-site rows."""
    missing = sum(1 for r in rows if r.get("status") == "missing")
    refused = sum(1 for r in rows if r.get("status") in ("rejected", "failed", "refused"))
    return {"expected": len(rows), "answered": len(rows) - missing, "refused": refused, "missing": missing}


def head_payload_bytes() -> int:
    """Bytes of one head (weight and bias, float32) as the arrays carry them."""
    return 4 * sum(math.prod(s) for s in P.HEAD_SHAPES.values())


def round_metrics(record: dict[str, Any]) -> dict[str, Any]:
    """One round's figures from the strategy's round record: reply counts, the global head's
    pooled and mean-site AUC, the training losses and update norms, and the head payload bytes
    sent to and received from the sites (arrays only, not message framing)."""
    train_rows = (record.get("train") or {}).get("sites", [])
    eval_rows = (record.get("evaluate") or {}).get("sites", [])
    pooled = (record.get("evaluate") or {}).get("pooled") or {}
    accepted = [r for r in train_rows if r.get("status") == "accepted"]
    norms = [r["update_norm"] for r in accepted if r.get("update_norm") is not None]
    aggregated = (record.get("train") or {}).get("aggregated") or {}
    head = head_payload_bytes()
    return {
        "train": reply_counts(train_rows),
        "evaluate": reply_counts(eval_rows),
        "global_pooled_auc": pooled.get("pooled_auc"),
        "global_mean_site_auc": pooled.get("mean_site_auc"),
        "site_aucs": {r["site"]: (r.get(P.MODEL_GLOBAL) or {}).get("auc") for r in eval_rows if r.get("status") == "ok"},
        "train_loss_weighted": aggregated.get(P.TRAIN_LOSS),
        "train_loss_by_site": {r["site"]: r.get("train_loss") for r in accepted},
        "update_norm_mean": sum(norms) / len(norms) if norms else None,
        "update_norm_max": max(norms) if norms else None,
        "head_bytes_sent": head * (len(train_rows) + len(eval_rows)),
        "head_bytes_received": head * len(accepted),
    }
