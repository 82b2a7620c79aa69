"""Streaming multipart upload straight into a case's temporary folder, with a size limit.

Starlette's own form parser spools every file to the system temp folder first; parsing the
stream ourselves writes patient data once, into the folder that is deleted after the case, and
stops reading as soon as the limit is passed.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import AsyncIterator

from python_multipart.exceptions import ParseError
from python_multipart.multipart import MultipartParser, parse_options_header

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
    """
    ctype, params = parse_options_header(content_type or "")
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise IchfedError("upload: expected multipart/form-data with one or more 'file' parts")
    raw = folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    saved: list[tuple[Path, str]] = []
    state: dict = {"headers": {}, "field": b"", "value": b"", "fh": None, "error": None, "ended": False}

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_headers_finished() -> None:
        _, disp = parse_options_header(state["headers"].get(b"content-disposition", b""))
        if disp.get(b"name") != b"file" or b"filename" not in disp:
            state["fh"] = None  # other form fields are ignored
            return
        if len(saved) >= MAX_FILES:
            state["error"] = IchfedError(f"upload: more than {MAX_FILES} files")
            state["fh"] = None
            return
        original = disp[b"filename"].decode("utf-8", "replace")
        path = raw / f"{len(saved):05d}_{_safe_name(original)}"
        saved.append((path, original))
        state["fh"] = open(path, "wb")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["fh"] is not None:
            state["fh"].write(data[start:end])

    def on_part_end() -> None:
        if state["fh"] is not None:
            state["fh"].close()
            state["fh"] = None
        state["headers"] = {}

    def on_end() -> None:
        state["ended"] = True

    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_end": on_end,
        },
    )
    n_bytes = 0
    try:
        async for chunk in chunks:
            n_bytes += len(chunk)
            if n_bytes > max_bytes:
                raise UploadTooLarge(f"upload: larger than the limit of {_mb(max_bytes)}")
            parser.write(chunk)
            if state["error"] is not None:
                raise state["error"]
        parser.finalize()
    except ParseError as e:
        # A broken body is the client's fault: a 400 with the reason, not a 500 with a traceback.
        raise IchfedError(f"upload: malformed multipart body ({_first_line(e)})") from None
    finally:
        if state["fh"] is not None:
            state["fh"].close()
    if not saved:
        raise IchfedError("upload: no file received")
    if not state["ended"]:
        # Without the closing boundary the last file may be cut short; reading it would give a
        # confusing error later, or worse, a result from part of a scan.
        raise IchfedError("upload: the body ended before its closing boundary (interrupted upload?)")
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
    for path, _ in saved:
        path.rename(series / path.name)
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
