"""Talking to the sites outside the training rounds: wait for them, send a message to many, and
hand out the reference bundle (``distribute_bundle``) so that every site holds the verified bundle
before a round starts. ``server.stats_run`` uses the same helpers.

The bundle offer is the run's first message. Each site answers with its status (have / need /
refused) and the number of fine-tune cases its split will give (``n-fine-tune``, planned from its
labelled cases before any preprocessing), and, when it opted in to segmenter rounds (issue 24), its
masked fine-tune cases (``n-masked-fine-tune``). A site that plans fewer than the protocol's minimum, or
refuses itself for that reason, is left out *before* the bundle (hundreds of MB) is sent, with a
log line that names the fix.
"""

from __future__ import annotations

import logging
import time

from shared.federation import protocol as P
from shared.plumbing.errors import IchfedError

from . import replies as R
from .admission import SiteLedger, as_count, check_reply_records
from .records import REJECTED, Distribution, SiteRow
from .settings import ServerSettings

log = logging.getLogger(__name__)

TOO_FEW_FIX = ("raise fine_tune_fraction in its site config or add labelled cases "
               "(`ichfed site check` shows the split the run will use)")


def _wait_for_nodes(grid, n: int, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.monotonic() > deadline:
            raise IchfedError(f"only {len(nodes)} site(s) connected within {timeout_s:g} s; min-sites is {n}")
        log.info("waiting for sites: %d connected, %d needed", len(nodes), n)
        time.sleep(1.0)


def send(grid, node_ids, message_type: str, content, timeout_s: float) -> list:
    """Send ``content`` to every node of ``node_ids`` and return the replies that came back."""
    from flwr.app import Message

    messages = [Message(content=content, dst_node_id=n, message_type=message_type) for n in node_ids]
    return list(grid.send_and_receive(messages, timeout=timeout_s)) if messages else []


def distribute_bundle(grid, bundle, settings: ServerSettings,
                      ledger: SiteLedger | None = None) -> tuple[dict[int, str], Distribution]:
    """Ask every site which bundle it has and whether it can run; send the bundle to those that lack it.

    Returns ``{node_id: site}`` of the sites holding the verified bundle, and the summary for the
    report. Sites that refuse (failed verification, too few cases) are logged by name and node and
    left out, and so is a node claiming a name another node already holds (``ledger``: the first
    claim wins). Too few ready sites is an ``IchfedError`` that lists the refusals.
    """
    ledger = ledger if ledger is not None else SiteLedger()
    from flwr.app import ConfigRecord, RecordDict

    nodes = _wait_for_nodes(grid, settings.min_sites, settings.wait_for_sites_s)
    trains = getattr(settings, "mode", "federate") != "stats"  # a stats run needs no fine-tune cases
    offer = RecordDict({P.CONFIG: ConfigRecord({P.CFG_BUNDLE_HASH: bundle.hash, P.CFG_DELIVER: False,
                                                P.CFG_TRAINS: trains})})
    ready: dict[int, str] = {}
    summary = Distribution()
    need: list[int] = []
    for msg in send(grid, nodes, P.QUERY_BUNDLE, offer, settings.round_timeout_s):
        node, name = msg.metadata.src_node_id, R.site_name(msg)
        why = _offer_refusal(ledger, msg, summary)
        if why:
            summary.refused.append(SiteRow(site=name, node_id=node, status=REJECTED, reason=why))
        elif R.reply_status(msg) == P.STATUS_HAVE:
            ready[node] = name
            summary.had.append((name, node))
        else:
            need.append(node)
    if need:
        _deliver(grid, bundle, need, settings, ledger, ready, summary)
    if len(ready) < settings.min_sites:
        refused = "; ".join(f"{r.label}: {r.reason}" for r in summary.refused)
        raise IchfedError(f"only {len(ready)} site(s) hold the verified bundle "
                          f"({', '.join(sorted(ready.values())) or 'none'}); min-sites is {settings.min_sites}"
                          + (f"; refused: {refused}" if refused else ""))
    log.info("sites ready: %s", ", ".join(f"{name} (node {node})" for node, name in sorted(ready.items())))
    return ready, summary


def _offer_refusal(ledger: SiteLedger, msg, summary: Distribution) -> str | None:
    """Why a reply to the bundle offer leaves its site out (None: it has or needs the bundle)."""
    label = f"{R.site_name(msg)} (node {msg.metadata.src_node_id})"
    status = R.reply_status(msg)
    if msg.has_error() or status not in (P.STATUS_HAVE, P.STATUS_NEED):
        why = R.refusal_reason(msg)
        fix = f"; {TOO_FEW_FIX}" if why == P.REASON_TOO_FEW else ""
        log.warning("bundle check: site %s refused: %s%s", label, why, fix)
        return why
    why = check_reply_records(msg, P.QUERY_BUNDLE) or ledger_claim(ledger, msg)
    planned = R.metrics(msg).get(P.N_FINE_TUNE)
    if why is None and planned is not None:
        n = as_count(planned)
        if n is None:
            why = f"'{P.N_FINE_TUNE}' is {planned!r}, not a case count"
        elif n < P.MIN_CASES_FLOOR:
            why = f"{P.REASON_TOO_FEW}: plans {n} fine-tune cases, fewer than {P.MIN_CASES_FLOOR}; {TOO_FEW_FIX}"
        else:
            summary.planned_fine_tune[R.site_name(msg)] = n
    masked = as_count(R.metrics(msg).get(P.N_MASKED_FINE_TUNE))
    if why is None and masked is not None and masked >= P.MIN_CASES_FLOOR:  # opted in to segmenter rounds
        summary.planned_masked[msg.metadata.src_node_id] = masked
    if why:
        log.warning("bundle check: site %s refused for this run: %s", label, why)
    return why


def ledger_claim(ledger: SiteLedger, msg) -> str | None:
    """Why the name in ``msg`` cannot be this node's (another node holds it, or it is malformed)."""
    name = R.info(msg).get(P.INFO_SITE)
    if not isinstance(name, str) or not P.SITE_NAME_RE.match(name):
        return f"site name {name!r} is missing or malformed"
    return ledger.claim_name(msg.metadata.src_node_id, name)


def _deliver(grid, bundle, need: list[int], settings: ServerSettings, ledger: SiteLedger,
             ready: dict[int, str], summary: Distribution) -> None:
    from flwr.app import ConfigRecord, RecordDict

    from shared.bundle.transport import bundle_to_records

    arrays, config = bundle_to_records(bundle.path)
    content = RecordDict({P.CONFIG: ConfigRecord({P.CFG_BUNDLE_HASH: bundle.hash, P.CFG_DELIVER: True}),
                          P.BUNDLE_ARRAYS: arrays, P.BUNDLE_CONFIG: config})
    log.info("sending bundle %s to %d site(s)", bundle.hash[:12], len(need))
    for msg in send(grid, need, P.QUERY_BUNDLE, content, settings.round_timeout_s):
        node, name = msg.metadata.src_node_id, ledger.name(msg.metadata.src_node_id, R.site_name(msg))
        if node not in need:
            continue  # the SuperLink answering for a site that went offline
        why = R.refusal_reason(msg) if R.reply_status(msg) != P.STATUS_HAVE else ledger_claim(ledger, msg)
        if why is None:
            ready[node] = name
            summary.received.append((name, node))
        else:
            log.warning("bundle delivery: site %s (node %s) refused: %s", name, node, why)
            summary.refused.append(SiteRow(site=name, node_id=node, status=REJECTED, reason=why))
