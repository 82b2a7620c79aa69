"""Every text file ichfed reads or writes, and every child process it reads, says UTF-8.

A hospital workstation or a CI runner whose locale is ``C`` without UTF-8 mode makes Python's
default text encoding ASCII; a report holding "±" or "—" then fails to read back (stop 17's CI
found two such failures). Naming the encoding at each call is the fix; this test keeps it so, by
reading the source with ``ast`` (it imports nothing).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "client", "server", "simulations", "ichfed", "benchmarks", "tests")
SUBPROCESS = {"run", "Popen", "check_output", "check_call"}


def _name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else None


def _text_mode(mode: ast.expr | None) -> bool:
    """True unless the mode is a literal holding ``b``; a computed mode counts as text (be explicit)."""
    return mode is None or not (isinstance(mode, ast.Constant) and "b" in str(mode.value))


def unspecified_encodings(source: str) -> list[tuple[int, str]]:
    """(line, call) for each text-mode file or process call in ``source`` that leaves the encoding to the locale."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        keywords = {k.arg: k.value for k in node.keywords}
        if "encoding" in keywords or None in keywords:  # named, or passed on through **kwargs
            continue
        name = _name(node.func)
        if name == "read_text" and isinstance(node.func, ast.Attribute) and not node.args:
            found.append((node.lineno, "read_text()"))
        elif name == "write_text" and isinstance(node.func, ast.Attribute) and len(node.args) == 1:
            found.append((node.lineno, "write_text(text)"))
        elif name == "open" and isinstance(node.func, ast.Name):
            if _text_mode(node.args[1] if len(node.args) > 1 else keywords.get("mode")):
                found.append((node.lineno, "open()"))
        elif name in SUBPROCESS:
            text = keywords.get("text", keywords.get("universal_newlines"))
            if isinstance(text, ast.Constant) and text.value:
                found.append((node.lineno, f"{name}(text=True)"))
    return sorted(found)


def test_the_checker_finds_each_kind_of_call():
    sample = (
        "p.read_text()\np.read_text(encoding='utf-8')\np.write_text('x')\nopen(f)\nopen(f, 'rb')\n"
        "subprocess.run(c, text=True)\nsubprocess.run(c, text=True, encoding='utf-8')\nopen(f, 'w', **kw)\n"
    )
    assert unspecified_encodings(sample) == [(1, "read_text()"), (3, "write_text(text)"), (4, "open()"),
                                             (6, "run(text=True)")]


@pytest.mark.parametrize("package", PACKAGES)
def test_text_io_names_its_encoding(package):
    offenders = [f"{path.relative_to(REPO)}:{line}: {call}"
                 for path in sorted((REPO / package).rglob("*.py")) if "__pycache__" not in path.parts
                 for line, call in unspecified_encodings(path.read_text(encoding="utf-8"))]
    assert not offenders, "name encoding='utf-8' at:\n" + "\n".join(offenders)


def test_an_ascii_console_gets_escapes_not_a_crash():
    import os
    import subprocess
    import sys

    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    code = "from ichfed.cli import _tolerate_narrow_consoles as t; t(); print('AUC 0.70 \\u00b1 0.02')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")
    assert proc.stdout == b"AUC 0.70 \\xb1 0.02\n"
