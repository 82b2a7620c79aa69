"""The segmenter strategy (issue 24): a Flower ``Strategy`` for segmenter rounds, admitting every site's
fine-tuned nnU-Net tensors with the head strategy's machinery and handing them to the same rule.

Each round sends the global segmenter's trainable tensors (``protocol.SEGMENTER``) to the opted-in
sites as ``train.segmenter`` and admits each reply like a head update (``server.strategy``):

- exactly the protocol's records and keys, the sender's name, a positive masked-case count that does
  not change during the run, a finite loss, a pseudo Dice in [0, 1] (``server.admission``);
- exactly the tensors sent, of the shapes sent, finite, bounded, and within ``segmenter-max-update-norm``
  of what was sent (``server.updates.check_segmenter_update``); zero-change updates flagged, replays
  rejected (``server.updates.UpdateRegistry``);
- each site's weight its masked case count, capped at ``max-site-share`` (``share_capped``);
- the ballots (checked tensors, capped weights; never the reply itself) aggregated by the run's rule:
  Flower's FedAvg, FedMedian or FedTrimmedAvg (``server.robust``), coordinate-wise over every tensor.

There is no per-round evaluation: the federated segmenter is judged once, after the last round, on
each site's held-out masked cases (``server.segmenter_phase``).
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.serverapp.strategy import Strategy

from shared.federation import protocol as P
from shared.models.segment_weights import SegmenterWeights
from shared.plumbing.errors import IchfedError

from . import replies as R
from .admission import (
    SiteLedger,
    check_segmenter_claims,
    share_capped,
    train_refusal,
)
from .records import ACCEPTED, MISSING, REJECTED, SegmenterRound, TrainRow
from .robust import AggregationRule
from .updates import CheckedSegmenterUpdate, UpdateRegistry, check_segmenter_update

log = logging.getLogger(__name__)


class SegmenterStrategy(Strategy):
    """Segmenter aggregation with admission of every reply; the rule is a wrapped Flower strategy."""

    def __init__(self, *, rule: AggregationRule, nodes: dict[int, str], config: dict[str, Any], min_sites: int,
                 max_update_norm: float, max_site_share: float, ledger: SiteLedger, progress=None) -> None:
        self.rule, self.nodes, self.config = rule, dict(nodes), dict(config)
        self.min_sites, self.max_update_norm, self.max_site_share = min_sites, max_update_norm, max_site_share
        self.ledger, self.progress = ledger, progress
        self.registry = UpdateRegistry()
        self.rounds: list[SegmenterRound] = []
        self.counts: dict[int, int] = {}  # each node's masked case count, fixed for the run
        self.sent: SegmenterWeights | None = None
        self._flower = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_evaluate_nodes=0,
                            min_available_nodes=1, weighted_by_key=P.NUM_EXAMPLES, arrayrecord_key=P.SEGMENTER,
                            configrecord_key=P.CONFIG, train_metrics_aggr_fn=_train_metrics)

    def summary(self) -> None:
        """Log the settings (Flower calls this at start)."""
        log.info("segmenter strategy: %s, %d site(s), %s, max-update-norm %g, max-site-share %g", self.rule.name,
                 len(self.nodes), self.config.get(P.CFG_SEG_TRAINABLE), self.max_update_norm, self.max_site_share)

    def configure_train(self, server_round, arrays, config, grid):
        """``train.segmenter`` with the global segmenter to every opted-in ready site."""
        from flwr.app import ConfigRecord, Message, RecordDict

        self.sent = SegmenterWeights.from_record(arrays)
        self.registry.sent(server_round, self.sent)
        self.rounds.append(SegmenterRound(round=server_round))
        if self.progress is not None:
            self.progress.event("segmenter_round_started", round=server_round, sites=len(self.nodes))
        cfg = {**self.config, **dict(config), P.CFG_ROUND: server_round}
        return [Message(RecordDict({P.SEGMENTER: arrays, P.CONFIG: ConfigRecord(cfg)}), dst_node_id=node,
                        message_type=P.TRAIN_SEGMENTER) for node in sorted(self.nodes)]

    def aggregate_train(self, server_round, replies):
        """Admit each update, cap the weights, aggregate the ballots by the rule."""
        from flwr.app import Message, MetricRecord, RecordDict

        replies = [m for m in replies if m.metadata.src_node_id in self.nodes]
        rows, admitted = [], []
        for msg in replies:
            row, checked = self._admit(server_round, msg)
            rows.append(row)
            if checked is not None:
                admitted.append((row, checked))
        answered = {m.metadata.src_node_id for m in replies}
        rows += [TrainRow(site=self.nodes[n], node_id=n, status=MISSING, reason="no reply")
                 for n in sorted(set(self.nodes) - answered)]
        weights = share_capped({row.node_id: row.n_fine_tune for row, _ in admitted}, self.max_site_share)
        ballots = []
        for row, checked in admitted:
            row.weight = weights[row.node_id]
            ballots.append(Message(RecordDict({P.SEGMENTER: checked.weights.to_record(), P.METRICS: MetricRecord(
                {P.NUM_EXAMPLES: float(row.weight), P.TRAIN_LOSS: float(row.train_loss)})}),
                dst_node_id=row.node_id, message_type=P.TRAIN_SEGMENTER))
        record = self.rounds[-1]
        record.train = rows
        if self.progress is not None:
            self.progress.event("segmenter_replies", round=server_round,
                                sites=[{"site": r.site, "node_id": r.node_id, "status": r.status} for r in rows])
        why = self._too_few(server_round, len(ballots), len(replies))
        if why:
            raise IchfedError(why)
        arrays, metrics = self.rule.flower_strategy(len(ballots), **self._flower).aggregate_train(server_round, ballots)
        aggregated = SegmenterWeights({k: a.numpy().astype("float32") for k, a in arrays.items()})
        why = aggregated.problem(like=self.sent)
        if why:  # cannot happen with checked ballots; never pass such weights on
            raise IchfedError(f"segmenter round {server_round}: the aggregate is unusable: {why}")
        record.aggregated = dict(metrics) if metrics is not None else {}
        record.trimmed = self.rule.trim(len(ballots)) or None
        return aggregated.to_record(), metrics

    def _too_few(self, r: int, n: int, n_replies: int) -> str | None:
        if n < self.min_sites:
            return f"segmenter round {r}: only {n} of {n_replies} site updates were usable (at least " \
                   f"{self.min_sites} needed)"
        why = self.rule.problem(n)
        return f"segmenter round {r}: {why}" if why else None

    def _admit(self, r: int, msg) -> tuple[TrainRow, CheckedSegmenterUpdate | None]:
        """The row of one reply, and its checked tensors when it is accepted."""
        node = msg.metadata.src_node_id
        row = TrainRow(site=self.ledger.name(node, R.site_name(msg)), node_id=node, status=REJECTED)
        checked, count = None, None
        why = self._refusal(msg)
        if why is None:
            metrics = R.metrics(msg)
            count, why = check_segmenter_claims(metrics)
            if why is None and self.counts.setdefault(node, count) != count:
                why = f"'{P.N_MASKED_FINE_TUNE}' changed from {self.counts[node]} to {count} during the run"
            row.n_claimed, row.train_loss = metrics.get(P.NUM_EXAMPLES), metrics.get(P.TRAIN_LOSS)
            row.train_dice = metrics.get(P.TRAIN_DICE)
        if why is None:
            checked = check_segmenter_update(msg.content[P.SEGMENTER], self.sent, self.max_update_norm)
            row.update_norm, why = checked.norm, checked.reason
        if why is None:
            flags, why = self.registry.judge(checked.weights)
            row.flags = tuple(f.replace("head", "segmenter") for f in flags)
        if why is not None:
            log.warning("segmenter round %d: update from site %s rejected: %s", r, row.label, why)
            row.reason = why
            return row, None
        for flag in row.flags:
            log.warning("segmenter round %d: update from site %s flagged: %s", r, row.label, flag)
        self.registry.received(checked.weights, row.site, node)
        row.status, row.n_fine_tune = ACCEPTED, count
        return row, checked

    def _refusal(self, msg) -> str | None:
        """Why a train reply cannot be read as an update at all (``admission.train_refusal``)."""
        return train_refusal(msg, self.ledger, P.TRAIN_SEGMENTER, P.SEGMENTER, "segmenter")

    def configure_evaluate(self, server_round, arrays, config, grid):
        """No per-round evaluation (the phase evaluates once, after the last round)."""
        return []

    def aggregate_evaluate(self, server_round, replies):
        return None


def _train_metrics(records, weight_key: str):
    """Total masked cases of the admitted sites' ballots and their weighted mean training loss."""
    from flwr.app import MetricRecord

    metrics = [next(iter(r.metric_records.values())) for r in records]
    total = sum(float(m[weight_key]) for m in metrics)
    loss = sum(float(m[P.TRAIN_LOSS]) * float(m[weight_key]) for m in metrics) / total
    return MetricRecord({P.TRAIN_LOSS: loss, "n-sites": len(metrics)})
