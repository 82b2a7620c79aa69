"""The final evaluation: the federated head on every site next to the reference and local-only
heads (the four arms, ``client.final``), in the message that also delivers the federated bundle.

Replies are admitted like an evaluate reply (``server.admission``, the final stage's keys: the
four arms); one that fails is dropped and logged with its node. A site that never answers (its
process died) is listed as missing.
"""

from __future__ import annotations

import logging

from shared.federation import protocol as P
from shared.models.head import HeadSet

from . import replies as R
from .admission import SiteLedger, admit_metrics_reply
from .records import (
    FAILED,
    MISSING,
    REJECTED,
    FinalEvaluation,
    MetricsRow,
    PooledMetrics,
)
from .settings import ServerSettings

log = logging.getLogger(__name__)


def final_evaluation(grid, ready: dict[int, str], heads: HeadSet, bundle, final_bundle,
                     settings: ServerSettings, ledger: SiteLedger | None = None, *, groups=None,
                     segmenter_hash: str | None = None) -> FinalEvaluation:
    """Ask every ready site for the four arms with ``heads`` (each at the site's own threshold);
    ``final_bundle`` (a loaded bundle, or None) travels in the same message, as its difference
    from ``bundle``, which every site holds.

    With a federated segmenter (issue 24), ``groups`` lists ``(nodes, parent, final bundle)``: each site
    gets the federated bundle derived from the segmenter it runs, against that segmenter's bundle (which
    it holds); ``segmenter_hash`` names the segmenter bundle beside the run's ``bundle``.
    """
    from flwr.app import Message

    ledger = ledger if ledger is not None else SiteLedger()
    groups = groups or [(set(ready), bundle, final_bundle)]
    messages = [Message(content=_content(heads, bundle, parent, fed, settings, segmenter_hash), dst_node_id=n,
                        message_type=P.QUERY_FINAL)
                for nodes, parent, fed in groups for n in sorted(nodes)]
    replies = [m for m in (grid.send_and_receive(messages, timeout=settings.round_timeout_s) if messages else [])
               if m.metadata.src_node_id in ready]  # an offline site's answer comes from the SuperLink (node 0)
    sites = [_row(msg, ready, ledger) for msg in replies]
    answered = {m.metadata.src_node_id for m in replies}
    for node in sorted(set(ready) - answered):
        log.warning("final evaluation: no reply from site %s (node %s)", ready[node], node)
        sites.append(MetricsRow(site=ready[node], node_id=node, status=MISSING, reason="no reply", final=True))
    sites.sort(key=lambda s: (s.site, s.node_id))
    return FinalEvaluation(sites=sites, pooled={m: PooledMetrics.pool(sites, m) for m in P.FINAL_ARMS})


def _content(heads: HeadSet, bundle, parent, final_bundle, settings: ServerSettings, segmenter_hash: str | None):
    from flwr.app import ConfigRecord, RecordDict

    from shared.bundle.transport import bundle_to_records

    content = RecordDict({
        P.HEAD: heads.to_record(),
        P.CONFIG: ConfigRecord({P.CFG_BUNDLE_HASH: bundle.hash, P.CFG_NUM_ROUNDS: settings.num_rounds,
                                P.CFG_DELIVER: final_bundle is not None,
                                **({P.CFG_SEG_BUNDLE_HASH: segmenter_hash} if segmenter_hash else {})}),
    })
    if final_bundle is not None:
        # Every site here trained on ``parent``'s pipeline: send only what differs from it (the new head).
        content[P.BUNDLE_ARRAYS], content[P.BUNDLE_CONFIG] = bundle_to_records(final_bundle.path, parent=parent)
    return content


def _row(msg, ready: dict[int, str], ledger: SiteLedger) -> MetricsRow:
    node = msg.metadata.src_node_id
    name = ready[node]
    if R.reply_status(msg) != P.STATUS_OK:
        row = MetricsRow(site=name, node_id=node, status=FAILED, reason=R.refusal_reason(msg), final=True)
        log.warning("final evaluation: site %s refused: %s", row.label, row.reason)
        return row
    why = admit_metrics_reply(ledger, msg, P.QUERY_FINAL)
    if why:
        row = MetricsRow(site=name, node_id=node, status=REJECTED, reason=why, final=True)
        log.warning("final evaluation: reply of site %s dropped: %s", row.label, why)
        return row
    return R.metrics_row(msg, name, final=True)
