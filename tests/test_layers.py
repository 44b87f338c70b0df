"""kvrag's packages form layers: a module imports only its own layer and the ones below,
and no chain of imports comes back to where it started. Every ``import`` of ``kvrag.*``
counts, at module level or inside a function, relative ones resolved."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "kvrag"

# Bottom to top; kvrag/__init__.py is below them all.
LAYERS = {
    "extras": 0, "loopback": 0, "compression": 0,
    "data": 1,
    "engines": 2, "engine_plugin": 2,
    "rag_stack": 3,
    "evaluation": 4,
    "train": 5, "analysis": 5, "bench": 5,
    "cli": 6,
}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module
    where: str  # path:line


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path) -> list[Import]:
    """Every kvrag module ``path`` imports; ``from X import y`` imports X.y where that is
    a module, else X."""
    source = module_name(path)
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    where = lambda node: f"{path.relative_to(ROOT)}:{node.lineno}"  # noqa: E731
    found: list[Import] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(source, alias.name, where(node)) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.append(Import(source, target if is_module(target) else base, where(node)))
    return list(dict.fromkeys(i for i in found
                              if i.target.split(".")[0] == "kvrag" and i.target != source))


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return -1
    assert parts[1] in LAYERS, f"{module}: kvrag.{parts[1]} has no layer in LAYERS"
    return LAYERS[parts[1]]


def all_imports() -> list[Import]:
    return [i for path in sorted(PACKAGE.rglob("*.py")) for i in imports_of(path)]


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (a depth-first walk)."""
    state: dict[str, str] = {}  # "open": on the current path; "done": fully explored
    for start in sorted(edges):
        if start in state:
            continue
        path, state[start] = [start], "open"
        stack = [iter(sorted(edges[start]))]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                state[path.pop()] = "done"
            elif state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                path.append(nxt)
                state[nxt] = "open"
                stack.append(iter(sorted(edges.get(nxt, ()))))
    return None


def test_the_walk_sees_imports_of_every_kind():
    found = {(i.source, i.target) for i in all_imports()}
    assert ("kvrag.cli.main", "kvrag.cli.compare") in found  # from kvrag.cli import compare
    assert ("kvrag.compression", "kvrag.compression.h2o") in found
    assert ("kvrag.cli.compare", "kvrag.evaluation.comparison") in found
    # inside a function
    assert ("kvrag.evaluation.engine_loading", "kvrag.engines.hf") in found


def test_no_module_imports_a_higher_layer():
    upward = [f"{i.where}: {i.source} imports {i.target}" for i in all_imports()
              if layer(i.target) > layer(i.source)]
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    edges: dict[str, set[str]] = {}
    for i in all_imports():
        edges.setdefault(i.source, set()).add(i.target)
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_a_cycle_is_found_and_named():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
