"""The package table of docs/ARCHITECTURE.md, checked on every import statement in the tree.

Imports inside functions count as much as those at the top of a module: a lazy import is still a
dependency. The test reads the source with ``ast`` and imports nothing, so it runs in a second.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Who may import whom (docs/ARCHITECTURE.md, "Packages"). ``ichfed`` may import everything.
OURS = ("shared", "client", "server", "simulations", "ichfed")
ALLOWED = {
    "shared": set(),
    "client": {"shared"},
    "server": {"shared"},
    "simulations": {"shared", "client", "server"},
    "ichfed": set(OURS),
}

# Breaches known and owned by someone else, each with the issue that removes it. Remove an entry
# when its fix lands; the test fails while an entry is listed but no longer needed.
KNOWN_BREACHES: set[tuple[str, str]] = set()


def _modules(package: str) -> list[Path]:
    return sorted(p for p in (REPO / package).rglob("*.py") if "__pycache__" not in p.parts)


def _imported(path: Path, root: Path = REPO) -> list[tuple[int, str]]:
    """Every (line, dotted module) ``path`` imports, relative imports resolved against its package."""
    package = list(path.relative_to(root).parts[:-1])
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: list[tuple[int, str]] = []
    for node in sorted(ast.walk(tree), key=lambda n: getattr(n, "lineno", 0)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                prefix = ".".join(package[: len(package) - (node.level - 1)])
                target = f"{prefix}.{node.module}" if node.module else prefix
                # ``from . import x`` names modules of the package itself
                names = [f"{target}.{a.name}" for a in node.names] if not node.module else [target]
            else:
                names = [node.module or ""]
            out += [(node.lineno, n) for n in names]
    return out


def _breaches(package: str) -> list[tuple[str, int, str]]:
    found = []
    for path in _modules(package):
        for line, name in _imported(path):
            top = name.split(".")[0]
            if top in OURS and top != package and top not in ALLOWED[package]:
                found.append((path.relative_to(REPO).as_posix(), line, name))
    return found


@pytest.mark.parametrize("package", [p for p in OURS if p != "ichfed"])
def test_package_imports_only_what_the_architecture_table_allows(package):
    found = [b for b in _breaches(package) if (b[0], b[2].split(".")[0]) not in KNOWN_BREACHES]
    assert not found, "imports across the layers of docs/ARCHITECTURE.md:\n" + "\n".join(
        f"  {f}:{line} imports {name}" for f, line, name in found)


def test_known_breaches_are_still_there():
    """A listed exception whose fix has landed must leave the list, so the rule is whole again."""
    still = {(f, name.split(".")[0]) for pkg in OURS for f, _, name in _breaches(pkg)}
    stale = KNOWN_BREACHES - still
    assert not stale, f"fixed, remove from KNOWN_BREACHES: {sorted(stale)}"


def test_cli_commands_do_not_import_each_other():
    """``ichfed/commands/<name>.py`` parse and wire; what two commands share lives below them."""
    found = []
    for path in _modules("ichfed/commands"):
        for line, name in _imported(path):
            if name.startswith("ichfed.commands.") and name != f"ichfed.commands.{path.stem}":
                found.append(f"  {path.relative_to(REPO).as_posix()}:{line} imports {name}")
    assert not found, "a CLI command imports another command:\n" + "\n".join(found)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """The rule would be worthless if imports inside functions or ``from ..x`` escaped it."""
    probe = tmp_path / "client" / "reader" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("import os\n\ndef f():\n    from server.app import x\n    from ..overlay import y\n"
                     "    from . import render\n    from ichfed.commands import predict\n", encoding="utf-8")
    names = [n for _, n in _imported(probe, root=tmp_path)]
    assert names == ["os", "server.app", "client.overlay", "client.reader.render", "ichfed.commands"]
