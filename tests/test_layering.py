"""The import graph of tfanet_core, components and pipelines: one-way layers and no runtime import cycles.

Layers, bottom up: ``tfanet_core`` (the library) < ``components`` (MLOps steps) < ``pipelines`` (what runs
the steps). A layer never imports one above it, not even for type checking. A runtime import is any
import statement, at module level or inside a function, except under ``if TYPE_CHECKING:``: a cycle of
those is a pair of modules that cannot be understood (or imported) one without the other. Standard library
only: the files are parsed, nothing is imported.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("tfanet_core", "components", "pipelines")
LAYER = {name: rank for rank, name in enumerate(PACKAGES)}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module of ours
    line: int
    runtime: bool  # False: under `if TYPE_CHECKING:`

    def __str__(self) -> str:
        path = module_path(self.source).relative_to(REPO)
        return f"{path}:{self.line} imports {self.target}" + ("" if self.runtime else " (TYPE_CHECKING)")


def module_path(module: str) -> Path:
    base = REPO.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def modules() -> dict[str, Path]:
    """Every module of the three packages: dotted name -> file."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, runtime: bool = True) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement under ``node`` (functions and classes included), with whether it runs."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _walk_one(stmt, False)
            for stmt in child.orelse:
                yield from _walk_one(stmt, runtime)
        else:
            yield from _walk_one(child, runtime)


def _walk_one(node: ast.AST, runtime: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node, runtime
    else:
        yield from _walk(node, runtime)


def imports(known: dict[str, Path]) -> list[Import]:
    """Imports between our modules; ``from pkg import name`` counts as importing ``pkg.name`` if that is a module."""
    out = []
    for module, path in known.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node, runtime in _walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            for target in dict.fromkeys(targets):
                while target and target not in known:  # `import a.b.c` of a non-module attribute: its module
                    target = target.rpartition(".")[0]
                if target and target != module:
                    out.append(Import(module, target, node.lineno, runtime))
    return out


def cycles(edges: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_layer_imports_a_layer_above_it() -> None:
    upward = [
        str(e) for e in imports(modules()) if LAYER[e.target.partition(".")[0]] > LAYER[e.source.partition(".")[0]]
    ]
    assert not upward, "imports against the layering tfanet_core < components < pipelines:\n" + "\n".join(upward)


def test_no_runtime_import_cycle() -> None:
    runtime = [e for e in imports(modules()) if e.runtime]
    report = []
    for component in cycles(runtime):
        members = set(component)
        report.append(" <-> ".join(component))
        report += [f"    {e}" for e in runtime if e.source in members and e.target in members]
    assert not report, "runtime import cycles (break one edge, or import under TYPE_CHECKING):\n" + "\n".join(report)


def test_the_check_sees_cycles_type_checking_and_function_imports() -> None:
    """The parser itself: a function-level import counts, a TYPE_CHECKING one does not, relative ones resolve."""
    a = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\nelse:\n    import y\n")
    assert [(type(n).__name__, r) for n, r in _walk(a)] == [("ImportFrom", True), ("Import", False), ("Import", True)]
    f = ast.parse("def f():\n    from . import b\n")
    assert [r for _, r in _walk(f)] == [True]
    edges = [Import("p.a", "p.b", 1, True), Import("p.b", "p.c", 1, True), Import("p.c", "p.a", 2, True)]
    assert cycles(edges) == [["p.a", "p.b", "p.c"]]
    assert cycles(edges[:2]) == []
