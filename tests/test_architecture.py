"""The import rules of ARCHITECTURE.md, checked by parsing every import of every project file.

Rules (each a test below):
  * no import cycle between files (a package ``__init__`` is a file like any other, so
    ``pkg/__init__`` -> ``pkg/mod`` -> ``pkg`` is a cycle);
  * no ``from x import _private`` of another module's private name;
  * one-way layers: feature_store <- pipeline <- jobs <- deploy <- cli
    (a lower layer never imports a higher one; bench may import anything).

Every import counts: module level and inside functions (a function-level import is only for a
heavy third-party library, never to hide a cycle, so it is an edge like any other).
``from pkg import name`` where ``pkg/name.py`` (or ``pkg/name/``) exists counts as importing the
module ``pkg.name`` (and ``pkg`` too when some other imported name is an attribute of ``pkg``).
Imports inside ``if TYPE_CHECKING:`` never run, so they are left out of the cycle check only;
the private-name and layer rules apply to them as well.

KNOWN_VIOLATIONS lists the exact edges still being fixed elsewhere; the tests fail on any
violation not in that list, and on any entry of the list that no longer occurs (so the list
only shrinks).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("feature_store", "pipeline", "jobs", "deploy", "cli", "bench")
# Lower index = lower layer. A module may import its own layer or any lower one.
LAYERS = {"feature_store": 0, "pipeline": 1, "jobs": 2, "deploy": 3, "cli": 4}
# bench sits above everything (it measures all of it); nothing may import bench.
LAYERS["bench"] = 5

# Exact edges tolerated for now, each with its reason: (kind, importer, imported[, name]).
# kind "cycle": the edge importer -> imported closes a cycle; kind "private": importer does
# ``from imported import name`` with a private name; kind "layer": a lower layer imports a higher
# one. Empty: every rule holds.
KNOWN_VIOLATIONS: dict[tuple[str, ...], str] = {}


# --------------------------------------------------------------------------- the graph


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _project_files() -> dict[str, Path]:
    files: dict[str, Path] = {}
    for pkg in PACKAGES:
        base = ROOT / pkg
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            files[_module_name(path)] = path
    return files


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve_relative(module: str, path: Path, level: int, target: str | None) -> str:
    parts = module.split(".")
    if not _is_package(path):
        parts = parts[:-1]  # the containing package
    if level > 1:
        parts = parts[: len(parts) - (level - 1)]
    base = ".".join(parts)
    if target:
        return f"{base}.{target}" if base else target
    return base


def _closest_module(name: str, modules: set[str]) -> str | None:
    """The project module that ``import name`` loads last (deepest existing prefix)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


class Import:
    __slots__ = ("importer", "imported", "names", "line", "typing_only")

    def __init__(self, importer: str, imported: str, names: tuple[str, ...], line: int, typing_only: bool = False):
        self.importer, self.imported, self.names, self.line = importer, imported, names, line
        self.typing_only = typing_only


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _typing_only_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside ``if TYPE_CHECKING:`` bodies."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for stmt in node.body:
                for sub in ast.walk(stmt):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        out.add(id(sub))
    return out


def _imports(files: dict[str, Path]) -> list[Import]:
    modules = set(files)
    out: list[Import] = []
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        typing_only = _typing_only_nodes(tree)
        for node in ast.walk(tree):
            tc = id(node) in typing_only
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _closest_module(alias.name, modules)
                    if target is not None:
                        out.append(Import(module, target, (), node.lineno, tc))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    source = _resolve_relative(module, path, node.level, node.module)
                else:
                    source = node.module or ""
                target = _closest_module(source, modules)
                if target is None:
                    continue
                names = tuple(a.name for a in node.names)
                subs = [f"{source}.{n}" for n in names if target == source and f"{source}.{n}" in modules]
                for sub in subs:
                    out.append(Import(module, sub, (), node.lineno, tc))
                if len(subs) < len(names):  # some names are attributes of the module itself
                    out.append(Import(module, target, names, node.lineno, tc))
    return out


