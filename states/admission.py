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
import secrets
from collections.abc import Callable

import trio

from clusterfsm.fsm import report_progress
from clusterfsm.states.context import ClusterContext
from clusterfsm.states.epochs import EPOCH_LOGGER
from clusterfsm.states.errors import (
    FrameError,
    HandshakeRejected,
    PeerDisconnected,
    printable,
)
from clusterfsm.states.handshake import CoordinatorHandshake, JoinerHandshake
from clusterfsm.states.lines import AdmissionLine
from clusterfsm.states.link import ControlLink
from clusterfsm.states.transport import Conn, connection_refused

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

    On refusal the ``Reject`` it owes the peer is sent before the error propagates.
    ``on_done`` runs as soon as the handshake completes, before its last reply is
    sent (rank 0 registers the admitted rank there, see CoordinatorHandshake).
    """
    while not hs.done:
        msg = await link.receive()
        try:
            replies = hs.receive(msg)
        except (HandshakeRejected, FrameError):
            for reply in hs.outbox_on_failure:
                await link.send(reply)
            raise
        if hs.done:
            on_done()
        for reply in replies:
            await link.send(reply)


# -- joiner -------------------------------------------------------------------------


async def join(ctx: ClusterContext) -> None:
    """Dial rank 0 and prove the key; on success ``ctx.links[0]`` and the session id
    are set and a data-plane port is reserved."""
    conn = await _dial_coordinator(ctx)
    link = ControlLink(conn, peer_rank=0)
    ctx.links[0] = link
    ctx.reservation = ctx.allocate_port(conn.local_host)
    hs = JoinerHandshake(
        ctx.config.key, ctx.config.node_id, ctx.rank, ctx.world_size,
        ctx.reservation.port, epoch=ctx.config.epoch, peer=conn.remote,
    )
    report_progress(f"handshake with rank 0 at {conn.remote}")
    await link.send(hs.start())
    try:
        await drive_handshake(link, hs)
    except (HandshakeRejected, FrameError):
        await link.aclose()
        raise
    ctx.session_id = hs.session_id


async def _dial_coordinator(ctx: ClusterContext) -> Conn:
    """Dial the peers in order until one accepts; refused means "not up yet": retry."""
    delay = CONNECT_RETRY_FIRST
    attempt = 0
    while True:
        for address, interface in ctx.dial_targets or [(a, None) for a in ctx.config.peers]:
            attempt += 1
            try:
                return await ctx.transport.connect(address, interface=interface)
            except OSError as exc:
                if not connection_refused(exc):
                    raise PeerDisconnected(str(address), "handshaking",
                                           f"connect: {exc}") from exc
                report_progress(f"rank 0 at {address} refused {attempt} connect attempt(s)")
        await trio.sleep(delay)
        delay = min(delay * 2, CONNECT_RETRY_MAX)


# -- rank 0 -------------------------------------------------------------------------


class Admission:
    """Rank 0's admission: accept connections until every rank 1..N-1 has proved the key.

    A connection that fails its handshake (wrong key, version, duplicate rank,
    garbage, silence) is refused, logged and closed; the listener keeps serving, so a
    rogue host cannot lock the legitimate peers out. At most
    ``MAX_PENDING_HANDSHAKES`` unauthenticated connections are held: one more evicts
    the oldest, so a flood costs bounded memory and file descriptors and a peer that
    completes its handshake promptly always gets in. Each connection has
    ``PER_CONNECTION_HANDSHAKE`` seconds from its accept. The refusals are counted
    and the last few kept (``ctx.rejections``), and named in the timeout error if the
    legitimate peers never come. Every connection not admitted is closed, also when
    the state is cancelled.

    Stale generations: ``floors`` (rank -> newest admitted epoch) starts from the
    configured ``epoch_floors`` (what earlier coordinators of this rank 0 admitted) and
    is raised as soon as a joiner's MAC has verified its epoch, so an older generation
    of an admitted rank is refused ``STALE_SESSION`` here and by the next coordinator.
    """

    def __init__(self, ctx: ClusterContext) -> None:
        self.ctx = ctx
        self.admitted: dict[int, ControlLink] = {}
        self.taken_ranks: set[int] = set()
        self.taken_nodes: set[bytes] = set()
        self.floors: dict[int, int] = dict(ctx.config.epoch_floors)
        self.everyone = trio.Event()
        #: Pending handshakes, oldest first (dict order), and the ones evicted for room.
        self.pending: dict[int, trio.CancelScope] = {}
        self.evicted: set[int] = set()
        self.refused = 0
        self.needed = ctx.world_size - 1

    async def run(self) -> None:
        """Create the session id, admit every rank, then close the listener and
        reserve rank 0's data-plane port."""
        ctx = self.ctx
        assert ctx.listener is not None
        ctx.session_id = secrets.token_bytes(16)
        self.progress()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._accept_loop, nursery)
            await self.everyone.wait()
            nursery.cancel_scope.cancel()
        ctx.links.update(sorted(self.admitted.items()))
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

    def refuse(self, conn: Conn, refusal: BaseException) -> None:
        """Count, keep and log one refused connection (its closing is the caller's)."""
        self.refused += 1
        self.ctx.rejections.append(refusal)
        del self.ctx.rejections[:-MAX_REJECTIONS_KEPT]
        _admission_log.warning("refused connection from %s: %s: %s",
                               conn.remote, type(refusal).__name__, printable(refusal))
        self.progress()

    async def _accept_loop(self, nursery: trio.Nursery) -> None:
        assert self.ctx.listener is not None
        token = 0
        while True:
            conn = await self.ctx.listener.accept()
            self._make_room()
            token += 1
            scope = trio.CancelScope(deadline=trio.current_time() + PER_CONNECTION_HANDSHAKE)
            self.pending[token] = scope
            nursery.start_soon(self._handshake_one, conn, token, scope)

    def _make_room(self) -> None:
        """Evict the oldest pending handshake if the pending limit is reached."""
        if len(self.pending) >= MAX_PENDING_HANDSHAKES:
            oldest = next(iter(self.pending))
            self.evicted.add(oldest)
            self.pending.pop(oldest).cancel()

    async def _handshake_one(self, conn: Conn, token: int, scope: trio.CancelScope) -> None:
        ctx = self.ctx
        link = ControlLink(conn)
        assert ctx.session_id is not None
        hs = CoordinatorHandshake(
            ctx.config.key, ctx.config.node_id, ctx.world_size, ctx.session_id,
            self.taken_ranks, self.taken_nodes, epoch_floors=self.floors, peer=conn.remote,
        )

        def register() -> None:
            self.taken_ranks.add(hs.rank)
            self.taken_nodes.add(hs.peer_node_id)
            # The MAC covered the epoch: this generation exists and holds the key.
            self.floors[hs.rank] = max(self.floors.get(hs.rank, 0), hs.epoch)

        refusal: BaseException | None = None
        try:
            try:
                with scope:
                    await drive_handshake(link, hs, register)
            except (HandshakeRejected, FrameError, PeerDisconnected) as exc:
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
                self.refuse(conn, refusal)
                return
            self._admit(link, hs, conn)
        finally:
            self.evicted.discard(token)
            if link.peer_rank < 0:
                await link.aclose()  # shielded; also on cancellation

    def _admit(self, link: ControlLink, hs: CoordinatorHandshake, conn: Conn) -> None:
        """Record a joiner whose handshake completed: its link, host and data port."""
        ctx = self.ctx
        link.peer_rank = hs.rank
        self.admitted[hs.rank] = link
        ctx.hosts[hs.rank] = conn.remote_host
        ctx.data_ports[hs.rank] = hs.data_port
        if hs.epoch:
            _epoch_log.info("%s", AdmissionLine(hs.rank, hs.epoch, conn.remote).format())
        if 0 not in ctx.hosts:
            ctx.hosts[0] = conn.local_host
        self.progress()
        if len(self.admitted) == self.needed:
            self.everyone.set()


__all__ = ["Admission", "drive_handshake", "join"]
