"""Streaming multipart upload straight into a case's temporary folder, with a size limit.

python-multipart's ``FormParser`` parses the stream and its ``File`` objects write each part
straight to disk in the case's folder (``UPLOAD_DIR``, nothing kept in memory): Starlette's own
form parser would spool every file to the system temp folder first. Patient data is written once,
into the folder that is deleted after the case, and reading stops as soon as the limit is passed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import AsyncIterator

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import File, FormParser, parse_options_header

from shared.plumbing.errors import IchfedError

MAX_FILES = 5000


class UploadTooLarge(IchfedError):
    """The upload passed the reader's size limit."""


@dataclasses.dataclass
class Upload:
    """What was received: the path to hand to ``read_image`` and the name to show."""

    input_path: Path
    display_name: str
    n_files: int
    n_bytes: int


def _safe_name(name: str) -> str:
    # Browsers send folder uploads as relative paths; keep only the last component and
    # characters that cannot escape the folder.
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")
    return base[:120] or "file"


async def receive(
    chunks: AsyncIterator[bytes], content_type: str, folder: Path, max_bytes: int
) -> Upload:
    """Parse a ``multipart/form-data`` body of one or more ``file`` parts into ``folder``.

    One ``.nii``/``.nii.gz``/``.zip`` file is passed on as that file; several files (a DICOM
    folder) or a single other file go into ``folder/series`` and that folder is passed on.
    Raises ``UploadTooLarge`` past ``max_bytes`` and ``IchfedError`` for a malformed or cut body.
    """
    ctype, params = parse_options_header(content_type or "")
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise IchfedError("upload: expected multipart/form-data with one or more 'file' parts")
    raw = folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    saved: list[tuple[Path, str]] = []
    ended: list[bool] = []

    def on_file(part: File) -> None:
        if part.in_memory:
            part.flush_to_disk()  # an empty part never reached the disk; give it its (empty) file
        part.close()
        path = Path(os.fsdecode(part.actual_file_name))
        if part.field_name != b"file":
            path.unlink()  # other form parts are not ours to keep
            return
        if len(saved) >= MAX_FILES:
            raise IchfedError(f"upload: more than {MAX_FILES} files")
        saved.append((path, (part.file_name or b"").decode("utf-8", "replace")))

    config = {"UPLOAD_DIR": str(raw), "UPLOAD_DELETE_TMP": False, "MAX_MEMORY_FILE_SIZE": 0,
              "UPLOAD_ERROR_ON_BAD_CTE": True}
    n_bytes = 0
    try:
        parser = FormParser("multipart/form-data", None, on_file, on_end=lambda: ended.append(True),
                            boundary=params[b"boundary"], config=config)
        async for chunk in chunks:
            n_bytes += len(chunk)
            if n_bytes > max_bytes:
                raise UploadTooLarge(f"upload: larger than the limit of {_mb(max_bytes)}")
            parser.write(chunk)
        parser.finalize()
    except FormParserError as e:  # ParseError (a broken body) is one of these
        # A broken body is the client's fault: a 400 with the reason, not a 500 with a traceback.
        raise IchfedError(f"upload: malformed multipart body ({_first_line(e)})") from None
    if not ended:
        # Without the closing boundary the last file may be cut short (and python-multipart hands
        # over no unfinished part); reading it would give a confusing error, or a result from part of a scan.
        raise IchfedError("upload: the body ended before its closing boundary (interrupted upload?)")
    if not saved:
        raise IchfedError("upload: no file received")
    return _arrange(saved, folder, n_bytes)


def _arrange(saved: list[tuple[Path, str]], folder: Path, n_bytes: int) -> Upload:
    if len(saved) == 1:
        path, original = saved[0]
        lower = original.lower()
        for suffix in (".nii.gz", ".nii", ".zip"):
            if lower.endswith(suffix):
                # Keep the suffix: the reader picks the format from it.
                target = folder / f"input{suffix}"
                path.rename(target)
                return Upload(target, _safe_name(original), 1, n_bytes)
    series = folder / "series"
    series.mkdir()
    for i, (path, original) in enumerate(saved):
        # Upload order and a name that cannot escape the folder (browsers send relative paths).
        path.rename(series / f"{i:05d}_{_safe_name(original)}")
    first = saved[0][1].replace("\\", "/")
    # A dropped folder shows as its name; loose files as the first file and a count.
    name = first.split("/")[0] if "/" in first else _safe_name(first)
    if len(saved) > 1 and "/" not in first:
        name = f"{name} (+{len(saved) - 1} files)"
    return Upload(series, name, len(saved), n_bytes)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _mb(n: int) -> str:
    return f"{n / 2**20:g} MB" if n >= 2**20 else f"{n} bytes"
