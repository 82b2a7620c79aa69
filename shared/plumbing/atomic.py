"""Atomic writes: a temporary file in the target folder, then ``os.replace``.

A reader never sees a half-written checkpoint, cache entry, bundle or report, and a
crash mid-write leaves the previous version intact.

File modes: ``mkstemp`` makes every temporary file 0600, which would leave public keys, bundles
and reports unreadable to the other accounts that must read them. The result gets the mode a
plain ``open()`` would give (0666 less the umask: 0644 usually) unless ``mode`` says otherwise;
secrets pass ``mode=0o600`` (``write_private_bytes``), set before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    # /proc avoids os.umask's set-and-restore, which races with other threads creating files.
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    ``suffix`` defaults to the target's full suffix (e.g. ``.nii.gz``) so that writers
    which pick a format from the extension, like SimpleITK, keep working. ``mode`` is the
    file's permission bits (default: what ``open()`` would create under the current umask).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(target.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    final = 0o666 & ~_umask() if mode is None else mode
    try:
        os.chmod(tmp_path, final)  # before the caller writes: a secret is never readable by others
        yield tmp_path
        os.chmod(tmp_path, final)  # again: some writers (safetensors) recreate the file
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically (``mode`` as in ``atomic_path``)."""
    with atomic_path(path, mode=mode) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_private_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a secret (a private key) atomically with mode 0600, never readable by others, even briefly."""
    write_bytes(path, data, mode=0o600)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    # numpy scalars and Paths show up in reports; everything else is a bug.
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
