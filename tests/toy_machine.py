"""A small machine used by the framework tests (the cluster machine is tested elsewhere)."""

from __future__ import annotations

import attrs

from clusterfsm.fsm import ErrorState, State, StateTimeout, Transition, machine_spec


@attrs.frozen(auto_exc=True)
class WarmupTimeout(StateTimeout):
    """Warm-up took too long."""


@attrs.frozen(auto_exc=True)
class WorkTimeout(StateTimeout):
    """Work took too long."""


@attrs.frozen(auto_exc=True)
class WorkFailed(Exception):
    """Work failed with a code."""

    code: int


@attrs.frozen(auto_exc=True)
class WorkFailedBadly(WorkFailed):
    """A subclass: routed to work_failed through the MRO."""


@attrs.frozen(auto_exc=True)
class Lost(Exception):
    """The steady state ended."""

    why: str


async def never(_ctx: object) -> str:  # replaced by scripts in tests
    raise AssertionError("scripted tests replace this activity")


def budget_left(ctx: dict[str, int] | None) -> bool:
    return ctx is None or ctx.get("budget", 1) > 0


TOY = machine_spec(
    "toy",
    initial="idle",
    states=[
        State("idle", never, deadline=1.0, on_timeout=WarmupTimeout),
        State("warming", never, deadline=2.0, on_timeout=WarmupTimeout),
        State("working", never, deadline=5.0, on_timeout=WorkTimeout, raises=(WorkFailed,)),
        State("serving", never, steady=True, raises=(Lost,)),
        State("stopped"),
    ],
    transitions=[
        Transition("idle", "start", "warming"),
        Transition("warming", "warm", "working"),
        Transition("working", "again", "warming", guard=budget_left),
        Transition("working", "done", "serving"),
        Transition("serving", "stop", "stopped"),
    ],
    errors=[
        ErrorState("warmup_timeout", WarmupTimeout),
        ErrorState("work_timeout", WorkTimeout),
        ErrorState("work_failed", WorkFailed),
        ErrorState("lost", Lost),
    ],
)
