"""Talking to the sites outside the training rounds: wait for them, send a message to many, and
hand out the reference bundle (``distribute_bundle``) so that every site holds the verified bundle
before a round starts. ``server.stats_run`` uses the same helpers.
"""

from __future__ import annotations

import logging
import time

from shared.federation import protocol as P
from shared.plumbing.errors import IchfedError

from .admission import SiteLedger
from .settings import ServerSettings
from .strategy import site_name

log = logging.getLogger(__name__)


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
    from flwr.app import Message

    messages = [Message(content=content, dst_node_id=n, message_type=message_type) for n in node_ids]
    return list(grid.send_and_receive(messages, timeout=timeout_s)) if messages else []


def distribute_bundle(grid, bundle, settings: ServerSettings,
                      ledger: SiteLedger | None = None) -> tuple[dict[int, str], dict[str, Any]]:
    """Ask every site which bundle it has and send the bundle to those that lack it.

    Returns ``{node_id: site}`` of the sites holding the verified bundle, and a summary for the
    report. Sites that refuse (failed verification) are logged by name and left out, and so is
    a node claiming a name another node already holds (``ledger``: the first claim wins).
    """
    ledger = ledger if ledger is not None else SiteLedger()
    from flwr.app import ConfigRecord, RecordDict

    from shared.bundle.transport import bundle_to_records

    nodes = _wait_for_nodes(grid, settings.min_sites, settings.wait_for_sites_s)
    offer = RecordDict({P.CONFIG: ConfigRecord({P.CFG_BUNDLE_HASH: bundle.hash, P.CFG_DELIVER: False})})
    ready: dict[int, str] = {}
    summary: dict[str, list[str]] = {"had": [], "received": [], "refused": []}
    need: list[int] = []
    for msg in send(grid, nodes, P.QUERY_BUNDLE, offer, settings.round_timeout_s):
        status = reply_status(msg)
        clash = name_clash(ledger, msg)
        if clash:
            log.warning("bundle check: node %s refused for this run: %s", msg.metadata.src_node_id, clash)
            summary["refused"].append(f"{site_name(msg)} (node {msg.metadata.src_node_id})")
        elif status == P.STATUS_HAVE:
            ready[msg.metadata.src_node_id] = site_name(msg)
            summary["had"].append(site_name(msg))
        elif status == P.STATUS_NEED:
            need.append(msg.metadata.src_node_id)
        else:
            log_refusal(msg, "bundle check")
            summary["refused"].append(site_name(msg))
    if need:
        arrays, config = bundle_to_records(bundle.path)
        content = RecordDict({P.CONFIG: ConfigRecord({P.CFG_BUNDLE_HASH: bundle.hash, P.CFG_DELIVER: True}),
                              P.BUNDLE_ARRAYS: arrays, P.BUNDLE_CONFIG: config})
        log.info("sending bundle %s to %d site(s)", bundle.hash[:12], len(need))
        for msg in send(grid, need, P.QUERY_BUNDLE, content, settings.round_timeout_s):
            if reply_status(msg) == P.STATUS_HAVE:
                ready[msg.metadata.src_node_id] = site_name(msg)
                summary["received"].append(site_name(msg))
            else:
                log_refusal(msg, "bundle delivery")
                summary["refused"].append(site_name(msg))
    if len(ready) < settings.min_sites:
        raise IchfedError(f"only {len(ready)} site(s) hold the verified bundle ({', '.join(sorted(ready.values())) or 'none'}); "
                          f"min-sites is {settings.min_sites}")
    log.info("sites ready: %s", ", ".join(sorted(ready.values())))
    return ready, {k: sorted(v) for k, v in summary.items()}


def name_clash(ledger: SiteLedger, msg) -> str | None:
    """Why the name in ``msg`` cannot be this node's (another node holds it), else None."""
    if msg.has_error() or P.INFO not in msg.content.config_records:
        return None  # an error reply carries no name to claim
    name = msg.content[P.INFO].get(P.INFO_SITE)
    if not isinstance(name, str) or not P.SITE_NAME_RE.match(name):
        return f"site name {name!r} is missing or malformed"
    return ledger.claim_name(msg.metadata.src_node_id, name)


def reply_status(msg) -> str | None:
    if msg.has_error() or P.INFO not in msg.content.config_records:
        return None
    return msg.content[P.INFO].get(P.INFO_STATUS)


def log_refusal(msg, what: str) -> None:
    why = msg.error.reason if msg.has_error() else msg.content[P.INFO].get(P.INFO_REASON, "no reason given")
    log.warning("%s: site %s refused: %s", what, site_name(msg), why)
