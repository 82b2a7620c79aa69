"""A run you can watch: one JSON line per event in ``events.jsonl``, and progress on stderr (a
``tqdm`` bar on a terminal, a line at least every 30 s elsewhere: :func:`bar`, :func:`heartbeat`).

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


# -- progress on a console that is not a terminal --------------------------------------------------
#
# A tqdm bar hides itself when stderr is not a terminal (a log file, journald, CI). Long work there
# must still say it is alive: ``bar`` is tqdm on a terminal and otherwise prints one line at least
# every ``INTERVAL_S`` seconds, and ``heartbeat`` does the same for work without a count (naming the
# innermost bar, or the last log message). One ticker thread serves every open bar and heartbeat of
# the process, and prints for the innermost one only.

INTERVAL_S = float(os.environ.get("ICHFED_PROGRESS_INTERVAL", "30"))
_quiet = False


def set_quiet(quiet: bool) -> None:
    """No progress lines at all (``ichfed -q``); tqdm bars on a terminal are unaffected."""
    global _quiet
    _quiet = bool(quiet)


def _on_terminal() -> bool:
    import sys

    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def bar(iterable=None, *, desc: str, total: int | None = None, unit: str = "it", **tqdm_kwargs: Any):
    """A progress bar over ``iterable`` (or updated by hand): ``tqdm`` on a terminal, elsewhere a line
    on stderr at least every ``INTERVAL_S`` seconds ("desc: 12/40 case, 1m30s") and one at the end
    when the work took longer than that. Use it where a ``tqdm(..., disable=None)`` would go."""
    if _on_terminal():
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=unit, **tqdm_kwargs)
    return _LineBar(iterable, desc=desc, total=total, unit=unit)


@contextlib.contextmanager
def heartbeat(label: str) -> Iterator[None]:
    """Around long work without a count (a command): off a terminal, a line at least every
    ``INTERVAL_S`` seconds naming the innermost open bar or the last log message."""
    if _on_terminal() or _quiet:
        yield
        return
    activity = _Activity(label, None, None, "")
    handler = _LastMessage(activity)
    logging.getLogger().addHandler(handler)
    _TICKER.push(activity)
    try:
        yield
    finally:
        _TICKER.pop(activity)
        logging.getLogger().removeHandler(handler)


class _Activity:
    """One open bar or heartbeat: what the ticker prints about it."""

    def __init__(self, desc: str, total: int | None, iterable: Any, unit: str) -> None:
        self.desc, self.unit, self.n = desc, unit, 0
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total = total
        self.t0 = time.monotonic()
        self.last_message: str | None = None

    def line(self) -> str:
        elapsed = _clock(time.monotonic() - self.t0)
        if self.unit:
            count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
            return f"{self.desc}: {count} {self.unit}, {elapsed}"
        inner = _TICKER.innermost_bar()
        now = inner.line() if inner is not None else (f"last: {self.last_message}" if self.last_message else "working")
        return f"{self.desc} ({elapsed}): {now}"


class _LineBar(_Activity):
    """The off-terminal bar: counts like tqdm, reports through the ticker."""

    def __init__(self, iterable: Any, *, desc: str, total: int | None, unit: str) -> None:
        super().__init__(desc, total, iterable, unit or "it")
        self.iterable = iterable
        self.closed = False
        if not _quiet:
            _TICKER.push(self)

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "_LineBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass  # the line names the count; a terminal bar shows the postfix

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not _quiet and _TICKER.pop(self) and time.monotonic() - self.t0 >= INTERVAL_S:
            _TICKER.emit(f"{self.desc}: done, {self.n} {self.unit} in {_clock(time.monotonic() - self.t0)}")


class _LastMessage(logging.Handler):
    """Keeps the last INFO-or-above message of the process for the heartbeat's line."""

    def __init__(self, activity: _Activity) -> None:
        super().__init__(logging.INFO)
        self.activity = activity

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.activity.last_message = record.getMessage().splitlines()[0][:120]
        except Exception:  # a message that cannot be formatted is simply not shown
            pass


class _Ticker:
    """The one thread that prints progress lines for the innermost open activity."""

    def __init__(self) -> None:
        self.stack: list[_Activity] = []
        self.lock = threading.Lock()
        self.last_line = time.monotonic()
        self.thread: threading.Thread | None = None

    def push(self, activity: _Activity) -> None:
        with self.lock:
            if not self.stack:
                self.last_line = time.monotonic()
            self.stack.append(activity)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="ichfed-progress", daemon=True)
                self.thread.start()

    def pop(self, activity: _Activity) -> bool:
        with self.lock:
            if activity in self.stack:
                self.stack.remove(activity)
                return True
            return False

    def innermost_bar(self) -> _Activity | None:
        with self.lock:
            return next((a for a in reversed(self.stack) if a.unit), None)

    def emit(self, line: str) -> None:
        import sys

        self.last_line = time.monotonic()
        try:
            sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {line}\n")
            sys.stderr.flush()
        except (OSError, ValueError):  # a closed console must not kill the work
            pass

    def _run(self) -> None:
        while True:
            time.sleep(min(1.0, INTERVAL_S / 4))
            with self.lock:
                if not self.stack:
                    self.thread = None
                    return
                # A heartbeat at the bottom names the innermost bar itself ("bootstrap (3m): segment 5/12")
                top = self.stack[0] if not self.stack[0].unit else self.stack[-1]
                due = time.monotonic() - self.last_line >= INTERVAL_S
            if due:
                self.emit(top.line())


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


_TICKER = _Ticker()
