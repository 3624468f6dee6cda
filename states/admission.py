"""Admission: how ranks get into a session, both sides of the ``handshaking`` state.

Rank 0 runs an :class:`Admission`: it accepts connections on its control listener
until every rank 1..N-1 has proved the key (:class:`~states.handshake.CoordinatorHandshake`),
and refuses, logs and closes everything else. A joiner runs :func:`join`: it dials
rank 0 and proves the key (:class:`~states.handshake.JoinerHandshake`). Both drive the
sans-IO handshakes with :func:`drive_handshake`.

Every refused connection is logged on the ``clusterfsm.states.admission`` logger
(peer, error type, error), never the key.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable

import attrs
import trio

from clusterfsm.fsm import report_progress
from clusterfsm.states.context import ClusterContext, Reservation
from clusterfsm.states.epochs import EPOCH_LOGGER
from clusterfsm.states.errors import (
    FrameError,
    HandshakeRejected,
    LinkTampered,
    PeerDisconnected,
    printable,
)
from clusterfsm.states.handshake import CoordinatorHandshake, JoinerHandshake
from clusterfsm.states.lines import AdmissionLine
from clusterfsm.states.link import ControlLink, wait_any
from clusterfsm.states.transport import AcceptFailed, Conn, worth_redialing

#: A joiner retries a refused connect (rank 0 not listening yet) with this back-off.
#: A refused connect costs ~0.1 ms; ranks started together (``demo``) are usually a
#: few ms apart, so the first retries are short (1, 2, 4 ms ...) instead of 10 ms.
CONNECT_RETRY_FIRST = 0.001
CONNECT_RETRY_MAX = 0.2
#: Upper bound on one joiner connection's handshake at rank 0 (slow clients).
PER_CONNECTION_HANDSHAKE = 5.0
#: Unauthenticated connections rank 0 holds at once. When one more arrives, the
#: oldest pending one is evicted (closed, recorded): a flood of silent connections
#: costs a bounded number of sockets and never queues the legitimate peer behind it.
MAX_PENDING_HANDSHAKES = 32
#: ``accept`` out of file descriptors: wait this long before the next try, doubling.
ACCEPT_BACKOFF_FIRST = 0.01
ACCEPT_BACKOFF_MAX = 0.5
#: A configured joiner's ``handshaking`` deadline is rank 0's plus this (the API adds
#: it). Rank 0 owns admission: when it fails (a rank never arrived), rank 0's ABORT,
#: which names the missing ranks, must reach the ranks it already admitted before
#: their own deadline passes, also when they started a little before it.
ADMISSION_GRACE = 2.0
#: Refusals kept for the timeout error's detail and for the app (the count is exact).
MAX_REJECTIONS_KEPT = 16

#: Every refused connection is logged here (peer, error type, error), never the key.
_admission_log = logging.getLogger("clusterfsm.states.admission")
#: Every admitted joiner's epoch, at INFO: an admission line (states.lines). A
#: supervised ``serve`` prints these on stdout for its supervisor, which remembers the
#: newest epoch per rank for its next coordinator (states.epochs).
_epoch_log = logging.getLogger(EPOCH_LOGGER)


# -- both sides ---------------------------------------------------------------------


async def drive_handshake(
    link: ControlLink,
    hs: JoinerHandshake | CoordinatorHandshake,
    on_done: Callable[[], None] = lambda: None,
) -> None:
    """Feed the sans-IO handshake from the link until done; send what it answers.

    On refusal the ``Reject`` it owes the peer is sent before the error propagates
    (sealed if both sides already hold the keys). ``on_done`` runs as soon as the
    handshake completes, before its last reply is sent (rank 0 registers the admitted
    rank there, see CoordinatorHandshake). The link seals from the moment the handshake
    has keys: before the coordinator's Welcome, after the joiner's Auth.
    """
    while not hs.done:
        msg = await link.receive()
        try:
            replies = hs.receive(msg)
        except (HandshakeRejected, FrameError):
            if hs.keys is not None:
                link.install_keys(hs.keys)
            for reply in hs.outbox_on_failure:
                await link.send(reply)
            raise
        if hs.done:
            on_done()
        if hs.keys is not None and hs.SEAL_REPLIES:
            link.install_keys(hs.keys)
        for reply in replies:
            await link.send(reply)
        if hs.keys is not None:
            link.install_keys(hs.keys)


# -- joiner -------------------------------------------------------------------------


async def join(ctx: ClusterContext) -> None:
    """Get into rank 0's session: dial, prove the key, then wait until the session is
    full.

    On success ``ctx.links[0]`` (started: its reader answers rank 0's heartbeats), the
    session id and a data-plane port reservation are set.

    A connection that ends (EOF, reset) before rank 0's ``WELCOME`` is redialled while
    the state's deadline lasts: rank 0 may have evicted it from a flood of
    connections, or a middlebox reset it. A refusal (``Reject``, a bad frame) is not:
    that is rank 0's answer.

    Once admitted, a joiner stays in ``handshaking`` until rank 0 has admitted every
    rank: rank 0's first ``PING`` (it pings only from ``awaiting_session``, which it
    enters with the session full) says so. Rank 0 answers our link meanwhile, and if
    admission fails it sends ``ABORT`` naming the rank that never arrived; our own
    deadline for this state is ``ADMISSION_GRACE`` longer than rank 0's, so that
    ``ABORT`` comes first.
    """
    delay = CONNECT_RETRY_FIRST
    while True:
        link, hs = await _handshake_with_coordinator(ctx)
        if hs is not None:
            break
        await trio.sleep(delay)
        delay = min(delay * 2, CONNECT_RETRY_MAX)
    ctx.session_id = hs.session_id
    # Periodic heartbeats start in ``ready``, where silence means a lost peer; before
    # it, every state has its own deadline and pings when it needs an answer
    # (awaiting_session), and thousands of sessions in one process do not pay ten
    # pings a second each while they bootstrap.
    link.start(ctx.nursery, heartbeat_interval=None)
    report_progress("admitted by rank 0; waiting for it to admit every other rank "
                    "(its first heartbeat says the session is full)")
    await wait_any(link.first_ping, link.failed)
    if not link.first_ping.is_set():
        assert link.failure is not None
        raise link.failure


async def _handshake_with_coordinator(
    ctx: ClusterContext,
) -> tuple[ControlLink, JoinerHandshake | None]:
    """One attempt: dial and handshake. ``None`` for the handshake: the connection
    ended before ``WELCOME`` (closed and released; worth another attempt)."""
    conn = await _dial_coordinator(ctx)
    link = ControlLink(conn, peer_rank=0)
    # In the context at once: a failure or cancellation from here on closes it.
    ctx.links[0] = link
    reservation: Reservation = ctx.allocate_port(conn.local_host)
    ctx.reservation = reservation
    hs = JoinerHandshake(
        ctx.config.key, ctx.config.node_id, ctx.rank, ctx.world_size,
        reservation.port, epoch=ctx.config.epoch, peer=conn.remote,
    )
    report_progress(f"handshake with rank 0 at {conn.remote}")
    try:
        await link.send(hs.start())
        await drive_handshake(link, hs)
    except (HandshakeRejected, FrameError, LinkTampered):
        await link.aclose()
        raise
    except PeerDisconnected as exc:
        await link.aclose()
        ctx.release_port()
        del ctx.links[0]
        _admission_log.info("rank 0 at %s closed our connection before WELCOME (%s); "
                            "redialling", conn.remote, printable(exc.detail))
        report_progress(f"rank 0 at {conn.remote} closed our connection before WELCOME "
                        f"({exc.detail}); redialling")
        return link, None
    return link, hs


async def _dial_coordinator(ctx: ClusterContext) -> Conn:
    """Dial the peers in order until one accepts; refused or reset means "not up yet"
    or "not this time": retry (the state's deadline bounds it)."""
    delay = CONNECT_RETRY_FIRST
    attempt = 0
    while True:
        for address, interface in ctx.dial_targets or [(a, None) for a in ctx.config.peers]:
            attempt += 1
            try:
                return await ctx.transport.connect(address, interface=interface)
            except OSError as exc:
                if not worth_redialing(exc):
                    raise PeerDisconnected(str(address), "handshaking",
                                           f"connect: {exc}") from exc
                report_progress(f"rank 0 at {address} refused {attempt} connect attempt(s)"
                                f"; last: {exc}")
        await trio.sleep(delay)
        delay = min(delay * 2, CONNECT_RETRY_MAX)


# -- rank 0 -------------------------------------------------------------------------


@attrs.define
class _Pending:
    """One connection still in its handshake: its time limit and its link."""

    scope: trio.CancelScope
    link: ControlLink

    @property
    def made_progress(self) -> bool:
        """It sent a valid HELLO (a connection still pending after a bad one is gone)."""
        return self.link.last_heard != -math.inf


class Admission:
    """Rank 0's admission: accept connections until every rank 1..N-1 has proved the key.

    Nothing one connection does can end it. A connection that fails its handshake
    (wrong key, version, duplicate rank, garbage, silence, EOF, reset) is refused,
    logged and closed; one that cannot even be taken (reset before we read its
    address, an ``accept`` error) is logged and the listener keeps serving; when
    ``accept`` runs out of file descriptors it backs off (``ACCEPT_BACKOFF_*``) and
    keeps accepting. So a rogue host, a port scan or a health check cannot lock the
    legitimate peers out or stop rank 0.

    At most ``MAX_PENDING_HANDSHAKES`` unauthenticated connections are held: one more
    evicts one, so a flood costs bounded memory and file descriptors. The evicted one
    is the oldest that has made no progress (no valid ``HELLO``), so a legitimate peer,
    whose ``HELLO`` arrives with its connection, survives a flood of silent ones even
    while its ``AUTH`` is a long round trip away; only when every pending connection
    has sent a ``HELLO`` is the oldest evicted. A joiner evicted anyway redials
    (:func:`join`). Each connection has ``PER_CONNECTION_HANDSHAKE`` seconds from its
    accept. The refusals are counted and the last few kept (``ctx.rejections``), and
    named in the timeout error if the legitimate peers never come. Every connection
    not admitted is closed, also when the state is cancelled.

    An admitted rank's link is in ``ctx.links`` and started at once: rank 0 answers its
    heartbeats while it waits for the others, and if admission fails (the deadline),
    the ``ABORT`` every failing rank sends its peers reaches the admitted ones with the
    reason ("waiting for ranks [2]"). An admitted rank whose link fails before the
    session is full (EOF, reset, its own ``ABORT``) is dropped, logged as a refusal,
    and may come back (a restarted process).

    Stale generations: ``floors`` (rank -> newest admitted epoch) starts from the
    configured ``epoch_floors`` (what earlier coordinators of this rank 0 admitted) and
    is raised as soon as a joiner's Auth has authenticated its epoch, so an older
    generation of an admitted rank is refused ``STALE_SESSION`` here and by the next
    coordinator.
    """

    def __init__(self, ctx: ClusterContext) -> None:
        self.ctx = ctx
        self.admitted: dict[int, ControlLink] = {}
        self.taken_ranks: set[int] = set()
        self.taken_nodes: set[bytes] = set()
        self.floors: dict[int, int] = dict(ctx.config.epoch_floors)
        #: Set when the session is full.
        self.done = trio.Event()
        #: Pending handshakes, oldest first (dict order), and the ones evicted for room.
        self.pending: dict[int, _Pending] = {}
        self.evicted: set[int] = set()
        self.refused = 0
        self.needed = ctx.world_size - 1
        self._nursery: trio.Nursery | None = None

    async def run(self) -> None:
        """Create the session id, admit every rank, then close the listener and
        reserve rank 0's data-plane port."""
        ctx = self.ctx
        assert ctx.listener is not None
        ctx.session_id = secrets.token_bytes(16)
        self.progress()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._accept_loop, nursery)
            await self.done.wait()
            nursery.cancel_scope.cancel()
        # Rank order: the later states go through the links in this order.
        links = dict(sorted(ctx.links.items()))
        ctx.links.clear()
        ctx.links.update(links)
        # The session is full: stop listening so no one else can even try.
        listener, ctx.listener = ctx.listener, None
        await listener.aclose()
        ctx.reservation = ctx.allocate_port(ctx.hosts[0])
        ctx.data_ports[0] = ctx.reservation.port

    def progress(self) -> None:
        """Report who is admitted, who is awaited and the last refusal."""
        waiting = sorted(set(range(1, self.ctx.world_size)) - set(self.admitted))
        text = (f"admitted {len(self.admitted)} of {self.needed} ranks; "
                f"waiting for ranks {waiting}")
        if self.refused:
            last = self.ctx.rejections[-1]
            text += f"; refused {self.refused} connection(s), last: {last}"
        report_progress(text)

    def refuse(self, peer: str, refusal: BaseException) -> None:
        """Count, keep and log one refused connection (its closing is the caller's)."""
        self.refused += 1
        self.ctx.rejections.append(refusal)
        del self.ctx.rejections[:-MAX_REJECTIONS_KEPT]
        _admission_log.warning("refused connection from %s: %s: %s",
                               printable(peer), type(refusal).__name__, printable(refusal))
        self.progress()

    async def _accept_loop(self, nursery: trio.Nursery) -> None:
        assert self.ctx.listener is not None
        token = 0
        backoff = ACCEPT_BACKOFF_FIRST
        while True:
            try:
                conn = await self.ctx.listener.accept()
            except AcceptFailed as exc:
                self.refuse(exc.peer, exc)
                if exc.exhausted:
                    # Out of descriptors: the connection stays in the backlog and the
                    # listener stays readable; wait for some to be freed (pending
                    # handshakes time out or finish) instead of spinning.
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, ACCEPT_BACKOFF_MAX)
                continue
            backoff = ACCEPT_BACKOFF_FIRST
            self._make_room()
            token += 1
            pending = _Pending(
                trio.CancelScope(deadline=trio.current_time() + PER_CONNECTION_HANDSHAKE),
                ControlLink(conn))
            self.pending[token] = pending
            nursery.start_soon(self._handshake_one, conn, token, pending)

    def _make_room(self) -> None:
        """At the pending limit, evict the oldest connection that made no progress
        (else the oldest of all)."""
        if len(self.pending) < MAX_PENDING_HANDSHAKES:
            return
        victim = next((t for t, p in self.pending.items() if not p.made_progress),
                      next(iter(self.pending)))
        self.evicted.add(victim)
        self.pending.pop(victim).scope.cancel()

    async def _handshake_one(self, conn: Conn, token: int, pending: _Pending) -> None:
        ctx = self.ctx
        link, scope = pending.link, pending.scope
        assert ctx.session_id is not None
        hs = CoordinatorHandshake(
            ctx.config.key, ctx.config.node_id, ctx.world_size, ctx.session_id,
            self.taken_ranks, self.taken_nodes, epoch_floors=self.floors, peer=conn.remote,
        )

        def register() -> None:
            self.taken_ranks.add(hs.rank)
            self.taken_nodes.add(hs.peer_node_id)
            # Noise message 2 authenticated the Hello and so its epoch: this
            # generation exists and holds the key.
            self.floors[hs.rank] = max(self.floors.get(hs.rank, 0), hs.epoch)

        refusal: BaseException | None = None
        try:
            try:
                with scope:
                    await drive_handshake(link, hs, register)
            except (HandshakeRejected, FrameError, PeerDisconnected, LinkTampered) as exc:
                refusal = exc
            finally:
                self.pending.pop(token, None)
            if refusal is None and scope.cancelled_caught:
                # Our deadline or an eviction (never the state's own cancellation,
                # which propagates): possibly after register(), mid-Welcome.
                why = (f"evicted: {MAX_PENDING_HANDSHAKES} newer connections pending"
                       if token in self.evicted
                       else f"no handshake within {PER_CONNECTION_HANDSHAKE} s")
                refusal = PeerDisconnected(conn.remote, "handshaking", why)
            if refusal is not None:
                if hs.done:
                    self.taken_ranks.discard(hs.rank)
                    self.taken_nodes.discard(hs.peer_node_id)
                self.refuse(conn.remote, refusal)
                return
            self._admit(link, hs, conn)
        finally:
            self.evicted.discard(token)
            if link.peer_rank < 0:
                await link.aclose()  # shielded; also on cancellation

    def _admit(self, link: ControlLink, hs: CoordinatorHandshake, conn: Conn) -> None:
        """Record a joiner whose handshake completed: its link (started, in
        ``ctx.links``), host and data port."""
        ctx = self.ctx
        link.peer_rank = hs.rank
        self.admitted[hs.rank] = link
        ctx.links[hs.rank] = link
        ctx.hosts[hs.rank] = conn.remote_host
        ctx.data_ports[hs.rank] = hs.data_port
        if hs.epoch:
            _epoch_log.info("%s", AdmissionLine(hs.rank, hs.epoch, conn.remote).format())
        if 0 not in ctx.hosts:
            ctx.hosts[0] = conn.local_host
        # Its reader answers the rank's pings and notices an ABORT or EOF while the
        # others are still on their way (see join()); no periodic heartbeats yet.
        link.start(ctx.nursery, heartbeat_interval=None)
        self.progress()
        if len(self.admitted) == self.needed:
            self.done.set()
        else:
            assert self._nursery is not None
            self._nursery.start_soon(self._watch_admitted, hs.rank, hs.peer_node_id, link)

    async def _watch_admitted(self, rank: int, node_id: bytes, link: ControlLink) -> None:
        """Until the session is full (cancelled then): if the admitted rank's link
        fails, drop the rank so that it can come back."""
        await link.failed.wait()
        del self.admitted[rank]
        del self.ctx.links[rank]
        self.ctx.hosts.pop(rank, None)
        self.ctx.data_ports.pop(rank, None)
        self.taken_ranks.discard(rank)
        self.taken_nodes.discard(node_id)
        await link.aclose()
        self.refuse(link.peer, PeerDisconnected(
            link.peer, "handshaking", f"rank {rank} left after its admission: "
            f"{link.failure}; waiting for it again"))


__all__ = ["Admission", "drive_handshake", "join"]
