"""File-system helpers used by bundles, transport and the segmenter: one implementation each.

* ``staged_dir``: build a folder in a temporary folder beside its target, fsync it, rename it into
  place, so a reader never sees half a bundle, model folder or dataset, and a crash leaves the
  previous one (or nothing) behind. Single files use ``shared.plumbing.atomic``.
* ``sha256_file``: a file's sha256, read in chunks (checkpoints and classifiers are hundreds of MB).
* ``read_json``: a JSON object from a file (or its verified bytes), an ``IchfedError`` naming the file
  when it is missing, not JSON or not an object.
* ``link_or_copy``: hard-link a file that is never modified in place, or copy it across file systems.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from shared.plumbing.errors import IchfedError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: str | os.PathLike, raw: bytes | None = None,
              error: type[IchfedError] = IchfedError) -> dict[str, Any]:
    """The JSON object in ``path`` (or in ``raw``, bytes already read from it and verified).

    Raises ``error`` (an ``IchfedError`` kind) naming ``path`` when the file is missing or
    unreadable, is not UTF-8 JSON, or does not hold an object.
    """
    p = Path(path)
    if raw is None:
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            raise error(f"{p}: file not found") from None
        except OSError as e:
            raise error(f"{p}: unreadable ({e.strerror})") from None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{p}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{p}: expected a JSON object")
    return data


def link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Hard-link ``source`` to ``target`` (both never modified in place), or copy it across file systems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file under ``root`` and the folders holding them (best effort on odd file systems)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync(Path(dirpath) / name, os.O_RDONLY)
        _fsync(Path(dirpath), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path: Path, flags: int) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike, *, replace: bool = False, prefix: str | None = None,
               mode: int | None = 0o755) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; when the block succeeds it becomes ``target``.

    The staged files are fsynced, the folder gets ``mode`` (``mkdtemp`` makes it 0700; None keeps
    that) and is renamed to ``target``. With ``replace`` an existing ``target`` is moved aside first
    (folders cannot be renamed over non-empty ones) and removed after; without it a non-empty
    ``target`` makes the rename fail with ``OSError``. On any error the staged folder is removed.
    """
    final = Path(target)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        old = None
        if replace and final.exists():
            old = final.with_name(f".{final.name}.old.{os.getpid()}")
            os.replace(final, old)
        os.rename(tmp, final)
        _fsync(final.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
