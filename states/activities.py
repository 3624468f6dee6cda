"""What each state of the bootstrap machine does, for both roles.

Rank 0 is the *coordinator*: it listens, admits the other ranks, creates the session,
decides the topology and releases everyone into group init. Every other rank is a
*joiner*: it dials rank 0, proves the key, and follows. Each activity returns the
trigger that leaves its state, or raises a typed error from :mod:`clusterfsm.states.errors`; the
machine (:mod:`clusterfsm.states.machine`) decides what that means. Deadlines are the machine's
job too: no activity here sleeps in a loop or waits without a bound of its own.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import TypeVar

import attrs
import trio

from clusterfsm.fsm import current_deadline, deadline_trace, note_outcome, report_progress
from clusterfsm.states.admission import Admission, join
from clusterfsm.states.beats import Beats
from clusterfsm.states.codec import (
    BeatPort,
    BootstrapAck,
    BootstrapPayload,
    GroupConfirm,
    GroupConfirmed,
    InitGo,
    InitReady,
    LinkReport,
)
from clusterfsm.states.compat_exchange import check_compatibility, send_compatibility
from clusterfsm.states.config import Address
from clusterfsm.states.context import ClusterContext
from clusterfsm.states.dataplane import ring_host, ring_refusal
from clusterfsm.states.discovery import AUTO_RANK, Beacon, BeaconSocket, discover, keep_beaconing
from clusterfsm.states.errors import (
    BootstrapRejected,
    LinkTampered,
    PeerAborted,
    PeerDisconnected,
    PeerLost,
    PrecheckFailed,
)
from clusterfsm.states.groupinit import InitPlan, TopologyDir, release_delay, resolve_backend
from clusterfsm.states.handshake import PROTOCOL_VERSION
from clusterfsm.states.lines import ErrorLine
from clusterfsm.states.link import (
    GOODBYE_GRACE,
    ControlLink,
    SessionMessage,
    check_session,
    unexpected_message,
    wait_any,
)
from clusterfsm.states.linkstates import guard_links
from clusterfsm.states.seal import warm_up
from clusterfsm.states.sidechannel import JacclSideChannel
from clusterfsm.states.topology import PeerLink, Topology, build_device_matrix, peer_links

#: How long after the soft init deadline the watchdog kills a rank frozen in init.
HARD_DEADLINE_GRACE = 0.5


# -- idle ---------------------------------------------------------------------------


async def idle(ctx: ClusterContext) -> str:
    """Start the init watchdog (its start-up overlaps the next states) and listen.

    With ``--interface`` the listeners wait for the links (``waiting_for_link``,
    :mod:`clusterfsm.states.linkstates`); a static rank 0 listens here.
    """
    ctx.nursery.start_soon(_start_watchdog, ctx)
    ctx.initializer.prepare()
    if ctx.world_size == 1:
        await trio.lowlevel.checkpoint()
        return "start"  # a group of one needs no link and listens for no one
    if ctx.config.interfaces:
        await trio.lowlevel.checkpoint()
        return "await_link"
    if ctx.config.is_coordinator and ctx.config.listen is not None:
        ctx.listener = await ctx.exits.enter_async_context(
            ctx.transport.listen(ctx.config.listen))
    # The first handshake of a process would pay 5-15 ms for its cryptography; pay it
    # now, while the peers start (once per process: free after the first bootstrap).
    warm_up()
    return "start"


async def _start_watchdog(ctx: ClusterContext) -> None:
    if not ctx.watchdog.started:
        await ctx.watchdog.start()


# -- discovering --------------------------------------------------------------------


async def discovering(ctx: ClusterContext) -> str:
    """Find the peers. Static discovery: rank 0 waits to be dialled, joiners have
    ``peers``. Interface discovery: beacons on every interface until every peer is
    heard, then the election (:mod:`clusterfsm.states.discovery`); rank 0 keeps its listeners,
    the others close theirs and dial rank 0 where they heard it."""
    if ctx.world_size == 1:
        ctx.node_ranks = {ctx.config.node_id: 0}  # no one else to find or elect
    if ctx.world_size == 1 or not ctx.config.interfaces:
        await trio.lowlevel.checkpoint()
        return "peers_found"
    claim = AUTO_RANK if ctx.config.rank is None else ctx.config.rank
    sockets: list[tuple[BeaconSocket, Beacon]] = []
    for name, listener in ctx.listeners_by_interface.items():
        sock = await ctx.exits.enter_async_context(
            ctx.discovery_net.beacon_socket(name, ctx.config.beacon_port))
        sockets.append((sock, Beacon(PROTOCOL_VERSION, ctx.config.node_id, ctx.instance,
                                     ctx.world_size, claim, listener.address.port)))
    heard, election = await guard_links(
        ctx, lambda: discover(sockets, ctx.config.key, sockets[0][1]))
    ctx.node_ranks = dict(election.ranks)
    ctx.peer_interfaces = {node: peer.interfaces for node, peer in heard.peers.items()}
    ctx.peer_addresses = {node: dict(peer.addresses) for node, peer in heard.peers.items()}
    ctx.beacons = trio.CancelScope()
    ctx.nursery.start_soon(_announce, ctx.beacons, sockets, ctx.config.key)
    if not ctx.is_coordinator:
        coordinator = next(p for p in heard.peers.values() if election.ranks[p.node_id] == 0)
        ctx.dial_targets = [(Address(coordinator.host, coordinator.control_port),
                             coordinator.interfaces[0])]
        if ctx.listener is not None:
            await ctx.listener.aclose()
            ctx.listener = None
    report_progress(f"elected rank {ctx.rank} of {ctx.world_size}; {heard.summary()}")
    return "peers_found"


async def _announce(scope: trio.CancelScope, sockets: list[tuple[BeaconSocket, Beacon]],
                    key: bytes) -> None:
    with scope:
        await keep_beaconing(sockets, key)


# -- handshaking --------------------------------------------------------------------


async def handshaking(ctx: ClusterContext) -> str:
    """Rank 0 admits every rank; a joiner gets in and waits until the session is full
    (:mod:`clusterfsm.states.admission`). Either way the links are started (their
    readers answer pings) when this state ends. World size 1 is a session of one: its
    id is made here and there is no one to admit; every later state then has no link
    to wait on, and group init takes MLX's single-process group."""
    if ctx.world_size == 1:
        await trio.lowlevel.checkpoint()
        ctx.session_id = secrets.token_bytes(16)
    elif ctx.is_coordinator:
        await Admission(ctx).run()
    else:
        await join(ctx)
    return "authenticated"


