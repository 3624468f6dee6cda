"""The control link: framed messages over one connection, heartbeats, typed failure.

A link has two phases.

1. **Handshake** (no background tasks): the state's activity calls :meth:`send` and
   :meth:`receive` directly; every read is bounded by the caller's deadline.
2. **Session** (after :meth:`start`): a reader task owns the stream's receive side. It
   answers pings, records pongs (health, RTT, the peer's status), turns an ``ABORT``
   frame into :class:`~states.errors.PeerAborted`, records a ``GOODBYE`` (the peer is
   closing on purpose, see :meth:`say_goodbye`), hands app frames to :attr:`app`
   (``states/appmsg.py``) and queues every other message in a small bounded inbox
   that activities read with :meth:`next_message`. A heartbeat task pings every
   ``interval``.

   The reader never waits behind app traffic: app frames go to a queue that the
   credit protocol keeps from overflowing, and pongs are sent by their own task (a
   reader waiting to send could deadlock two ranks that both flood each other). So
   heartbeats and control frames are read however much app data is in flight.

Sealing: once the handshake has derived the session keys, :meth:`install_keys` makes
every frame either way a SEALED frame (``states/seal.py``): :meth:`send` seals, and a
received frame is opened in order, so a frame that was altered, replayed, reordered,
dropped, truncated or injected in cleartext fails the link with
:class:`~states.errors.LinkTampered` and the stream is closed at once. Nothing from an
unopened frame is acted on: a forged ABORT or GOODBYE is tampering, never an abort or
a departure.

Any failure (EOF, malformed frame, abort, broken stream, or a bug) is stored once as
:attr:`failure`, the link is marked failed (:attr:`failed`, an event), and every later
:meth:`next_message` raises it. The tasks themselves never raise into their nursery:
the failure reaches the machine through the activity that is waiting on the link, so
it lands in the right error state.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import trio

from clusterfsm.states.appmsg import AppLane
from clusterfsm.states.codec import (
    Abort,
    AppCredit,
    AppData,
    BeatPort,
    ClusterMsgType,
    Frame,
    FrameDecoder,
    Goodbye,
    Message,
    Ping,
    Pong,
    decode_message,
    encode_message,
)
from clusterfsm.states.errors import (
    BootstrapRejected,
    FrameError,
    FrameErrorKind,
    LinkTampered,
    PeerAborted,
    PeerDisconnected,
)
from clusterfsm.states.seal import Opener, Sealer, SessionKeys
from clusterfsm.states.transport import Conn

_SEALED = ClusterMsgType.SEALED
_TYPES = {int(t): t for t in ClusterMsgType if t is not _SEALED}

#: Up to a few frames per read: fewer wake-ups for bulk app traffic.
_READ_CHUNK = 262144
_INBOX = 32
#: A rank whose app closed the cluster waits this long for its peers' GOODBYE before it
#: closes its links (ranks closing together then all end in ``closed``); a rank that
#: got a GOODBYE while its app still uses the cluster reports ``peer_left`` at the
#: latest this long after it (or when the link closes, if sooner).
GOODBYE_GRACE = 0.5



async def wait_any(*events: trio.Event) -> None:
    """Until one of ``events`` is set (at once if one already is); the caller bounds it."""
    if any(event.is_set() for event in events):
        await trio.lowlevel.checkpoint()
        return
    async with trio.open_nursery() as nursery:
        async def on(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        for event in events:
            nursery.start_soon(on, event)

class ControlLink:
    """One control connection to one peer (rank ``peer_rank`` once known)."""

    def __init__(self, conn: Conn, *, peer_rank: int = -1) -> None:
        self.conn = conn
        self.peer_rank = peer_rank
        self._decoder = FrameDecoder()
        self._pending: list[Frame] = []
        self._sealer: Sealer | None = None
        self._opener: Opener | None = None
        self._send_lock = trio.StrictFIFOLock()
        self._inbox_send, self._inbox = trio.open_memory_channel[Message](_INBOX)
        self.failed = trio.Event()
        self.failure: BaseException | None = None
        self.first_pong = trio.Event()
        #: The peer pinged us (a joiner learns from rank 0's first ping that the
        #: session is full: rank 0 pings only once it has admitted every rank).
        self.first_ping = trio.Event()
        self.last_heard = -math.inf
        self._heartbeats_since = -math.inf
        self.pings_sent = 0
        self._started = False
        self._closed = False
        self.state = "handshaking"  # which machine state a failure is reported in
        #: Sessions the peer said GOODBYE for (its app closed the cluster on purpose;
        #: bounded: at most a few, ever).
        self._goodbye_sessions: set[bytes] = set()
        #: Replaced on every GOODBYE: lets a waiter see the next one, whatever session.
        self._goodbye_arrived = trio.Event()
        self.goodbye_sent = False
        #: App messages on this link (states/appmsg.py).
        self.app = AppLane(self)
        #: Our app-defined status, sent in our pings and pongs (``cluster.set_status``).
        self.local_status = b""
        #: The peer's latest status and heartbeat round trip (None until measured).
        self.peer_status = b""
        self.rtt: float | None = None
        #: When the off-loop heartbeat thread last heard the peer (``states/beats.py``;
        #: written by that thread, in trio's clock).
        self.beat_heard = -math.inf
        #: The peer's heartbeat UDP port (BEAT_PORT), once it said.
        self.peer_beat_port: int | None = None
        self.beat_port_known = trio.Event()
        self._ping_sent: tuple[int, float] = (-1, 0.0)
        self._pong_owed: int | None = None
        self._pong_wanted = trio.Event()

    @property
    def peer(self) -> str:
        return self.conn.remote

    # -- sealing ---------------------------------------------------------------------

    def install_keys(self, keys: SessionKeys) -> None:
        """Seal every frame from now on, both ways (once; the handshake calls it)."""
        if self._sealer is None:
            self._sealer = keys.sealer()
            self._opener = keys.opener(peer=self.peer)

    @property
    def sealed(self) -> bool:
        return self._sealer is not None

    def _to_message(self, frame: Frame) -> Message:
        """The message in a received frame: opened in order once the link is sealed
        (a cleartext frame then is tampering); a sealed frame before keys is unexpected."""
        opener = self._opener
        if opener is None:
            if frame.type is _SEALED:
                raise FrameError(FrameErrorKind.UNEXPECTED, "a sealed frame before the "
                                 "handshake derived keys", self.peer)
            return decode_message(frame)
        if frame.type is not _SEALED:
            raise opener.refuse_unsealed(frame.type)
        type_byte, payload = opener.open(frame.payload)
        inner = _TYPES.get(type_byte)
        if inner is None:  # authentic, so a peer bug, not an attack: a protocol error
            raise FrameError(FrameErrorKind.UNKNOWN_TYPE,
                             f"sealed message type 0x{type_byte:02x}", self.peer)
        return decode_message(Frame(inner, payload))

    # -- sending ---------------------------------------------------------------------

    async def send(self, msg: Message) -> None:
        """Send one message (sealed once keys are installed); a broken stream becomes
        :class:`PeerDisconnected`."""
        await self.send_many((msg,))

    async def send_many(self, msgs: Sequence[Message]) -> None:
        """Send messages back to back, in one write (the chunks of one app message:
        half the system calls and wake-ups of one write each), as :meth:`send` does."""
        async with self._send_lock:
            sealer = self._sealer
            if sealer is None:
                data = b"".join([encode_message(msg) for msg in msgs])
            else:
                # Sealing spends a counter value: it must reach the wire, in order. So
                # no cancellation between sealing and sending (send_all's first
                # checkpoint cannot fire after this one) ...
                await trio.lowlevel.checkpoint_if_cancelled()
                data = b"".join([sealer.seal(msg.TYPE, msg.encode()) for msg in msgs])
            try:
                await self.conn.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise self._fail(PeerDisconnected(self.peer, self.state, f"send: {exc}")) from exc
            except trio.Cancelled:
                # ... and a send cancelled part way leaves the stream unusable.
                self._fail(PeerDisconnected(self.peer, self.state, "a send was interrupted"))
                raise

    # -- handshake phase -------------------------------------------------------------

    async def receive(self) -> Message:
        """Read the next message directly (handshake phase only)."""
        if self._started:
            raise RuntimeError("the reader task owns the stream; use next_message()")
        while not self._pending:
            data = await self._read()
            try:
                self._pending.extend(self._decoder.feed(data))
            except FrameError as exc:
                raise self._fail(_with_peer(exc, self.peer)) from None
        msg = self._open(self._pending.pop(0))
        self.last_heard = trio.current_time()
        return msg

    async def _read(self) -> bytes:
        try:
            data = bytes(await self.conn.stream.receive_some(_READ_CHUNK))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise self._fail(PeerDisconnected(self.peer, self.state, str(exc))) from exc
        if not data:
            try:
                self._decoder.close()
            except FrameError as exc:
                raise self._fail(_with_peer(exc, self.peer)) from None
            raise self._fail(PeerDisconnected(self.peer, self.state, "EOF"))
        return data

    # -- session phase ---------------------------------------------------------------

    def start(self, nursery: trio.Nursery, *, heartbeat_interval: float | None) -> None:
        """Hand the stream to a reader task (in ``nursery``); with an interval, start
        periodic heartbeats too (else later, :meth:`start_heartbeats`)."""
        if self._started:
            raise RuntimeError("link already started")
        self._started = True
        nursery.start_soon(self._guarded, self._reader, name=f"link-reader[{self.peer}]")
        nursery.start_soon(self._guarded, self._ponger, name=f"link-ponger[{self.peer}]")
        if heartbeat_interval is not None:
            self.start_heartbeats(nursery, heartbeat_interval)

    @property
    def quiet_since(self) -> float:
        """When the peer last spoke (on the link or to the heartbeat thread), or when
        our periodic heartbeats started if that is later: a peer is not silent for the
        time nobody was asking it anything."""
        return max(self.last_heard, self.beat_heard, self._heartbeats_since)

    def mark_heartbeats_started(self) -> None:
        """Count silence from now (heartbeats run elsewhere: the off-loop thread)."""
        self._heartbeats_since = trio.current_time()

    def start_heartbeats(self, nursery: trio.Nursery, interval: float) -> None:
        """Ping every ``interval`` from now on (the reader answers the peer's pings
        whether or not we send our own)."""
        self._heartbeats_since = trio.current_time()
        nursery.start_soon(self._guarded, self._heartbeat, interval,
                           name=f"link-heartbeat[{self.peer}]")

    async def next_message(self) -> Message:
        """The next queued message; raises the link's failure once it has failed."""
        try:
            return await self._inbox.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            assert self.failure is not None
            raise self.failure from None

    async def say_goodbye(self, session_id: bytes) -> None:
        """Tell the peer our app closed the cluster on purpose (once; best effort).

        Sent before the link closes, so the peer tells the EOF that follows from a
        crash. A link that already failed is skipped; a send that fails is recorded
        as the link's failure, as any send is, and not raised: there is no one left
        to tell.
        """
        if self.goodbye_sent or self.failure is not None:
            return
        self.goodbye_sent = True
        try:
            await self.send(Goodbye(session_id))
        except PeerDisconnected:
            return

    def said_goodbye(self, session_id: bytes) -> bool:
        """The peer sent GOODBYE for this session (one for another session does not count)."""
        return session_id in self._goodbye_sessions

    async def wait_goodbye_for(self, session_id: bytes) -> None:
        """Until the peer said GOODBYE for ``session_id`` or the link failed (the caller
        bounds it); GOODBYEs for other sessions are skipped."""
        while not self.said_goodbye(session_id) and not self.failed.is_set():
            await wait_any(self._goodbye_arrived, self.failed)
        await trio.lowlevel.checkpoint()

    async def ping_now(self) -> None:
        """Send a ping immediately (used to learn health without waiting a period)."""
        self.pings_sent += 1
        self._ping_sent = (self.pings_sent, trio.current_time())
        await self.send(Ping(self.pings_sent, self.local_status))

    async def _guarded(self, task: object, *args: object) -> None:
        try:
            await task(*args)  # type: ignore[operator]
        except LinkTampered:
            # Recorded by _fail(); nothing more is read from, or sent to, a link
            # someone else writes into.
            await self.aclose()
        except FrameError as exc:
            self._fail(_with_peer(exc, self.peer))  # a no-op if already recorded
        except (PeerDisconnected, PeerAborted) as exc:
            self._fail(exc)  # usually recorded already: the first failure wins
        except Exception as exc:  # noqa: BLE001 - stored, re-raised by next_message()
            self._fail(exc)

    async def run_guarded(self, task: Callable[[], Awaitable[None]]) -> None:
        """Run a task that serves this link (app delivery): its failure fails the
        link, as the reader's does, instead of raising into the nursery."""
        await self._guarded(task)

    async def _reader(self) -> None:
        # Messages that arrived in the same read as the handshake's last one.
        pending, self._pending = self._pending, []
        for frame in pending:
            await self._dispatch(self._open(frame))
        while True:
            data = await self._read()
            try:
                frames = self._decoder.feed(data)
            except FrameError as exc:
                raise self._fail(_with_peer(exc, self.peer)) from None
            for frame in frames:
                await self._dispatch(self._open(frame))

    def _open(self, frame: Frame) -> Message:
        try:
            return self._to_message(frame)
        except FrameError as exc:
            raise self._fail(_with_peer(exc, self.peer)) from None
        except LinkTampered as exc:
            raise self._fail(exc) from None

    async def _dispatch(self, msg: Message) -> None:
        now = trio.current_time()
        self.last_heard = now
        if isinstance(msg, AppData):
            self.app.received(msg)
        elif isinstance(msg, AppCredit):
            self.app.credited(msg.frames)
        elif isinstance(msg, Ping):
            self.first_ping.set()
            self.peer_status = msg.status
            self._pong_owed = msg.seq
            self._pong_wanted.set()
        elif isinstance(msg, Pong):
            self.peer_status = msg.status
            seq, sent = self._ping_sent
            if msg.seq == seq:
                self.rtt = now - sent
            self.first_pong.set()
        elif isinstance(msg, BeatPort):
            if self.peer_beat_port is None:
                self.peer_beat_port = msg.port
                self.beat_port_known.set()
        elif isinstance(msg, Abort):
            raise self._fail(PeerAborted(self.peer_rank, msg.error,
                                         f"{msg.state}: {msg.detail}"))
        elif isinstance(msg, Goodbye):
            # Any state may see it (a peer can reach ready and close while we still
            # confirm); only ``ready`` gives it a meaning, the EOF after it still
            # fails the link for every other state.
            # A GOODBYE for another session must not hide the right one after it.
            if len(self._goodbye_sessions) < 16:
                self._goodbye_sessions.add(msg.session_id)
            self._goodbye_arrived.set()
            self._goodbye_arrived = trio.Event()
        else:
            await self._inbox_send.send(msg)

    async def _ponger(self) -> None:
        """Answer the latest ping (pongs for older ones are folded into it)."""
        while True:
            await self._pong_wanted.wait()
            self._pong_wanted = trio.Event()
            seq, self._pong_owed = self._pong_owed, None
            if seq is not None:
                await self.send(Pong(seq, self.local_status))

    async def _heartbeat(self, interval: float) -> None:
        while True:
            await self.ping_now()
            await trio.sleep(interval)

    # -- failure and close -----------------------------------------------------------

    def _fail(self, exc: BaseException) -> BaseException:
        """Record the first failure; return the failure to raise (the first one wins)."""
        if self.failure is None:
            self.failure = exc
            self.failed.set()
            self._inbox_send.close()
            self.app.close()
        return self.failure

    async def aclose(self) -> None:
        """Close the stream (idempotent); pending sends fail, the reader sees EOF."""
        if not self._closed:
            self._closed = True
            self._fail(PeerDisconnected(self.peer, self.state, "closed locally"))
            with trio.move_on_after(0.5) as scope:
                scope.shield = True
                await self.conn.stream.aclose()


def _with_peer(exc: FrameError, peer: str) -> FrameError:
    if exc.peer:
        return exc
    return FrameError(exc.kind, exc.detail, peer)


def unexpected_message(msg: Message, where: str, peer: str) -> FrameError:
    """A well-formed message that is not allowed here (closes the link)."""
    return FrameError(FrameErrorKind.UNEXPECTED, f"{type(msg).__name__} during {where}", peer)


class SessionMessage(Protocol):
    """A message that belongs to one session (every message after the handshake)."""

    @property
    def session_id(self) -> bytes: ...


def check_session(msg: SessionMessage, session_id: bytes, what: str, peer: str) -> None:
    """Refuse a message of another session (a stale rank, a replay): the one rule, so
    every such refusal is the same ``BootstrapRejected`` naming what was refused."""
    if msg.session_id != session_id:
        raise BootstrapRejected(
            f"{what}: session id {msg.session_id.hex()} is not this session's", peer)
