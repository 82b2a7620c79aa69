"""The head strategy: a Flower ``Strategy`` that admits each site's reply and hands the aggregation
to a Flower strategy (FedAvg, FedMedian or FedTrimmedAvg, ``server.robust``).

Sampling and message construction are Flower's ``FedAvg`` (``fraction 1``, only the sites that
confirmed the bundle); the weighted mean, median and trimmed mean are Flower's. What this adds:

- every train reply is checked (exactly the protocol's records and keys, the sender's name,
  a positive integer case count that does not change during the run, a finite loss, and every
  head within ``max-update-norm`` of the one sent: ``server.updates``); a bad one is rejected with
  a log line naming the site and its node, and the round goes on while ``min_sites`` remain;
- zero-change and replayed updates are flagged, replays rejected (``server.updates``);
- each site's weight is its own fine-tune count, capped at ``max_site_share`` of the round
  (``server.admission.share_capped``). The rule aggregates *ballots* built from the checked heads
  and the capped weights, never the site's reply itself, which stays as it arrived;
- evaluate replies are range-checked, pooled and tabled; a site asked but silent is missing;
- every row, round and event goes to the ``RoundBook`` the run hands in (``server.rounds``).
"""

from __future__ import annotations

import logging
from typing import Iterable

from flwr.serverapp.strategy import FedAvg, Strategy

from shared.federation import protocol as P
from shared.models.head import HeadSet
from shared.plumbing.errors import IchfedError

from . import replies as R
from .admission import (
    SiteLedger,
    admit_metrics_reply,
    check_train_claims,
    share_capped,
    train_refusal,
)
from .records import (
    ACCEPTED,
    FAILED,
    MISSING,
    REJECTED,
    MetricsRow,
    PooledMetrics,
    TrainRow,
)
from .robust import AggregationRule
from .rounds import RoundBook
from .updates import CheckedUpdate, UpdateRegistry, check_update

log = logging.getLogger(__name__)

DEFAULT_MAX_UPDATE_NORM = 100.0
# No site holds more than half a round's weight: then no single site can set the weighted median
# of the thresholds, and one liar moves the weighted mean by at most half its deviation
# (docs/security.md, "max-site-share"). An honest site larger than all others together is capped.
DEFAULT_MAX_SITE_SHARE = 0.5


