"""Per-case temporary folders, marked as the reader's own so a restart can remove what a crash left.

Each case folder holds the uploaded image only while the case runs. A reader killed mid-case
(power cut, OOM killer, ``kill -9``) never reaches its cleanup, so patient images would stay in
the temp folder indefinitely. Every folder is therefore created with a marker naming the
process that owns it; on start the reader deletes marked folders whose owner is gone, and
nothing else: unmarked folders (someone else's, even with our prefix) and folders of a reader
still running (several may share one temp folder) are left alone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from shared.plumbing.atomic import write_json

log = logging.getLogger(__name__)

PREFIX = "ichfed-reader-"
MARKER = ".ichfed-reader-case.json"


def _root(work_dir: Path | None) -> Path:
    return Path(work_dir) if work_dir is not None else Path(tempfile.gettempdir())


def new_case_folder(work_dir: Path | None = None) -> Path:
    """A fresh private (0700) case folder under ``work_dir`` (default: the system temp folder), marked as ours."""
    folder = Path(tempfile.mkdtemp(prefix=PREFIX, dir=work_dir))
    write_json(folder / MARKER, {"pid": os.getpid(), "host": socket.gethostname(), "created": time.time()})
    return folder


def _owner_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_leftovers(work_dir: Path | None = None) -> list[Path]:
    """Delete case folders under ``work_dir`` left by a reader process that no longer runs; returns them."""
    removed: list[Path] = []
    host = socket.gethostname()
    for folder in sorted(_root(work_dir).glob(PREFIX + "*")):
        marker = folder / MARKER
        if folder.is_symlink() or not folder.is_dir() or not marker.is_file():
            continue
        try:
            owner = json.loads(marker.read_text(encoding="utf-8"))
            pid, owner_host = int(owner["pid"]), str(owner["host"])
        except (OSError, ValueError, KeyError, TypeError):
            # Markers are written atomically, so an unreadable one is not ours to judge.
            log.warning("reader: %s has an unreadable marker; left in place", folder)
            continue
        # A temp folder on a shared mount may hold another machine's live cases; pids mean nothing there.
        if owner_host != host or _owner_alive(pid):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append(folder)
    if removed:
        log.warning("reader: removed %d case folder(s) left by an earlier reader that stopped mid-case", len(removed))
    return removed
