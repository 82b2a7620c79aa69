"""The command blocks of docs/quickstart.md, as a test reads them.

A block is a fenced code block preceded by ``<!-- quickstart: ROLE -->`` (``coordinator``,
``site``, ``flwr-config``). Commands are the block's lines with backslash continuations joined,
comments and blank lines dropped.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "docs" / "quickstart.md"
_BLOCK = re.compile(r"<!--\s*quickstart:\s*([a-z-]+)\s*-->\s*\n```[a-z]*\n(.*?)^```", re.S | re.M)


def blocks(text: str | None = None) -> list[tuple[str, str]]:
    """``(role, body)`` of every marked block, in document order."""
    text = QUICKSTART.read_text(encoding="utf-8") if text is None else text
    return [(m.group(1), m.group(2)) for m in _BLOCK.finditer(text)]


def commands(body: str) -> list[str]:
    """The shell commands of a block body (continuations joined, comments and blanks dropped)."""
    joined = re.sub(r"\\\n\s*", " ", body)
    out = []
    for line in joined.splitlines():
        if not shlex.split(line, comments=True):
            continue
        out.append(line.strip())
    return out


def substitute(text: str, subs: list[tuple[str, str]]) -> str:
    """Apply ``subs`` (old, new) in order."""
    for old, new in subs:
        text = text.replace(old, new)
    return text
