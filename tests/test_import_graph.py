"""No two modules of clusterfsm.states import each other, directly or in a circle.

A circle means two modules share one job (or one calls the other through a door it
should not have, as the demo once called ``cli.main`` with argv strings). Imports
inside functions count: they only delay the circle to the first call.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "clusterfsm.states"


def imports_of(path: Path) -> set[str]:
    """The clusterfsm.states modules ``path`` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue
        for name in names:
            if name.startswith(PACKAGE + "."):
                found.add(name[len(PACKAGE) + 1:].split(".")[0])
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in (ROOT / "states").glob("*.py") if p.stem != "__init__"}
    return {name: imports_of(path) & modules.keys() - {name}
            for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def test_no_two_states_modules_import_each_other_in_a_circle() -> None:
    graph = import_graph()
    assert {"cli", "demo", "serve", "supervisor"} <= graph.keys()
    assert circles(graph) == []


def test_the_circle_finder_finds_circles() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_a_rank_never_imports_the_supervisor_machine() -> None:
    """``serve`` (every rank) reaches neither the supervisor machine nor its CLI."""
    graph = import_graph()
    reached: set[str] = set()
    todo = ["serve"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(graph[module])
    assert not reached & {"supervisor", "supervisor_cli", "supervisor_child", "supervised"}
