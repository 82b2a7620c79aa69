"""The statistics run (``mode = "stats"``): deliver the bundle, ask every site for its Table 1, pool it.

No head is trained or sent. The bundle travels only so that sites without reference masks can
segment their cases with the same model a federation would use; its delivery is the federation's
own (``server.distribution.distribute_bundle``), so a site that refuses the bundle is left out the same way.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from shared.federation import protocol as P
from shared.federation import stats_protocol as S

from .admission import SiteLedger
from .table1 import build_table1, parse_reply, write_table1

log = logging.getLogger(__name__)


def run_stats(grid, settings) -> dict[str, Any]:
    """Ask the sites on ``grid`` for their Table 1 and write it to ``settings.reports``; returns the table.

    ``settings`` is a ``server.settings.ServerSettings``. Sites that refuse or do not answer are listed
    under ``run.refused`` / ``run.missing`` and left out of the pooled column.
    """
    from flwr.app import ConfigRecord, RecordDict

    from shared.bundle import load_bundle

    from .distribution import distribute_bundle, send
    from .replies import refusal_reason, reply_status

    t0 = time.perf_counter()
    bundle = load_bundle(settings.bundle_path, settings.public_key)
    ready, distribution = distribute_bundle(grid, bundle, settings, SiteLedger())
    content = RecordDict({P.CONFIG: ConfigRecord({P.CFG_BUNDLE_HASH: bundle.hash})})
    replies = [m for m in send(grid, sorted(ready), S.QUERY_STATS, content, settings.round_timeout_s)
               if m.metadata.src_node_id in ready]
    sites, refused = [], []
    for msg in replies:
        name = ready[msg.metadata.src_node_id]
        if reply_status(msg) != P.STATUS_OK:
            why = refusal_reason(msg)
            log.warning("stats: site %s (node %s) refused: %s", name, msg.metadata.src_node_id, why)
            refused.append({"site": name, "reason": why})
            continue
        sites.append(parse_reply(name, _metrics(msg), _reasons(msg), _scanner(msg)))
    answered = {ready[m.metadata.src_node_id] for m in replies}
    missing = sorted(set(ready.values()) - answered)
    for name in missing:
        log.warning("stats: no reply from site %s", name)
    sites.sort(key=lambda s: s["site"])
    run = {"mode": "stats", "bundle_hash": bundle.hash, "bundle_name": bundle.manifest.name,
           "distribution": distribution.to_dict(), "refused": refused, "missing": missing,
           "wall_s": round(time.perf_counter() - t0, 2)}
    table = build_table1(sites, run)
    paths = write_table1(table, settings.reports)
    log.info("stats run finished: Table 1 at %s", paths["markdown"])
    return table


def _metrics(msg) -> dict[str, Any]:
    rec = msg.content.metric_records.get(P.METRICS)
    return dict(rec) if rec is not None else {}


def _reasons(msg) -> dict[str, str]:
    info = msg.content[P.INFO]
    return {k[: -len(P.REASON_SUFFIX)]: str(v) for k, v in info.items() if k.endswith(P.REASON_SUFFIX)}


def _scanner(msg) -> dict[str, list]:
    rec = msg.content.config_records.get(S.SCANNER)
    return {k: list(v) for k, v in rec.items()} if rec is not None else {}
