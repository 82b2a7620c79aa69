"""The coordinator's view of a run: ``events.jsonl`` in the run's folder and a bar of rounds.

Events, one JSON line each (``shared.plumbing.progress.EventLog``), in this order:
``run_started`` (run ID, rounds, first round), ``bundle_distributed``, per round ``round_started``,
``train_replies``, ``evaluate_replies`` and ``round_finished`` (with :func:`round_metrics`, which
``server/report.py`` also plots in ``rounds.png``), ``final_evaluation``, and last ``run_finished``
or ``run_failed`` (with ``reason``). ``ichfed federate status`` reads these names. Every stage's
event lists its sites as ``{"site", "node_id", "status"}``: a name beside the node it came from.

The bar (``disable=None``: off when stderr is not a terminal) shows round k of R, the sites that
answered / were expected / refused in the last stage, elapsed time and tqdm's estimate of the
time remaining.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from shared.federation import protocol as P
from shared.plumbing.progress import EVENTS_NAME, EventLog

from .records import FAILED, MISSING, OK, REJECTED, RoundRecord, SiteRow


class RunProgress:
    """The coordinator's view of a run: events plus a bar of rounds."""

    def __init__(self, folder: str | os.PathLike, total_rounds: int, *, desc: str = "federation") -> None:
        self.events = EventLog(Path(folder) / EVENTS_NAME)
        self.total_rounds = total_rounds
        self.head_features = P.HEAD_FEATURES  # set from the bundle once it is loaded (a hybrid head reads 515)
        self.desc = desc
        self.bar = None

    def start(self, first_round: int = 1, **fields: Any) -> None:
        """The run starts at ``first_round`` (``run_started``, with ``fields``: run ID, bundle, ...)."""
        from tqdm import tqdm

        self.bar = tqdm(total=self.total_rounds, initial=max(0, first_round - 1), desc=self.desc, unit="round",
                        disable=None, dynamic_ncols=True, leave=True)
        self.events.write("run_started", total_rounds=self.total_rounds, first_round=first_round, **fields)

    def event(self, event: str, **fields: Any) -> None:
        """Any other event (bundle distribution, final evaluation)."""
        self.events.write(event, **fields)

    def round_started(self, r: int, expected: int) -> None:
        """Round ``r`` asks ``expected`` sites to train."""
        self._postfix(f"training at {expected} sites", desc=f"round {r}/{self.total_rounds}")
        self.events.write("round_started", round=r, expected=expected)

    def stage_replies(self, r: int, stage: str, rows: Sequence[SiteRow]) -> dict[str, int]:
        """Count the replies of one stage (``train`` / ``evaluate``) from its per-site rows."""
        counts = reply_counts(rows)
        self._postfix(f"{stage}: {counts['answered']}/{counts['expected']} answered, {counts['refused']} refused")
        self.events.write(f"{stage}_replies", round=r, **counts, sites=site_statuses(rows))
        return counts

    def round_finished(self, record: RoundRecord) -> dict[str, Any]:
        """The round is over: write its metrics (see :func:`round_metrics`) and advance the bar."""
        metrics = round_metrics(record, self.head_features)
        self.events.write("round_finished", round=record.round, **metrics)
        auc = metrics.get("global_pooled_auc")
        if self.bar is not None:
            self.bar.update(1)
        self._postfix(f"answered {metrics['train']['answered']}/{metrics['train']['expected']}, "
                      f"refused {metrics['train']['refused']}" + (f", pooled AUC {auc:.3f}" if auc is not None else ""))
        return metrics

    def close(self, **fields: Any) -> None:
        """The run finished (``run_finished`` with ``fields``)."""
        self.events.write("run_finished", **fields)
        self._close_bar()

    def failed(self, reason: str, **fields: Any) -> None:
        """The run failed (``run_failed`` with ``reason``); a run that failed before it started still
        gets its ``run_started`` first, so every events file begins the same way."""
        if self.bar is None:
            self.events.write("run_started", total_rounds=self.total_rounds, first_round=None)
        self.events.write("run_failed", reason=reason, **fields)
        self._close_bar()

    def _postfix(self, text: str, desc: str | None = None) -> None:
        if self.bar is not None:
            if desc:
                self.bar.set_description(desc)
            self.bar.set_postfix_str(text)

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def site_statuses(rows: Sequence[SiteRow]) -> list[dict[str, Any]]:
    """``[{"site", "node_id", "status"}]`` of a stage's rows (the events' site lists)."""
    return [{"site": r.site, "node_id": r.node_id, "status": r.status} for r in rows]


def reply_counts(rows: Sequence[SiteRow]) -> dict[str, int]:
    """expected / answered / refused / missing from a stage's per-site rows."""
    missing = sum(1 for r in rows if r.status == MISSING)
    refused = sum(1 for r in rows if r.status in (REJECTED, FAILED))
    return {"expected": len(rows), "answered": len(rows) - missing, "refused": refused, "missing": missing}


def head_payload_bytes(n_features: int = P.HEAD_FEATURES) -> int:
    """Bytes of one head reading ``n_features`` (weight and bias, float32) as the arrays carry them."""
    return 4 * P.HEAD_CLASSES * (n_features + 1)


def round_metrics(record: RoundRecord, n_features: int = P.HEAD_FEATURES) -> dict[str, Any]:
    """One round's figures: reply counts, the global head's pooled and mean-site AUC, the training
    losses and update norms, and the head payload bytes sent to and received from the sites
    (arrays only, not message framing). Per-site figures are keyed "name (node id)"."""
    accepted = record.accepted()
    norms = [r.update_norm for r in accepted if r.update_norm is not None]
    pooled = record.pooled
    head = head_payload_bytes(n_features)
    return {
        "train": reply_counts(record.train),
        "evaluate": reply_counts(record.evaluate),
        "global_pooled_auc": pooled.pooled_auc if pooled else None,
        "global_mean_site_auc": pooled.mean_site_auc if pooled else None,
        "site_aucs": {r.label: r.metric(P.MODEL_GLOBAL, "auc") for r in record.evaluate if r.status == OK},
        "train_loss_weighted": record.aggregated.get(P.TRAIN_LOSS),
        "train_loss_by_site": {r.label: r.train_loss for r in accepted},
        "update_norm_mean": sum(norms) / len(norms) if norms else None,
        "update_norm_max": max(norms) if norms else None,
        "flagged": {r.label: list(r.flags) for r in record.train if r.flags},
        "head_bytes_sent": head * (len(record.train) + len(record.evaluate)),
        "head_bytes_received": head * len(accepted),
    }
