"""A run you can watch: one JSON line per event in ``events.jsonl`` and a ``tqdm`` bar on stderr.

The server writes ``<state_dir>/events.jsonl`` (bundle distribution, each round's start and end
with its metrics, the final evaluation); each site writes ``<site state_dir>/events.jsonl`` for
its own stages. ``tail -f`` follows either; every line is a complete JSON object
(``{"t": ISO time, "elapsed_s": ..., "event": ..., ...}``) written with one ``write`` call on
a file opened for appending, so a reader never sees half a line and two writers never interleave
inside one.

The bar (``disable=None``: off when stderr is not a terminal) shows round k of R, the sites that
answered / were expected / refused in the last stage, elapsed time and tqdm's estimate of the
time remaining.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator

EVENTS_NAME = "events.jsonl"

log = logging.getLogger(__name__)


class EventLog:
    """Append-only JSON Lines file; thread-safe, one ``os.write`` per event."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._t0 = time.monotonic()

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event; returns the record written."""
        record = {"t": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
                  "elapsed_s": round(time.monotonic() - self._t0, 3), "event": event,
                  **{k: _jsonable(v) for k, v in fields.items()}}
        line = (json.dumps(record, allow_nan=False, sort_keys=False) + "\n").encode("utf-8")
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)  # one call: the line lands whole at the end of the file
            finally:
                os.close(fd)
        return record


def read_events(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every event in an ``events.jsonl`` (a torn last line, if any, is skipped)."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    if hasattr(v, "item"):  # numpy scalars
        return _jsonable(v.item())
    return v


class RunProgress:
    """The coordinator's view of a run: events plus a bar of rounds."""

    def __init__(self, folder: str | os.PathLike, total_rounds: int, *, first_round: int = 1,
                 desc: str = "federation") -> None:
        from tqdm import tqdm

        self.events = EventLog(Path(folder) / EVENTS_NAME)
        self.total_rounds = total_rounds
        self.bar = tqdm(total=total_rounds, initial=max(0, first_round - 1), desc=desc, unit="round",
                        disable=None, dynamic_ncols=True, leave=True)
        self.events.write("run_started", total_rounds=total_rounds, first_round=first_round)

    def event(self, event: str, **fields: Any) -> None:
        """Any other event (bundle distribution, final evaluation)."""
        self.events.write(event, **fields)

    def round_started(self, r: int, expected: int) -> None:
        """Round ``r`` asks ``expected`` sites to train."""
        self.bar.set_description(f"round {r}/{self.total_rounds}")
        self.bar.set_postfix_str(f"training at {expected} sites")
        self.events.write("round_started", round=r, expected=expected)

    def stage_replies(self, r: int, stage: str, rows: list[dict[str, Any]]) -> dict[str, int]:
        """Count the replies of one stage (``train`` / ``evaluate``) from the strategy's rows."""
        counts = reply_counts(rows)
        self.bar.set_postfix_str(f"{stage}: {counts['answered']}/{counts['expected']} answered, "
                                 f"{counts['refused']} refused")
        self.events.write(f"{stage}_replies", round=r, **counts)
        return counts

    def round_finished(self, r: int, record: dict[str, Any]) -> dict[str, Any]:
        """Round ``r`` is over: write its metrics (see :func:`round_metrics`) and advance the bar."""
        metrics = round_metrics(record)
        self.events.write("round_finished", round=r, **metrics)
        self.bar.update(1)
        auc = metrics.get("global_pooled_auc")
        self.bar.set_postfix_str(f"answered {metrics['train']['answered']}/{metrics['train']['expected']}, "
                                 f"refused {metrics['train']['refused']}"
                                 + (f", pooled AUC {auc:.3f}" if auc is not None else ""))
        return metrics

    def close(self, **fields: Any) -> None:
        """End of the run (``run_finished`` with ``fields``)."""
        self.events.write("run_finished", **fields)
        self.bar.close()


def reply_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """expected / answered / refused / missing from a stage's per-site rows."""
    missing = sum(1 for r in rows if r.get("status") == "missing")
    refused = sum(1 for r in rows if r.get("status") in ("rejected", "failed", "refused"))
    return {"expected": len(rows), "answered": len(rows) - missing, "refused": refused, "missing": missing}


def head_payload_bytes() -> int:
    """Bytes of one head (weight and bias, float32) as the arrays carry them."""
    from shared import protocol as P

    return 4 * sum(math.prod(s) for s in P.HEAD_SHAPES.values())


