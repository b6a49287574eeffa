"""The layout is the map: every import of every module of ``src/lorakit`` follows the layer table of
``docs/architecture.md``, the module graph has no cycle, the command uses only the public API, and no
package hides one of its modules behind a name."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import lorakit

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DOC = ROOT / "docs" / "architecture.md"
CLI_ALLOWED = ("lorakit", "lorakit.integrations.trainer", "lorakit.distributed", "lorakit.hub")


def _layers() -> dict[str, int]:
    """Package or module name → level, read from the table between the doc's layer markers."""
    text = DOC.read_text(encoding="utf-8")
    table = text.split("<!-- layers:start -->", 1)[1].split("<!-- layers:end -->", 1)[0]
    levels: dict[str, int] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].isdigit():
            for name in re.findall(r"`([\w.]+)`", cells[1]):
                levels[name] = int(cells[0])
    return levels


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "lorakit").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _level(module: str, levels: dict[str, int]) -> int:
    owners = [name for name in levels if module == name or module.startswith(name + ".")]
    if not owners:
        raise AssertionError(f"{module} is in no row of the layer table of {DOC.name}")
    return levels[max(owners, key=len)]


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every lorakit module ``path`` imports, anywhere in the file (functions and TYPE_CHECKING too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lorakit":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "lorakit")
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.add("<relative import>")
    return found


MODULES = _modules()
LEVELS = _layers()
GRAPH = {name: _imports(path, MODULES) - {name} for name, path in MODULES.items()}


def test_the_table_covers_every_module() -> None:
    for module in MODULES:
        _level(module, LEVELS)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module: str) -> None:
    here = _level(module, LEVELS)
    upward = sorted(t for t in GRAPH[module] if t == "<relative import>" or _level(t, LEVELS) > here)
    assert not upward, f"{module} (level {here}) imports {upward}, which sit above it"


def test_the_module_graph_has_no_cycle() -> None:
    # The package itself (level 9) imports everything below it by design; cycles are sought below it.
    graph = {m: {t for t in ts if t != "lorakit"} for m, ts in GRAPH.items() if m != "lorakit"}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]))
            if not state.get(nxt):
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node)


def test_the_command_uses_only_the_public_api() -> None:
    for module, targets in GRAPH.items():
        if module.startswith("lorakit.cli"):
            private = sorted(t for t in targets if not t.startswith("lorakit.cli") and t not in CLI_ALLOWED)
            assert not private, f"{module} reaches past the public API: {private}"


def test_no_package_hides_a_module_behind_a_name() -> None:
    for info in pkgutil.walk_packages(lorakit.__path__, "lorakit."):
        if info.name.endswith(".__main__"):  # importing it runs the command
            continue
        module = importlib.import_module(info.name)
        parent_name, _, child = info.name.rpartition(".")
        parent = importlib.import_module(parent_name)
        value = getattr(parent, child, module)
        assert value is module, f"{parent_name}.{child} is {value!r}, which hides the module {info.name}"


def test_the_public_api_is_explicit() -> None:
    assert sorted(set(lorakit.__all__)) == sorted(lorakit.__all__)
    for name in lorakit.__all__:
        assert hasattr(lorakit, name), name