# -- awaiting_session ---------------------------------------------------------------


async def awaiting_session(ctx: ClusterContext) -> str:
    """Wait (on events, no polling) until every link has answered a heartbeat."""
    ctx.mark_links("awaiting_session")
    for link in ctx.links.values():
        await link.ping_now()
    for rank, link in ctx.links.items():
        report_progress(f"waiting for the first heartbeat answer of rank {rank}")
        await _wait_or_fail(link, link.first_pong)
    return "session_ready"


async def _wait_or_fail(link: ControlLink, event: trio.Event) -> None:
    """Wait for ``event``; raise the link's failure if the link fails first."""
    await wait_any(event, link.failed)
    if not event.is_set():
        assert link.failure is not None
        raise link.failure


# -- exchanging_bootstrap -----------------------------------------------------------


async def exchanging_bootstrap(ctx: ClusterContext) -> str:
    """Joiners report their links; rank 0 decides backend and topology and sends the
    0x07 frame; every joiner checks it is for this session and acknowledges."""
    ctx.mark_links("exchanging_bootstrap")
    assert ctx.session_id is not None
    if ctx.is_coordinator:
        # Rank 0 decides the backend: check it can run here, then that every rank
        # fits (MLX, wire version, backends, app fields), before anyone builds on it.
        ctx.initializer.precheck(resolve_backend(ctx.config.backend))
        backend = await check_compatibility(ctx, ctx.config.backend)
        ctx.initializer.precheck(backend)
        reports: dict[int, dict[bytes, tuple[str, ...]]] = {}
        for rank, link in ctx.links.items():
            report_progress(f"waiting for rank {rank}'s link report")
            report = await _expect(link, LinkReport, "exchanging_bootstrap", ctx.session_id,
                                   "link report")
            reports[rank] = dict(report.links)
        topology, coordinator = _decide_topology(ctx, backend, reports)
        ctx.plan = InitPlan(backend, 0, ctx.world_size, topology, ctx.session_id,
                            coordinator, _peer_links(ctx, backend, topology))
        for link in ctx.links.values():  # none in a group of one
            await link.send(BootstrapPayload(
                coordinator_port=Address.parse(coordinator).port if coordinator else 0,
                session_id=ctx.session_id, backend=ctx.plan.wire_backend,
                world_size=ctx.world_size, topology=topology,
            ))
        for rank, link in ctx.links.items():
            report_progress(f"waiting for rank {rank} to acknowledge the bootstrap frame")
            await _expect(link, BootstrapAck, "exchanging_bootstrap", ctx.session_id,
                          "bootstrap acknowledgement")
    else:
        link = ctx.links[0]
        await send_compatibility(ctx)
        await link.send(LinkReport(ctx.session_id, tuple(sorted(ctx.peer_interfaces.items()))))
        report_progress("waiting for rank 0's bootstrap frame (0x07)")
        frame = await _expect(link, BootstrapPayload, "exchanging_bootstrap",
                              ctx.session_id, "bootstrap frame")
        if frame.world_size != ctx.world_size:
            raise BootstrapRejected(
                f"world size {frame.world_size}, expected {ctx.world_size}", link.peer)
        backend = frame.backend.name.lower()
        coordinator = None
        if backend == "ring":
            mine = frame.topology[ctx.rank]
            assert ctx.reservation is not None
            if not any(str(e).endswith(f":{ctx.reservation.port}") for e in mine):
                raise BootstrapRejected(
                    f"topology gives rank {ctx.rank} {list(mine)}, not our port "
                    f"{ctx.reservation.port}", link.peer)
        elif frame.coordinator_port:
            # jaccl's own coordinator is IPv4 TCP too (states.dataplane).
            coordinator = f"{_ring_host(Address.parse(link.peer).host)}:{frame.coordinator_port}"
        elif not ctx.initializer.side_channel_supported():
            raise PrecheckFailed(
                "side_channel", "rank 0 runs jaccl's metadata exchange over the control "
                "link (init(all_gather_factory=...)), which this rank's mlx lacks: "
                "install mlx >= 0.32.1 on every rank")
        ctx.plan = InitPlan(backend, ctx.rank, ctx.world_size, frame.topology, ctx.session_id,
                            coordinator, _peer_links(ctx, backend, frame.topology))
        await link.send(BootstrapAck(ctx.session_id))
    if ctx.beacons is not None:
        # Every rank is in the session now (the frame proves it to joiners): stop
        # announcing. Not earlier: a slower node may still need to hear us.
        ctx.beacons.cancel()
    return "bootstrap_agreed"


