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

# Inside ``shared/``: which sub-package may import which (docs/ARCHITECTURE.md, "shared/ sub-packages").
# ``pipeline`` (and ``prediction``, its result record) sit on top and may import every sub-package.
SHARED_ALLOWED = {
    "plumbing": set(),
    "security": {"plumbing"},
    "imaging": {"plumbing"},
    "evaluation": {"plumbing"},
    "federation": {"plumbing", "imaging"},
    "models": {"plumbing", "imaging", "federation"},
    "training": {"plumbing", "imaging", "federation", "models"},
    "bundle": {"plumbing", "security", "imaging", "federation", "models"},
}
SHARED_TOP = {"pipeline", "prediction", "__init__"}

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


def _shared_part(path: Path) -> str:
    rel = path.relative_to(REPO / "shared").parts
    return rel[0] if len(rel) > 1 else Path(rel[0]).stem


def test_shared_sub_packages_import_only_lower_floors():
    """The stages are visible from the folder only if the floors hold: plumbing at the bottom, the
    pipeline on top, and no sub-package reaching up."""
    assert set(SHARED_ALLOWED) | SHARED_TOP == {_shared_part(p) for p in _modules("shared")}
    found = []
    for path in _modules("shared"):
        part = _shared_part(path)
        if part in SHARED_TOP:
            continue
        for line, name in _imported(path):
            bits = name.split(".")
            if bits[0] == "shared" and len(bits) > 1 and bits[1] != part and bits[1] not in SHARED_ALLOWED[part]:
                found.append(f"  {path.relative_to(REPO).as_posix()}:{line} imports {name}")
    assert not found, "shared/ sub-package imports above its floor:\n" + "\n".join(found)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for pkg in OURS for p in _modules(pkg)}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for _, imported in _imported(path):
            # ``from pkg import mod`` names a module; ``from mod import func`` names its module
            target = imported if imported in modules else imported.rpartition(".")[0]
            if target in modules and target != name:
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    """No two modules import each other, directly or around a loop, lazily or not."""
    cycles = _cycles(_import_graph())
    assert not cycles, "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)


def test_cycle_finder_sees_a_loop():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


# -- size: small modules, short functions (docs/ARCHITECTURE.md, "Conventions") ----------------------
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# Route factories build an app whose handlers are nested functions registered with a decorator
# (``@app.train()``, ``@app.get("/")``): the handlers close over what the factory made (the node's
# session pool, the reader's case store), so the factory grows by one short handler per message type
# or route. The handlers count as functions of their own (60 lines each), and the factory's own
# code, without them, is held to 60 lines too.
ROUTE_FACTORIES = {
    "client/app.py::build_client_app",  # the ClientApp: one handler per Flower message type
    "client/reader/app.py::create_app",  # the reader page: one FastAPI route per URL
}
# Breaches in code another engineer is changing now, left to them to split (not an exemption: the
# entry must still breach, so it goes away with the split).
PENDING_SPLITS: set[str] = set()


def _functions(path: Path):
    """(qualified name, node) of every function and method in ``path``, nested ones included."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{prefix}{child.name}", child
                yield from walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def _lines(node) -> int:
    """Source lines of a function from its first decorator (or ``def``) to its last line."""
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    return node.end_lineno - first + 1


def _handlers(factory) -> list:
    """The decorated functions nested directly in ``factory``: its routes or message handlers."""
    return [n for n in ast.walk(factory) if n is not factory and isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.decorator_list]


def _size_breaches() -> list[str]:
    found = []
    for pkg in OURS:
        for path in _modules(pkg):
            rel = path.relative_to(REPO).as_posix()
            n = len(path.read_text(encoding="utf-8").splitlines())
            if n > MAX_MODULE_LINES:
                found.append(f"  {rel}: {n} lines (at most {MAX_MODULE_LINES})")
            for name, node in _functions(path):
                length = _lines(node)
                if f"{rel}::{name}" in ROUTE_FACTORIES:
                    length -= sum(_lines(h) for h in _handlers(node))
                if length > MAX_FUNCTION_LINES and f"{rel}::{name}" not in PENDING_SPLITS:
                    found.append(f"  {rel}::{name}: {length} lines (at most {MAX_FUNCTION_LINES})")
    return found


def test_no_module_over_400_lines_and_no_function_over_60():
    """Modules small, one job each; functions short (benchmarks/ and tests/ are exempt)."""
    found = _size_breaches()
    assert not found, "split these (docs/ARCHITECTURE.md, Conventions):\n" + "\n".join(found)


def test_route_factories_are_listed_by_what_they_are():
    """The exemption list holds only functions that exist and register decorated handlers, so it
    cannot grow into a list of long functions."""
    for entry in sorted(ROUTE_FACTORIES):
        rel, name = entry.split("::")
        nodes = [n for q, n in _functions(REPO / rel) if q == name]
        assert nodes, f"ROUTE_FACTORIES: {entry} not found"
        assert len(_handlers(nodes[0])) >= 2, f"ROUTE_FACTORIES: {entry} registers no handlers"


def test_pending_splits_still_breach():
    """An entry leaves ``PENDING_SPLITS`` with its split; a stale entry would hide a new breach."""
    for entry in sorted(PENDING_SPLITS):
        rel, name = entry.split("::")
        nodes = [n for q, n in _functions(REPO / rel) if q == name]
        assert nodes and _lines(nodes[0]) > MAX_FUNCTION_LINES, f"PENDING_SPLITS: {entry} is split now: remove it"


def test_the_size_check_counts_decorators_nested_functions_and_methods(tmp_path):
    probe = tmp_path / "probe.py"
    body = "\n".join(f"    x{i} = {i}" for i in range(58))
    probe.write_text(f"class A:\n    @staticmethod\n    def m():\n    {body.replace(chr(10), chr(10) + '    ')}\n"
                     f"        return 1\n\n\ndef f():\n    def g():\n        return 2\n    return g\n",
                     encoding="utf-8")
    sizes = {name: _lines(node) for name, node in _functions(probe)}
    assert sizes == {"A.m": 61, "f": 4, "f.g": 2}
