"""The import graph of procval, read statically: no cycle, and imports go one way, down the layers.

Every module under ``procval/`` is parsed with :mod:`ast`. An edge is any import a module can
execute: at module level, inside a function (a lazy import is still an import), through
``importlib.import_module("procval...")``, and the package facade's ``_LAZY_*`` tables, whose
values its ``__getattr__`` imports. Relative imports are resolved, and ``from procval import x``
is an edge to the submodule ``procval.x`` when there is one, else to the facade itself.

Imports under ``if TYPE_CHECKING:`` never run, so they cannot load a module into a worker nor
fail at import time: they are left out of the cycle check (mypy reads such cycles fine). They
must still point down the layers, though, so that the report side does not even name
``procval.results``' types and the direction can be read off every import line.

A package's ``__init__`` is not counted as imported by its submodules (Python runs it, but the
edges name what a module asks for, as import-linter and grimp count them).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "procval"

# Each group may import itself and the groups before it, never one after it. Keyed by the first
# name under procval/ (a file or a folder); a new module must be placed here to pass.
LAYERS: list[tuple[str, set[str]]] = [
    (
        "shared basics",
        {
            "_version",
            "errors",
            "_convert",
            "_identity",
            "_pickling",
            "ratelimit",
            "config",
            "wire",
            "_dspy_call",
            "usage",
            "_scores",
        },
    ),
    ("worker", {"worker"}),
    ("backends", {"backends"}),
    ("report", {"report"}),
    ("results", {"_row", "results", "_reduce", "_summary", "_groups"}),
    ("store", {"store"}),
    ("run", {"run"}),
    ("task and cli", {"task", "cli", "_cli_util", "_cli_args", "__main__"}),
    ("integrations", {"integrations", "dspy"}),
    ("the facade", {""}),  # procval/__init__.py: its __getattr__ reaches every public name
]

# What a worker process must never load (it imports procval.worker.runtime and what that needs).
NOT_IN_A_WORKER = ("report", "store", "run", "results", "cli", "task")


@dataclass(frozen=True)
class Edge:
    """``source`` imports ``target`` at ``line``; ``typing`` when under ``if TYPE_CHECKING:``."""

    source: str
    target: str
    line: int
    typing: bool


def module_name(path: Path, root: Path) -> str:
    parts = ["procval", *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def parse_edges(root: Path) -> tuple[set[str], list[Edge]]:
    """Every procval module under ``root`` and every import between them (see the docstring)."""
    files = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    packages = {name for name, path in files.items() if path.name == "__init__.py"}
    edges = []
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        package = name if name in packages else name.rpartition(".")[0]
        for node, typing in _walk(tree):
            for target in _targets(node, package, files):
                if target != name:
                    edges.append(Edge(name, target, node.lineno, typing))
    return set(files), edges


def _walk(tree: ast.AST, typing: bool = False) -> Iterator[tuple[ast.AST, bool]]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield child, True
                yield from _walk(child, True)
            for child in node.orelse:
                yield child, typing
                yield from _walk(child, typing)
            continue
        yield node, typing
        yield from _walk(node, typing)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(node: ast.AST, package: str, modules: Mapping[str, Path]) -> list[str]:
    def known(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    found: list[str | None] = []
    if isinstance(node, ast.Import):
        found = [known(alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            anchor = package.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:
            found.append(
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else known(base)
            )
    elif (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute | ast.Name)
        and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        found = [known(node.args[0].value)]
    elif (
        isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id.startswith("_LAZY") for t in node.targets)
        and isinstance(node.value, ast.Dict)
    ):
        found = [
            known(value.value)
            for value in node.value.values
            if isinstance(value, ast.Constant) and isinstance(value.value, str)
        ]
    return [target for target in found if target is not None]


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """A cycle in ``graph`` as ``[a, b, ..., a]``, or None when there is none."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_path:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in done:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def layer_of(module: str) -> int:
    head = module.split(".")[1] if "." in module else ""
    for level, (_, heads) in enumerate(LAYERS):
        if head in heads:
            return level
    raise AssertionError(f"{module} is in no layer: place procval/{head} in LAYERS")


def upward(edges: list[Edge]) -> list[str]:
    """The edges that point to a later layer, as lines to print."""
    return [
        f"{e.source} (layer {LAYERS[layer_of(e.source)][0]!r}) imports {e.target} "
        f"(layer {LAYERS[layer_of(e.target)][0]!r}) at line {e.line}"
        + (" under TYPE_CHECKING" if e.typing else "")
        for e in edges
        if layer_of(e.target) > layer_of(e.source)
    ]


MODULES, EDGES = parse_edges(ROOT)
RUNTIME = {m: {e.target for e in EDGES if e.source == m and not e.typing} for m in MODULES}


def test_the_parser_sees_the_imports_it_must_count():
    """Guards the guard: a module-level, a lazy, a relative and a facade import are all edges."""
    pairs = {(e.source, e.target) for e in EDGES if not e.typing}
    assert ("procval.run.api", "procval.run.scheduler") in pairs  # module level
    assert ("procval.results", "procval.report.compare") in pairs  # inside a method
    assert ("procval.backends.loky", "procval.worker.runtime") in pairs  # from pkg import module
    assert ("procval", "procval.dspy") in pairs  # the facade's _LAZY_MODULES
    assert len(MODULES) > 40


def test_no_import_cycle_among_procval_modules():
    cycle = find_cycle(RUNTIME)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_imports_go_down_the_layers():
    assert upward(EDGES) == []


def test_a_worker_loads_nothing_of_the_parent_side():
    """What procval.worker reaches, transitively, holds no report, store, run or results code."""
    reached: set[str] = set()
    todo = [m for m in MODULES if m.startswith("procval.worker")]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(RUNTIME[module])
    banned = sorted(m for m in reached if m.split(".")[1:2] and m.split(".")[1] in NOT_IN_A_WORKER)
    assert banned == [], f"procval.worker imports {banned}"


def test_the_report_never_imports_results():
    assert not [
        e for e in EDGES if e.source.startswith("procval.report") and e.target == "procval.results"
    ]


@pytest.mark.parametrize(
    ("graph", "cycle"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ],
)
def test_find_cycle_finds_a_cycle_and_only_a_cycle(graph, cycle):
    assert find_cycle(graph) == cycle


def test_an_upward_import_is_reported(tmp_path):
    """A worker module importing the store, lazily, is caught with its line."""
    (tmp_path / "worker").mkdir()
    (tmp_path / "store").mkdir()
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "worker" / "__init__.py").write_text("")
    (tmp_path / "store" / "__init__.py").write_text("")
    (tmp_path / "store" / "writer.py").write_text("from ..worker import runtime\n")
    (tmp_path / "worker" / "runtime.py").write_text(
        "def f():\n    from procval.store import writer\n"
    )
    modules, edges = parse_edges(tmp_path)
    graph = {m: {e.target for e in edges if e.source == m} for m in modules}
    assert find_cycle(graph) == [
        "procval.store.writer",
        "procval.worker.runtime",
        "procval.store.writer",
    ]
    assert upward(edges) == [
        "procval.worker.runtime (layer 'worker') imports procval.store.writer (layer 'store') "
        "at line 2"
    ]
