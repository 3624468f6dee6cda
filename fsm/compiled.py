"""A spec compiled to a ``transitions.Machine``: the single authority on legality.

The runner never decides by itself which state comes next. It hands every trigger
(an activity's event, an error's type name, ``deadline``, ``cancel``) to the compiled
``transitions.Machine``; if that machine refuses, the refusal becomes a typed
:class:`~fsm.errors.IllegalTransition` and the run ends in ``unexpected``. A trigger
can therefore never be silently ignored, and what the diagram shows (it is drawn from
the same edges) is exactly what can happen.

One ``transitions.Machine`` is built per spec and shared by every run: each run has
its own tiny model object, so starting a run costs one allocation, not a machine build.

``transitions`` logs two INFO lines of its own per state change (its enter and exit
callbacks) on its ``transitions`` logger; the runner already logs one record per
transition (``clusterfsm.transitions``). Building a machine therefore sets that
library's logger to WARNING, if nobody set its level (an app that did keeps its
choice), and touches no other logging configuration.
"""

from __future__ import annotations

import logging
from typing import Any

from transitions import Machine, MachineError

from clusterfsm.fsm.errors import IllegalTransition
from clusterfsm.fsm.spec import Edge, MachineSpec


def quiet_transitions_library() -> None:
    """Set the ``transitions`` package's logger to WARNING unless its level was set."""
    library = logging.getLogger("transitions")
    if library.level == logging.NOTSET:
        library.setLevel(logging.WARNING)


class RunModel:
    """The per-run model ``transitions`` moves between states (its ``state`` attribute).

    It is not registered with the machine (``add_model`` would bind a method per
    trigger and per state onto every run's model); triggers are fired through the
    machine's ``Event`` objects, which is what ``model.trigger`` does internally.
    """

    __slots__ = ("state",)

    def __init__(self, initial: str) -> None:
        self.state = initial


class CompiledMachine:
    """A validated spec plus the ``transitions.Machine`` built from its edges."""

    def __init__(self, spec: MachineSpec) -> None:
        quiet_transitions_library()
        self.spec = spec.validate()
        self.edges: tuple[Edge, ...] = spec.edges()
        guards = {(t.source, t.trigger, t.dest): t.guard for t in spec.transitions}
        table: list[dict[str, Any]] = []
        for e in self.edges:
            row: dict[str, Any] = {"trigger": e.trigger, "source": e.source, "dest": e.dest}
            guard = guards.get((e.source, e.trigger, e.dest)) if e.kind == "normal" else None
            if guard is not None:
                row["conditions"] = [guard]
            table.append(row)
        self.machine = Machine(
            model=None,
            states=list(spec.state_names),
            transitions=table,
            initial=spec.initial,
            auto_transitions=False,
            ignore_invalid_triggers=False,
            send_event=False,
            queued=False,
        )

    def new_model(self) -> RunModel:
        return RunModel(self.spec.initial)

    def fire(self, model: RunModel, trigger: str, context: Any) -> str:
        """Move ``model`` along ``trigger``; return the new state or raise IllegalTransition."""
        source = model.state
        event = self.machine.events.get(trigger)
        if event is None:
            raise IllegalTransition(source, trigger, "the machine declares no such trigger")
        try:
            moved = event.trigger(model, context)
        except MachineError as exc:
            raise IllegalTransition(source, trigger, str(exc.value)) from exc
        if not moved:
            raise IllegalTransition(source, trigger, "every guard on this trigger said no")
        return model.state


_CACHE: dict[int, tuple[MachineSpec, CompiledMachine]] = {}


def compile_spec(spec: MachineSpec) -> CompiledMachine:
    """The compiled machine for ``spec`` (built once per spec object, then reused)."""
    hit = _CACHE.get(id(spec))
    if hit is not None and hit[0] is spec:
        return hit[1]
    compiled = CompiledMachine(spec)
    _CACHE[id(spec)] = (spec, compiled)
    return compiled
