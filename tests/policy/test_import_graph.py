"""The project's import graph, read from the source (ast, no import): no circles, and the layer rules.

Every import counts: module level, inside functions, and under ``if TYPE_CHECKING:``. A circle hidden in a
function-level import is still a circle for a reader (and for the next refactor). The layers:

- ``schemas`` imports only ``schemas``, the standard library and pydantic (``schemas.asyncapi`` writes YAML
  with PyYAML);
- ``ml`` imports only ``ml`` and is synchronous (no asyncio, no Kafka, no HTTP server);
- ``handlers`` imports ``handlers``, ``ml`` and ``schemas``; never ``consumers`` or aiokafka;
- ``consumers`` imports no ``testkit`` or ``bench``; ``testkit`` no ``bench``; nothing here imports ``tests``.
"""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("consumers", "handlers", "ml", "schemas", "testkit", "bench")
STDLIB = set(sys.stdlib_module_names) | {"__future__"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def _imported_names(name: str, path: Path) -> set[str]:
    """Every dotted name imported anywhere in the module (``from a import b`` gives ``a`` and ``a.b``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


@cache
def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(project module -> project modules it imports, project module -> top-level foreign packages it imports)."""
    modules = _modules()
    ours: dict[str, set[str]] = {}
    foreign: dict[str, set[str]] = {}
    for name, path in modules.items():
        ours[name], foreign[name] = set(), set()
        for imported in _imported_names(name, path):
            target = imported
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target:
                if target != name:
                    ours[name].add(target)
            else:
                foreign[name].add(imported.split(".")[0])
    return ours, foreign


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _layer(name: str) -> str:
    return name.split(".")[0]


def test_the_scan_sees_the_whole_project():
    ours, _ = _graph()
    assert {"consumers.runtime", "handlers.annotation", "ml.weights", "schemas.annotation", "testkit.local",
            "bench.common"} <= set(ours)
    assert "handlers.context" in ours["handlers.annotation"]  # a module-level import
    assert "ml.training.loop" in ours["handlers.training"] or "ml.training" in ours["handlers.training"]  # function-level


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    ours, _ = _graph()
    assert _cycles(ours) == []


def test_layers_import_only_downwards():
    ours, _ = _graph()
    allowed = {
        "schemas": {"schemas"},
        "ml": {"ml"},
        "handlers": {"handlers", "ml", "schemas"},
        "consumers": {"consumers", "handlers", "ml", "schemas"},
        "testkit": {"testkit", "consumers", "handlers", "ml", "schemas"},
        "bench": set(PACKAGES),
    }
    wrong = {name: sorted(d for d in deps if _layer(d) not in allowed[_layer(name)])
             for name, deps in ours.items()}
    assert {name: deps for name, deps in wrong.items() if deps} == {}


def test_foreign_imports_of_the_lower_layers():
    _, foreign = _graph()
    problems = {}
    for name, packages in foreign.items():
        layer = _layer(name)
        if layer == "schemas":
            extra = {"yaml"} if name == "schemas.asyncapi" else set()
            bad = packages - STDLIB - {"pydantic"} - extra
        elif layer == "ml":
            bad = packages & {"asyncio", "aiokafka", "aiohttp", "aioboto3", "structlog", "consumers", "tests"}
        elif layer == "handlers":
            bad = packages & {"aiokafka", "tests"}
        else:
            bad = packages & {"tests"}
        if bad:
            problems[name] = sorted(bad)
    assert problems == {}


def test_test_modules_import_fixtures_never_each_other():
    """docs/testing.md's rule: a helper several test modules need lives in ``testkit`` (or, as a fixture, in
    ``tests/fixtures``); a test module never imports another test module or a ``conftest``."""
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        name = _module_name(path)
        if name.startswith("tests.fixtures") or path.name == "__init__.py":
            continue
        for imported in _imported_names(name, path):
            if imported.startswith("tests.") and not imported.startswith("tests.fixtures"):
                offenders.append(f"{name} imports {imported}")
    assert not offenders, offenders