def _decide_topology(ctx: ClusterContext, backend: str,
                     reports: dict[int, dict[bytes, tuple[str, ...]]],
                     ) -> tuple[Topology, str | None]:
    """Rank 0's choice: the ring hostfile, or the jaccl device matrix (from its own
    links and every joiner's link ``reports``) and, only for an mlx without
    ``all_gather_factory``, jaccl's own coordinator address. A group of one has no
    data plane: no topology."""
    if ctx.world_size == 1:
        return (), None
    if backend == "ring":
        return tuple((f"{_ring_host(ctx.hosts[r])}:{ctx.data_ports[r]}",)
                     for r in range(ctx.world_size)), None
    if not ctx.node_ranks:
        raise PrecheckFailed("matrix_incomplete", "the jaccl device matrix is built from "
                             "interface discovery: run every rank with --interface")
    ranks = ctx.node_ranks
    reach = {0: {ranks[n]: names for n, names in ctx.peer_interfaces.items()}}
    for rank, report in reports.items():
        reach[rank] = {ranks[n]: names for n, names in report.items() if n in ranks}
    matrix = build_device_matrix(ctx.world_size, reach)
    if ctx.initializer.side_channel_supported():
        return matrix, None
    return matrix, f"{_ring_host(ctx.hosts[0])}:{ctx.data_ports[0]}"


def _peer_links(ctx: ClusterContext, backend: str, matrix: Topology
                ) -> tuple[PeerLink, ...]:
    """jaccl: this rank's cables as the matrix uses them, each with the peer's address
    heard there by discovery (no new wire field: every rank heard every peer's
    beacons), for the route check before init."""
    if backend != "jaccl" or ctx.world_size == 1:
        return ()
    heard = {ctx.node_ranks[node]: addresses
             for node, addresses in ctx.peer_addresses.items() if node in ctx.node_ranks}
    return peer_links(matrix, ctx.rank, heard)


