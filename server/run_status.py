"""How a federated run ended, read from the server's state folder (``ichfed federate status``).

Layout written by the ServerApp:

- ``<state_dir>/latest_run``: a text file naming the newest run folder (``runs/<run_id>``, or
  just ``<run_id>``);
- ``<state_dir>/runs/<run_id>/events.jsonl``: one JSON object per line (``run_started``,
  ``round_started``, ``train_replies``, ``round_finished``, ``run_finished``, ``run_failed``
  with its ``reason``, ...) and the run's report files beside it (``server.run_folder``).

A state folder from before per-run folders holds ``events.jsonl`` and ``report/`` directly;
it is read as one run (its events from the last ``run_started`` on).

The outcome is ``finished`` (a ``run_finished`` event), ``failed`` (``run_failed``) or
``running``: no end event yet, which is also what a run whose process died without a word
looks like; ``last_event_age_s`` tells the two apart for a human.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
from pathlib import Path
from typing import Any

from shared.plumbing.errors import IchfedError
from shared.plumbing.progress import EVENTS_NAME, read_events

from .run_folder import LATEST as LATEST_RUN
from .run_folder import RUNS

EXIT_CODES = {"finished": 0, "failed": 1, "running": 3}


@dataclasses.dataclass(frozen=True)
class RunStatus:
    """What the events of one run say about it."""

    folder: Path
    run_id: str
    outcome: str  # finished | failed | running
    reason: str | None  # run_failed's reason
    total_rounds: int | None
    rounds_finished: int  # the last finished round's number
    last_event: dict[str, Any] | None
    last_event_age_s: float | None
    last_train: dict[str, Any] | None  # the latest train_replies counts (expected, answered, refused, missing)
    report: Path | None

    @property
    def exit_code(self) -> int:
        """0 finished, 1 failed, 3 still running (or ended without an end event)."""
        return EXIT_CODES[self.outcome]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        d = dataclasses.asdict(self)
        d.update(folder=str(self.folder), report=str(self.report) if self.report else None, exit_code=self.exit_code)
        return d


def locate_run(state_dir: str | os.PathLike, run_id: str | None = None) -> Path:
    """The folder of run ``run_id`` (default: the one ``latest_run`` names) in ``state_dir``.

    Falls back to ``state_dir`` itself when it holds a run's events or report directly (the
    layout before per-run folders). Raises ``IchfedError`` naming what is missing.
    """
    root = Path(state_dir)
    if not root.is_dir():
        raise IchfedError(f"{root}: not a folder (give the run config's state-dir)")
    if run_id is not None:
        folder = root / RUNS / run_id
        if not folder.is_dir():
            raise IchfedError(f"--run: no run {run_id!r} in {root / RUNS}")
        return folder
    pointer = root / LATEST_RUN
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        folder = root / name if (root / name).is_dir() else root / RUNS / name
        if not name or not folder.is_dir():
            raise IchfedError(f"{pointer}: names {name!r}, which is not a run folder")
        return folder
    if (root / EVENTS_NAME).is_file() or (root / "report").is_dir():
        return root
    raise IchfedError(f"{root}: no {LATEST_RUN} and no {EVENTS_NAME} (no run has started with this state-dir)")


def run_status(folder: str | os.PathLike, now: _dt.datetime | None = None) -> RunStatus:
    """Read ``folder/events.jsonl`` (from its last ``run_started``) and say how the run stands."""
    folder = Path(folder)
    events = read_events(folder / EVENTS_NAME)
    starts = [i for i, e in enumerate(events) if e.get("event") == "run_started"]
    events = events[starts[-1]:] if starts else events
    kinds = [e.get("event") for e in events]
    failed = next((e for e in reversed(events) if e.get("event") == "run_failed"), None)
    if failed is not None:
        outcome, reason = "failed", str(failed.get("reason") or "no reason given")
    elif "run_finished" in kinds:
        outcome, reason = "finished", None
    else:
        outcome, reason = "running", None
    started = events[0] if starts else {}
    last = events[-1] if events else None
    train = next((e for e in reversed(events) if e.get("event") == "train_replies"), None)
    report = _report(folder, events)
    return RunStatus(
        folder=folder, run_id=str(started.get("run_id") or folder.name), outcome=outcome, reason=reason,
        total_rounds=started.get("total_rounds"), rounds_finished=_last_round(events),
        last_event=last, last_event_age_s=_age(last, now),
        last_train={k: train.get(k) for k in ("round", "expected", "answered", "refused", "missing")} if train else None,
        report=report,
    )


def _last_round(events: list[dict[str, Any]]) -> int:
    """The last finished round (a resumed run starts past round 1)."""
    done = [int(e.get("round") or 0) for e in events if e.get("event") == "round_finished"]
    return max(done) if done else 0


def report_file(folder: Path, name: str = "report.md") -> Path:
    """A run's report file: in its run folder, or in ``report/`` of a state folder from before run folders."""
    here = Path(folder) / name
    return here if here.is_file() or not (Path(folder) / "report" / name).is_file() else Path(folder) / "report" / name


def _report(folder: Path, events: list[dict[str, Any]]) -> Path | None:
    for e in reversed(events):
        if e.get("event") == "run_finished" and e.get("report"):
            return Path(e["report"])
    candidate = report_file(folder)
    return candidate if candidate.is_file() else None


def _age(event: dict[str, Any] | None, now: _dt.datetime | None) -> float | None:
    if not event or not event.get("t"):
        return None
    try:
        t = _dt.datetime.fromisoformat(str(event["t"]))
    except ValueError:
        return None
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return round((now - t).total_seconds(), 1)


def render(status: RunStatus) -> str:
    """The human-readable status (``ichfed federate status``)."""
    head = {"finished": "finished", "running": "running (no end event yet)",
            "failed": f"FAILED: {status.reason}"}[status.outcome]
    lines = [f"run       {status.run_id}  ({status.folder})", f"status    {head}"]
    total = status.total_rounds if status.total_rounds is not None else "?"
    lines.append(f"rounds    {status.rounds_finished} of {total} finished")
    if status.last_train:
        t = status.last_train
        lines.append(f"sites     round {t['round']}: {t['answered']}/{t['expected']} answered, "
                     f"{t['refused']} refused, {t['missing']} missing")
    if status.last_event:
        age = status.last_event_age_s
        lines.append(f"last      {status.last_event.get('event')} at {status.last_event.get('t')}"
                     + (f" ({_duration(age)} ago)" if age is not None else ""))
        if status.outcome == "running" and age is not None and age > 3600:
            lines.append("          no event for over an hour: if `flwr ls` shows no running run, the ServerApp "
                         "stopped without a word (see its log: flwr log <run-id>)")
    lines.append(f"report    {status.report if status.report else 'not written'}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")