class HeadStrategy(Strategy):
    """Head aggregation with admission of every reply; the rule is a wrapped Flower strategy."""

    def __init__(self, *, rule: AggregationRule | None = None, min_sites: int = 2,
                 max_update_norm: float = DEFAULT_MAX_UPDATE_NORM, max_site_share: float = DEFAULT_MAX_SITE_SHARE,
                 ledger: SiteLedger | None = None, book: RoundBook | None = None,
                 ready_nodes: Iterable[int] | None = None) -> None:
        self.rule = rule or AggregationRule()
        self.min_sites = min_sites
        self.max_update_norm = max_update_norm
        self.max_site_share = max_site_share
        # One ledger per run: names and fine-tune counts, shared with the bundle distribution and final evaluation.
        self.ledger = ledger if ledger is not None else SiteLedger()
        self.book = book if book is not None else RoundBook()
        self.ready_nodes = set(ready_nodes) if ready_nodes is not None else None
        self.registry = UpdateRegistry()
        self._flower = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=min_sites,
                            min_evaluate_nodes=min_sites, min_available_nodes=min_sites,
                            weighted_by_key=P.NUM_EXAMPLES, arrayrecord_key=P.HEAD, configrecord_key=P.CONFIG,
                            train_metrics_aggr_fn=_train_metrics)
        self.sampler = FedAvg(**self._flower)

    def summary(self) -> None:
        """Log the strategy's settings (Flower calls this at start)."""
        log.info("head strategy: %s (num-malicious-sites %d), min-sites %d, max-update-norm %g, max-site-share %g",
                 self.rule.name, self.rule.num_malicious, self.min_sites, self.max_update_norm, self.max_site_share)

    # -- training ---------------------------------------------------------------------------
    def configure_train(self, server_round, arrays, config, grid):
        """Flower's configure_train, limited to the sites that hold the verified bundle."""
        r = self.book.number(server_round)
        messages = self._only_ready(self.sampler.configure_train(r, arrays, config, grid))
        sent = HeadSet.from_record(arrays)
        self.registry.sent(r, sent)
        self.book.begin(r, sent, [m.metadata.dst_node_id for m in messages])
        return messages

    def aggregate_train(self, server_round, replies):
        """Admit each update (logging site and node), cap the weights, aggregate the ballots by the rule."""
        from flwr.app import Message, MetricRecord, RecordDict

        r = self.book.number(server_round)
        replies = self._from_asked(replies)
        rows, admitted = [], []
        for msg in replies:
            row, checked = self._admit_update(r, msg)
            rows.append(row)
            if checked is not None:
                admitted.append((row, checked))
        rows.extend(TrainRow(site=s, node_id=n, status=MISSING, reason="no reply")
                    for s, n in self._missing(r, "training", replies))
        weights = share_capped({row.node_id: row.n_fine_tune for row, _ in admitted}, self.max_site_share)
        ballots = []
        for row, checked in admitted:
            row.weight = weights[row.node_id]
            if row.weight < row.n_fine_tune:
                log.warning("round %d: site %s weight capped from %d to %.4g (max-site-share %g)",
                            r, row.label, row.n_fine_tune, row.weight, self.max_site_share)
            # A ballot, not the reply: Flower's robust rules pop arrays from what they aggregate.
            ballots.append(Message(RecordDict({P.HEAD: checked.heads.to_record(), P.METRICS: MetricRecord(
                {P.NUM_EXAMPLES: float(row.weight), P.N_FINE_TUNE: row.n_fine_tune,
                 P.TRAIN_LOSS: float(row.train_loss if row.train_loss is not None else 0.0)})}),
                dst_node_id=row.node_id, message_type=P.TRAIN))
        why = self._too_few(r, len(ballots), len(replies))
        if why:
            self.book.trained(rows)
            raise IchfedError(why)
        arrays, metrics = self.rule.flower_strategy(len(ballots), **self._flower).aggregate_train(r, ballots)
        heads = HeadSet.from_record(arrays)  # float32, and checked to be a head record again
        self.book.trained(rows, dict(metrics) if metrics is not None else {}, self.rule.trim(len(ballots)) or None)
        return heads.to_record(), metrics

    def _too_few(self, r: int, n: int, n_replies: int) -> str | None:
        if n < self.min_sites:
            return f"round {r}: only {n} of {n_replies} site updates were usable (min-sites is {self.min_sites}); " \
                   "stopping the run"
        why = self.rule.problem(n)
        return f"round {r}: {why}; stopping the run" if why else None

    def _admit_update(self, r: int, msg) -> tuple[TrainRow, CheckedUpdate | None]:
        """The row of one train reply, and its checked heads when it is accepted."""
        node = msg.metadata.src_node_id
        row = TrainRow(site=self.ledger.name(node, R.site_name(msg)), node_id=node, status=REJECTED)
        checked, count = None, None
        why = self._refusal(msg)
        if why is None:
            metrics = R.metrics(msg)
            count, why = check_train_claims(metrics)
            if why is None:
                why = self.ledger.check_count(node, metrics.get(P.N_FINE_TUNE, count))
            row.n_claimed, row.train_loss = metrics.get(P.NUM_EXAMPLES), metrics.get(P.TRAIN_LOSS)
        if why is None:
            checked = check_update(msg.content[P.HEAD], self.book.sent, self.max_update_norm)
            row.update_norm, row.update_norm_max, why = checked.norm, checked.norm_max, checked.reason
        if why is None:
            flags, why = self.registry.judge(checked.heads)
            row.flags = tuple(flags)
        if why is not None:
            log.warning("round %d: update from site %s rejected: %s", r, row.label, why)
            row.reason = why
            return row, None
        for flag in row.flags:
            log.warning("round %d: update from site %s flagged: %s", r, row.label, flag)
        self.registry.received(checked.heads, row.site, node)
        row.status, row.n_fine_tune = ACCEPTED, count
        return row, checked

    def _refusal(self, msg) -> str | None:
        """Why a train reply cannot be read as an update at all (``admission.train_refusal``)."""
        return train_refusal(msg, self.ledger, P.TRAIN, P.HEAD, "head")

    # -- evaluation -------------------------------------------------------------------------
    def configure_evaluate(self, server_round, arrays, config, grid):
        """Flower's configure_evaluate, limited to the sites that hold the verified bundle."""
        r = self.book.number(server_round)
        messages = self._only_ready(self.sampler.configure_evaluate(r, arrays, config, grid))
        self.book.ask_evaluation(r, [m.metadata.dst_node_id for m in messages])
        return messages

    def aggregate_evaluate(self, server_round, replies):
        """Per-site table and pooled metrics of the global head on every site's held-out split."""
        from flwr.app import MetricRecord

        r = self.book.number(server_round)
        replies = self._from_asked(replies)
        rows = [self._evaluate_row(r, msg) for msg in replies]
        rows.extend(MetricsRow(site=s, node_id=n, status=MISSING, reason="no reply")
                    for s, n in self._missing(r, "evaluation", replies))
        pooled = PooledMetrics.pool(rows, P.MODEL_GLOBAL)
        self.book.evaluated(rows, pooled)
        _log_table(r, rows, pooled)
        return MetricRecord({k: float(v) for k, v in pooled.values.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)})

    def _evaluate_row(self, r: int, msg) -> MetricsRow:
        node = msg.metadata.src_node_id
        name = self.ledger.name(node, R.site_name(msg))
        if msg.has_error() or R.reply_status(msg) != P.STATUS_OK:
            row = MetricsRow(site=name, node_id=node, status=FAILED, reason=R.refusal_reason(msg))
            log.warning("round %d: evaluation at site %s failed: %s", r, row.label, row.reason)
            return row
        why = admit_metrics_reply(self.ledger, msg, P.EVALUATE)
        if why:
            row = MetricsRow(site=name, node_id=node, status=REJECTED, reason=why)
            log.warning("round %d: evaluation reply of site %s dropped: %s", r, row.label, why)
            return row
        return R.metrics_row(msg, name)

    # -- the sites asked ----------------------------------------------------------------------
    def _only_ready(self, messages) -> list:
        messages = list(messages)
        if self.ready_nodes is None:
            return messages
        return [m for m in messages if m.metadata.dst_node_id in self.ready_nodes]

    def _from_asked(self, replies) -> list:
        """The replies that came from the sites asked. For a site that went offline the SuperLink
        answers itself (an error from node 0, not from the site): that site is listed as missing."""
        replies = list(replies)
        for m in replies:
            if m.metadata.src_node_id not in self.book.asked:
                log.info("reply from node %s, which was not asked: %s", m.metadata.src_node_id,
                         m.error.reason if m.has_error() else "content ignored")
        return [m for m in replies if m.metadata.src_node_id in self.book.asked]

    def _missing(self, r: int, what: str, replies: list) -> list[tuple[str, int]]:
        """(site, node) of the sites asked (or ready: an offline one is not even sampled) that never answered."""
        answered = {m.metadata.src_node_id for m in replies}
        out = []
        for node in sorted(set(self.book.asked) | (self.ready_nodes or set())):
            if node not in answered:
                out.append((self.ledger.name(node), node))
                log.warning("round %d: no %s reply from site %s (node %s)", r, what, out[-1][0], node)
        return out


