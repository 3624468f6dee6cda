"""The rank supervisor: one declared machine that keeps a rank process coming back.

Theory of operation
-------------------
MLX keeps one distributed group per process, and ``mx.distributed.init`` holds the
GIL and cannot be cancelled from inside (docs/design.md section 3.1). So after a lost
peer or a hung init the only clean way back is a *new process* that bootstraps a *new
session*. The supervisor is that outside party: a small process (or task, see
:mod:`clusterfsm.states.supervised`) that never imports MLX, runs the rank as a child, watches
what the child reports, and replaces it::

    launching -> bootstrapping -> running
        ^          |  ^    | failed/stuck   | lost
        |          v  |    v                v
        |  waiting_for_link (child)         |
        +-- backing_off <---------------- stopping

A child waiting for its cable (its own ``waiting_for_link``) is not failing: the
supervisor waits with it, without the bootstrap bound. A generation that ends because
a cable was pulled (``link_lost``) is restarted at once and does not count against
the restart budget: the next child simply waits for the cable.

Rule 1 (as in :mod:`clusterfsm.states.machine`): which state comes next is decided only by the
table :data:`SUPERVISOR` below. Activities start, watch and stop the child and return
a trigger; a child's failure is an *event* (it leads to a restart), not an error of
the supervisor. The supervisor's own error states are for what a restart cannot fix:

- ``restart_budget_exhausted``: more consecutive failed generations than allowed
  (a generation that stayed ready for ``stable_after_s`` resets the count);
- ``child_misconfigured``: the child exited with the usage exit code (bad flags, bad
  key file): restarting it would fail the same way;
- ``spawn_failed``: the child program could not be started at all;
- ``child_unkillable``: a child survived SIGKILL past the deadline (a process stuck
  in the kernel); nothing more can be done from user space;
- ``supervisor_stalled``: a backstop deadline of the supervisor itself passed (a bug:
  every wait in an activity has a tighter bound of its own).

Every child gets a new *epoch* (nanoseconds since the epoch, strictly increasing per
supervisor, in ``CLUSTERFSM_EPOCH``), so a coordinator can tell an old generation of a
node from its current one (docs/protocol.md, HELLO; docs/operations.md). A child that
is rank 0 prints an admission line (``admitted rank K epoch E from HOST``) on stdout
for each supervised joiner it admits; the launcher keeps the newest epoch per rank and
hands the table to every later child in ``CLUSTERFSM_EPOCH_FLOORS``, so a restarted
coordinator still refuses the older generations its predecessor had already replaced
(``STALE_SESSION``).
The table lives in this process's memory only: restarting the supervisor forgets it.

The child is watched through its output lines (the ``serve`` line protocol, owned by
:mod:`clusterfsm.states.lines`): its transitions, its ``DistributedGroup ready`` line
and, on failure, its error line on stderr (the init watchdog prints the same kind when
it kills a frozen rank). A ``peer_lost`` transition is acted on at once.

Where the rest lives: the child process, its launcher and the events its lines become
are :mod:`clusterfsm.states.supervisor_child`; ``serve --supervise`` (flags, the
child's command line, the supervisor's own output) is
:mod:`clusterfsm.states.supervisor_cli`; the embedding API is
:mod:`clusterfsm.states.supervised`.

Cancellation: the supervisor's nursery owns the child and its reader tasks. Leaving
:func:`run_supervisor` - normally, by error, or cancelled - kills and reaps the
child (shielded), so no rank outlives its supervisor; and if the supervisor process
itself dies (SIGKILL), the child follows within a fraction of a second
(:mod:`clusterfsm.states.lifeline`).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable

import attrs
import trio

from clusterfsm.fsm import (
    ErrorState,
    MachineSpec,
    Outcome,
    Runner,
    State,
    StateTimeout,
    TraceRecord,
    Transition,
    machine_spec,
    report_progress,
)
from clusterfsm.fsm.runner import Observer
from clusterfsm.states.exitcodes import EXIT_USAGE
from clusterfsm.states.supervisor_child import (
    Child,
    ChildExited,
    ChildFailed,
    ChildReady,
    ChildTransition,
    InboxItem,
    Launcher,
    StopRequested,
)

# -- errors -------------------------------------------------------------------------


@attrs.frozen(auto_exc=True)
class RestartBudgetExhausted(Exception):
    """Too many consecutive generations failed; ``last_failure`` says how the last did."""

    restarts: int
    generations: int
    last_failure: str

    def __str__(self) -> str:
        return (f"gave up after {self.restarts} restart(s) ({self.generations} "
                f"generation(s)); last: {self.last_failure}")


@attrs.frozen(auto_exc=True)
class ChildSpawnFailed(Exception):
    """The rank's child process could not be started (missing interpreter, ...)."""

    generation: int
    detail: str

    def __str__(self) -> str:
        return f"generation {self.generation} could not be started: {self.detail}"


