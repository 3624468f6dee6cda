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
what happened: visited states blue, the state(s) the run ended in doubled (green if
fine, red if an error state, orange if the run stopped without an end), untaken parts
grey and untaken error states dashed rose, so "where could it have failed" stays
visible. ``annotations`` add text under a state (time spent), ``edge_notes`` under a
taken edge (its step number: Mermaid's state diagrams cannot colour one edge, so the
note is what marks the path there). The overlay has its own palette and classes; with
no overlay the output is exactly the plain diagram's, byte for byte.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypedDict, Unpack

from transitions.extensions import GraphMachine

from clusterfsm.fsm.spec import (
    CANCEL,
    CANCELLED_STATE,
    UNEXPECTED,
    UNEXPECTED_STATE,
    Edge,
    MachineSpec,
)

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


# Overlay palettes, one per engine: Mermaid's classDef takes CSS (stroke, dashes),
# Graphviz its own attributes. Kept apart from _STYLES so that the plain diagram, which
# prints every classDef, does not change when the overlay grows a style.
_OVERLAY_DOT: dict[str, dict[str, dict[str, str]]] = copy.deepcopy(_STYLES)
_OVERLAY_DOT["node"].update({
    "visited": {"fillcolor": "lightblue", "color": "navy", "penwidth": "2"},
    "ended_ok": {"fillcolor": "palegreen", "color": "darkgreen", "peripheries": "2",
                 "penwidth": "2"},
    "ended_error": {"fillcolor": "salmon", "color": "darkred", "peripheries": "2",
                    "penwidth": "2"},
    "stopped": {"fillcolor": "orange", "color": "darkorange3", "peripheries": "2",
                "penwidth": "2"},
    "unvisited": {"fillcolor": "white", "color": "gray70", "fontcolor": "gray45"},
    "unvisited_error": {"fillcolor": "white", "color": "rosybrown", "fontcolor": "rosybrown",
                        "style": "rounded,filled,dashed"},
})
_OVERLAY_DOT["edge"].update({
    "taken": {"color": "navy", "fontcolor": "navy", "penwidth": "2.5"},
    "untaken": {"color": "gray75", "fontcolor": "gray55"},
})
_OVERLAY_MERMAID: dict[str, dict[str, dict[str, str]]] = {
    "node": {
        "default": {"fill": "white", "color": "black"},
        "visited": {"fill": "lightblue", "stroke": "navy", "stroke-width": "2px",
                    "color": "black"},
        "ended_ok": {"fill": "palegreen", "stroke": "darkgreen", "stroke-width": "4px",
                     "color": "black"},
        "ended_error": {"fill": "salmon", "stroke": "darkred", "stroke-width": "4px",
                        "color": "black"},
        "stopped": {"fill": "orange", "stroke": "darkorange", "stroke-width": "4px",
                    "color": "black"},
        "unvisited": {"fill": "white", "stroke": "lightgray", "color": "gray"},
        "unvisited_error": {"fill": "white", "stroke": "rosybrown",
                            "stroke-dasharray": "4", "color": "rosybrown"},
    },
    "edge": {"default": {}},
    "graph": {"default": {}},
}


class _OverlayDotMachine(_SpecGraphMachine):
    style_attributes = copy.deepcopy(_OVERLAY_DOT)  # type: ignore[arg-type]


class _OverlayMermaidMachine(_SpecGraphMachine):
    style_attributes = copy.deepcopy(_OVERLAY_MERMAID)  # type: ignore[arg-type]


class _Model:
    pass


def _edge_label(edge: Edge, deadlines: Mapping[str, float | None],
                note: str | None = None) -> str:
    if edge.kind == "deadline":
        seconds = deadlines.get(edge.source)
        label = f"deadline {seconds:g} s" if seconds is not None else "deadline"
    elif edge.guarded:
        label = f"{edge.trigger} [guard]"
    else:
        label = edge.trigger
    return f"{label} {note}" if note else label


def _line_breaks(label: str, engine: str) -> str:
    """A newline in a label as each engine spells a line break (left-aligned in DOT)."""
    if "\n" not in label:
        return label
    return label.replace("\n", "<br>" if engine == "mermaid" else "\\l")


