"""Running a declared machine on trio.

Theory of operation
-------------------
One run is one loop in one task::

    state = initial
    while state is not final:
        with a cancel scope whose deadline is the state's deadline:
            outcome = await state.activity(context)   # an event name, or an exception
        trigger = event | error type name | "deadline" | "unexpected"
        state = compiled_machine.fire(trigger)        # transitions.Machine decides

The activity runs *inline*, inside a fresh cancel scope, so entering a state starts
it, and leaving the state (which only happens when the activity has finished, or its
deadline or an outside cancellation stopped it) leaves nothing running: every task an
activity starts lives in a nursery inside the activity. A run never leaves a task
behind.

Outcomes map to triggers like this:

- a returned string is the trigger (the compiled machine rejects an illegal one with
  :class:`~fsm.errors.IllegalTransition`, and the run ends in ``unexpected``);
- an exception whose type (or a base of it) is bound to an error state fires the edge
  to that error state, with the exception kept as the run's error value; exception
  groups from nurseries are looked through, a declared leaf wins;
- the deadline produces the state's ``on_timeout`` error (with the last progress note
  the activity gave via :func:`report_progress`);
- any other ``Exception`` becomes :class:`~fsm.errors.UnexpectedError` in state
  ``unexpected``: it never escapes and is never lost;
- cancellation from outside (or ``KeyboardInterrupt``) records the move to
  ``cancelled`` and then propagates, as trio requires.

Every transition produces a :class:`~fsm.trace.TraceRecord` delivered to observers
(callbacks, called synchronously, in order) and to subscribers (trio channels), and
one INFO record on the stdlib logger ``clusterfsm.transitions`` (:data:`TRANSITION_LOG`)
whose ``machine``, ``source``, ``event``, ``dest``, ``elapsed_ms`` and ``error``
attributes carry the transition's fields for a handler or formatter to use.

Deadlines
---------
Each :class:`~fsm.spec.State` declares its default deadline. A run may override some
of them (``Runner(..., deadlines={"connecting": 0.5})``); :func:`effective_deadlines`
is the one place overrides are checked and merged: an unknown state, a state without
a deadline (a final or steady one), or a time that is not a positive finite number is
a :class:`~fsm.errors.DeadlineOverrideError` before anything runs. A command line can
call it at parse time to apply the same rule.

Inside an activity, :func:`current_deadline` tells the state's deadline as the
runner's cancel scope holds it (when it was entered, when it expires) and
:func:`time_left` how many seconds remain, so an activity never recomputes its own
budget from a copy of the table.

State
-----
The run's current state lives in one place: the per-run model the compiled
``transitions.Machine`` moves (:class:`~fsm.compiled.RunModel`). :attr:`Runner.state`
reads it; the runner keeps no copy.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from typing import Any, Generic, TypeVar

import attrs
import trio

from clusterfsm.fsm.compiled import CompiledMachine, RunModel, compile_spec
from clusterfsm.fsm.errors import (
    DeadlineOverrideError,
    IllegalTransition,
    MachineCancelled,
    UnexpectedError,
)
from clusterfsm.fsm.spec import CANCEL, DEADLINE, UNEXPECTED, MachineSpec, State
from clusterfsm.fsm.trace import TraceEnd, TraceRecord

C = TypeVar("C")
Observer = Callable[[TraceRecord], None]

_log = logging.getLogger("clusterfsm.fsm.runner")

#: One INFO record per transition of every run (see the module docstring). INFO, error
#: transitions included: an app that configured no logging sees nothing (Python's
#: last-resort handler prints WARNING and above only, and stderr may be a protocol).
TRANSITION_LOG = logging.getLogger("clusterfsm.transitions")

#: Called with ``(machine_name, record)`` for every transition of every run in this
#: process. For test kits and tracing tools (transition coverage); apps use observers.
GLOBAL_OBSERVERS: list[Callable[[str, TraceRecord], None]] = []


@attrs.frozen
class StateDeadline:
    """The current state's deadline, as the runner's cancel scope for it holds it.

    ``entered_at`` and ``expires_at`` are on the trio clock; ``seconds`` is the budget
    (``None`` and ``expires_at = inf`` for a steady state without a deadline). ``spec``
    is the running machine (for :func:`~fsm.trace.deadline_trace`).
    """

    spec: MachineSpec = attrs.field(eq=False, repr=False)
    state: str
    entered_at: float
    seconds: float | None

    @property
    def expires_at(self) -> float:
        return math.inf if self.seconds is None else self.entered_at + self.seconds

    def time_left(self) -> float:
        """Seconds until the deadline (negative once it passed; inf without one)."""
        return self.expires_at - trio.current_time()

    def elapsed(self) -> float:
        """Seconds spent in the state so far."""
        return trio.current_time() - self.entered_at


class _StateCell:
    """What the runner shares with the activity of the state it is in."""

    __slots__ = ("deadline", "note", "text")

    def __init__(self, deadline: StateDeadline) -> None:
        self.deadline = deadline
        self.text = ""
        self.note: str | None = None


_current: ContextVar[_StateCell | None] = ContextVar("fsm_current_state", default=None)


def report_progress(text: str) -> None:
    """Note what the current state's activity is waiting for.

    If the state's deadline passes, the note becomes the timeout error's ``detail``
    (``"waiting for rank 2; rejected 1 connection: bad_key"``), so an operator learns
    what was missing, not only that time ran out. Outside a run it does nothing.
    """
    cell = _current.get()
    if cell is not None:
        cell.text = text


def note_outcome(text: str) -> None:
    """Note how the current state's step went; the note goes on its trace record.

    For what an operator would otherwise misread: a state that took a second because
    a library slept in a retry, not because something hung. Outside a run it does
    nothing; a later note replaces an earlier one.
    """
    cell = _current.get()
    if cell is not None:
        cell.note = text


def current_deadline() -> StateDeadline:
    """The deadline of the state whose activity calls this (or a task it started).

    Raises ``RuntimeError`` outside an activity: there is no state to ask about.
    """
    cell = _current.get()
    if cell is None:
        raise RuntimeError("current_deadline() is only meaningful inside an activity")
    return cell.deadline


def time_left() -> float:
    """Seconds left before the current state's deadline (inf for a steady state)."""
    return current_deadline().time_left()


