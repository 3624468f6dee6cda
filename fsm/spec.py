"""Declaring a machine: states, transitions, error states, deadlines, activities.

A :class:`MachineSpec` is plain data. It says *what may happen*; :mod:`clusterfsm.fsm.compiled`
turns it into a ``transitions.Machine`` (the one authority on which trigger is legal
from which state) and :mod:`clusterfsm.fsm.runner` makes it happen on trio.

Vocabulary:

- A **state** has an *activity*: an ``async`` function of the run's context that
  returns the name of the next trigger (an *event*), or raises an error. A state
  without an activity is *final* (the run ends there).
- Every non-final state has a **deadline** and names the :class:`~fsm.errors.StateTimeout`
  subclass its expiry produces. A *steady* state (one that is meant to last, such as
  ``ready``) may go without a deadline, but then must declare the errors that end it.
- An **error state** is final and bound to exactly one error type. A state lists the
  error types its activity may raise (``raises``); the compiler adds an edge from the
  state to each bound error state, and from every non-final state to the two states
  every machine has: ``cancelled`` and ``unexpected``.

:meth:`MachineSpec.validate` finds everything that would make a run misbehave and
reports all of it at once (:class:`~fsm.errors.SpecError`), at build time.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import attrs

from clusterfsm.fsm.errors import (
    MachineCancelled,
    SpecError,
    StateTimeout,
    UnexpectedError,
)

#: An activity: awaits whatever the state waits for, returns the next trigger's name.
Activity = Callable[[Any], Awaitable[str]]
#: A guard: decides from the run's context whether a transition may be taken.
Guard = Callable[[Any], bool]

#: Trigger used when a state's deadline passes.
DEADLINE = "deadline"
#: Trigger used when the run is cancelled from outside.
CANCEL = "cancel"
#: Trigger used for an exception of an undeclared type (or an illegal trigger).
UNEXPECTED = "unexpected"
#: Names of the two error states every machine has.
CANCELLED_STATE = "cancelled"
UNEXPECTED_STATE = "unexpected"

RESERVED_TRIGGERS = frozenset({DEADLINE, CANCEL, UNEXPECTED})
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@attrs.frozen
class State:
    """One state of a machine.

    ``activity`` is ``None`` for a final state. ``deadline`` is in seconds;
    ``on_timeout`` is the :class:`StateTimeout` subclass raised when it passes.
    ``raises`` lists the declared error types the activity may raise.
    """

    name: str
    activity: Activity | None = attrs.field(default=None, eq=False)
    deadline: float | None = None
    on_timeout: type[StateTimeout] | None = None
    raises: tuple[type[BaseException], ...] = ()
    steady: bool = False
    doc: str = ""

    @property
    def final(self) -> bool:
        return self.activity is None


@attrs.frozen
class ErrorState:
    """A final state that a run enters with an error value of type ``error``.

    ``doc`` says what causes it; ``remedy`` what an operator should do about it. Both
    end up in generated documentation.
    """

    name: str
    error: type[BaseException]
    doc: str = ""
    remedy: str = ""


@attrs.frozen
class Transition:
    """``source --trigger--> dest``, taken only if ``guard(context)`` is true."""

    source: str
    trigger: str
    dest: str
    guard: Guard | None = attrs.field(default=None, eq=False)
    doc: str = ""


@attrs.frozen
class Edge:
    """One compiled, legal transition; ``kind`` is normal, error, deadline or cancel."""

    source: str
    trigger: str
    dest: str
    kind: str = "normal"
    guarded: bool = False


_BUILTIN_ERRORS = (
    ErrorState(
        CANCELLED_STATE,
        MachineCancelled,
        doc="The embedding code cancelled the run (cancel scope, Ctrl-C, shutdown).",
        remedy="Nothing failed; start a new run when wanted.",
    ),
    ErrorState(
        UNEXPECTED_STATE,
        UnexpectedError,
        doc="An exception of an undeclared type, or an illegal trigger: a bug.",
        remedy="Report it with the trace; the original exception is attached.",
    ),
)


@attrs.frozen
class MachineSpec:
    """A whole machine. Build one with :func:`machine_spec` to get validation."""

    name: str
    initial: str
    states: tuple[State, ...]
    transitions: tuple[Transition, ...]
    errors: tuple[ErrorState, ...]
    doc: str = ""

    # -- lookups ---------------------------------------------------------------------

    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.states) + tuple(e.name for e in self.errors)

    def state(self, name: str) -> State:
        for s in self.states:
            if s.name == name:
                return s
        raise KeyError(name)

    def is_error_state(self, name: str) -> bool:
        return any(e.name == name for e in self.errors)

    def is_final(self, name: str) -> bool:
        return self.is_error_state(name) or self.state(name).final

    def error_state_for(self, error: type[BaseException]) -> ErrorState | None:
        """The error state bound to ``error`` or to its nearest declared base class."""
        by_type = {e.error: e for e in self.errors}
        for klass in error.__mro__:
            if klass in by_type:
                return by_type[klass]
        return None

    def error_trigger(self, error: type[BaseException]) -> str:
        """The trigger name that moves a run into ``error``'s error state."""
        return error.__name__

    # -- the compiled edge list ------------------------------------------------------

    def edges(self) -> tuple[Edge, ...]:
        """Every legal transition, in declaration order (stable: diagrams depend on it).

        Declared transitions first, then per state its error edges, its deadline edge,
        and the ``cancel``/``unexpected`` edges every non-final state has.
        """
        out: list[Edge] = [
            Edge(t.source, t.trigger, t.dest, "normal", t.guard is not None)
            for t in self.transitions
        ]
        for s in self.states:
            if s.final:
                continue
            targets: list[ErrorState] = []
            for err in s.raises:
                target = self.error_state_for(err)
                if target is not None and target not in targets:
                    targets.append(target)
            out.extend(
                Edge(s.name, self.error_trigger(t.error), t.name, "error") for t in targets
            )
            if s.on_timeout is not None:
                target = self.error_state_for(s.on_timeout)
                if target is not None:
                    out.append(Edge(s.name, DEADLINE, target.name, "deadline"))
            out.append(Edge(s.name, CANCEL, CANCELLED_STATE, "cancel"))
            out.append(Edge(s.name, UNEXPECTED, UNEXPECTED_STATE, "unexpected"))
        return tuple(out)

    # -- validation ------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Everything wrong with this spec, as sentences; empty when it can run."""
        problems: list[str] = []
        names = [s.name for s in self.states] + [e.name for e in self.errors]
        seen: set[str] = set()
        for n in names:
            if n in seen:
                problems.append(f"state name {n!r} is declared twice")
            seen.add(n)
            if not _NAME.match(n):
                problems.append(f"state name {n!r} is not lower_snake_case")
        plain = {s.name: s for s in self.states}
        errors = {e.name: e for e in self.errors}

        if self.initial not in plain:
            problems.append(f"initial state {self.initial!r} is not a declared state")
        elif plain[self.initial].final:
            problems.append(f"initial state {self.initial!r} has no activity")

        bound: dict[type[BaseException], str] = {}
        for e in self.errors:
            error_type: type[BaseException] = e.error
            if not (isinstance(error_type, type) and issubclass(error_type, Exception)):
                problems.append(f"error state {e.name!r}: {error_type!r} is not an Exception type")
                continue
            if not attrs.has(error_type):
                problems.append(f"error state {e.name!r}: {e.error.__name__} is not an attrs class")
            if e.error in bound:
                problems.append(
                    f"error type {error_type.__name__} is bound to two states: "
                    f"{bound[e.error]!r} and {e.name!r}"
                )
            bound[e.error] = e.name

        for t in self.transitions:
            where = f"transition {t.source} --{t.trigger}--> {t.dest}"
            if t.trigger in RESERVED_TRIGGERS:
                problems.append(f"{where}: trigger {t.trigger!r} is reserved")
            if t.trigger in {err.__name__ for err in bound}:
                problems.append(f"{where}: trigger {t.trigger!r} collides with an error type")
            if t.source not in plain:
                problems.append(f"{where}: source is not a declared state")
            elif plain[t.source].final:
                problems.append(f"{where}: leads nowhere, {t.source!r} is final (no activity)")
            if t.dest not in plain and t.dest not in errors:
                problems.append(f"{where}: dest is not a declared state")

        outgoing = {t.source for t in self.transitions}
        for s in self.states:
            if s.final:
                if s.deadline is not None or s.raises or s.on_timeout is not None:
                    problems.append(f"state {s.name!r} is final (no activity) but declares "
                                    "a deadline, a timeout or errors")
                continue
            if s.deadline is None and not s.steady:
                problems.append(f"state {s.name!r} has no deadline (declare one, or steady=True)")
            if s.deadline is not None and s.deadline <= 0:
                problems.append(f"state {s.name!r} has a non-positive deadline {s.deadline}")
            if s.deadline is not None and s.on_timeout is None:
                problems.append(f"state {s.name!r} has a deadline but no on_timeout error type")
            if s.on_timeout is not None:
                if not issubclass(s.on_timeout, StateTimeout):
                    problems.append(f"state {s.name!r}: on_timeout {s.on_timeout.__name__} "
                                    "is not a StateTimeout")
                elif s.on_timeout not in bound:
                    problems.append(f"state {s.name!r}: on_timeout {s.on_timeout.__name__} "
                                    "is bound to no error state")
            if s.steady and not s.raises and s.on_timeout is None:
                problems.append(f"steady state {s.name!r} declares no error it can end in")
            for err in s.raises:
                if self.error_state_for(err) is None:
                    problems.append(f"state {s.name!r} raises {err.__name__}, "
                                    "which is bound to no error state")
            if s.name not in outgoing:
                problems.append(f"state {s.name!r} has an activity but no outgoing transition")

        if not problems:
            reachable = _reachable(self.initial, self.edges())
            for n in names:
                if n not in reachable:
                    kind = "error state" if n in errors else "state"
                    problems.append(f"{kind} {n!r} is unreachable from {self.initial!r}")
        return problems

    def validate(self) -> MachineSpec:
        """Raise :class:`SpecError` listing every problem; return ``self`` if none."""
        problems = self.problems()
        if problems:
            raise SpecError(self.name, tuple(problems))
        return self

    def with_activities(self, activities: Mapping[str, Activity]) -> MachineSpec:
        """A copy whose named states run other activities (used by the test kit)."""
        unknown = set(activities) - {s.name for s in self.states}
        if unknown:
            raise KeyError(f"no such states: {sorted(unknown)}")
        states = tuple(
            attrs.evolve(s, activity=activities[s.name]) if s.name in activities else s
            for s in self.states
        )
        return attrs.evolve(self, states=states)