def _build(
    spec: MachineSpec,
    engine: Literal["graphviz", "mermaid"],
    *,
    deadlines: Mapping[str, float] | None = None,
    visited: Iterable[str] | None = None,
    taken: Iterable[tuple[str, str]] | None = None,
    annotations: Mapping[str, str] | None = None,
    ended: Iterable[str] | None = None,
    stopped: Iterable[str] | None = None,
    edge_notes: Mapping[tuple[str, str], str] | None = None,
    untaken_labels: bool = True,
) -> str:
    overlay = visited is not None
    # Iterables may be one-shot; each is read more than once below.
    visited = list(visited) if visited is not None else None
    taken = list(taken) if taken is not None else None
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
        labels[name] = _line_breaks(label, engine)
    edges = [e for e in spec.edges() if e.trigger not in (CANCEL, UNEXPECTED)]
    notes = edge_notes or {}
    hide = set() if untaken_labels or taken is None else {
        (e.source, e.dest) for e in edges} - set(taken)
    rows = [
        {"trigger": e.trigger, "source": e.source, "dest": e.dest,
         "label": " " if (e.source, e.dest) in hide  # "" would mean "use the trigger"
         else _edge_label(e, effective, notes.get((e.source, e.dest)))}
        for e in edges
    ]
    model = _Model()
    machine_cls: type[_SpecGraphMachine] = _SpecGraphMachine
    if overlay:
        machine_cls = _OverlayMermaidMachine if engine == "mermaid" else _OverlayDotMachine
    machine = machine_cls(
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
    ended_set: set[str] = set(ended) if ended is not None else set()
    if visited is not None and ended is None:
        visited_list = list(visited)
        if visited_list:
            ended_set = {visited_list[-1]}
    stopped_set = set(stopped or ())
    for name in spec.state_names:
        graph.set_node_style(name, _node_style(spec, name, visited_set, ended_set, stopped_set))
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
    spec: MachineSpec, name: str, visited: set[str] | None, ended: set[str],
    stopped: set[str],
) -> str:
    if visited is not None:
        if name in stopped:
            return "stopped"
        if name in ended:
            return "ended_error" if spec.is_error_state(name) else "ended_ok"
        if name in visited:
            return "visited"
        return "unvisited_error" if spec.is_error_state(name) else "unvisited"
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
        if " --> " in stripped and stripped.endswith(":"):
            line = line.rstrip()[:-1]  # an edge drawn without a label
        out.append(line.rstrip())
    return "\n".join(out) + "\n"


class Overlay(TypedDict, total=False):
    """The optional arguments of :func:`to_mermaid` and :func:`to_dot` (see the module
    doc): ``deadlines`` to print on deadline edges, ``visited`` states, ``taken``
    edges, ``ended`` states (default: the last visited), ``stopped`` states (a run cut
    off there, no end line), ``annotations`` per state and ``edge_notes`` per taken
    edge; ``untaken_labels=False`` drops the labels of edges not taken (a much
    narrower picture). A newline in an annotation is a line break."""

    deadlines: Mapping[str, float] | None
    visited: Iterable[str] | None
    taken: Iterable[tuple[str, str]] | None
    annotations: Mapping[str, str] | None
    ended: Iterable[str] | None
    stopped: Iterable[str] | None
    edge_notes: Mapping[tuple[str, str], str] | None
    untaken_labels: bool


def to_mermaid(spec: MachineSpec, **overlay: Unpack[Overlay]) -> str:
    """Mermaid ``stateDiagram-v2`` source for ``spec`` (deterministic; :class:`Overlay`)."""
    return _fix_mermaid(_build(spec, "mermaid", **overlay))


def to_dot(spec: MachineSpec, **overlay: Unpack[Overlay]) -> str:
    """Graphviz DOT source for ``spec`` (deterministic; :class:`Overlay`)."""
    raw = _build(spec, "graphviz", **overlay)
    return raw if raw.endswith("\n") else raw + "\n"
