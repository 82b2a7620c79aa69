"""Reading a site's reply: its claimed name, status and reason, and its metrics as a typed row.

Nothing here decides whether a reply is believed (that is ``server.admission``); these helpers
only take a Flower ``Message`` apart, tolerating error replies, which carry no content.
"""

from __future__ import annotations

from typing import Any

from shared.federation import protocol as P

from .records import OK, MetricsRow


def info(msg) -> dict[str, Any]:
    """The reply's INFO record as a dict (empty for an error reply or a reply without one)."""
    if msg.has_error() or not msg.has_content() or P.INFO not in msg.content.config_records:
        return {}
    return dict(msg.content[P.INFO])


def site_name(msg) -> str:
    """The site's name from its reply, else ``node-<id>`` (error replies carry none)."""
    name = info(msg).get(P.INFO_SITE)
    if isinstance(name, str) and P.SITE_NAME_RE.match(name):
        return name
    return f"node-{msg.metadata.src_node_id}"


def reply_status(msg) -> str | None:
    """``ok`` / ``have`` / ``need`` / ``refused`` as the site says, or None (error reply, no INFO)."""
    status = info(msg).get(P.INFO_STATUS)
    return status if isinstance(status, str) else None


def refusal_reason(msg) -> str:
    """Why a site refused or failed: Flower's error text, or the reply's reason code."""
    if msg.has_error():
        return f"error reply ({msg.error.reason})"
    return str(info(msg).get(P.INFO_REASON, "no reason given"))


def metrics(msg) -> dict[str, Any]:
    """The reply's METRICS record as a dict (empty when it has none)."""
    if msg.has_error() or not msg.has_content() or P.METRICS not in msg.content.metric_records:
        return {}
    return dict(msg.content[P.METRICS])


def metrics_row(msg, site: str, *, final: bool = False, models: tuple[str, ...] | None = None) -> MetricsRow:
    """An admitted evaluate, final or segmenter reply as a row: ``<model>.<metric>`` keys per model (every
    model of the stage present, if empty; ``models`` names them for a segmenter reply), the site counts,
    and each ``<key>.reason`` (an undefined or withheld metric is None beside its reason)."""
    models = models or (P.FINAL_ARMS if final else (P.MODEL_GLOBAL,))
    row = MetricsRow(site=site, node_id=msg.metadata.src_node_id, status=OK, final=final,
                     arms={m: {} for m in models})
    for key, value in metrics(msg).items():
        parts = P.split_metric_key(key)
        if parts is None:
            row.counts[key] = value
        else:
            row.arms.setdefault(parts[0], {})[parts[1]] = value
    for key, value in info(msg).items():
        if key.endswith(P.REASON_SUFFIX):
            target = key[: -len(P.REASON_SUFFIX)]
            row.reasons[target] = value
            parts = P.split_metric_key(target)
            if parts is not None:
                row.arms.setdefault(parts[0], {}).setdefault(parts[1], None)
    if final:
        row.kept_bundle = info(msg).get(P.INFO_BUNDLE_HASH)
        row.bundle_problem = info(msg).get(P.INFO_REASON)
        row.adoption = info(msg).get(P.INFO_ADOPTION)
    return row
