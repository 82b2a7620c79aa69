"""The rounds of one run as they happen: the history, the round in progress, and its events.

``server.strategy.HeadStrategy`` writes into a ``RoundBook`` handed to it at construction; the
run reads the history from it (checkpoints through Flower's ``evaluate_fn`` hook, the report).
Keeping the state here, rather than on the strategy, lets the strategy be a pure Flower
``Strategy`` (messages in, records out) and the run own what it reports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.models.head import HeadSet

from .records import MetricsRow, PooledMetrics, RoundRecord, TrainRow

if TYPE_CHECKING:
    from .run_progress import RunProgress


class RoundBook:
    """The run's round records (resumed ones first) and what the round in progress sent and asked."""

    def __init__(self, history: list[RoundRecord] | None = None, progress: RunProgress | None = None,
                 offset: int = 0) -> None:
        self.rounds: list[RoundRecord] = list(history or [])
        self.progress = progress
        self.offset = offset  # rounds done before a resume: Flower counts from 1 again
        self.sent: HeadSet | None = None
        self.asked: list[int] = []

    def number(self, flower_round: int) -> int:
        """The run's round number of Flower's ``flower_round`` (continuing after a resume)."""
        return flower_round + self.offset

    @property
    def current(self) -> RoundRecord:
        """The round in progress (the last one begun)."""
        return self.rounds[-1]

    def begin(self, r: int, sent: HeadSet, asked: list[int]) -> RoundRecord:
        """Round ``r`` sends ``sent`` to ``asked`` for training."""
        self.rounds.append(RoundRecord(round=r))
        self.sent, self.asked = sent, list(asked)
        if self.progress is not None:
            self.progress.round_started(r, len(asked))
        return self.current

    def ask_evaluation(self, r: int, asked: list[int]) -> None:
        """The nodes asked to evaluate round ``r``'s head (a round of its own if it trained nothing)."""
        if not self.rounds or self.current.round != r:
            self.rounds.append(RoundRecord(round=r))
        self.asked = list(asked)

    def trained(self, rows: list[TrainRow], aggregated: dict | None = None, trimmed: int | None = None) -> None:
        """The round's train rows, and the aggregate's metrics (none when the round stopped before it)."""
        rec = self.current
        rec.train, rec.aggregated, rec.trimmed = rows, dict(aggregated or {}), trimmed
        if self.progress is not None:
            self.progress.stage_replies(rec.round, "train", rows)

    def evaluated(self, rows: list[MetricsRow], pooled: PooledMetrics) -> None:
        """The round's evaluate rows and their pooled metrics."""
        rec = self.current
        rec.evaluate, rec.pooled = rows, pooled
        if self.progress is not None:
            self.progress.stage_replies(rec.round, "evaluate", rows)
