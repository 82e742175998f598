"""The project's import layers, checked from source (AST), lazy and TYPE_CHECKING imports included.

Layers, top to bottom:  tabs/*  ->  backends/<package> public APIs (`backends/<pkg>/__init__.py`)  ->  studio core.
- studio core (studio/**) never imports backends or tabs, except the composition modules in COMPOSITION;
- a tab imports a capability only through its package (`backends.llm`, never `backends.llm.backend`);
- a backend module imports its own package's modules directly and other capabilities through their packages;
- a package `__init__` and a tab module import no torch at module level (checked at run time in test_layers.py);
- no import cycle between project modules, counting every import statement wherever it stands.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOTS = ("studio", "backends", "tabs")
COMPOSITION = ("studio.app", "studio.context", "studio.api", "studio.bench")  # may import backends (and app: tabs)
SINGLE_FILE_BACKENDS = ("backends.tinylm",)  # a capability that is one module, public as a whole


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, dotted
    target: str  # imported project module, dotted (the longest name that is a module of the tree)
    line: int
    top_level: bool  # at module level (not inside a function, class body or `if TYPE_CHECKING`)


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules(root: Path) -> dict[str, Path]:
    found = {}
    for top in PROJECT_ROOTS:
        for path in sorted((root / top).rglob("*.py")):
            found[module_name(root, path)] = path
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is a project module (`a.b.c` -> `a.b` when c is an attribute)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _bound_names(module: str, modules: dict[str, Path]) -> frozenset[str]:
    """Names a package's __init__ binds at module level (what `from pkg import name` then gets)."""
    path = modules.get(module)
    if path is None or path.name != "__init__.py":
        return frozenset()
    bound = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.Assign):
            bound.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return frozenset(bound)


def imports_of(source: str, path: Path, modules: dict[str, Path]) -> list[Edge]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    edges: list[Edge] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from pkg import name`: the submodule pkg.name only when pkg's __init__ does not bind `name`
                names = [base if a.name in _bound_names(base, modules) else f"{base}.{a.name}" for a in child.names]
            else:
                nested = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
                nested = nested or (isinstance(child, ast.If) and _is_type_checking(child))
                visit(child, top and not nested)
                continue
            for name in names:
                target = _resolve(name, modules)
                if target and target != source:
                    edges.append(Edge(source, target, child.lineno, top))

    visit(tree, True)
    return edges


def import_graph(root: Path) -> list[Edge]:
    modules = project_modules(root)
    return [e for name, path in modules.items() for e in imports_of(name, path, modules)]


def _capability(module: str) -> str | None:
    """'backends.llm.backend' -> 'backends.llm'; 'backends.tinylm' -> 'backends.tinylm'."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "backends" and len(parts) >= 2 else None


def _is_composition(module: str) -> bool:
    return any(module == c or module.startswith(c + ".") for c in COMPOSITION)


def layer_violations(edges: list[Edge]) -> list[str]:
    problems = []
    for e in edges:
        where = f"{e.source}:{e.line} imports {e.target}"
        src_top, dst_top = e.source.split(".")[0], e.target.split(".")[0]
        if src_top == "studio" and dst_top in ("backends", "tabs") and not _is_composition(e.source):
            problems.append(f"{where}: studio core must not import {dst_top}")
        if src_top == "studio" and dst_top == "tabs" and e.source != "studio.app":
            problems.append(f"{where}: only studio.app composes tabs")
        if src_top == "backends" and dst_top == "tabs":
            problems.append(f"{where}: backends must not import tabs")
        if src_top == "backends" and e.target in COMPOSITION:
            problems.append(f"{where}: backends must not import the composition modules")
        if dst_top == "backends" and e.target != _capability(e.target):
            crossing = src_top != "backends" or _capability(e.source) != _capability(e.target)
            if crossing and not (src_top == "studio" and _is_composition(e.source) and e.source != "studio.app"):
                problems.append(f"{where}: use the package's public API `{_capability(e.target)}`")
        own_package = _capability(e.source)
        if src_top == "backends" and e.target == own_package and e.source not in (e.target, own_package):
            problems.append(f"{where}: import sibling modules directly, not the own package's __init__")
    return problems


def find_cycles(edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return cycles
