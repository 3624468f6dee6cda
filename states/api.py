"""The embedding API: ``async with bootstrap_cluster(config) as cluster: ...``.

::

    config = ClusterConfig(rank=0, world_size=2, listen=Address("10.0.0.1", 7700),
                           key=load_key("cluster.key"))
    async with bootstrap_cluster(config) as cluster:
        group = cluster.group            # mlx.core.distributed.Group, size checked
        ...                              # cluster.state == "ready"
    # on failure: raises the typed error (HandshakeRejected, GroupInitTimeout, ...),
    # bare, a ClusterError whose .state names the error state and .retryable says
    # whether a new process may succeed; observers saw every transition.

While the block runs, the machine stays in ``ready`` and watches the peers. If a peer
is lost, ``cluster.state`` becomes ``peer_lost``, ``cluster.error`` is the
:class:`~states.errors.PeerLost`, and ``await cluster.wait_lost()`` returns. If a
peer's app closes the cluster on purpose, ``cluster.state`` becomes ``peer_left`` (no
error) and ``wait_lost()`` returns too: the group is no longer whole either way.

Leaving the block normally (or by cancellation) is a deliberate close: a GOODBYE goes
to every peer first, and peers whose apps close at about the same time all end in
``closed``. Leaving it with an exception sends no GOODBYE (the peers see a loss).
Either way the links are closed, the watchdog reaped and the topology files deleted.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast, overload

import attrs
import trio

from clusterfsm.fsm import Outcome, Runner, TraceRecord, TraceWriter, effective_deadlines
from clusterfsm.fsm.errors import UnexpectedError
from clusterfsm.fsm.runner import Observer
from clusterfsm.states.admission import ADMISSION_GRACE
from clusterfsm.states.appmsg import MAX_APP_MESSAGE, MessageTooLarge, UnknownRank
from clusterfsm.states.codec import MAX_STATUS, NO_SESSION, Abort
from clusterfsm.states.config import ClusterConfig
from clusterfsm.states.configsource import ConfigError, config_from_env, config_from_toml
from clusterfsm.states.context import ClusterContext, PortAllocator, PortReservation
from clusterfsm.states.discovery import DiscoveryNet, UdpDiscoveryNet
from clusterfsm.states.errors import ClusterError, InternalError
from clusterfsm.states.groupinit import Group, GroupInitializer
from clusterfsm.states.health import Health, HealthChanges, HealthPublisher
from clusterfsm.states.link import wait_any
from clusterfsm.states.machine import BOOTSTRAP
from clusterfsm.states.transport import TcpTransport, Transport
from clusterfsm.states.watchdog import InitWatchdog, NoWatchdog

if TYPE_CHECKING:
    from mlx.core.distributed import Group as MlxGroup

#: The group type a :class:`Cluster` hands out: ``mlx.core.distributed.Group`` with
#: the real initializer, the :class:`~states.groupinit.Group` protocol with an injected one.
G = TypeVar("G", bound=Group)

#: The states the cluster can leave ``ready`` for.
ENDED_STATES = ("closed", "peer_lost", "peer_left", "link_lost", "link_tampered")

#: How long a failing rank spends telling its peers (ABORT) before closing.
ABORT_GRACE = 0.25


@attrs.frozen
class PeerInfo:
    """What this rank knows of one peer, from its heartbeats."""

    rank: int
    #: The peer's latest ``set_status`` payload (empty until it sets one).
    status: bytes
    #: The latest heartbeat round trip in seconds (None until one was measured).
    rtt: float | None
    #: When the peer was last heard, on ``trio.current_time()``'s clock.
    last_heard: float


class Cluster(Generic[G]):
    """A bootstrapped cluster, as seen by one rank."""

    def __init__(self, ctx: ClusterContext, runner: Runner[ClusterContext],
                 health: HealthPublisher) -> None:
        self._ctx = ctx
        self._runner = runner
        self._health = health  # refreshed by bootstrap_cluster's _publish_health task
        # For :meth:`health` from any thread: reading this clock is a plain computation
        # (trio's SystemClock: an offset plus ``perf_counter``; MockClock: a base plus
        # the real time scaled), no call into the run loop.
        self._clock = trio.lowlevel.current_clock()

    @property
    def group(self) -> G:
        """The group: ``mlx.core.distributed.Group`` from the real initializer (so
        ``mx.distributed.all_sum(x, group=cluster.group)`` type-checks), whatever an
        injected initializer returned otherwise (``bootstrap_cluster``'s overloads)."""
        assert self._ctx.group is not None
        return cast(G, self._ctx.group)

    @property
    def backend(self) -> str:
        """The backend the group runs on, ``ring`` or ``jaccl`` (``any`` resolved)."""
        assert self._ctx.plan is not None
        return self._ctx.plan.backend

    @property
    def trace_path(self) -> str | None:
        """Where this rank's JSON-lines trace is written (``trace_path=``), if anywhere."""
        return self._ctx.trace_path

    @property
    def rank(self) -> int:
        return self._ctx.rank

    @property
    def size(self) -> int:
        return self._ctx.world_size

    @property
    def session_id(self) -> bytes:
        assert self._ctx.session_id is not None
        return self._ctx.session_id

    @property
    def state(self) -> str:
        return self._runner.state

    @property
    def error(self) -> BaseException | None:
        return self._runner.error

    @property
    def trace(self) -> tuple[TraceRecord, ...]:
        return self._runner.records

    # -- app messages (states/appmsg.py) ----------------------------------------------

    async def send(self, rank: int, data: bytes) -> None:
        """Send ``data`` (at most ``MAX_APP_MESSAGE``, 1 MiB) to ``rank``: ordered per
        peer; waits while the peer's app does not read (back-pressure). Raises
        ``MessageTooLarge``/``UnknownRank`` (nothing sent), or the link's failure."""
        await self._ctx.app().send(rank, data)

    async def broadcast(self, data: bytes) -> None:
        """Send ``data`` to every other rank (as :meth:`send`, in rank order)."""
        await self._ctx.app().broadcast(data)

    def messages(self) -> trio.MemoryReceiveChannel[tuple[int, bytes]]:
        """``async for rank, data in cluster.messages()``: every message sent to this
        rank, in order per sender, until the cluster closes (one reader)."""
        return self._ctx.app().messages()

    # -- status and peers ----------------------------------------------------------------

    def set_status(self, status: bytes) -> None:
        """Carry ``status`` (app-defined, at most ``MAX_STATUS`` = 256 bytes) on every
        heartbeat from now on; peers read it in ``cluster.peers``."""
        if len(status) > MAX_STATUS:
            raise MessageTooLarge(len(status), MAX_STATUS)
        self._ctx.set_status(bytes(status))

    @property
    def peers(self) -> dict[int, PeerInfo]:
        """Each linked peer's latest status, heartbeat RTT and last-heard time (a
        joiner has one link, to rank 0; rank 0 has one to every joiner)."""
        return {rank: PeerInfo(rank, link.peer_status, link.rtt,
                               max(link.last_heard, link.beat_heard))
                for rank, link in self._ctx.links.items()}

    def health(self) -> Health:
        """``healthy``, ``degraded`` (an answer older than 3 heartbeat intervals) or
        ``unavailable`` (a link failed or never answered, or the cluster ended).

        Callable from any thread, and computed at the call (no trio call, no wait
        for the loop): from the links' heartbeats (:func:`session_health`, on the
        cluster's trio clock), the links' failures and the cluster's state. So it is
        ``degraded`` the moment a link's silence passes three intervals, ``healthy``
        again the moment the peer is heard (the heartbeat thread writes that on the
        link), and ``unavailable`` the moment a link failed or the cluster left
        ``ready``, even while the loop is blocked.
        """
        if self._health.ended or self._runner.state != "ready":
            return "unavailable"
        return session_health(self._ctx, self._clock.current_time())

    def health_changes(self) -> HealthChanges:
        """``async for health in cluster.health_changes()`` (in the cluster's trio
        loop): the current health, then each change; ends once the cluster has left
        ``ready`` (after a last ``unavailable``). The loop runs the timer that catches
        a link turning stale only while such a reader waits (``_publish_health``)."""
        return self._health.changes()

    async def wait_lost(self) -> BaseException | None:
        """Wait until the cluster leaves ``ready`` (peer lost or left, a cable pulled,
        a tampered link, or closed); the error (``PeerLost``, ``LinkLost``,
        ``LinkTampered``), or ``None`` for a clean end (``cluster.state`` says which)."""
        await self._runner.wait_for(*ENDED_STATES)
        return self._runner.error


def session_health(ctx: ClusterContext, now: float | None = None) -> Health:
    """The worst health over the links, from their heartbeats, at ``now`` on the
    cluster's trio clock (default: ``trio.current_time()``, in the loop).

    Only plain reads of the links, so :meth:`Cluster.health` calls it from any thread:
    the links are a snapshot (``tuple`` copies the dict in one step under the GIL; the
    dict does not change in ``ready`` anyway)."""
    if now is None:
        now = trio.current_time()
    stale_after = 3 * ctx.config.heartbeat_interval
    health: Health = "healthy"
    for link in tuple(ctx.links.values()):
        if link.failure is not None or not link.first_pong.is_set():
            return "unavailable"
        # ``now > quiet_since + stale_after``, not ``now - quiet_since > ...``: the very
        # sum :func:`next_health_check` wakes just after, so a wake-up there always sees
        # the link stale (no float rounding leaving it a hair short, and a loop spinning).
        if now > link.quiet_since + stale_after:
            health = "degraded"
    return health


def next_health_check(ctx: ClusterContext) -> float:
    """The earliest time :func:`session_health` could change with no event: the first
    moment a fresh link turns stale (just after its ``quiet_since + 3 intervals``), or,
    while a link is stale, one interval from now (it turns fresh again when the peer is
    heard, which wakes nothing). ``inf`` when only an event can change it (a link
    failed, or has not answered yet: see :func:`_publish_health`)."""
    now = trio.current_time()
    interval = ctx.config.heartbeat_interval
    stale_after = 3 * interval
    earliest = math.inf
    for link in ctx.links.values():
        if link.failure is not None:
            return math.inf  # unavailable until the end: nothing but the end changes it
        if not link.first_pong.is_set():
            continue  # its first pong is an event
        stale_at = link.quiet_since + stale_after
        wake = now + interval if now > stale_at else math.nextafter(stale_at, math.inf)
        earliest = min(earliest, wake)
    return earliest


@overload
def bootstrap_cluster(
    config: ClusterConfig,
    *,
    transport: Transport | None = None,
    initializer: None = None,
    watchdog: InitWatchdog | NoWatchdog | None = None,
    allocate_port: PortAllocator = PortReservation,
    observers: Iterable[Observer] = (),
    trace_path: str | None = None,
    discovery_net: DiscoveryNet | None = None,
) -> AbstractAsyncContextManager[Cluster[MlxGroup]]: ...


@overload
def bootstrap_cluster(
    config: ClusterConfig,
    *,
    transport: Transport | None = None,
    initializer: GroupInitializer,
    watchdog: InitWatchdog | NoWatchdog | None = None,
    allocate_port: PortAllocator = PortReservation,
    observers: Iterable[Observer] = (),
    trace_path: str | None = None,
    discovery_net: DiscoveryNet | None = None,
) -> AbstractAsyncContextManager[Cluster[Group]]: ...


def bootstrap_cluster(
    config: ClusterConfig,
    *,
    transport: Transport | None = None,
    initializer: GroupInitializer | None = None,
    watchdog: InitWatchdog | NoWatchdog | None = None,
    allocate_port: PortAllocator = PortReservation,
    observers: Iterable[Observer] = (),
    trace_path: str | None = None,
    discovery_net: DiscoveryNet | None = None,
) -> AbstractAsyncContextManager[Cluster[Any]]:
    """Run the bootstrap machine for one rank; yield the cluster once it is ready.

    Everything it starts (links, heartbeats, the watchdog process) lives in a nursery
    inside this context manager and is gone when it exits, on success, failure or
    cancellation. A failed bootstrap raises a :class:`~states.errors.ClusterError`
    (bare, never inside an exception group): its ``state`` is the error state the
    machine ended in, ``retryable`` whether a new process may succeed.

    With the default (real) initializer the cluster's ``group`` is typed
    ``mlx.core.distributed.Group``; with an injected one (a test's
    ``fake_initializer()``), only the :class:`~states.groupinit.Group` protocol.
    """
    return _bootstrap(config, transport=transport, initializer=initializer,
                      watchdog=watchdog, allocate_port=allocate_port, observers=observers,
                      trace_path=trace_path, discovery_net=discovery_net)


@asynccontextmanager
async def _bootstrap(
    config: ClusterConfig,
    *,
    transport: Transport | None = None,
    initializer: GroupInitializer | None = None,
    watchdog: InitWatchdog | NoWatchdog | None = None,
    allocate_port: PortAllocator = PortReservation,
    observers: Iterable[Observer] = (),
    trace_path: str | None = None,
    discovery_net: DiscoveryNet | None = None,
) -> AsyncIterator[Cluster[Any]]:
    writer = TraceWriter(trace_path) if trace_path else None
    failure: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            ctx = ClusterContext(
                config=config,
                transport=transport or TcpTransport(),
                initializer=initializer or GroupInitializer(),
                nursery=nursery,
                watchdog=watchdog if watchdog is not None else InitWatchdog(),
                allocate_port=allocate_port,
                trace_path=trace_path,
                discovery_net=discovery_net or UdpDiscoveryNet(),
            )
            all_observers = [*([writer.record] if writer else []), *observers]
            deadlines = effective_deadlines(BOOTSTRAP, config.deadlines)
            if config.rank is not None and config.rank > 0:
                deadlines["handshaking"] += ADMISSION_GRACE  # rank 0 decides first
            runner: Runner[ClusterContext] = Runner(
                BOOTSTRAP, ctx, deadlines=deadlines, observers=all_observers)
            ended = trio.Event()

            async def run() -> None:
                try:
                    await runner.run()
                finally:
                    ended.set()

            nursery.start_soon(run)
            app_failed = False
            try:
                state = await runner.wait_for("ready")
                if state == "ready":
                    # Not before ``ready`` has started the heartbeats: an app that
                    # blocks its loop at once must not look dead (states/beats.py).
                    await wait_any(ctx.serving, ended)
                    state = runner.state
                if state == "ready":
                    health = HealthPublisher(lambda: session_health(ctx))
                    nursery.start_soon(_publish_health, runner, ctx, health)
                    try:
                        yield Cluster(ctx, runner, health)
                    except Exception:
                        app_failed = True  # not a deliberate close: no GOODBYE
                        raise
                else:
                    await ended.wait()
                    failure = _app_error(runner.error, state)
                    failure.add_note(
                        f"clusterfsm: rank {config.rank} ended in state {state!r}")
            finally:
                with trio.CancelScope(shield=True):
                    if not app_failed and runner.state in ("ready", "peer_left"):
                        await _say_goodbye(ctx)
                    ctx.close_requested.set()
                    with trio.move_on_after(ABORT_GRACE + 1.0):
                        await ended.wait()
                    if runner.error is not None:
                        await _tell_peers(ctx, runner)
                    await _teardown(ctx)
                    if writer is not None:
                        writer.finish(
                            Outcome(runner.state, runner.error, runner.records).end_record())
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Our own tasks never raise; a group here carries the app's exception from
        # the ``async with`` body (trio wraps it). Hand it back unwrapped.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    if failure is not None:
        raise failure


def _app_error(error: BaseException | None, state: str) -> ClusterError:
    """What the app gets for the run's error (the run ended in ``state``): the typed
    error itself, or, for an undeclared one (state ``unexpected``), an
    :class:`InternalError` caused by it."""
    if isinstance(error, ClusterError):
        return error
    if isinstance(error, UnexpectedError):
        internal = InternalError(error.state, error.type_name, str(error.exception))
    else:
        internal = InternalError(state, type(error).__name__, str(error))
    internal.__cause__ = error
    return internal


async def _publish_health(runner: Runner[ClusterContext], ctx: ClusterContext,
                          health: HealthPublisher) -> None:
    """Recompute the health for ``cluster.health_changes()`` when it could have
    changed, until the cluster leaves ``ready``; then publish the end (``unavailable``)
    to every reader.

    On an event always: a link fails, a link's first pong, the end of ``ready``, a
    reader starting to wait (it wants a value as of its call). Those are rare. By time
    alone the health changes only when a link turns stale, or, while one is stale, when
    its peer is heard again (:func:`next_health_check` says when); that timer is armed
    only while a reader waits (``health.watched``). With no reader this loop does not
    wake at all in a quiet ``ready``: ``cluster.health()`` computes its own answer at
    the call and needs nothing from here.

    While a reader waits, a healthy cluster, whose peers are heard every interval,
    wakes this loop at most once per two intervals, not every interval: at each
    wake-up every link was heard at most one interval ago, so none turns stale (three
    intervals of silence) for two more. The reader then gets:

    - ``degraded`` as soon as the loop runs once a link's silence passes three
      intervals (a timer set for that very moment);
    - ``healthy`` again at most one ``interval`` after the peer was heard;
    - ``unavailable`` as soon as the loop runs after a failure or the end.

    (``interval`` is ``ctx.config.heartbeat_interval``.) When the last reader stops
    waiting, the timer already armed may fire once more; then it is not re-armed.
    """

    async def on(event: trio.Event) -> None:
        await event.wait()
        health.poke()

    async def on_end() -> None:
        await runner.wait_for(*ENDED_STATES)
        health.poke()

    try:
        async with trio.open_nursery() as watchers:
            watchers.start_soon(on_end)
            for link in ctx.links.values():
                watchers.start_soon(on, link.failed)
                if not link.first_pong.is_set():
                    watchers.start_soon(on, link.first_pong)
            while runner.state == "ready":
                health.refresh()
                await health.wait_poked(
                    next_health_check(ctx) if health.watched else math.inf)
            watchers.cancel_scope.cancel()
    finally:
        health.finish()


async def _say_goodbye(ctx: ClusterContext) -> None:
    """Best effort: GOODBYE on every live link, so the peers tell our close from a crash.

    Sent before ``close_requested``: ``ready`` then waits for the peers' GOODBYEs
    (``GOODBYE_GRACE``) before the links close.
    """
    assert ctx.session_id is not None
    with trio.move_on_after(ABORT_GRACE):
        for link in ctx.links.values():
            await link.say_goodbye(ctx.session_id)


async def _tell_peers(ctx: ClusterContext, runner: Runner[ClusterContext]) -> None:
    """Best effort: send ABORT to every live peer so it fails fast, not at a deadline."""
    error = runner.error
    assert error is not None
    abort = Abort(
        ctx.session_id or NO_SESSION,
        runner.state[:64],
        type(error).__name__[:64],
        str(error)[:1000],
    )
    with trio.move_on_after(ABORT_GRACE):
        for link in ctx.links.values():
            if link.failure is None:
                try:
                    await link.send(abort)
                except Exception:  # noqa: BLE001 - the peer is already gone: nothing to tell
                    continue


async def _teardown(ctx: ClusterContext) -> None:
    if ctx.router is not None:
        ctx.router.close()  # ends the app's ``async for ... in cluster.messages()``
    for link in ctx.links.values():
        await link.aclose()
    if ctx.listener is not None:
        await ctx.listener.aclose()
        ctx.listener = None
    await ctx.exits.aclose()
    ctx.release_port()
    # Our own directory first: the watchdog removes what is still registered when its
    # pipe closes, and must find nothing left to do (no two removers at once).
    if ctx.files is not None:
        ctx.files.close()
        ctx.files = None
    await ctx.watchdog.aclose()


__all__ = [
    "MAX_APP_MESSAGE",
    "MAX_STATUS",
    "Cluster",
    "ClusterConfig",
    "ClusterError",
    "ConfigError",
    "MessageTooLarge",
    "PeerInfo",
    "UnknownRank",
    "bootstrap_cluster",
    "config_from_env",
    "config_from_toml",
]