def effective_deadlines(
    spec: MachineSpec, overrides: Mapping[str, float] | None = None
) -> dict[str, float]:
    """Every state's deadline for a run: the declared ones with ``overrides`` applied.

    The one place overrides are checked: a name that is not a state, a state without
    a deadline (final, or steady without a timeout error), or a time that is not a
    positive finite number raises :class:`~fsm.errors.DeadlineOverrideError`.
    """
    timed = {s.name: s for s in spec.states if s.on_timeout is not None}
    allowed = tuple(timed)
    merged = {name: s.deadline for name, s in timed.items() if s.deadline is not None}
    for name, seconds in (overrides or {}).items():
        if name not in timed:
            if name not in spec.state_names:
                problem = f"{name!r} is not a state of machine {spec.name!r}: no such state"
            elif spec.is_final(name):
                problem = f"{name!r} is not a state with an activity (it is final)"
            else:
                problem = (f"state {name!r} declares no timeout error (it is steady), "
                           "so it cannot take a deadline")
            raise DeadlineOverrideError(spec.name, name, seconds, problem, allowed)
        if not (isinstance(seconds, (int, float)) and seconds > 0
                and math.isfinite(seconds)):
            raise DeadlineOverrideError(
                spec.name, name, seconds,
                "the deadline must be a positive, finite number of seconds", allowed)
        merged[name] = float(seconds)
    return merged


@attrs.frozen
class Outcome:
    """How a run ended: the final state and, for an error state, the error value."""

    state: str
    error: BaseException | None
    records: tuple[TraceRecord, ...]

    @property
    def ok(self) -> bool:
        return self.error is None

    def end_record(self) -> TraceEnd:
        if self.error is None:
            return TraceEnd(self.state)
        return TraceEnd(self.state, type(self.error).__name__, str(self.error))


