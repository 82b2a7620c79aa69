"""FedAvg over the head, weighted by each site's fine-tune case count, with update validation.

Built on Flower's ``flwr.serverapp.strategy.FedAvg``: sampling, message construction and the
weighted average are Flower's. What this adds:

- only sites that confirmed the bundle are asked to train;
- every site update is checked (allowed keys, shapes, finite values, update norm, a positive
  integer case count, a finite training loss); a bad one is rejected with a log line naming the
  site and its node, and the round goes on if at least ``min_sites`` updates remain, else it
  stops with an ``IchfedError``;
- the weight a site claims is capped at its own fine-tune count (which must not change during
  the run) and at ``max_site_share`` of the round (``server/admission.py``); robust
  alternatives to the weighted mean are in ``server/robust.py``;
- evaluate replies are range-checked on arrival; sites are named by their authenticated node
  (``node_id`` in every row) and a site that was asked but never answered is listed as missing;
- a per-site table and pooled metrics every round, kept in ``history``;
- round numbers continue after a resume (``round_offset``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import numpy as np
from flwr.serverapp.strategy import FedAvg

from shared.federation import protocol as P
from shared.models.head import Head
from shared.plumbing.errors import IchfedError

from .admission import (
    SiteLedger,
    admit_metrics_reply,
    check_identity,
    check_train_claims,
    share_capped,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_UPDATE_NORM = 100.0
# A site of honest but unequal size keeps its FedAvg weight up to 3:1 against the rest;
# a site claiming more is capped (robust aggregation is the stronger guard, server/robust.py).
DEFAULT_MAX_SITE_SHARE = 0.75


def site_name(message) -> str:
    """The site's name from its reply, else ``node-<id>`` (for error replies)."""
    if message.has_content() and P.INFO in message.content.config_records:
        name = message.content[P.INFO].get(P.INFO_SITE)
        if isinstance(name, str) and P.SITE_NAME_RE.match(name):
            return name
    return f"node-{message.metadata.src_node_id}"


def head_from_record(record) -> dict[str, np.ndarray]:
    """Every array of a head record (the main head and any cross-fit fold heads) as float32 numpy."""
    return {k: np.asarray(record[k].numpy(), dtype=np.float32) for k in record.keys()}


