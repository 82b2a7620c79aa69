"""Each run's own folder in the server's state folder, and the pointer to the newest one.

::

    <state_dir>/
        latest_run                   the newest run folder's name (one line, written atomically)
        runs/<run_id>/events.jsonl   that run's events (run_started ... run_finished or run_failed)
        runs/<run_id>/report.json    its report (+ report.md, report.html, figures), also when it failed
        checkpoints/                 the global heads after each round (shared by a run and its resumes)
        bundles/                     the federated bundles

``<run_id>`` is Flower's run ID (``flwr run`` and the simulation engine both give one); a run
started without one (a direct call) gets the UTC time, ``YYYYmmddTHHMMSSZ``. A name already taken
gets ``-2``, ``-3``, ... so a resume or a rerun never writes into an earlier run's folder.
``ichfed federate status`` reads exactly this layout.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

from shared.plumbing.atomic import write_text
from shared.plumbing.progress import EVENTS_NAME

RUNS = "runs"
LATEST = "latest_run"


def new_run_folder(state_dir: str | os.PathLike, run_id: int | str | None = None) -> Path:
    """Create ``<state_dir>/runs/<run_id>/`` (a fresh name) and point ``latest_run`` at it."""
    runs = Path(state_dir) / RUNS
    runs.mkdir(parents=True, exist_ok=True)
    base = str(run_id) if run_id not in (None, "", 0) else _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name, k = base, 1
    while True:
        try:
            (runs / name).mkdir()
            break
        except FileExistsError:
            k += 1
            name = f"{base}-{k}"
    write_text(Path(state_dir) / LATEST, name + "\n")
    return runs / name


def latest_run(state_dir: str | os.PathLike) -> Path | None:
    """The newest run's folder (``latest_run`` names it), or None before the first run."""
    pointer = Path(state_dir) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    folder = Path(state_dir) / RUNS / name
    return folder if name and folder.is_dir() else None


def events_path(run_folder: str | os.PathLike) -> Path:
    """A run folder's ``events.jsonl``."""
    return Path(run_folder) / EVENTS_NAME
