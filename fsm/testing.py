"""A test kit for declared machines: scripted activities, virtual time, coverage.

Deterministic machine tests need three things the framework gives here:

- **Scripted activities** (:class:`Script`): per state, the outcomes its activity
  produces on each visit: an event name, an exception to raise, :data:`HANG` (wait
  until the deadline fires), or :class:`After` (wait some virtual seconds first).
- **Virtual time**: :func:`run_scripted` runs under
  ``trio.testing.MockClock(autojump_threshold=0)``, so a 30 s deadline takes no real
  time and the order of events is exact.
- **Transition coverage**: :class:`TransitionCoverage` collects every transition the
  test session took (through :data:`fsm.runner.GLOBAL_OBSERVERS`), and
  :meth:`TransitionCoverage.missing` lists declared edges no test took; a test fails
  on it. :func:`shortest_paths` gives, for every state, the shortest trigger sequence
  that reaches it, and :func:`drive_edge` takes any one declared edge.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import attrs
import trio
import trio.testing

from clusterfsm.fsm.runner import GLOBAL_OBSERVERS, Observer, Outcome, Runner
from clusterfsm.fsm.spec import Activity, Edge, MachineSpec
from clusterfsm.fsm.trace import TraceRecord


class _Hang:
    def __repr__(self) -> str:
        return "HANG"


#: A scripted outcome: block until the state's deadline (or a cancellation) fires.
HANG = _Hang()


@attrs.frozen
class After:
    """A scripted outcome: wait ``seconds`` of (virtual) time, then produce ``outcome``."""

    seconds: float
    outcome: str | BaseException | _Hang


Outcomeish = str | BaseException | _Hang | After


class ScriptExhausted(AssertionError):
    """A state was entered more often than the script had outcomes for it."""


class Script:
    """Outcomes per state, consumed one per visit, in order.

    ``Script({"fetching": ["retry", "done"], "parsing": [ValueError("x")]})``
    """

    def __init__(self, outcomes: Mapping[str, Sequence[Outcomeish] | Outcomeish]) -> None:
        self._queues: dict[str, deque[Outcomeish]] = {}
        for state, seq in outcomes.items():
            if isinstance(seq, (str, BaseException, _Hang, After)):
                seq = [seq]
            self._queues[state] = deque(seq)
        self.visits: list[str] = []

    def activity_for(self, state: str) -> Activity:
        async def scripted(_context: Any) -> str:
            self.visits.append(state)
            queue = self._queues.get(state)
            if not queue:
                raise ScriptExhausted(f"no scripted outcome left for state {state!r}")
            return await _play(queue.popleft())

        scripted.__qualname__ = f"scripted[{state}]"
        return scripted

    def apply(self, spec: MachineSpec) -> MachineSpec:
        """``spec`` with every scripted state's activity replaced."""
        return spec.with_activities({s: self.activity_for(s) for s in self._queues})


async def _play(outcome: Outcomeish) -> str:
    if isinstance(outcome, After):
        await trio.sleep(outcome.seconds)
        return await _play(outcome.outcome)
    if isinstance(outcome, _Hang):
        await trio.sleep_forever()
    if isinstance(outcome, BaseException):
        raise outcome
    assert isinstance(outcome, str)
    return outcome


def run_scripted(
    spec: MachineSpec,
    script: Script | Mapping[str, Sequence[Outcomeish] | Outcomeish],
    *,
    context: Any = None,
    deadlines: Mapping[str, float] | None = None,
    observers: Iterable[Observer] = (),
    cancel_after: float | None = None,
) -> Outcome:
    """Run ``spec`` with scripted activities under a MockClock; return the outcome.

    ``cancel_after`` cancels the run from outside after that many virtual seconds
    (the outcome then ends in ``cancelled``).
    """
    script = script if isinstance(script, Script) else Script(script)
    scripted = script.apply(spec)
    result: list[Outcome] = []

    async def main() -> None:
        runner = Runner(scripted, context, deadlines=deadlines, observers=observers)
        with trio.move_on_after(math.inf if cancel_after is None else cancel_after):
            result.append(await runner.run())
        if not result:
            result.append(Outcome(runner.state, runner.error, runner.records))

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return result[0]