def _ring_host(control_host: str) -> str:
    """The IPv4 address of a rank's ring entry, or of jaccl's own coordinator
    (states.dataplane); a control host that gives none (a name that resolved to a
    remote IPv6 address) is refused before init."""
    host = ring_host(control_host)
    if host is None:
        raise PrecheckFailed("data_plane_address", ring_refusal([control_host]) or "")
    return host


M = TypeVar("M", bound=SessionMessage)


async def _expect(link: ControlLink, kind: type[M], where: str, session_id: bytes,
                  what: str) -> M:
    """The link's next message, which must be a ``kind`` of this session (``what``
    names it in the refusal: :func:`~clusterfsm.states.link.check_session`)."""
    msg = await link.next_message()
    if not isinstance(msg, kind):
        raise unexpected_message(msg, where, link.peer)
    check_session(msg, session_id, what, link.peer)
    return msg


# -- initializing_group -------------------------------------------------------------


async def initializing_group(ctx: ClusterContext) -> str:
    """Barrier, then ``mx.distributed.init`` under the hard deadline.

    Nobody enters init (which freezes its process) until every rank said it is about
    to; rank 0 then releases all ranks at once and the ring's last rank only as it
    calls init itself (its go says to wait a few ms more), so that rank's first dial
    finds rank 0 listening. The race MLX keeps inside init is docs/design.md section 3.5.
    """
    ctx.mark_links("initializing_group")
    plan = ctx.plan
    assert plan is not None and ctx.session_id is not None
    ctx.initializer.precheck(plan.backend)
    # Before the barrier: a second bootstrap in this process would get MLX's old group;
    # the peers hear of it (ABORT) at once instead of waiting in init for us.
    ctx.initializer.groups.check_fresh(plan.backend)
    await ctx.initializer.plan_check(plan)  # before the barrier: peers hear of it
    try:
        ctx.files = TopologyDir()
    except OSError as exc:  # TMPDIR missing, disk full
        raise PrecheckFailed("topology_file", f"cannot make a private topology "
                             f"directory: {exc}") from exc
    # Registered at once and until the cluster closes: a rank killed from here on
    # (in the barrier, frozen in init, after ready) leaves no directory behind.
    await ctx.watchdog.ready()
    await ctx.watchdog.remove_on_exit([str(ctx.files.path)])
    if ctx.is_coordinator:
        for rank, link in ctx.links.items():
            report_progress(f"barrier: waiting for rank {rank} to be ready for init")
            await _expect(link, InitReady, "initializing_group", ctx.session_id,
                          "barrier arrival (InitReady)")
        late: list[tuple[ControlLink, int]] = []
        for rank, link in ctx.links.items():
            delay = release_delay(plan.backend, rank, ctx.world_size, ctx.config.release_delay_s)
            if delay:  # the ring's last rank: released as this rank calls init
                late.append((link, round(delay * 1000)))
            else:
                await link.send(InitGo(ctx.session_id, 0))

        async def release_late() -> None:
            session_id = ctx.session_id
            assert session_id is not None
            for link, delay_ms in late:
                await link.send(InitGo(session_id, delay_ms))
    else:
        link = ctx.links[0]
        await link.send(InitReady(ctx.session_id))
        report_progress("barrier: waiting for rank 0's go")
        go = await _expect(link, InitGo, "initializing_group", ctx.session_id, "go signal")
        if go.delay_ms:
            await trio.sleep(go.delay_ms / 1000)

        async def release_late() -> None:
            await trio.lowlevel.checkpoint()
    report_progress(f"in mx.distributed.init ({plan.backend}, rank {ctx.rank})")
    await _arm_watchdog(ctx)
    side_channel = None
    if plan.backend == "jaccl":
        ctx.release_port()  # jaccl binds its own sockets; ours must not be in the way
        if plan.coordinator is None:
            side_channel = JacclSideChannel(ctx.rank, ctx.world_size, ctx.session_id,
                                            ctx.links)
    try:
        ctx.group = await ctx.initializer.initialize(plan, ctx.files, side_channel,
                                                     before_call=release_late)
        if ctx.initializer.backoff is not None:
            note_outcome(ctx.initializer.backoff.describe())
    finally:
        # Shielded: a cancelled state must still disarm, or the watchdog would kill
        # this rank during its (orderly) teardown.
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            await ctx.watchdog.disarm()
        ctx.release_port()
    return "group_initialized"