def _graph(imports: list[Import]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for imp in imports:
        if imp.importer != imp.imported and not imp.typing_only:
            graph.setdefault(imp.importer, set()).add(imp.imported)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module, as one cycle path through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []
    counter = [0]

    import sys

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    nodes = set(graph) | {w for ws in graph.values() for w in ws}
    for v in sorted(nodes):
        if v not in index:
            strong(v)

    cycles = []
    for comp in comps:
        members = set(comp)
        start = comp[0]
        # shortest path start -> ... -> start inside the component (BFS)
        prev: dict[str, str] = {}
        frontier = [start]
        found = None
        seen = {start}
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph.get(v, ())):
                    if w not in members:
                        continue
                    if w == start:
                        found = v
                        break
                    if w not in seen:
                        seen.add(w)
                        prev[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path = [start]
        v = found
        while v is not None and v != start:
            path.insert(1, v)
            v = prev.get(v)
        path.append(start)
        cycles.append({"members": comp, "path": path})
    return cycles


def _layer(module: str) -> int | None:
    return LAYERS.get(module.split(".")[0])


def _analyse():
    files = _project_files()
    imports = _imports(files)
    graph = _graph(imports)
    return files, imports, graph


# --------------------------------------------------------------------------- the checks


def _known(kind: str) -> dict[tuple[str, ...], str]:
    return {k: v for k, v in KNOWN_VIOLATIONS.items() if k[0] == kind}


def _cycle_violations(graph: dict[str, set[str]]) -> list[dict]:
    known_edges = {(k[1], k[2]) for k in _known("cycle")}
    pruned = {v: {w for w in ws if (v, w) not in known_edges} for v, ws in graph.items()}
    return _cycles(pruned)


def test_no_import_cycles():
    _, _, graph = _analyse()
    cycles = _cycle_violations(graph)
    assert not cycles, "import cycles:\n" + "\n".join(
        f"  {' -> '.join(c['path'])}   (component: {', '.join(c['members'])})" for c in cycles
    )


def test_known_cycle_edges_still_exist():
    """A known cycle edge that is gone (or no longer closes a cycle) must leave the list."""
    _, _, graph = _analyse()
    stale = []
    for key in _known("cycle"):
        _, a, b = key
        if b not in graph.get(a, set()):
            stale.append(key)
            continue
        # does b reach a?  (then a -> b closes a cycle)
        seen, todo = {b}, [b]
        while todo:
            v = todo.pop()
            for w in graph.get(v, ()):
                if w not in seen:
                    seen.add(w)
                    todo.append(w)
        if a not in seen:
            stale.append(key)
    assert not stale, f"remove these from KNOWN_VIOLATIONS (fixed): {stale}"


def _private_imports(imports: list[Import]) -> list[tuple[str, ...]]:
    found = []
    for imp in imports:
        for name in imp.names:
            if name.startswith("_") and not name.startswith("__"):
                if imp.importer != imp.imported:
                    found.append(("private", imp.importer, imp.imported, name))
    return sorted(set(found))


def test_no_private_imports_across_modules():
    _, imports, _ = _analyse()
    found = _private_imports(imports)
    known = set(_known("private"))
    new = [f for f in found if f not in known]
    stale = [k for k in known if k not in found]
    assert not new, "private names imported across modules:\n" + "\n".join(
        f"  {a}: from {b} import {n}" for _, a, b, n in new
    )
    assert not stale, f"remove these from KNOWN_VIOLATIONS (fixed): {stale}"


def _layer_violations(imports: list[Import]) -> list[tuple[str, ...]]:
    found = set()
    for imp in imports:
        a, b = _layer(imp.importer), _layer(imp.imported)
        if a is not None and b is not None and b > a:
            found.add(("layer", imp.importer, imp.imported))
    return sorted(found)


def test_imports_go_one_way():
    _, imports, _ = _analyse()
    found = _layer_violations(imports)
    known = set(_known("layer"))
    new = [f for f in found if f not in known]
    stale = [k for k in known if k not in found]
    assert not new, (
        "wrong-way imports (feature_store <- pipeline <- jobs <- deploy <- cli <- bench):\n"
        + "\n".join(f"  {a} imports {b}" for _, a, b in new)
    )
    assert not stale, f"remove these from KNOWN_VIOLATIONS (fixed): {stale}"


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The parser itself: function-level, relative and from-package-import-submodule edges."""
    global ROOT
    pkg = tmp_path / "pipeline" / "heads"
    pkg.mkdir(parents=True)
    (tmp_path / "pipeline" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from . import knn\n")
    (pkg / "knn.py").write_text("def f():\n    from pipeline.heads import thing\n")
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "__init__.py").write_text("")
    (tmp_path / "jobs" / "a.py").write_text("from pipeline.heads.knn import _x\n")
    (tmp_path / "feature_store").mkdir()
    (tmp_path / "feature_store" / "__init__.py").write_text("def g():\n    import jobs.a\n")
    saved = ROOT
    ROOT = tmp_path
    try:
        files, imports, graph = _analyse()
    finally:
        ROOT = saved
    assert graph["pipeline.heads"] == {"pipeline.heads.knn"}
    assert graph["pipeline.heads.knn"] == {"pipeline.heads"}
    assert [c["members"] for c in _cycles(graph)] == [["pipeline.heads", "pipeline.heads.knn"]]
    assert _private_imports(imports) == [("private", "jobs.a", "pipeline.heads.knn", "_x")]
    assert _layer_violations(imports) == [("layer", "feature_store", "jobs.a")]


def test_architecture_md_names_every_package():
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    for pkg in PACKAGES:
        if (ROOT / pkg).is_dir():
            assert f"{pkg}" in text, f"ARCHITECTURE.md does not mention {pkg}/"
    assert "feature_store ← pipeline ← jobs ← deploy ← cli" in text


def test_missing_shared_data_fails_under_ci_and_skips_elsewhere(monkeypatch, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("_tlpipe_tests_conftest", Path(__file__).with_name("conftest.py"))
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)

    monkeypatch.setenv("TLPIPE_SHARED_DATA", str(tmp_path / "absent"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        conftest._archive(tmp_path, "cifar10.tar.gz")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        conftest._archive(tmp_path, "cifar10.tar.gz")