def machine_spec(
    name: str,
    *,
    initial: str,
    states: Iterable[State],
    transitions: Iterable[Transition],
    errors: Iterable[ErrorState] = (),
    doc: str = "",
) -> MachineSpec:
    """Declare a machine and validate it; the built-in error states are added for you."""
    declared = tuple(errors)
    builtin = tuple(
        b for b in _BUILTIN_ERRORS if all(e.name != b.name for e in declared)
    )
    spec = MachineSpec(
        name=name,
        initial=initial,
        states=tuple(states),
        transitions=tuple(transitions),
        errors=declared + builtin,
        doc=doc,
    )
    return spec.validate()


def _reachable(initial: str, edges: Iterable[Edge]) -> set[str]:
    succ: dict[str, list[str]] = {}
    for e in edges:
        succ.setdefault(e.source, []).append(e.dest)
    seen = {initial}
    todo = deque([initial])
    while todo:
        for nxt in succ.get(todo.popleft(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


__all__ = [
    "CANCEL",
    "CANCELLED_STATE",
    "DEADLINE",
    "UNEXPECTED",
    "UNEXPECTED_STATE",
    "Activity",
    "Edge",
    "ErrorState",
    "Guard",
    "MachineSpec",
    "State",
    "Transition",
    "machine_spec",
]
