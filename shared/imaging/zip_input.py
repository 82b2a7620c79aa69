"""A ``.zip`` of one CT series (or of one NIfTI file), unpacked within bounds checked before a byte is written.

A 1.4 MB zip used to write 5 GiB into the temporary folder before ingestion failed. Now, from the
central directory alone:

* every member's name stays inside the folder (``../x`` and absolute names are refused);
* at most ``MAX_MEMBERS`` members, whose declared sizes add up to at most ``MAX_UNZIPPED_BYTES``
  (the largest volume ichfed decodes, ``nifti_checks.MAX_VOLUME_BYTES``);
* the declared total is at most ``MAX_ZIP_RATIO`` times the archive's size, and so is every member
  larger than 1 MiB (CT slices deflate about 2-4:1; the bound is Apache POI's zip-bomb default);
* no two members' data overlap (a non-recursive zip bomb reuses one compressed stream for many members).

Then members are streamed 1 MiB at a time with a running count: a member that yields more than it
declares, or a total past the bound, stops extraction at once.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from shared.imaging.nifti_checks import MAX_VOLUME_BYTES
from shared.plumbing.errors import IchfedError

#: refuse zips that would unpack to more than this (a zip bomb, or not one CT series)
MAX_UNZIPPED_BYTES = MAX_VOLUME_BYTES
#: refuse a declared/compressed ratio above this (whole archive, and each member over 1 MiB)
MAX_ZIP_RATIO = 100
#: refuse archives with more members than this (a CT series has at most a few thousand slices)
MAX_MEMBERS = 20_000
_CHUNK = 1 << 20
_LOCAL_HEADER = 30  # fixed part of a zip local file header


def unpack(p: Path, root: Path) -> list[zipfile.ZipInfo]:
    """Check ``p`` (module doc) and extract its file members into folder ``root``; returns them.

    Raises ``IchfedError`` naming ``p`` for an unreadable, unsafe or oversized archive.
    """
    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise IchfedError(f"{p}: not a readable zip file ({e})") from None
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        check_declared(p, members, p.stat().st_size)
        root = root.resolve()
        targets = [_target(p, root, m) for m in members]
        total = 0
        for m, target in zip(members, targets):
            total = _extract(p, zf, m, target, total)
    return members


def check_declared(p: Path, members: list[zipfile.ZipInfo], archive_size: int) -> None:
    """The central-directory checks: member count, declared total, compression ratios, overlapping data."""
    if len(members) > MAX_MEMBERS:
        raise IchfedError(f"{p}: holds {len(members)} files; refusing more than {MAX_MEMBERS}")
    declared = sum(m.file_size for m in members)
    if declared > MAX_UNZIPPED_BYTES:
        raise IchfedError(f"{p}: unpacks to {declared / 1024**3:.1f} GiB; refusing more than "
                          f"{MAX_UNZIPPED_BYTES // 1024**3} GiB (a zip bomb, or not one CT series?)")
    if declared > MAX_ZIP_RATIO * max(archive_size, 1):
        raise IchfedError(f"{p}: declares {declared} bytes in a {archive_size}-byte archive, a compression ratio "
                          f"of {declared / max(archive_size, 1):.0f}:1 (more than {MAX_ZIP_RATIO}:1: a zip bomb?)")
    for m in members:
        if m.file_size > _CHUNK and m.file_size > MAX_ZIP_RATIO * max(m.compress_size, 1):
            raise IchfedError(f"{p}: member {m.filename!r} declares a compression ratio of "
                              f"{m.file_size / max(m.compress_size, 1):.0f}:1 (more than {MAX_ZIP_RATIO}:1: a zip bomb?)")
    spans = sorted((m.header_offset, m.header_offset + _LOCAL_HEADER + len(m.orig_filename.encode("utf-8", "replace"))
                    + m.compress_size, m.filename) for m in members)
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if end > start:
            raise IchfedError(f"{p}: members {name!r} and {other!r} share compressed data (a zip bomb?)")


def _target(p: Path, root: Path, m: zipfile.ZipInfo) -> Path:
    target = (root / m.filename).resolve()
    # A member named ../x would write outside the folder.
    if root not in target.parents:
        raise IchfedError(f"{p}: member {m.filename!r} points outside the archive")
    return target


def _extract(p: Path, zf: zipfile.ZipFile, m: zipfile.ZipInfo, target: Path, total: int) -> int:
    """Stream member ``m`` to ``target`` with running caps; returns the new running total."""
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    try:
        with zf.open(m) as src, open(target, "wb") as dst:
            while chunk := src.read(_CHUNK):
                written += len(chunk)
                total += len(chunk)
                if written > m.file_size:
                    raise IchfedError(f"{p}: member {m.filename!r} unpacks to more than the {m.file_size} bytes "
                                      "it declares")
                if total > MAX_UNZIPPED_BYTES:
                    raise IchfedError(f"{p}: unpacks to more than {MAX_UNZIPPED_BYTES // 1024**3} GiB")
                dst.write(chunk)
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError, NotImplementedError) as e:
        # RuntimeError: an encrypted member; NotImplementedError: an unknown compression method.
        why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise IchfedError(f"{p}: cannot unpack {m.filename!r} ({why})") from None
    return total
