"""The supervisor and the cable: a child waiting for its link is not failing, and a
generation ended by a pulled cable is restarted without spending the budget.
Deterministic: scripted children, virtual time (see test_supervisor.py)."""

from __future__ import annotations

import attrs

from clusterfsm.states.supervisor_child import ChildEvent, ChildFailed, ChildTransition
from tests.test_supervisor import POLICY, FakeLauncher, Step, path, ready, supervise


def waiting(gen: int) -> ChildEvent:
    return ChildTransition(gen, "idle", "await_link", "waiting_for_link")


def link_up(gen: int) -> ChildEvent:
    return ChildTransition(gen, "waiting_for_link", "link_up", "discovering")


def pulled(gen: int) -> ChildEvent:
    return ChildTransition(gen, "ready", "LinkLost", "link_lost")


def pulled_line(gen: int) -> ChildEvent:
    return ChildFailed(gen, "link_lost", "LinkLost", "link on 'en2' lost: no carrier")


async def test_a_child_waiting_for_its_cable_is_waited_for_without_a_bound(
        autojump_clock: object) -> None:
    # ten minutes without a cable: far beyond the 20 s bootstrap bound
    launcher = FakeLauncher([[(0.1, waiting), (600.0, link_up), (1.0, ready)]])
    outcome, ctx = await supervise(launcher, stop_after=700.0)
    assert path(outcome) == ["bootstrapping", "waiting_for_link", "bootstrapping", "running",
                             "shutting_down", "stopped"]
    assert len(launcher.children) == 1 and ctx.restarts == 0


async def test_pulled_cables_restart_for_free_and_the_next_child_waits(
        autojump_clock: object) -> None:
    cycle: list[Step] = [(0.1, waiting), (5.0, link_up), (1.0, ready), (3.0, pulled),
                         (0.0, pulled_line), (0.0, 1)]
    first: list[Step] = [(1.0, ready), (3.0, pulled), (0.0, pulled_line), (0.0, 1)]
    launcher = FakeLauncher([first, cycle, cycle, [(0.1, waiting), (5.0, link_up),
                                                   (1.0, ready)]])
    policy = attrs.evolve(POLICY, max_restarts=0)  # not a single counted restart allowed
    outcome, ctx = await supervise(launcher, policy, stop_after=60.0)
    assert outcome.state == "stopped", outcome.error
    assert len(launcher.children) == 4 and ctx.restarts == 0
    assert path(outcome).count("running") == 4
    assert path(outcome).count("waiting_for_link") == 3


async def test_a_child_that_fails_while_waiting_ends_its_generation(
        autojump_clock: object) -> None:
    def timed_out(gen: int) -> ChildEvent:
        return ChildFailed(gen, "link_wait_timeout", "LinkWaitTimeout", "no carrier")

    launcher = FakeLauncher([[(0.1, waiting), (2.0, timed_out), (0.0, 1)], [(1.0, ready)]])
    outcome, ctx = await supervise(launcher, stop_after=20.0)
    assert path(outcome)[:5] == ["bootstrapping", "waiting_for_link", "stopping",
                                 "backing_off", "launching"]
    assert ctx.restarts == 1  # a deadline the operator set is a failure: counted


async def test_stop_while_the_child_waits_for_its_cable(autojump_clock: object) -> None:
    launcher = FakeLauncher([[(0.1, waiting)]])
    outcome, _ = await supervise(launcher, stop_after=5.0)
    assert path(outcome)[-3:] == ["waiting_for_link", "shutting_down", "stopped"]
    assert launcher.children[0].signals == ["TERM"]
