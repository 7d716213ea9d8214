"""The code's shape stays as issue 16 left it: no import cycle between the project's modules
(counting imports inside functions and under TYPE_CHECKING, which only hide a cycle), and no
source file over 600 lines (the packages, the benchmarks and the tests)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("orchestrator", "agents")
SOURCE_DIRS = (*PACKAGES, "benchmarks", "tests")
MAX_LINES = 600


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def cycle_from(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_no_import_cycle() -> None:
    found = modules()
    graph = {
        name: {m for m in imports(path) if m in found and m != name} for name, path in found.items()
    }
    assert cycle_from(graph) is None


def test_the_cycle_finder_finds_one() -> None:
    assert cycle_from({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle_from({"a": {"b"}, "b": set()}) is None


def test_no_source_file_over_600_lines() -> None:
    paths = [path for folder in SOURCE_DIRS for path in (REPO / folder).rglob("*.py")]
    long = {
        str(path.relative_to(REPO)): n
        for path in paths
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert len(paths) > 100 and long == {}