class Runner(Generic[C]):
    """Runs one instance of a machine with ``context`` passed to every activity.

    ``deadlines`` overrides the spec's per-state deadlines (seconds) for this run;
    :func:`effective_deadlines` checks them here, before the run. A runner runs once;
    make a new one for the next run.
    """

    def __init__(
        self,
        spec: MachineSpec | CompiledMachine,
        context: C,
        *,
        deadlines: Mapping[str, float] | None = None,
        observers: Iterable[Observer] = (),
    ) -> None:
        self.compiled = spec if isinstance(spec, CompiledMachine) else compile_spec(spec)
        self.spec = self.compiled.spec
        self.context = context
        self._states = {s.name: s for s in self.spec.states}
        self._deadlines = effective_deadlines(self.spec, deadlines)
        self._observers = list(observers)
        self._subscribers: list[trio.MemorySendChannel[TraceRecord]] = []
        self._records: list[TraceRecord] = []
        # The one record of the current state: transitions moves it, we only read it.
        self._model = self.compiled.new_model()
        self._error: BaseException | None = None
        # Created only when someone waits (wait_for): most transitions have no waiter,
        # and 2,000 concurrent runs should not allocate an Event per transition each.
        self._changed: trio.Event | None = None
        self._started = False
        self._finished = False

    # -- public view -----------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._model.state

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def records(self) -> tuple[TraceRecord, ...]:
        return tuple(self._records)

    def deadline_for(self, state: str) -> float | None:
        """``state``'s deadline in this run (overrides applied); None if it has none."""
        return self._deadlines.get(state)

    def subscribe(self) -> trio.MemoryReceiveChannel[TraceRecord]:
        """A channel of every later transition; it closes when the run ends.

        Unbounded on purpose: a run has a bounded number of transitions, and a slow
        reader must not block the machine nor lose a record.
        """
        send, receive = trio.open_memory_channel[TraceRecord](math.inf)
        if self._finished:
            send.close()
        else:
            self._subscribers.append(send)
        return receive

    async def wait_for(self, *states: str) -> str:
        """Wait until the run is in one of ``states`` or has ended; return the state.

        Woken by each transition (no polling).
        """
        unknown = set(states) - set(self.spec.state_names)
        if unknown:
            raise KeyError(f"no such states: {sorted(unknown)}")
        while self.state not in states and not self._finished:
            if self._changed is None:
                self._changed = trio.Event()
            await self._changed.wait()
        return self.state

    # -- the loop --------------------------------------------------------------------

    async def run(self) -> Outcome:
        """Run to a final state and return the outcome; see the module docstring."""
        if self._started:
            raise RuntimeError("a Runner runs once; create a new one")
        self._started = True
        model = self._model
        try:
            while not self.spec.is_final(model.state):
                await self._step(model, self._states[model.state])
            return Outcome(model.state, self._error, tuple(self._records))
        finally:
            self._finished = True
            for send in self._subscribers:
                send.close()
            self._subscribers.clear()
            self._wake_waiters()

    async def _step(self, model: RunModel, state: State) -> None:
        assert state.activity is not None
        entered = trio.current_time()
        deadline = self.deadline_for(state.name)
        cell = _StateCell(StateDeadline(self.spec, state.name, entered, deadline))
        token = _current.set(cell)
        try:
            with trio.CancelScope(deadline=cell.deadline.expires_at) as scope:
                event = await state.activity(self.context)
        except BaseException as exc:
            remainder = _without_cancellation(exc)
            if remainder is None or not isinstance(remainder, Exception):
                # Cancelled from outside (our own deadline is absorbed by the scope),
                # or KeyboardInterrupt: record it, then let it propagate.
                self._advance(model, CANCEL, entered, MachineCancelled(state.name))
                raise
            self._advance_error(model, state, entered, remainder)
            return
        finally:
            _current.reset(token)
        if scope.cancelled_caught:
            assert state.on_timeout is not None and deadline is not None
            timeout = state.on_timeout(in_state=state.name, deadline_s=deadline, detail=cell.text)
            self._advance(model, DEADLINE, entered, timeout)
        elif not isinstance(event, str):
            self._advance_unexpected(
                model, state, entered,
                TypeError(f"activity returned {event!r}, not an event name"),
            )
        else:
            self._advance(model, event, entered, None, note=cell.note)

    def _advance_error(
        self, model: RunModel, state: State, entered: float, exc: Exception
    ) -> None:
        leaf = _declared_leaf(self.spec, exc)
        if leaf is None:
            self._advance_unexpected(model, state, entered, exc)
            return
        bound = self.spec.error_state_for(type(leaf))
        assert bound is not None
        self._advance(model, self.spec.error_trigger(bound.error), entered, leaf)

    def _advance_unexpected(
        self, model: RunModel, state: State, entered: float, exc: BaseException
    ) -> None:
        self._advance(model, UNEXPECTED, entered, UnexpectedError(state.name, exc))

    def _advance(
        self, model: RunModel, trigger: str, entered: float, error: BaseException | None,
        note: str | None = None,
    ) -> None:
        source = model.state
        try:
            dest = self.compiled.fire(model, trigger, self.context)
        except IllegalTransition as illegal:
            if error is not None:
                illegal.add_note(f"while handling {type(error).__name__}: {error}")
                illegal.__cause__ = error
            trigger, error = UNEXPECTED, UnexpectedError(source, illegal)
            dest = self.compiled.fire(model, trigger, self.context)
        now = trio.current_time()
        record = TraceRecord(
            t=now,
            source=source,
            event=trigger,
            dest=dest,
            elapsed_ms=(now - entered) * 1000.0,
            error=None if error is None else type(error).__name__,
            note=note,
        )
        if error is not None:
            self._error = error
        self._records.append(record)
        if TRANSITION_LOG.isEnabledFor(logging.INFO):
            self._log_transition(record)
        self._publish(record)

    def _log_transition(self, record: TraceRecord) -> None:
        fields = {"machine": self.spec.name, "source": record.source, "event": record.event,
                  "dest": record.dest, "elapsed_ms": record.elapsed_ms,
                  "error": record.error}
        tail = f" ({record.error})" if record.error else ""
        TRANSITION_LOG.info("%s: %s --%s--> %s after %.3f ms%s", self.spec.name,
                            record.source, record.event, record.dest, record.elapsed_ms,
                            tail, extra=fields)

    def _publish(self, record: TraceRecord) -> None:
        for observer in self._observers:
            try:
                observer(record)
            except Exception:  # noqa: BLE001 - logged with traceback below
                # An observer is the app's progress display; its bug must not take the
                # cluster down. It is logged with its traceback, not swallowed.
                _log.exception("observer %r failed on %s", observer, record)
        for hook in GLOBAL_OBSERVERS:
            hook(self.spec.name, record)
        for send in self._subscribers:
            send.send_nowait(record)
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()


def _without_cancellation(exc: BaseException) -> BaseException | None:
    """``exc`` minus any ``trio.Cancelled`` in it; None if it was only cancellation."""
    if isinstance(exc, trio.Cancelled):
        return None
    if isinstance(exc, BaseExceptionGroup):
        _, rest = exc.split(trio.Cancelled)
        return rest
    return exc


def _leaves(exc: BaseException) -> Iterable[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _declared_leaf(spec: MachineSpec, exc: BaseException) -> BaseException | None:
    """The first exception in ``exc`` (a group is searched) bound to an error state."""
    for leaf in _leaves(exc):
        if spec.error_state_for(type(leaf)) is not None:
            return leaf
    return None


async def run_machine(
    spec: MachineSpec,
    context: Any,
    *,
    deadlines: Mapping[str, float] | None = None,
    observers: Iterable[Observer] = (),
) -> Outcome:
    """Convenience: build a :class:`Runner` and run it to the end."""
    return await Runner(spec, context, deadlines=deadlines, observers=observers).run()