async def _arm_watchdog(ctx: ClusterContext) -> None:
    """Arm the hard deadline: what is left of this state's deadline, plus a grace.

    A rank whose trio loop still runs ends at the state's own (soft) deadline, with a
    normal trace; only a rank frozen inside init is killed, ``HARD_DEADLINE_GRACE``
    later. The watchdog writes the trace lines the runner would have written (built
    here by the framework, from the declaration) with its own time of expiry.
    """
    deadline = current_deadline()
    now = trio.current_time()
    seconds = max(0.1, deadline.time_left()) + HARD_DEADLINE_GRACE
    elapsed_before_ms = deadline.elapsed() * 1000
    record, end = deadline_trace(
        deadline.spec, deadline.state, t=now, elapsed_ms=elapsed_before_ms, message="")
    assert end.error is not None, "a deadline's end record always names its error type"
    message = ErrorLine(f"clusterfsm rank {ctx.rank}", end.state, end.error,
                        f"mx.distributed.init did not return within {seconds:g} s "
                        "(hard deadline; the rank was killed)").format()
    await ctx.watchdog.arm(
        seconds,
        message=message,
        trace=ctx.trace_path,
        record=record.to_json(),
        end=attrs.evolve(end, message=message).to_json(),
        t_armed=now,
        elapsed_before_ms=elapsed_before_ms,
        cleanup=[str(ctx.files.path)] if ctx.files is not None else [],
    )


# -- confirming_group ---------------------------------------------------------------


async def confirming_group(ctx: ClusterContext) -> str:
    """No rank is ``ready`` while another failed: rank 0 collects every rank's OK."""
    ctx.mark_links("confirming_group")
    assert ctx.session_id is not None and ctx.group is not None
    if ctx.is_coordinator:
        for rank, link in ctx.links.items():
            report_progress(f"waiting for rank {rank}'s group confirmation")
            confirm = await _expect(link, GroupConfirm, "confirming_group", ctx.session_id,
                                    "group confirmation")
            if not confirm.ok or confirm.size != ctx.world_size:
                raise PeerAborted(rank, "GroupConfirm",
                                  f"ok={confirm.ok} size={confirm.size}: {confirm.detail}")
        for link in ctx.links.values():
            await link.send(GroupConfirmed(ctx.session_id))
    else:
        link = ctx.links[0]
        await link.send(GroupConfirm(ctx.session_id, True, ctx.group.size(), ""))
        report_progress("waiting for rank 0's confirmation that every rank is up")
        await _expect(link, GroupConfirmed, "confirming_group", ctx.session_id,
                      "confirmation that every rank is up")
    return "group_confirmed"


# -- ready --------------------------------------------------------------------------


async def ready(ctx: ClusterContext) -> str:
    """Serve until the app closes the cluster (``close``), a peer closes on purpose
    (``peer_left``), a peer is lost (``PeerLost``) or an ``--interface`` goes down
    (``LinkLost``).

    A deliberate close is announced: the API sends GOODBYE on every link when the app
    leaves the ``async with`` block cleanly (:func:`clusterfsm.states.api.bootstrap_cluster`),
    then asks us to close; we wait up to ``GOODBYE_GRACE`` for the GOODBYE of every
    peer we said goodbye to, so ranks whose apps close together all end in ``closed``
    and none sees the others' links close under it.
    """
    ctx.mark_links("ready")
    assert ctx.session_id is not None
    session_id = ctx.session_id
    ctx.app()
    await _start_heartbeats(ctx, session_id)
    ctx.serving.set()  # the API hands the cluster to the app only now
    lost_after = ctx.config.peer_lost_after
    left: list[int] = []
    async with trio.open_nursery() as nursery:
        def on_left(rank: int) -> None:
            left.append(rank)
            nursery.cancel_scope.cancel()

        for rank, link in ctx.links.items():
            nursery.start_soon(_watch_peer, rank, link, lost_after, session_id, on_left)

        # A pulled cable is LinkLost at once (the kernel says so), not PeerLost after
        # the heartbeat deadline.
        await guard_links(ctx, ctx.close_requested.wait)
        nursery.cancel_scope.cancel()
    if left and not ctx.close_requested.is_set():
        report_progress(f"rank {left[0]} closed the cluster (GOODBYE)")
        return "peer_left"
    with trio.move_on_after(GOODBYE_GRACE):
        for link in ctx.links.values():
            if link.goodbye_sent:
                await link.wait_goodbye_for(session_id)
    return "close"


