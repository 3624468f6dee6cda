"""Diagrams drawn from the spec: Mermaid ``stateDiagram-v2`` and Graphviz DOT.

The drawing is done by ``transitions``' own ``GraphMachine`` (its Mermaid engine needs
no binary; its Graphviz engine only needs the pure-Python ``graphviz`` package to emit
DOT source), fed with exactly the edges the runtime machine is compiled from. So the
picture cannot drift from the code, and ``clusterfsm diagram --check`` can compare
bytes: the same spec always gives the same text.

Conventions on the picture:

- error states are red, the steady/successful states green;
- an error edge is labelled with the error type; a deadline edge with the deadline
  (``deadline 10 s``);
- the ``cancel`` and ``unexpected`` edges exist from *every* non-final state; drawing
  them all would hide the machine, so the two states say "from any state" instead.

Given a run's path (``visited`` states and ``taken`` edges), the same drawing marks
what happened: visited states blue, the final state bold, untaken parts grey.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from transitions.extensions import GraphMachine

from fsm.spec import CANCEL, CANCELLED_STATE, UNEXPECTED, UNEXPECTED_STATE, Edge, MachineSpec

_STYLES: dict[str, dict[str, dict[str, str]]] = {
    "node": {
        "default": {
            "style": "rounded,filled",
            "shape": "rectangle",
            "fillcolor": "white",
            "color": "black",
            "peripheries": "1",
        },
        "happy": {"fillcolor": "white", "color": "black"},
        "steady": {"fillcolor": "honeydew", "color": "darkgreen"},
        "final": {"fillcolor": "honeydew", "color": "darkgreen"},
        "error": {"fillcolor": "mistyrose", "color": "darkred"},
        "visited": {"fillcolor": "lightblue", "color": "navy"},
        "ended_ok": {"fillcolor": "palegreen", "color": "darkgreen", "peripheries": "2"},
        "ended_error": {"fillcolor": "salmon", "color": "darkred", "peripheries": "2"},
        "unvisited": {"fillcolor": "white", "color": "gray"},
    },
    "edge": {
        "default": {"color": "black"},
        "error": {"color": "darkred", "fontcolor": "darkred"},
        "taken": {"color": "navy", "penwidth": "2"},
        "untaken": {"color": "gray"},
    },
    "graph": {"default": {"color": "black", "fillcolor": "white", "style": "solid"}},
}


class _SpecGraphMachine(GraphMachine):
    """GraphMachine with our palette; otherwise untouched."""

    style_attributes = copy.deepcopy(_STYLES)  # type: ignore[arg-type]
    machine_attributes = {"directed": "true", "strict": "false", "rankdir": "TB"}


class _Model:
    pass


def _edge_label(edge: Edge, deadlines: Mapping[str, float | None]) -> str:
    if edge.kind == "deadline":
        seconds = deadlines.get(edge.source)
        return f"deadline {seconds:g} s" if seconds is not None else "deadline"
    if edge.guarded:
        return f"{edge.trigger} [guard]"
    return edge.trigger


def _build(
    spec: MachineSpec,
    engine: Literal["graphviz", "mermaid"],
    *,
    deadlines: Mapping[str, float] | None,
    visited: Iterable[str] | None,
    taken: Iterable[tuple[str, str]] | None,
    annotations: Mapping[str, str] | None,
) -> str:
    effective = {s.name: s.deadline for s in spec.states}
    effective.update(deadlines or {})
    annotations = annotations or {}
    labels: dict[str, str] = {}
    for name in spec.state_names:
        label = name
        if name in (CANCELLED_STATE, UNEXPECTED_STATE):
            label = f"{name} (from any state)"
        if name in annotations:
            label = f"{label} {annotations[name]}"
        labels[name] = label
    edges = [e for e in spec.edges() if e.trigger not in (CANCEL, UNEXPECTED)]
    rows = [
        {"trigger": e.trigger, "source": e.source, "dest": e.dest,
         "label": _edge_label(e, effective)}
        for e in edges
    ]
    model = _Model()
    machine = _SpecGraphMachine(
        model=model,
        states=list(spec.state_names),
        transitions=rows,
        initial=spec.initial,
        auto_transitions=False,
        graph_engine=engine,
        title=spec.name,
        show_conditions=False,
        show_state_attributes=False,
    )
    for name, label in labels.items():
        # transitions' markup reads a state's ``label`` attribute when drawing it.
        machine.states[name].label = label  # type: ignore[attr-defined]
    machine._needs_update = True  # markup is cached; labels were set after the build
    graph: Any = machine.model_graphs[id(model)]  # transitions' stubs omit custom_styles
    graph.reset_styling()
    visited_set = set(visited) if visited is not None else None
    taken_set = set(taken) if taken is not None else None
    last = None
    if visited is not None:
        visited_list = list(visited)
        last = visited_list[-1] if visited_list else None
    for name in spec.state_names:
        graph.set_node_style(name, _node_style(spec, name, visited_set, last))
    for e in edges:
        if taken_set is not None:
            style = "taken" if (e.source, e.dest) in taken_set else "untaken"
        else:
            style = "error" if e.kind in ("error", "deadline") else ""
        if style:
            graph.custom_styles["edge"][e.source][e.dest] = style
    source: str = graph.get_graph(title=spec.name).source
    return source


def _node_style(
    spec: MachineSpec, name: str, visited: set[str] | None, last: str | None
) -> str:
    if visited is not None:
        if name == last:
            return "ended_error" if spec.is_error_state(name) else "ended_ok"
        if name in visited:
            return "visited"
        return "unvisited"
    if spec.is_error_state(name):
        return "error"
    state = spec.state(name)
    if state.final or state.steady:
        return "final"
    return "happy"


def _fix_mermaid(text: str) -> str:
    """Make transitions' Mermaid text valid for Mermaid itself.

    transitions writes the front matter title as a bare line and the class
    statement as ``Class``; Mermaid wants ``title: ...`` and lower-case ``class``.
    """
    out: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if i == 1 and lines[0] == "---" and not stripped.startswith("title:"):
            out.append(f"title: {stripped}")
            continue
        if stripped.startswith("Class "):
            line = line.replace("Class ", "class ", 1)
        out.append(line.rstrip())
    return "\n".join(out) + "\n"


def to_mermaid(
    spec: MachineSpec,
    *,
    deadlines: Mapping[str, float] | None = None,
    visited: Iterable[str] | None = None,
    taken: Iterable[tuple[str, str]] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> str:
    """Mermaid ``stateDiagram-v2`` source for ``spec`` (deterministic)."""
    raw = _build(spec, "mermaid", deadlines=deadlines, visited=visited, taken=taken,
                 annotations=annotations)
    return _fix_mermaid(raw)


def to_dot(
    spec: MachineSpec,
    *,
    deadlines: Mapping[str, float] | None = None,
    visited: Iterable[str] | None = None,
    taken: Iterable[tuple[str, str]] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> str:
    """Graphviz DOT source for ``spec`` (deterministic)."""
    raw = _build(spec, "graphviz", deadlines=deadlines, visited=visited, taken=taken,
                 annotations=annotations)
    return raw if raw.endswith("\n") else raw + "\n"