def shortest_paths(spec: MachineSpec) -> dict[str, tuple[Edge, ...]]:
    """For each reachable state, the shortest edge sequence from the initial state."""
    succ: dict[str, list[Edge]] = {}
    for e in spec.edges():
        succ.setdefault(e.source, []).append(e)
    paths: dict[str, tuple[Edge, ...]] = {spec.initial: ()}
    todo = deque([spec.initial])
    while todo:
        here = todo.popleft()
        for e in succ.get(here, ()):
            if e.dest not in paths:
                paths[e.dest] = (*paths[here], e)
                todo.append(e.dest)
    return paths


def script_for_edge(spec: MachineSpec, edge: Edge) -> dict[str, list[Outcomeish]]:
    """A script that takes the shortest path to ``edge.source`` and then ``edge``.

    Error edges raise an instance made by :func:`sample_error`; deadline edges hang.
    """
    steps = (*shortest_paths(spec)[edge.source], edge)
    script: dict[str, list[Outcomeish]] = {}
    for step in steps:
        script.setdefault(step.source, []).append(_outcome_for(spec, step))
    return script


def drive_edge(spec: MachineSpec, edge: Edge, *, context: Any = None) -> Outcome:
    """Run ``spec`` with scripted activities so that it takes ``edge``; return the outcome.

    A ``cancel`` edge is taken by hanging in its source state and cancelling the run
    from outside; every other kind goes through :func:`script_for_edge`. The deadline
    edge of a steady state whose deadline is optional (none by default) is taken with
    a deadline set for this run.
    """
    if edge.kind != "cancel":
        deadlines = None
        if edge.kind == "deadline" and spec.state(edge.source).deadline is None:
            deadlines = {edge.source: 1.0}
        return run_scripted(spec, script_for_edge(spec, edge), context=context,
                            deadlines=deadlines)
    path = shortest_paths(spec)[edge.source]
    script = script_for_edge(spec, path[-1]) if path else {}
    script.setdefault(edge.source, []).append(HANG)
    return run_scripted(spec, script, context=context, cancel_after=0.001)


def _outcome_for(spec: MachineSpec, edge: Edge) -> Outcomeish:
    if edge.kind == "normal":
        return edge.trigger
    if edge.kind == "deadline":
        return HANG
    if edge.kind == "unexpected":
        return RuntimeError("scripted undeclared failure")
    if edge.kind == "error":
        target = next(e for e in spec.errors if e.name == edge.dest)
        return sample_error(target.error)
    raise ValueError(f"edge kind {edge.kind!r} cannot be scripted (cancel: use cancel_after)")


def sample_error(error: type[BaseException]) -> BaseException:
    """An instance of an attrs error type with placeholder field values."""
    kwargs: dict[str, Any] = {}
    if not attrs.has(error):
        return error()
    for field in attrs.fields(error):
        if field.default is not attrs.NOTHING:
            continue
        kwargs[field.name] = _placeholder(field.type)
    return cast(BaseException, error(**kwargs))


def _placeholder(annotation: Any) -> Any:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    if text in ("int",):
        return 0
    if text in ("float",):
        return 0.0
    if text in ("bool",):
        return False
    if text in ("str",):
        return "scripted"
    if text.startswith(("BaseException", "Exception")):
        return RuntimeError("scripted")
    return "scripted"


class TransitionCoverage:
    """Which declared edges runs in this process took, per machine name."""

    def __init__(self) -> None:
        self.taken: dict[str, set[tuple[str, str, str]]] = {}

    def record(self, machine: str, record: TraceRecord) -> None:
        self.taken.setdefault(machine, set()).add((record.source, record.event, record.dest))

    def install(self) -> Callable[[], None]:
        """Start collecting from every run in the process; returns the uninstaller."""
        GLOBAL_OBSERVERS.append(self.record)
        return lambda: GLOBAL_OBSERVERS.remove(self.record)

    def missing(self, spec: MachineSpec) -> list[Edge]:
        """Declared edges never taken, ``cancel`` and ``unexpected`` included."""
        taken = self.taken.get(spec.name, set())
        return [e for e in spec.edges() if (e.source, e.trigger, e.dest) not in taken]

    def assert_complete(self, spec: MachineSpec) -> None:
        missing = self.missing(spec)
        if missing:
            lines = "\n".join(f"  {e.source} --{e.trigger}--> {e.dest}" for e in missing)
            raise AssertionError(
                f"{len(missing)} declared transition(s) of {spec.name!r} were never "
                f"taken by the test suite:\n{lines}"
            )