def round_metrics(record: dict[str, Any]) -> dict[str, Any]:
    """One round's figures from the strategy's round record: reply counts, the global head's
    pooled and mean-site AUC, the training losses and update norms, and the head payload bytes
    sent to and received from the sites (arrays only, not message framing)."""
    from shared import protocol as P

    train_rows = (record.get("train") or {}).get("sites", [])
    eval_rows = (record.get("evaluate") or {}).get("sites", [])
    pooled = (record.get("evaluate") or {}).get("pooled") or {}
    accepted = [r for r in train_rows if r.get("status") == "accepted"]
    losses = [r["train_loss"] for r in accepted if r.get("train_loss") is not None]
    norms = [r["update_norm"] for r in accepted if r.get("update_norm") is not None]
    aggregated = (record.get("train") or {}).get("aggregated") or {}
    head = head_payload_bytes()
    return {
        "train": reply_counts(train_rows),
        "evaluate": reply_counts(eval_rows),
        "global_pooled_auc": pooled.get("pooled_auc"),
        "global_mean_site_auc": pooled.get("mean_site_auc"),
        "site_aucs": {r["site"]: (r.get(P.MODEL_GLOBAL) or {}).get("auc") for r in eval_rows if r.get("status") == "ok"},
        "train_loss_weighted": aggregated.get(P.TRAIN_LOSS),
        "train_loss_by_site": {r["site"]: r.get("train_loss") for r in accepted},
        "update_norm_mean": sum(norms) / len(norms) if norms else None,
        "update_norm_max": max(norms) if norms else None,
        "head_bytes_sent": head * (len(train_rows) + len(eval_rows)),
        "head_bytes_received": head * len(accepted),
    }


class SiteProgress:
    """A site's own stages, as events in ``<state_dir>/events.jsonl``."""

    def __init__(self, state_dir: str | os.PathLike, site: str) -> None:
        self.events = EventLog(Path(state_dir) / EVENTS_NAME)
        self.site = site

    @contextlib.contextmanager
    def stage(self, name: str, **fields: Any) -> Iterator[dict[str, Any]]:
        """Write ``stage_started`` / ``stage_finished`` (with its seconds, or ``stage_failed``)
        around a block; the block may add figures to the yielded dict. Repeated case-level
        conditions counted meanwhile (``shared.logs.tally``) are summarised once at the end."""
        from shared.logs import flush_tallies

        extra: dict[str, Any] = {}
        t0 = time.monotonic()
        self.events.write("stage_started", site=self.site, stage=name, **fields)
        try:
            yield extra
        except BaseException as e:
            self.events.write("stage_failed", site=self.site, stage=name, error=type(e).__name__,
                              seconds=round(time.monotonic() - t0, 3))
            raise
        finally:
            counts = flush_tallies(log, prefix=f"site {self.site}: ", console=False)
        self.events.write("stage_finished", site=self.site, stage=name, seconds=round(time.monotonic() - t0, 3),
                          conditions={k: {"cases": n, "hits": h} for k, (h, n) in counts.items()}, **extra)


_in_site_mod = threading.local()  # set while a site mod handles a message: nested ones stand aside


def site_mod(locate):
    """A Flower ClientApp mod: each message a site handles is one stage in the site's
    ``events.jsonl`` (``stage_started`` / ``stage_finished`` with its seconds) and its log
    records go to the site's ``site.log`` (``shared.logs.site_file``).

    ``locate(context)`` returns ``(state_dir, site_name)``, or None when the site is unknown
    (the message is then handled without either). Wired twice (the ClientApp's own and a
    simulation runner's), the outer one records and the inner one stands aside.
    """
    return _SiteMod(locate)


class _SiteMod:
    """``site_mod``'s mod. A module-level class, so that Ray pickles it by reference: a closure
    would be pickled by value together with the module's ``threading.local``, which cannot be."""

    def __init__(self, locate) -> None:
        self.locate = locate

    def __call__(self, message, context, call_next):
        from shared.logs import setup_worker, site_file

        if getattr(_in_site_mod, "active", False):
            return call_next(message, context)  # an outer site mod already records this message
        setup_worker()
        where = None
        try:
            where = self.locate(context)
        except Exception:  # an unusable config is reported by the handler itself
            where = None
        if where is None:
            return call_next(message, context)
        state_dir, site = where
        _in_site_mod.active = True
        try:
            with site_file(state_dir, site):
                with SiteProgress(state_dir, site).stage(message.metadata.message_type) as figures:
                    reply = call_next(message, context)
                    figures["reply"] = "error" if reply.has_error() else "ok"
        finally:
            _in_site_mod.active = False
        return reply
