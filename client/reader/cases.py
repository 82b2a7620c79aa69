"""Cases the reader is working on: a single worker runs them one at a time, in arrival order.

Each case lives in a temporary folder that is removed as soon as its prediction is done (or
fails); what stays is the result JSON and the display volumes, in memory only, under a random
token, until the case expires or the page closes it.

Capacity is bounded by refusing new uploads (``StoreFull``, answered 429 with Retry-After),
never by evicting finished cases: on a shared reader, one user's uploads must not make another
user's result vanish while it is being read. Finished cases go only when idle past the TTL or
when their page closes them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from shared.plumbing.errors import IchfedError
from shared.prediction import PredictionResult

from .render import CaseView, make_view

log = logging.getLogger(__name__)

STAGES = ("queued", "reading", "segmentation", "classification", "rendering", "done", "error")
PENDING = ("queued", "reading", "segmentation", "classification", "rendering")
# Until a case has finished, assume one takes this long when telling a client when to retry.
DEFAULT_CASE_S = 30.0


class StoreFull(IchfedError):
    """No room for another case now; ``retry_after_s`` says when to try again."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclasses.dataclass
class Case:
    """One uploaded case; ``state`` walks through ``STAGES``."""

    token: str
    folder: Path
    display_name: str
    state: str = "queued"
    message: str | None = None
    result: PredictionResult | None = None
    view: CaseView | None = None
    queued_at: float = dataclasses.field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    touched: float = dataclasses.field(default_factory=time.monotonic)
    seq: int = 0


class CaseStore:
    """Holds cases by token and runs them through ``analyse`` on one worker thread.

    ``analyse(input_path, progress)`` returns ``(PredictionResult, image, mask)``; ``progress(stage)``
    reports the stage it is in. One worker means concurrent uploads queue rather than compete
    for the one GPU or the CPU.
    """

    def __init__(self, analyse: Callable, ttl_s: float = 1800.0, max_cases: int = 8, max_queued: int = 4) -> None:
        self._analyse = analyse
        self._ttl_s = ttl_s
        self._max_cases = max_cases
        self._max_queued = max_queued
        self._last_run_s: float | None = None
        self._cases: dict[str, Case] = {}
        self._lock = threading.Lock()
        self._seq = 0
        self._running_seq = 0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ichfed-reader")

    def admit(self) -> None:
        """Raise ``StoreFull`` when a new case would be refused (checked before reading an upload)."""
        self.expire()
        with self._lock:
            self._check_room()

    def _check_room(self) -> None:
        # Caller holds the lock.
        pending = [c for c in self._cases.values() if c.state in PENDING]
        per_case = self._last_run_s if self._last_run_s is not None else DEFAULT_CASE_S
        if len(pending) >= self._max_queued:
            raise StoreFull(
                f"reader: busy, {len(pending)} case(s) already waiting or running (limit {self._max_queued})",
                _seconds(per_case),
            )
        if len(self._cases) >= self._max_cases:
            now = time.monotonic()
            frees = [self._ttl_s - (now - c.touched) for c in self._cases.values() if c.state not in PENDING]
            raise StoreFull(
                f"reader: holding {len(self._cases)} cases, the limit; one is freed when a page closes "
                "its case or a case stays idle past its time-to-live",
                _seconds(min(frees) if frees else per_case),
            )

    def submit(self, folder: Path, input_path: Path, display_name: str) -> Case:
        """Queue a received case; the worker deletes ``folder`` when done with it.

        Raises ``StoreFull`` (and leaves ``folder`` to the caller) when there is no room.
        """
        self.expire()
        with self._lock:
            self._check_room()
            self._seq += 1
            case = Case(token=secrets.token_urlsafe(18), folder=folder, display_name=display_name, seq=self._seq)
            self._cases[case.token] = case
        self._worker.submit(self._run, case, input_path)
        return case

    def get(self, token: str) -> Case:
        """The case for ``token``; an unknown or expired token is a user error."""
        self.expire()
        with self._lock:
            case = self._cases.get(token)
            if case is None:
                raise KeyError(token)
            case.touched = time.monotonic()
            return case

    def queue_position(self, case: Case) -> int:
        """How many cases run before this one (0 once it is running)."""
        if case.state != "queued":
            return 0
        with self._lock:
            return sum(1 for c in self._cases.values() if c.seq < case.seq and c.state in ("queued",)) + (
                1 if self._running_seq and self._running_seq < case.seq else 0
            )

    def drop(self, token: str) -> bool:
        """Forget a finished case (its display volumes and result)."""
        with self._lock:
            case = self._cases.get(token)
            if case is None or case.state not in ("done", "error"):
                return False
            del self._cases[token]
            return True

    def expire(self) -> None:
        """Forget finished cases idle longer than the time-to-live (never to make room for others)."""
        now = time.monotonic()
        with self._lock:
            for c in [c for c in self._cases.values() if c.state in ("done", "error")]:
                if now - c.touched > self._ttl_s:
                    del self._cases[c.token]

    def close(self) -> None:
        """Stop the worker after the running case and forget everything."""
        self._worker.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for c in self._cases.values():
                shutil.rmtree(c.folder, ignore_errors=True)
            self._cases.clear()

    def _run(self, case: Case, input_path: Path) -> None:
        with self._lock:
            self._running_seq = case.seq
        case.started_at = time.time()

        def progress(stage: str) -> None:
            if stage in STAGES:
                case.state = stage

        final, message = "error", None
        try:
            progress("reading")
            result, image, mask = self._analyse(input_path, progress)
            result = dataclasses.replace(result, source=case.display_name)  # the name dropped, not the temp path
            progress("rendering")
            case.view = make_view(image, mask)
            case.result = result
            final = "done"
        except IchfedError as e:
            message = _strip_folder(str(e), case.folder, input_path, case.display_name)
        except Exception as e:  # noqa: BLE001 - the page must stay usable whatever happens
            log.exception("reader: case %s failed", case.token[:6])
            message = f"internal error while reading the case ({type(e).__name__}); see the server log"
        finally:
            shutil.rmtree(case.folder, ignore_errors=True)
            case.finished_at = time.time()
            with self._lock:
                self._running_seq = 0
                self._last_run_s = case.finished_at - case.started_at
            # Last: a poller that sees "done" or "error" sees everything else already in place.
            case.message = message
            case.state = final
            log.info("reader: case %s %s in %.1f s", case.token[:6], final, case.finished_at - case.started_at)


def _seconds(s: float) -> int:
    """Whole seconds for a Retry-After header, at least 1."""
    return max(1, math.ceil(s))


def _strip_folder(message: str, folder: Path, input_path: Path, display_name: str) -> str:
    # Error messages name the file; the temporary folder means nothing to the reader, the name
    # they dropped does.
    message = message.replace(str(input_path), display_name)
    for prefix in (str(folder) + "/", str(folder)):
        message = message.replace(prefix, "")
    return message


def status(store: CaseStore, case: Case) -> dict[str, Any]:
    """The JSON the page polls for one case."""
    out: dict[str, Any] = {
        "token": case.token,
        "state": case.state,
        "name": case.display_name,
        "queue_position": store.queue_position(case),
        "message": case.message,
        "queued_at": case.queued_at,
        "started_at": case.started_at,
        "finished_at": case.finished_at,
    }
    if case.state == "done":
        out["result"] = case.result.to_dict()
        out["view"] = case.view.describe()
    return out