async def _start_heartbeats(ctx: ClusterContext, session_id: bytes) -> None:
    """Off the app's loop where the links are real sockets (``states/beats.py``: a
    busy app must not look dead), else (in-memory links) pings on the links."""
    beats = _open_beats(ctx, session_id)
    if beats is None:
        for link in ctx.links.values():
            link.start_heartbeats(ctx.nursery, ctx.config.heartbeat_interval)
        return
    ctx.beats = beats
    beats.status = ctx.status
    ctx.nursery.start_soon(beats.run, name="beats")
    for link in ctx.links.values():
        link.mark_heartbeats_started()
        ctx.nursery.start_soon(_beat_with, beats, link)
        try:
            await link.send(BeatPort(session_id, beats.port))
        except PeerDisconnected:
            continue  # recorded as the link's failure: the watcher reports the loss


def _open_beats(ctx: ClusterContext, session_id: bytes) -> Beats | None:
    links = list(ctx.links.values())
    if not links or not all(isinstance(link.conn.stream, trio.SocketStream)
                            for link in links):
        return None
    hosts = {link.conn.local_host for link in links}
    host = hosts.pop() if len(hosts) == 1 else ("::" if ":" in next(iter(hosts)) else "0.0.0.0")
    try:
        return Beats(host, ctx.config.key, session_id, ctx.rank,
                     ctx.config.heartbeat_interval, links)
    except OSError as exc:
        # Not worth losing a group over: the links' own heartbeats still work, only a
        # busy app loop could then look dead. Said in the trace.
        report_progress(f"no heartbeat UDP socket on {host} ({exc}); heartbeats run on "
                        "the control links, answered by the app's loop")
        return None


async def _beat_with(beats: Beats, link: ControlLink) -> None:
    """Register the peer with the heartbeat thread once it said where it listens."""
    await wait_any(link.beat_port_known, link.failed)
    if link.peer_beat_port is not None:
        beats.set_address(link.peer_rank, link.conn.remote_host, link.peer_beat_port)


async def _watch_peer(rank: int, link: ControlLink, lost_after: float, session_id: bytes,
                      on_left: Callable[[int], None]) -> None:
    """Until the peer is lost (raise ``PeerLost``) or has left (call ``on_left``).

    A peer that said GOODBYE is closing on purpose: it waits ``GOODBYE_GRACE`` for our
    own GOODBYE (our app may be closing too), then closes its link. If that link
    closes, or the grace passes, first, the peer has left. A link that closes without
    a GOODBYE is a loss, as is silence, counted from ``link.quiet_since``: periodic
    heartbeats start in ``ready``, so a peer whose last message came before a long init
    elsewhere in the group is not lost for that.
    """
    while True:
        if link.said_goodbye(session_id):
            with trio.move_on_after(GOODBYE_GRACE):
                await link.failed.wait()
            on_left(rank)
            return
        heard = link.quiet_since
        with trio.move_on_at(heard + lost_after):
            await link.wait_goodbye_for(session_id)  # one for another session: skipped
            if link.failure is None or link.said_goodbye(session_id):
                continue
            if isinstance(link.failure, LinkTampered):
                raise link.failure  # not a loss: someone writes into the link
            silence = trio.current_time() - link.last_heard
            raise PeerLost(rank, silence, str(link.failure))
        # The deadline fired: lost unless something was heard meanwhile. (Not a
        # recomputed "silence >= lost_after": float rounding could leave it a hair
        # short of the deadline that fired, and this loop spinning.)
        if link.quiet_since == heard:
            silence = trio.current_time() - heard
            raise PeerLost(rank, silence, f"no heartbeat for {silence:.3f} s")


__all__ = [
    "awaiting_session",
    "confirming_group",
    "discovering",
    "exchanging_bootstrap",
    "handshaking",
    "idle",
    "initializing_group",
    "ready",
]