@attrs.frozen(auto_exc=True)
class ChildMisconfigured(Exception):
    """The child exited with the usage exit code: a restart would fail the same way."""

    generation: int
    returncode: int
    detail: str = ""

    def __str__(self) -> str:
        return (f"generation {self.generation} exited {self.returncode} (bad usage or "
                f"configuration): {self.detail or 'see its stderr'}")


@attrs.frozen(auto_exc=True)
class ChildStopTimeout(StateTimeout):
    """A child did not exit even after SIGKILL (stuck in the kernel)."""


@attrs.frozen(auto_exc=True)
class SupervisorStalled(StateTimeout):
    """A backstop deadline of the supervisor itself passed (a supervisor bug)."""


@attrs.frozen
class ChildFailure:
    """How one generation ended, for the log and the final error."""

    generation: int
    state: str
    error: str
    detail: str = ""
    returncode: int | None = None

    def __str__(self) -> str:
        code = "" if self.returncode is None else f", exit {self.returncode}"
        tail = f": {self.detail}" if self.detail else ""
        return f"generation {self.generation} ended in {self.state} ({self.error}{code}){tail}"


# -- policy and context -------------------------------------------------------------


def _positive(_inst: object, attr: attrs.Attribute[float], value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{attr.name} must be a positive number of seconds, got {value!r}")


@attrs.frozen
class RestartPolicy:
    """How often and how fast to restart; validated where it is built.

    ``max_restarts`` bounds *consecutive* restarts: a generation that stayed ready
    for ``stable_after_s`` resets the count and the back-off. Back-off is
    exponential from ``backoff_min_s`` to ``backoff_max_s`` with "equal jitter"
    (half fixed, half random), so two nodes restarting together do not keep
    colliding, yet every wait is at least half the nominal one.
    """

    max_restarts: int = 5
    backoff_min_s: float = attrs.field(default=0.2, validator=_positive)
    backoff_max_s: float = attrs.field(default=5.0, validator=_positive)
    stop_grace_s: float = attrs.field(default=2.0, validator=_positive)
    stable_after_s: float = attrs.field(default=10.0, validator=_positive)
    #: Bound on a generation reaching ready (its own deadlines sum lower).
    bootstrap_timeout_s: float = attrs.field(default=120.0, validator=_positive)
    #: How long a reaped-after-SIGKILL wait may take before ``child_unkillable``.
    kill_wait_s: float = attrs.field(default=5.0, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if self.backoff_min_s > self.backoff_max_s:
            raise ValueError("backoff_min_s must not exceed backoff_max_s")

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """The wait before restart number ``attempt + 1`` (0-based attempt)."""
        nominal = min(self.backoff_max_s, self.backoff_min_s * 2.0 ** min(attempt, 32))
        return nominal / 2 + rng.uniform(0, nominal / 2)

    def deadlines(self) -> dict[str, float]:
        """The supervisor states' backstop deadlines, derived from this policy.

        The one source of them: the machine declares the default policy's, and a run
        with this policy overrides them with these (the runner checks the names).
        """
        stop = self.stop_grace_s + self.kill_wait_s
        return {
            "launching": 30.0,
            "bootstrapping": self.bootstrap_timeout_s + 5.0,
            "stopping": stop,
            "backing_off": self.backoff_max_s + 5.0,
            "shutting_down": stop,
        }


def epoch_clock() -> Callable[[], int]:
    """Epochs from the wall clock in ns, strictly increasing even if the clock steps
    back: a node's later generation always carries a larger epoch, also across a
    restart of the supervisor itself (a counter would start again at 1)."""
    last = 0

    def next_epoch() -> int:
        nonlocal last
        last = max(time.time_ns(), last + 1)
        return last

    return next_epoch


@attrs.define
class SupervisorContext:
    """What the supervisor's states share for one supervised rank."""

    launcher: Launcher
    policy: RestartPolicy
    nursery: trio.Nursery
    inbox: trio.MemorySendChannel[InboxItem]
    events: trio.MemoryReceiveChannel[InboxItem]
    rng: random.Random = attrs.field(factory=random.Random)
    next_epoch: Callable[[], int] = attrs.field(factory=epoch_clock)
    log: Callable[[str], None] = lambda _text: None
    #: Called with each generation's story: ("ready"|"lost"|"failed", generation, detail).
    on_generation: Callable[[str, int, str], None] = lambda _k, _g, _d: None

    generation: int = 0
    epoch: int = 0
    restarts: int = 0
    child: Child | None = None
    failure: ChildFailure | None = None
    ready_at: float | None = None
    lost_at: float | None = None
    session: str = ""
    #: Seconds from each loss to the next generation's ready (time to recover).
    recoveries: list[float] = attrs.field(factory=list)
    stop_requested: bool = False

    def request_stop(self) -> None:
        """Ask the supervisor to stop the child and end in ``stopped``."""
        if not self.stop_requested:
            self.stop_requested = True
            self.inbox.send_nowait(StopRequested())


# -- activities ---------------------------------------------------------------------


async def _next_event(ctx: SupervisorContext) -> InboxItem:
    """The next stop request or event of the *current* generation (older ones dropped)."""
    while True:
        item = await ctx.events.receive()
        if isinstance(item, StopRequested) or item.generation == ctx.generation:
            return item


async def launching(ctx: SupervisorContext) -> str:
    """Start a new generation with a new epoch (it bootstraps a new session)."""
    ctx.generation += 1
    ctx.epoch = ctx.next_epoch()
    ctx.failure = None
    ctx.ready_at = None
    ctx.session = ""
    report_progress(f"starting generation {ctx.generation}")
    try:
        ctx.child = await ctx.launcher.launch(ctx.generation, ctx.epoch, ctx.nursery, ctx.inbox)
    except OSError as exc:
        raise ChildSpawnFailed(ctx.generation, str(exc)) from exc
    ctx.log(f"generation {ctx.generation} started (pid {ctx.child.pid}, epoch {ctx.epoch})")
    return "launched"


def _misconfigured(ctx: SupervisorContext, code: int) -> ChildMisconfigured:
    detail = ctx.failure.detail if ctx.failure is not None else ""
    return ChildMisconfigured(ctx.generation, code, detail)


def _note_failure(ctx: SupervisorContext, item: ChildFailed) -> None:
    """The child's error line: the generation's failure, as the child named it."""
    ctx.failure = ChildFailure(ctx.generation, item.state, item.error, item.detail)


def _note_exit(ctx: SupervisorContext, item: ChildExited, state: str) -> None:
    """The child exited (last seen in ``state``): record its exit code on the failure.

    An error line may have come before the exit (stdout and stderr are separate pipes,
    read concurrently: a worker that fails at once), so an earlier failure is kept. A
    usage exit means the flags are wrong: ``ChildMisconfigured``, never restarted.
    """
    if item.returncode == EXIT_USAGE:
        raise _misconfigured(ctx, item.returncode)
    ctx.failure = attrs.evolve(
        ctx.failure or ChildFailure(ctx.generation, state, "ChildExited"),
        returncode=item.returncode)


async def bootstrapping(ctx: SupervisorContext) -> str:
    """Wait for the child's ready line; its failure, exit or silence ends the generation."""
    bound = ctx.policy.bootstrap_timeout_s
    state = "started"
    with trio.move_on_after(bound):
        while True:
            report_progress(f"generation {ctx.generation} in {state}")
            item = await _next_event(ctx)
            if isinstance(item, StopRequested):
                return "shutdown"
            if isinstance(item, ChildTransition):
                state = item.dest
                if state == "waiting_for_link":
                    return "child_waiting"
            elif isinstance(item, ChildReady):
                ctx.ready_at = trio.current_time()
                ctx.session = item.session
                return "child_ready"
            elif isinstance(item, ChildFailed):
                _note_failure(ctx, item)
            else:
                _note_exit(ctx, item, state)
                return "child_failed"
    ctx.failure = ChildFailure(ctx.generation, state, "BootstrapStalled",
                               f"not ready within {bound:g} s")
    return "child_stuck"


#: Child states that end a generation because a cable was pulled: the restart is not
#: counted (the next generation waits for the cable in its ``waiting_for_link``).
LINK_LOSS_STATES = frozenset({"link_lost"})


async def waiting_for_link(ctx: SupervisorContext) -> str:
    """The child waits for its cable: no bound (plugging it in may take days); its
    discovery starting is ``link_up``, its failure or exit ends the generation."""
    state = "waiting_for_link"
    while True:
        report_progress(f"generation {ctx.generation} waits for its link ({state})")
        item = await _next_event(ctx)
        if isinstance(item, StopRequested):
            return "shutdown"
        if isinstance(item, ChildTransition):
            state = item.dest
            if item.source == "waiting_for_link" and item.dest == "discovering":
                return "link_up"
        elif isinstance(item, ChildFailed):
            _note_failure(ctx, item)
        elif isinstance(item, ChildExited):
            _note_exit(ctx, item, state)
            return "child_failed"


async def running(ctx: SupervisorContext) -> str:
    """The child's group is up. Its ``peer_lost`` (or any exit) ends the generation."""
    while True:
        item = await _next_event(ctx)
        if isinstance(item, StopRequested):
            return "shutdown"
        if isinstance(item, ChildTransition) and item.dest == "peer_lost":
            ctx.failure = ChildFailure(ctx.generation, "peer_lost", "PeerLost")
            return "child_lost"
        if isinstance(item, ChildTransition) and item.dest in LINK_LOSS_STATES:
            ctx.failure = ChildFailure(ctx.generation, item.dest, "LinkLost",
                                       "a cable was pulled")
            return "child_lost"
        if isinstance(item, ChildTransition) and item.dest == "peer_left":
            # A peer closed its cluster on purpose (its operator stopped it): the group
            # is gone all the same; start a new session and wait for that rank.
            ctx.failure = ChildFailure(ctx.generation, "peer_left", "PeerLeft",
                                       "a peer closed the cluster on purpose")
            return "child_lost"
        if isinstance(item, ChildFailed):
            _note_failure(ctx, item)
            return "child_lost"
        if isinstance(item, ChildExited):
            _note_exit(ctx, item, "ready")
            return "child_lost"


async def _stop_child(ctx: SupervisorContext) -> None:
    """SIGTERM, ``stop_grace_s`` to exit, then SIGKILL; always reaped before returning."""
    child = ctx.child
    if child is None:
        return
    if child.returncode is None:
        report_progress(f"SIGTERM to generation {child.generation} (pid {child.pid})")
        child.terminate()
        with trio.move_on_after(ctx.policy.stop_grace_s):
            await child.wait()
        if child.returncode is None:
            ctx.log(f"generation {child.generation} ignored SIGTERM for "
                    f"{ctx.policy.stop_grace_s:g} s: SIGKILL")
            report_progress(f"SIGKILL to generation {child.generation} (pid {child.pid})")
            child.kill()
    await child.wait()
    ctx.child = None


async def stopping(ctx: SupervisorContext) -> str:
    """End the failed generation (SIGTERM, grace, SIGKILL) and reap it."""
    failed_at = trio.current_time()
    await _stop_child(ctx)
    if ctx.lost_at is None:
        ctx.lost_at = failed_at
    if ctx.ready_at is not None and failed_at - ctx.ready_at >= ctx.policy.stable_after_s:
        ctx.restarts = 0  # it was stable: this is a fresh failure, not a flapping one
    failure = ctx.failure or ChildFailure(ctx.generation, "unknown", "ChildExited")
    ctx.log(f"{failure}")
    ctx.on_generation("lost" if ctx.ready_at is not None else "failed", ctx.generation,
                      str(failure))
    return "stopped"


async def backing_off(ctx: SupervisorContext) -> str:
    """Wait the jittered back-off, or give up once the restart budget is spent. After
    a pulled cable the restart is immediate-ish (the shortest back-off) and free."""
    if ctx.failure is not None and ctx.failure.state in LINK_LOSS_STATES:
        delay = ctx.policy.backoff(0, ctx.rng)
        ctx.log(f"a cable was pulled: restart in {delay:.3f} s (not counted; "
                f"{ctx.restarts}/{ctx.policy.max_restarts} used)")
        report_progress(f"back-off {delay:.3f} s before a restart after a pulled cable")
    else:
        if ctx.restarts >= ctx.policy.max_restarts:
            raise RestartBudgetExhausted(ctx.restarts, ctx.generation,
                                         str(ctx.failure or "no failure recorded"))
        delay = ctx.policy.backoff(ctx.restarts, ctx.rng)
        ctx.restarts += 1
        ctx.log(f"restart {ctx.restarts}/{ctx.policy.max_restarts} in {delay:.3f} s")
        report_progress(f"back-off {delay:.3f} s before restart {ctx.restarts}")
    with trio.move_on_after(delay):
        while True:
            item = await _next_event(ctx)
            if isinstance(item, StopRequested):
                return "shutdown"
    return "relaunch"


async def shutting_down(ctx: SupervisorContext) -> str:
    """Asked to stop: end the current child (if any) the same careful way."""
    await _stop_child(ctx)
    return "stopped"


#: The deadlines the supervisor's states declare: the default policy's (a run with
#: another policy overrides them with its own, see run_supervisor).
_DEADLINES = RestartPolicy().deadlines()

SUPERVISOR: MachineSpec = machine_spec(
    "supervisor",
    initial="launching",
    doc="Keeps one rank coming back: a new child process and session per generation.",
    states=[
        State("launching", launching, deadline=_DEADLINES["launching"],
              on_timeout=SupervisorStalled, raises=(ChildSpawnFailed,),
              doc="Start a child rank process with a new epoch."),
        State("bootstrapping", bootstrapping, deadline=_DEADLINES["bootstrapping"],
              on_timeout=SupervisorStalled, raises=(ChildMisconfigured,),
              doc="Wait for the child's ready line; a failure, exit or bound ends it."),
        State("waiting_for_link", waiting_for_link, steady=True,
              raises=(ChildMisconfigured,),
              doc="The child waits for its cable: no bound, no restart counted."),
        State("running", running, steady=True, raises=(ChildMisconfigured,),
              doc="The child's group is up; watch for peer_lost, link_lost or an exit."),
        State("stopping", stopping, deadline=_DEADLINES["stopping"],
              on_timeout=ChildStopTimeout, doc="SIGTERM, grace, SIGKILL; reap the child."),
        State("backing_off", backing_off, deadline=_DEADLINES["backing_off"],
              on_timeout=SupervisorStalled, raises=(RestartBudgetExhausted,),
              doc="Jittered exponential back-off; give up when the budget is spent "
                  "(a pulled cable's restart is not counted)."),
        State("shutting_down", shutting_down, deadline=_DEADLINES["shutting_down"],
              on_timeout=ChildStopTimeout,
              doc="Asked to stop: end the child the same way, then stop."),
        State("stopped", doc="Stopped on request; no child is left."),
    ],
    transitions=[
        Transition("launching", "launched", "bootstrapping"),
        Transition("bootstrapping", "child_ready", "running"),
        Transition("bootstrapping", "child_failed", "stopping"),
        Transition("bootstrapping", "child_stuck", "stopping"),
        Transition("bootstrapping", "child_waiting", "waiting_for_link"),
        Transition("waiting_for_link", "link_up", "bootstrapping"),
        Transition("waiting_for_link", "child_failed", "stopping"),
        Transition("waiting_for_link", "shutdown", "shutting_down"),
        Transition("running", "child_lost", "stopping"),
        Transition("stopping", "stopped", "backing_off"),
        Transition("backing_off", "relaunch", "launching"),
        Transition("bootstrapping", "shutdown", "shutting_down"),
        Transition("running", "shutdown", "shutting_down"),
        Transition("backing_off", "shutdown", "shutting_down"),
        Transition("shutting_down", "stopped", "stopped"),
    ],
    errors=[
        ErrorState("spawn_failed", ChildSpawnFailed,
                   doc="The child rank process could not be started.",
                   remedy="Check the Python interpreter and the installation."),
        ErrorState("child_misconfigured", ChildMisconfigured,
                   doc="The child exited with the usage code (bad flags or key file); "
                       "restarting cannot help.",
                   remedy="Fix the serve flags / key file shown in the child's stderr."),
        ErrorState("restart_budget_exhausted", RestartBudgetExhausted,
                   doc="More consecutive generations failed than --max-restarts allows.",
                   remedy="Read the last failure named; start the missing peer or fix "
                          "the network, then start the supervisor again."),
        ErrorState("child_unkillable", ChildStopTimeout,
                   doc="A child did not exit even after SIGKILL (stuck in the kernel).",
                   remedy="Inspect the process (D state, driver hang); reboot the node."),
        ErrorState("supervisor_stalled", SupervisorStalled,
                   doc="A backstop deadline of the supervisor itself passed (a bug).",
                   remedy="Report it with the supervisor's trace."),
    ],
)


# -- running it ---------------------------------------------------------------------


async def run_supervisor(
    launcher: Launcher,
    policy: RestartPolicy,
    *,
    rng: random.Random | None = None,
    next_epoch: Callable[[], int] | None = None,
    log: Callable[[str], None] = lambda _text: None,
    on_generation: Callable[[str, int, str], None] = lambda _k, _g, _d: None,
    observers: Iterable[Observer] = (),
    started: Callable[[SupervisorContext], None] = lambda _ctx: None,
) -> Outcome:
    """Run the supervisor machine until ``stopped`` or a final error; return the outcome.

    ``started(ctx)`` is called once the context exists (signal handlers and the
    embedding API call ``ctx.request_stop()`` through it). The child is killed and
    reaped on every way out, cancellation included.
    """
    send, receive = trio.open_memory_channel[InboxItem](math.inf)
    async with trio.open_nursery() as nursery:
        ctx = SupervisorContext(
            launcher=launcher, policy=policy, nursery=nursery, inbox=send, events=receive,
            rng=rng or random.Random(), next_epoch=next_epoch or epoch_clock(), log=log,
            on_generation=on_generation)

        def note(record: TraceRecord) -> None:
            if record.dest == "running" and ctx.lost_at is not None:
                ctx.recoveries.append(record.t - ctx.lost_at)
                ctx.log(f"generation {ctx.generation} ready (session {ctx.session or '?'}), "
                        f"recovered {record.t - ctx.lost_at:.3f} s after the loss")
            if record.dest == "running":
                ctx.lost_at = None
                ctx.on_generation("ready", ctx.generation, ctx.session)

        runner: Runner[SupervisorContext] = Runner(
            SUPERVISOR, ctx, deadlines=policy.deadlines(), observers=[note, *observers])
        started(ctx)
        try:
            outcome = await runner.run()
        finally:
            with trio.CancelScope(shield=True):
                await _kill_and_reap(ctx)
            nursery.cancel_scope.cancel()
    return outcome


async def _kill_and_reap(ctx: SupervisorContext) -> None:
    child = ctx.child
    if child is not None:
        child.kill()
        with trio.move_on_after(ctx.policy.kill_wait_s):
            await child.wait()
        ctx.child = None


__all__ = [
    "SUPERVISOR",
    "ChildFailure",
    "ChildMisconfigured",
    "ChildSpawnFailed",
    "ChildStopTimeout",
    "RestartBudgetExhausted",
    "RestartPolicy",
    "SupervisorContext",
    "SupervisorStalled",
    "epoch_clock",
    "run_supervisor",
]
