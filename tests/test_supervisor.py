"""The supervisor machine, deterministically: fake children, virtual time, seeded jitter.

Real processes are in test_supervisor_processes.py; here every child is a scripted
:class:`FakeChild` whose events arrive at exact virtual times (pytest-trio's
``autojump_clock``), so restart, back-off, grace and budget are checked exactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import attrs
import pytest
import trio

from clusterfsm.fsm import Edge, Outcome, effective_deadlines
from clusterfsm.fsm.testing import drive_edge
from clusterfsm.states.supervisor import (
    SUPERVISOR,
    ChildMisconfigured,
    ChildSpawnFailed,
    RestartBudgetExhausted,
    RestartPolicy,
    SupervisorContext,
    run_supervisor,
)
from clusterfsm.states.supervisor_child import (
    ChildEvent,
    ChildExited,
    ChildFailed,
    ChildReady,
    ChildTransition,
    InboxItem,
    child_event,
)
from clusterfsm.states.supervisor_cli import (
    child_command,
    generation_trace_path,
    parse_backoff,
    strip_flags,
)
from tests.conftest import COVERAGE

# A script step: after `delay` virtual seconds, an event (built for the generation)
# or an int (the child exits with that code).
Step = tuple[float, Callable[[int], ChildEvent] | int]


def ready(gen: int) -> ChildEvent:
    return ChildReady(gen, f"session{gen}", "DistributedGroup ready rank=0 size=2")


def lost(gen: int) -> ChildEvent:
    return ChildTransition(gen, "ready", "PeerLost", "peer_lost")


def init_timeout(gen: int) -> ChildEvent:
    return ChildFailed(gen, "group_init_timeout", "GroupInitTimeout", "hard deadline")


class FakeChild:
    """A scripted child: SIGTERM ends it (-15) unless it ignores SIGTERM."""

    def __init__(self, generation: int, epoch: int, inbox: trio.MemorySendChannel[InboxItem],
                 ignore_term: bool) -> None:
        self.generation, self.epoch = generation, epoch
        self.pid = 1000 + generation
        self.returncode: int | None = None
        self.signals: list[str] = []
        self._inbox = inbox
        self._ignore_term = ignore_term
        self._exited = trio.Event()

    def terminate(self) -> None:
        self.signals.append("TERM")
        if not self._ignore_term:
            self.exit(-15)

    def kill(self) -> None:
        self.signals.append("KILL")
        self.exit(-9)

    def exit(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
            self._inbox.send_nowait(ChildExited(self.generation, code))
            self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode


@attrs.define
class FakeLauncher:
    """Generation g plays ``scripts[g - 1]`` (the last script repeats)."""

    scripts: Sequence[Sequence[Step]]
    ignore_term: bool = False
    spawn_error: OSError | None = None
    children: list[FakeChild] = attrs.field(factory=list)
    epochs: list[int] = attrs.field(factory=list)

    async def launch(self, generation: int, epoch: int, nursery: trio.Nursery,
                     inbox: trio.MemorySendChannel[InboxItem]) -> FakeChild:
        if self.spawn_error is not None:
            raise self.spawn_error
        child = FakeChild(generation, epoch, inbox, self.ignore_term)
        self.children.append(child)
        self.epochs.append(epoch)
        script = self.scripts[min(generation, len(self.scripts)) - 1]

        async def play() -> None:
            for delay, step in script:
                await trio.sleep(delay)
                if child.returncode is not None:
                    return
                if isinstance(step, int):
                    child.exit(step)
                else:
                    inbox.send_nowait(step(generation))

        nursery.start_soon(play)
        return child


POLICY = RestartPolicy(max_restarts=3, backoff_min_s=0.5, backoff_max_s=4.0,
                       stop_grace_s=1.0, stable_after_s=10.0, bootstrap_timeout_s=20.0)


async def supervise(launcher: FakeLauncher, policy: RestartPolicy = POLICY, *,
                    stop_after: float | None = None) -> tuple[Outcome, SupervisorContext]:
    contexts: list[SupervisorContext] = []
    async with trio.open_nursery() as nursery:
        def started(ctx: SupervisorContext) -> None:
            contexts.append(ctx)
            if stop_after is not None:
                async def stop() -> None:
                    await trio.sleep(stop_after)
                    ctx.request_stop()

                nursery.start_soon(stop)

        outcome = await run_supervisor(launcher, policy, rng=random.Random(7),
                                       started=started)
        nursery.cancel_scope.cancel()
    return outcome, contexts[0]


def path(outcome: Outcome) -> list[str]:
    return [r.dest for r in outcome.records]


async def test_peer_lost_restarts_into_a_new_generation(autojump_clock: object) -> None:
    launcher = FakeLauncher([[(1.0, ready), (5.0, lost)], [(1.0, ready)]])
    outcome, ctx = await supervise(launcher, stop_after=30.0)
    assert outcome.state == "stopped" and outcome.error is None
    assert path(outcome) == ["bootstrapping", "running", "stopping", "backing_off",
                             "launching", "bootstrapping", "running", "shutting_down",
                             "stopped"]
    first, second = launcher.children
    assert first.signals == ["TERM"] and first.returncode == -15
    assert second.signals == ["TERM"]  # stopped on request, gracefully
    assert launcher.epochs[1] > launcher.epochs[0]
    # lost at t=6; back-off 0.25..0.5 s; the new generation is ready 1 s after launch.
    assert len(ctx.recoveries) == 1 and 1.25 <= ctx.recoveries[0] <= 1.5


async def test_a_peer_that_left_on_purpose_also_starts_a_new_generation(
        autojump_clock: object) -> None:
    def left(gen: int) -> ChildEvent:
        return ChildTransition(gen, "ready", "peer_left", "peer_left")

    launcher = FakeLauncher([[(1.0, ready), (5.0, left)], [(1.0, ready)]])
    outcome, _ctx = await supervise(launcher, stop_after=30.0)
    assert outcome.state == "stopped" and outcome.error is None
    assert path(outcome).count("running") == 2
    assert launcher.children[0].signals == ["TERM"]  # the first generation was ended


async def test_init_deadline_failures_exhaust_the_budget_with_a_typed_error(
        autojump_clock: object) -> None:
    launcher = FakeLauncher([[(2.0, init_timeout), (0.0, -9)]])
    outcome, ctx = await supervise(launcher)
    assert outcome.state == "restart_budget_exhausted"
    assert isinstance(outcome.error, RestartBudgetExhausted)
    assert outcome.error.restarts == 3 and outcome.error.generations == 4
    assert "group_init_timeout (GroupInitTimeout, exit -9)" in outcome.error.last_failure
    assert [c.returncode for c in launcher.children] == [-9] * 4
    assert ctx.child is None  # every child reaped


async def test_a_child_ignoring_sigterm_is_killed_after_the_grace(
        autojump_clock: object) -> None:
    launcher = FakeLauncher([[(1.0, ready), (1.0, lost)], [(1.0, ready)]], ignore_term=True)
    outcome, _ = await supervise(launcher, stop_after=20.0)
    assert outcome.state == "stopped"
    assert launcher.children[0].signals == ["TERM", "KILL"]
    stopping = next(r for r in outcome.records if r.source == "stopping")
    assert stopping.elapsed_ms == pytest.approx(POLICY.stop_grace_s * 1000)


async def test_a_silent_child_is_stuck_at_the_bootstrap_bound(autojump_clock: object) -> None:
    launcher = FakeLauncher([[], [(1.0, ready)]])
    outcome, _ = await supervise(launcher, stop_after=40.0)
    assert [r.event for r in outcome.records][:2] == ["launched", "child_stuck"]
    assert outcome.records[1].elapsed_ms == pytest.approx(POLICY.bootstrap_timeout_s * 1000)
    assert outcome.state == "stopped" and len(launcher.children) == 2


async def test_usage_exit_is_not_restarted(autojump_clock: object) -> None:
    launcher = FakeLauncher([[(0.1, 2)]])
    outcome, _ = await supervise(launcher)
    assert outcome.state == "child_misconfigured"
    assert isinstance(outcome.error, ChildMisconfigured) and outcome.error.returncode == 2
    assert len(launcher.children) == 1


async def test_usage_exit_after_ready_is_not_restarted(autojump_clock: object) -> None:
    launcher = FakeLauncher([[(0.1, ready), (1.0, 2)]])
    outcome, _ = await supervise(launcher)
    assert (outcome.records[-1].source, outcome.state) == ("running", "child_misconfigured")


async def test_spawn_failure_is_typed(autojump_clock: object) -> None:
    launcher = FakeLauncher([[]], spawn_error=FileNotFoundError("no python"))
    outcome, _ = await supervise(launcher)
    assert outcome.state == "spawn_failed" and isinstance(outcome.error, ChildSpawnFailed)


async def test_a_stable_generation_resets_the_budget(autojump_clock: object) -> None:
    # Each generation is ready for 11 s (> stable_after 10 s), then loses its peer:
    # never more than one consecutive restart, so a budget of 1 is never spent.
    launcher = FakeLauncher([[(0.5, ready), (11.0, lost)]])
    policy = attrs.evolve(POLICY, max_restarts=1)
    outcome, ctx = await supervise(launcher, policy, stop_after=60.0)
    assert outcome.state == "stopped" and len(launcher.children) >= 4
    assert len(ctx.recoveries) == len(launcher.children) - 1


async def test_stop_during_back_off_stops_without_a_new_child(autojump_clock: object) -> None:
    launcher = FakeLauncher([[(1.0, init_timeout), (0.0, 1)]])
    policy = attrs.evolve(POLICY, backoff_min_s=4.0)
    outcome, _ = await supervise(launcher, policy, stop_after=2.0)
    assert path(outcome)[-3:] == ["backing_off", "shutting_down", "stopped"]
    assert len(launcher.children) == 1


async def test_cancelling_the_supervisor_kills_and_reaps_the_child(
        autojump_clock: object) -> None:
    launcher = FakeLauncher([[(1.0, ready)]], ignore_term=True)
    with trio.move_on_after(5.0):
        await supervise(launcher)
    (child,) = launcher.children
    assert child.signals == ["KILL"] and child.returncode == -9


async def test_events_of_an_earlier_generation_are_ignored(autojump_clock: object) -> None:
    # Generation 1 exits at once; its late "ready" (sent by the script at t=3 with
    # generation 1) must not make generation 2 look ready.
    def late_ready_of_gen1(_gen: int) -> ChildEvent:
        return ChildReady(1, "stale", "DistributedGroup ready")

    launcher = FakeLauncher([[(0.1, 1)], [(3.0, late_ready_of_gen1), (2.0, ready)]])
    outcome, ctx = await supervise(launcher, stop_after=30.0)
    assert ctx.session == "session2"
    running = next(r for r in outcome.records if r.dest == "running")
    assert running.elapsed_ms == pytest.approx(5000)


def test_backoff_is_bounded_jittered_and_seeded() -> None:
    policy = RestartPolicy(backoff_min_s=0.2, backoff_max_s=5.0)
    waits = [policy.backoff(k, random.Random(1)) for k in range(12)]
    assert waits == [policy.backoff(k, random.Random(1)) for k in range(12)]
    for k, wait in enumerate(waits):
        nominal = min(5.0, 0.2 * 2**k)
        assert nominal / 2 <= wait <= nominal
    assert len({policy.backoff(3, random.Random(s)) for s in range(5)}) == 5


def test_the_policy_is_the_one_source_of_the_supervisor_deadlines() -> None:
    assert effective_deadlines(SUPERVISOR) == RestartPolicy().deadlines()
    policy = RestartPolicy(stop_grace_s=1.0, backoff_max_s=2.0, bootstrap_timeout_s=30.0)
    assert effective_deadlines(SUPERVISOR, policy.deadlines()) == policy.deadlines()


def test_policy_and_flags_are_validated() -> None:
    with pytest.raises(ValueError):
        RestartPolicy(backoff_min_s=2.0, backoff_max_s=1.0)
    with pytest.raises(ValueError):
        RestartPolicy(max_restarts=-1)
    assert parse_backoff("0.1:2") == (0.1, 2.0)
    for bad in ("x", "2:1", "0:1", "1:inf"):
        with pytest.raises(ValueError):
            parse_backoff(bad)


def test_child_lines_are_parsed() -> None:
    assert child_event(3, "rank 1: ready --PeerLost--> peer_lost (3.2 ms)") == \
        ChildTransition(3, "ready", "PeerLost", "peer_lost")
    ready_line = "DistributedGroup ready rank=0 size=2 backend=ring session=abcd"
    assert child_event(1, ready_line) == ChildReady(1, "abcd", ready_line)
    assert child_event(1, "clusterfsm rank 0: state group_init_timeout, error "
                         "GroupInitTimeout: killed") == \
        ChildFailed(1, "group_init_timeout", "GroupInitTimeout", "killed")
    assert child_event(1, "rank 0: all_sum = 3 (expected 3)") is None
    # --rank auto: serve names the node until the election
    assert child_event(2, "node 0a1b2c3d: ready --peer_left--> peer_left (1.0 ms)") == \
        ChildTransition(2, "ready", "peer_left", "peer_left")
    # a peer's words quoted in an error line are never a ready line
    forged = ("rank 1: state handshake_rejected, error HandshakeRejected: handshake "
              "rejected (bad_key): DistributedGroup ready session=ffff")
    assert child_event(1, forged) == ChildFailed(
        1, "handshake_rejected", "HandshakeRejected",
        "handshake rejected (bad_key): DistributedGroup ready session=ffff")


def test_child_command_drops_the_supervisor_flags() -> None:
    argv = ["serve", "--supervise", "--rank", "1", "--max-restarts=3", "--restart-backoff",
            "0.1:1", "--trace-json", "t.jsonl", "--verify", "--stop-grace", "1"]
    assert strip_flags(argv) == ["serve", "--rank", "1", "--verify"]
    cmd = child_command(argv, "t.jsonl")(2, 99)
    assert cmd[-5:] == ["--rank", "1", "--verify", "--trace-json", "t.gen2.jsonl"]
    assert generation_trace_path("trace", 1) == "trace.gen1"


@pytest.mark.parametrize("edge", SUPERVISOR.edges(),
                         ids=lambda e: f"{e.source}--{e.trigger}-->{e.dest}")
def test_every_declared_supervisor_edge_is_taken(edge: Edge) -> None:
    out = drive_edge(SUPERVISOR, edge)
    assert (edge.source, edge.trigger, edge.dest) in [
        (r.source, r.event, r.dest) for r in out.records]


@pytest.mark.coverage_gate
def test_zz_every_supervisor_transition_was_exercised(request: pytest.FixtureRequest) -> None:
    """The supervisor's share of the transition-coverage gate (runs last)."""
    config = request.session.config
    if config.option.keyword or config.option.markexpr or request.session.testscollected < 100:
        pytest.skip("only meaningful when the whole suite runs")
    COVERAGE.assert_complete(SUPERVISOR)