def update_norm(head: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """L2 distance of the main head in ``head`` from the one in ``reference`` (``Head.distance``)."""
    return Head.from_arrays(head).distance(Head.from_arrays(reference))


def check_update(head: dict[str, np.ndarray], reference: dict[str, np.ndarray], max_norm: float) -> str | None:
    """Why a site's head update is unacceptable, or None when it is fine.

    ``head`` must hold exactly the keys sent (``reference``: the main head and any cross-fit fold
    heads), each of its head's shape and finite; the update norm is the main head's.
    """
    if set(head) != set(reference) or P.cross_fit_folds(head) is None:
        return f"arrays {sorted(head)} are not {sorted(reference)}"
    for key in head:
        shape = P.HEAD_SHAPES[key.rpartition(".")[2]]
        if tuple(head[key].shape) != shape:
            return f"'{key}' has shape {tuple(head[key].shape)}, expected {shape}"
        if not np.all(np.isfinite(head[key])):
            return f"'{key}' holds NaN or Inf"
    norm = update_norm(head, reference)
    if not norm <= max_norm:
        return f"update norm {norm:.3g} exceeds the limit {max_norm:g}"
    return None


def pooled_metrics(site_rows: list[dict[str, Any]], model: str) -> dict[str, Any]:
    """Pool per-site metrics of ``model``: summed confusion counts, the pooled AUC from the sites'
    score histograms, fixed/random-effects AUC (and paired differences) with 95 % CIs, and the
    case-weighted ``mean_site_auc``. See :mod:`server.pooling`."""
    from .pooling import pool_model

    return pool_model(site_rows, model)


def metrics_from_reply(message) -> dict[str, Any]:
    """A site's reply as ``{model: {metric: value}, "counts": {...}, "reasons": {...}}``."""
    out: dict[str, Any] = {"counts": {}, "reasons": {}}
    content = message.content
    if P.METRICS in content.metric_records:
        for key, value in content[P.METRICS].items():
            parts = P.split_metric_key(key)
            if parts is None:
                out["counts"][key] = value
            else:
                out.setdefault(parts[0], {})[parts[1]] = value
    if P.INFO in content.config_records:
        for key, value in content[P.INFO].items():
            if key.endswith(P.REASON_SUFFIX):
                target = key[: -len(P.REASON_SUFFIX)]
                out["reasons"][target] = value
                parts = P.split_metric_key(target)
                if parts is not None:
                    # An undefined or withheld metric is null in the report, next to its reason.
                    out.setdefault(parts[0], {}).setdefault(parts[1], None)
    return out


class HeadFedAvg(FedAvg):
    """Flower FedAvg over the final layer with update validation and per-site bookkeeping."""

    def __init__(
        self,
        *,
        min_sites: int = 2,
        max_update_norm: float = DEFAULT_MAX_UPDATE_NORM,
        ready_nodes: Iterable[int] | None = None,
        round_offset: int = 0,
        history: list[dict[str, Any]] | None = None,
        on_round_end: Callable[[int, dict[str, np.ndarray], dict[str, Any]], None] | None = None,
        max_site_share: float = DEFAULT_MAX_SITE_SHARE,
        ledger: SiteLedger | None = None,
    ) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=min_sites,
            min_evaluate_nodes=min_sites,
            min_available_nodes=min_sites,
            weighted_by_key=P.NUM_EXAMPLES,
            arrayrecord_key=P.HEAD,
            configrecord_key=P.CONFIG,
            train_metrics_aggr_fn=_train_metrics,
        )
        self.min_sites = min_sites
        self.max_update_norm = max_update_norm
        self.ready_nodes = set(ready_nodes) if ready_nodes is not None else None
        self.round_offset = round_offset
        self.history: list[dict[str, Any]] = list(history or [])
        self.on_round_end = on_round_end
        self.max_site_share = max_site_share
        # Names and fine-tune counts per authenticated node; shared with the ServerApp's bundle
        # distribution and final evaluation so one run has one ledger.
        self.ledger = ledger if ledger is not None else SiteLedger()
        self._asked: list[int] = []
        self._sent: dict[str, np.ndarray] | None = None
        self._current: dict[str, Any] = {}
        self.last_arrays: dict[str, np.ndarray] | None = None
        self.progress = None  # a server.run_progress.RunProgress the ServerApp attaches, if any

    # -- training ---------------------------------------------------------------------------
    def _only_ready(self, messages):
        messages = list(messages)
        if self.ready_nodes is None:
            return messages
        return [m for m in messages if m.metadata.dst_node_id in self.ready_nodes]

    def configure_train(self, server_round, arrays, config, grid):
        """Flower's configure_train, limited to the sites that hold the verified bundle."""
        r = server_round + self.round_offset
        self._sent = head_from_record(arrays)
        self._current = {"round": r, "train": {"sites": []}, "evaluate": {"sites": []}}
        messages = self._only_ready(super().configure_train(r, arrays, config, grid))
        self._asked = [m.metadata.dst_node_id for m in messages]
        if self.progress is not None:
            self.progress.round_started(r, len(messages))
        return messages

    def aggregate_train(self, server_round, replies):
        """Reject bad updates (logging site and node), cap the claimed weights, then Flower's
        aggregation of the rest (weighted FedAvg, or the robust rule of a ``server.robust`` class)."""
        r = server_round + self.round_offset
        replies = self._from_sites(replies)
        accepted, accepted_rows, claims = [], [], {}
        rows = self._current.setdefault("train", {"sites": []})["sites"]
        for msg in replies:
            node = msg.metadata.src_node_id
            name = self.ledger.name(node, site_name(msg))
            row: dict[str, Any] = {"site": name, "node_id": node}
            reason, count = self._reject_reason(msg)
            if reason is None:
                head = head_from_record(msg.content[P.HEAD])
                metrics = dict(msg.content[P.METRICS])
                row.update(status="accepted", n_fine_tune=count, n_claimed=metrics[P.NUM_EXAMPLES],
                           train_loss=metrics.get(P.TRAIN_LOSS),
                           update_norm=update_norm(head, self._sent) if self._sent else None)
                accepted.append(msg)
                accepted_rows.append(row)
                claims[node] = count
            else:
                log.warning("round %d: update from site %s (node %s) rejected: %s", r, name, node, reason)
                row.update(status="rejected", reason=reason)
            rows.append(row)
        rows.extend(self._missing(r, "training", replies))
        if self.progress is not None:
            self.progress.stage_replies(r, "train", rows)
        weights = share_capped(claims, self.max_site_share)
        for msg, row in zip(accepted, accepted_rows):
            w = weights[msg.metadata.src_node_id]
            if w < row["n_fine_tune"]:
                log.warning("round %d: site %s (node %s) weight capped from %d to %.4g (max-site-share %g)",
                            r, row["site"], row["node_id"], row["n_fine_tune"], w, self.max_site_share)
            row["weight"] = w
            # FedAvg reads the weight from the reply: hand it the capped one.
            msg.content[P.METRICS][P.NUM_EXAMPLES] = float(w)
        if len(accepted) < self.min_sites:
            raise IchfedError(
                f"round {r}: only {len(accepted)} of {len(replies)} site updates were usable "
                f"(min-sites is {self.min_sites}); stopping the run"
            )
        arrays, metrics = super().aggregate_train(r, accepted)
        if arrays is not None:
            self.last_arrays = head_from_record(arrays)
            arrays = _as_float32(arrays)
        self._current["train"]["aggregated"] = dict(metrics) if metrics is not None else {}
        return arrays, metrics

    def _from_sites(self, replies) -> list:
        """The replies that came from the sites asked. For a site that went offline the SuperLink
        answers itself (an error from node 0, not from the site): that site is listed as missing."""
        replies = list(replies)
        for m in replies:
            if m.metadata.src_node_id not in self._asked:
                log.info("reply from node %s, which was not asked: %s", m.metadata.src_node_id,
                         m.error.reason if m.has_error() else "content ignored")
        return [m for m in replies if m.metadata.src_node_id in self._asked]

    def _missing(self, r: int, what: str, replies: list) -> list[dict[str, Any]]:
        """Rows for the sites that were asked this round and never answered (killed, timed out)."""
        answered = {m.metadata.src_node_id for m in replies}
        rows = []
        # A ready site that went offline is not even sampled: it is missing too.
        for node in sorted(set(self._asked) | (self.ready_nodes or set())):
            if node not in answered:
                name = self.ledger.name(node)
                log.warning("round %d: no %s reply from site %s (node %s)", r, what, name, node)
                rows.append({"site": name, "node_id": node, "status": "missing", "reason": "no reply"})
        return rows

    def _reject_reason(self, msg) -> tuple[str | None, int | None]:
        """Why a train reply is rejected (else None) and the fine-tune count it may weigh in with."""
        if msg.has_error():
            return f"error reply ({msg.error.reason})", None
        content = msg.content
        info = _info(msg)
        if info.get(P.INFO_STATUS) == P.STATUS_REFUSED:
            return f"site refused ({info.get(P.INFO_REASON)})", None
        if list(content.array_records.keys()) != [P.HEAD] or list(content.metric_records.keys()) != [P.METRICS]:
            return "reply does not hold exactly one head and one metric record", None
        why = self._identity(msg)
        if why:
            return why, None
        metrics = dict(content[P.METRICS])
        count, why = check_train_claims(metrics)
        if why is None:
            why = self.ledger.check_count(msg.metadata.src_node_id, metrics.get(P.N_FINE_TUNE, count))
        if why:
            return why, None
        try:
            head = head_from_record(content[P.HEAD])
        except Exception as e:  # an undecodable array is the sender's problem
            return f"head arrays unreadable ({type(e).__name__})", None
        return check_update(head, self._sent or head, self.max_update_norm), count

    def _identity(self, msg) -> str | None:
        return check_identity(self.ledger, msg)

    # -- evaluation -------------------------------------------------------------------------
    def configure_evaluate(self, server_round, arrays, config, grid):
        """Flower's configure_evaluate, limited to the sites that hold the verified bundle."""
        messages = self._only_ready(super().configure_evaluate(server_round + self.round_offset, arrays, config, grid))
        self._asked = [m.metadata.dst_node_id for m in messages]
        return messages

    def aggregate_evaluate(self, server_round, replies):
        """Per-site table and pooled metrics of the global head on every site's held-out split."""
        from flwr.app import MetricRecord

        r = server_round + self.round_offset
        rows = self._current.setdefault("evaluate", {"sites": []})["sites"]
        replies = self._from_sites(replies)
        for msg in replies:
            node = msg.metadata.src_node_id
            name = self.ledger.name(node, site_name(msg))
            info = _info(msg)
            if msg.has_error() or info.get(P.INFO_STATUS) != P.STATUS_OK:
                why = msg.error.reason if msg.has_error() else info.get(P.INFO_REASON, "no reason given")
                log.warning("round %d: evaluation at site %s (node %s) failed: %s", r, name, node, why)
                rows.append({"site": name, "node_id": node, "status": "failed", "reason": why})
                continue
            why = self._admit_metrics(msg)
            if why:
                log.warning("round %d: evaluation reply of site %s (node %s) dropped: %s", r, name, node, why)
                rows.append({"site": name, "node_id": node, "status": "rejected", "reason": why})
                continue
            parsed = metrics_from_reply(msg)
            rows.append({"site": name, "node_id": node, "status": "ok", P.MODEL_GLOBAL: parsed.get(P.MODEL_GLOBAL, {}),
                         "counts": parsed["counts"], "reasons": parsed["reasons"]})
        rows.extend(self._missing(r, "evaluation", replies))
        pooled = pooled_metrics(rows, P.MODEL_GLOBAL)
        self._current["evaluate"]["pooled"] = pooled
        self._log_table(r, rows, pooled)
        self.history.append(self._current)
        if self.on_round_end is not None and self.last_arrays is not None:
            self.on_round_end(r, self.last_arrays, self._current)
        return MetricRecord({k: float(v) for k, v in pooled.items() if isinstance(v, (int, float)) and v is not None})

    def _admit_metrics(self, msg) -> str | None:
        return admit_metrics_reply(self.ledger, msg)

    def _log_table(self, r: int, rows: list[dict[str, Any]], pooled: dict[str, Any]) -> None:
        log.info("round %d: global head on held-out splits", r)
        log.info("  %-16s %5s %6s %6s %6s %6s", "site", "n", "AUC", "Acc", "Sens", "Spec")
        for row in rows + [{"site": "pooled", P.MODEL_GLOBAL: {**pooled, "auc": pooled.get("pooled_auc")}}]:
            m = row.get(P.MODEL_GLOBAL) or {}
            log.info("  %-16s %5s %6s %6s %6s %6s", row["site"], m.get("n", "-"),
                     *(_fmt(m.get(k)) for k in ("auc", "accuracy", "sensitivity", "specificity")))


def _info(msg) -> dict[str, Any]:
    if not msg.has_content() or P.INFO not in msg.content.config_records:
        return {}
    return dict(msg.content[P.INFO])


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _as_float32(arrays):
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(np.asarray(arrays[k].numpy(), dtype=np.float32)) for k in arrays.keys()})


def _train_metrics(records, weight_key: str):
    """Total fine-tune cases and the case-weighted mean training loss."""
    from flwr.app import MetricRecord

    metrics = [next(iter(r.metric_records.values())) for r in records]
    total = sum(float(m[weight_key]) for m in metrics)
    loss = sum(float(m[P.TRAIN_LOSS]) * float(m[weight_key]) for m in metrics if P.TRAIN_LOSS in m) / total
    return MetricRecord({"n-fine-tune-total": int(total), P.TRAIN_LOSS: loss, "n-sites": len(metrics)})
