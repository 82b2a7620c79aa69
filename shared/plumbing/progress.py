"""A run you can watch: one JSON line per event in ``events.jsonl`` and a ``tqdm`` bar on stderr.

The server writes ``<state_dir>/events.jsonl`` (bundle distribution, each round's start and end
with its metrics, the final evaluation); each site writes ``<site state_dir>/events.jsonl`` for
its own stages. ``tail -f`` follows either; every line is a complete JSON object
(``{"t": ISO time, "elapsed_s": ..., "event": ..., ...}``) written with one ``write`` call on
a file opened for appending, so a reader never sees half a line and two writers never interleave
inside one.

The coordinator's bar and the per-round figures are ``server.run_progress``.
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


class SiteProgress:
    """A site's own stages, as events in ``<state_dir>/events.jsonl``."""

    def __init__(self, state_dir: str | os.PathLike, site: str) -> None:
        self.events = EventLog(Path(state_dir) / EVENTS_NAME)
        self.site = site

    @contextlib.contextmanager
    def stage(self, name: str, **fields: Any) -> Iterator[dict[str, Any]]:
        """Write ``stage_started`` / ``stage_finished`` (with its seconds, or ``stage_failed``)
        around a block; the block may add figures to the yielded dict. Repeated case-level
        conditions counted meanwhile (``shared.plumbing.logs.tally``) are summarised once at the end."""
        from shared.plumbing.logs import flush_tallies

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
    records go to the site's ``site.log`` (``shared.plumbing.logs.site_file``).

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
        from shared.plumbing.logs import setup_worker, site_file

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