def _log_table(r: int, rows: list[MetricsRow], pooled: PooledMetrics) -> None:
    log.info("round %d: global head on held-out splits", r)
    log.info("  %-28s %5s %6s %6s %6s %6s", "site", "n", "AUC", "Acc", "Sens", "Spec")
    lines = [(row.label, row.arms.get(P.MODEL_GLOBAL) or {}) for row in rows]
    lines.append(("pooled", {**pooled.values, "auc": pooled.pooled_auc}))
    for label, m in lines:
        log.info("  %-28s %5s %6s %6s %6s %6s", label, m.get("n", "-"),
                 *("-" if m.get(k) is None else f"{m[k]:.3f}" for k in ("auc", "accuracy", "sensitivity", "specificity")))


def _train_metrics(records, weight_key: str):
    """Total fine-tune cases (the sites' own counts) and the weighted mean training loss (capped weights)."""
    from flwr.app import MetricRecord

    metrics = [next(iter(r.metric_records.values())) for r in records]
    total = sum(float(m[weight_key]) for m in metrics)
    loss = sum(float(m[P.TRAIN_LOSS]) * float(m[weight_key]) for m in metrics) / total
    return MetricRecord({"n-fine-tune-total": int(sum(int(m[P.N_FINE_TUNE]) for m in metrics)),
                         P.TRAIN_LOSS: loss, "n-sites": len(metrics)})
