"""Error values the framework itself produces.

Every failure a machine can end in is an *error value*: a frozen attrs exception that
carries the facts an operator needs (which state, which deadline, which peer) instead
of a formatted message. Machines declare their own error types; the framework adds the
few that exist for every machine:

- :class:`StateTimeout` is the base of every per-state deadline error, so a machine can
  give each state's timeout its own named type and error state.
- :class:`MachineCancelled` is what a run ends in when the embedding code cancels it.
- :class:`UnexpectedError` wraps an exception nobody declared, so it is never lost and
  never escapes the runner as a crash.
- :class:`IllegalTransition` is raised when an activity produces a trigger that the
  compiled ``transitions.Machine`` does not allow from the current state.
- :class:`SpecError` is raised at build time for a spec that cannot run correctly.
- :class:`DeadlineOverrideError` is raised before a run for a deadline override the
  machine cannot take (see :func:`clusterfsm.fsm.runner.effective_deadlines`).
"""

from __future__ import annotations

import attrs


@attrs.frozen(auto_exc=True)
class StateTimeout(Exception):
    """A state's deadline passed before its activity produced an event.

    ``detail`` is the last progress note the activity reported (see
    :func:`clusterfsm.fsm.report_progress`): what it was still waiting for when time ran out.
    ``in_state`` is the state whose deadline passed (not the error state the run goes
    to: a machine may give its error types a ``state`` of their own).
    """

    in_state: str
    deadline_s: float
    detail: str = ""

    def __str__(self) -> str:
        tail = f": {self.detail}" if self.detail else ""
        return f"{self.in_state} did not finish within {self.deadline_s:g} s{tail}"


@attrs.frozen(auto_exc=True)
class MachineCancelled(Exception):
    """The run was cancelled from outside while it was in ``state``."""

    state: str

    def __str__(self) -> str:
        return f"cancelled while in {self.state}"


@attrs.frozen(auto_exc=True)
class UnexpectedError(Exception):
    """An exception of an undeclared type ended the run; the original is kept."""

    state: str
    exception: BaseException = attrs.field(eq=False, repr=lambda e: f"{type(e).__name__}({e})")

    @property
    def type_name(self) -> str:
        return type(self.exception).__qualname__

    def __str__(self) -> str:
        return f"{self.type_name} in {self.state}: {self.exception}"


@attrs.frozen(auto_exc=True)
class IllegalTransition(Exception):
    """An activity produced a trigger the machine does not allow from ``state``."""

    state: str
    trigger: str
    reason: str = "no such transition"

    def __str__(self) -> str:
        return f"trigger {self.trigger!r} is not allowed in state {self.state!r}: {self.reason}"


@attrs.frozen(auto_exc=True)
class SpecError(Exception):
    """The declared machine is not runnable; every problem found is listed."""

    machine: str
    problems: tuple[str, ...]

    def __str__(self) -> str:
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"machine {self.machine!r} is not valid:\n{lines}"


@attrs.frozen(auto_exc=True)
class DeadlineOverrideError(ValueError):
    """A per-run deadline override names no state that has a deadline, or no valid time.

    A ``ValueError``: it is bad input (a flag, a config), found before the run starts.
    ``problem`` says what is wrong; the message also lists the states that take one.
    """

    machine: str
    state: str
    seconds: float
    problem: str
    allowed: tuple[str, ...] = ()

    def __str__(self) -> str:
        tail = f" (states with a deadline: {', '.join(self.allowed)})" if self.allowed else ""
        return f"deadline {self.state}={self.seconds!r}: {self.problem}{tail}"
