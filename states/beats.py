"""Heartbeats that do not need the app's event loop: a UDP responder in a thread.

Why a thread: an app embeds the cluster in its own trio loop and runs MLX work on it
(``mx.eval`` blocks that thread for as long as the computation takes). Heartbeats
answered by that loop would make a busy rank look dead. Here one worker thread per
rank (started with ``trio.to_thread.run_sync``, inside the cluster's nursery, stopped
through a wake-up socket when that nursery is cancelled) owns a UDP socket on the
host of the control links, sends every peer a heartbeat each interval, and records
when each peer was last heard (in trio's clock), its heartbeat round trip and its app
status on the peer's :class:`~clusterfsm.states.link.ControlLink`.
``ready`` (``states/activities.py``) judges liveness from those fields; a stopped,
killed or unplugged process also stops its thread, so it is still found lost after
``peer_lost_after``. The thread needs the GIL only for microseconds per packet, and
MLX releases the GIL while it computes (docs/design.md, section 3.1a).

No ping/pong: each heartbeat echoes the latest one heard from that peer and how long
ago it arrived, so the round trip comes from the peer's own heartbeats (as TCP
timestamps do) and the thread wakes twice per interval, not three times.

Packet (big-endian), at most :data:`MAX_PACKET` bytes::

    magic "CB" | version u8 | src rank u8 | dst rank u8 | seq u64 | echo u64 |
    held_us u32 | status length u16 | status | mac (16 bytes)

``mac`` is HMAC-SHA256 over everything before it, truncated to 16 bytes, under a key
derived from the cluster key and the session id (:func:`beat_key`), so a host without
the key cannot keep a dead rank "alive". A heartbeat counts only if its ``seq`` is newer
than the last one counted from that rank (no replays). Bad packets are dropped and
counted (UDP has no connection to close).
"""

from __future__ import annotations

import hmac
import select
import socket
import struct
import time
from collections.abc import Iterable, Mapping
from typing import Final, Protocol

import trio

from clusterfsm.states.codec import MAX_STATUS

MAGIC: Final = b"CB"
VERSION: Final = 1
_HEAD = struct.Struct(">2sBBBQQIH")
#: Our heartbeats whose send time is kept, to turn an echo into a round trip.
_KEEP = 16
_MAC = 16
MAX_PACKET: Final = _HEAD.size + MAX_STATUS + _MAC


def beat_key(key: bytes, session_id: bytes) -> bytes:
    """The heartbeat MAC key: bound to this session, never the cluster key itself."""
    return hmac.digest(key, b"clusterfsm heartbeat v1" + session_id, "sha256")


class BeatPeer(Protocol):
    """What the thread writes for one peer (a ControlLink has these fields)."""

    peer_rank: int
    peer_status: bytes
    rtt: float | None
    beat_heard: float


class _Peer:
    __slots__ = ("addr", "heard_at", "last_in", "link")

    def __init__(self, link: BeatPeer, addr: tuple[str, int] | None) -> None:
        self.link = link
        self.addr = addr
        self.last_in = 0  # seq of the newest heartbeat counted from the peer (0: none)
        self.heard_at = 0.0  # when it arrived (perf_counter)


class Beats:
    """One rank's heartbeat socket and the peers it beats with."""

    def __init__(self, host: str, key: bytes, session_id: bytes, rank: int,
                 interval: float, links: Iterable[BeatPeer]) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.bind((host, 0))
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        self.port: int = self.sock.getsockname()[1]
        self._key = beat_key(key, session_id)
        self._rank = rank
        self._interval = interval
        #: Every linked peer; its address comes from its BEAT_PORT (:meth:`set_address`)
        #: or its first authenticated heartbeat, whichever is first, so a rank whose
        #: loop is blocked before it read the peer's BEAT_PORT still beats back.
        self._peers = {link.peer_rank: _Peer(link, None) for link in links}
        self.status = b""
        self.dropped = 0  # packets refused (bad MAC, replay, unknown rank, malformed)
        self.send_errors = 0
        self._seq = 0
        self._sent_at: dict[int, float] = {}  # our last _KEEP heartbeats' send times
        # trio's clock is perf_counter plus an offset (trio.SystemClock): the thread
        # writes trio times without calling into trio.
        self._offset = trio.current_time() - time.perf_counter()
        self._wake_r, self._wake_w = socket.socketpair()

    def set_address(self, rank: int, host: str, port: int) -> None:
        """Where ``rank``'s heartbeat socket is (trio side; one attribute write)."""
        self._peers[rank].addr = (host, port)

    async def run(self) -> None:
        """Run the thread until cancelled; then stop it and close the sockets."""
        try:
            async with trio.open_nursery() as nursery:
                async def stop_on_cancel() -> None:
                    try:
                        await trio.sleep_forever()
                    finally:
                        self._wake_w.send(b"x")

                nursery.start_soon(stop_on_cancel)
                await trio.to_thread.run_sync(self._loop, thread_name="clusterfsm-beats")
                nursery.cancel_scope.cancel()
        finally:
            for sock in (self.sock, self._wake_r, self._wake_w):
                sock.close()

    # -- the thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        next_beat = time.perf_counter()
        while True:
            timeout = max(0.0, next_beat - time.perf_counter())
            readable, _, _ = select.select([self.sock, self._wake_r], [], [], timeout)
            if self._wake_r in readable:
                return
            if self.sock in readable:
                self._drain()
            now = time.perf_counter()
            if now >= next_beat:
                self._beat_all(now)
                next_beat = now + self._interval

    def _beat_all(self, now: float) -> None:
        self._seq += 1
        self._sent_at[self._seq] = now
        self._sent_at.pop(self._seq - _KEEP, None)
        status = self.status
        for rank, peer in self._peers.items():
            if peer.addr is None:
                continue
            held_us = min(int((now - peer.heard_at) * 1e6), 2**32 - 1) if peer.last_in else 0
            body = _HEAD.pack(MAGIC, VERSION, self._rank, rank, self._seq, peer.last_in,
                              held_us, len(status)) + status
            try:
                self.sock.sendto(body + hmac.digest(self._key, body, "sha256")[:_MAC],
                                 peer.addr)
            except OSError:
                # Full buffers, an unreachable peer: the missing beats are the signal.
                self.send_errors += 1

    def _drain(self) -> None:
        for _ in range(64):  # bounded per wake-up; the rest waits for the next select
            try:
                packet, source = self.sock.recvfrom(MAX_PACKET + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.dropped += 1  # e.g. ICMP port unreachable reported on Linux
                continue
            self._receive(packet, source)

    def _receive(self, packet: bytes, source: tuple[str, int]) -> None:
        now = time.perf_counter()
        peers: Mapping[int, _Peer] = self._peers
        if not _HEAD.size + _MAC <= len(packet) <= MAX_PACKET:
            self.dropped += 1
            return
        body, mac = packet[:-_MAC], packet[-_MAC:]
        magic, version, src, dst, seq, echo, held_us, n = _HEAD.unpack_from(body)
        peer = peers.get(src)
        if (magic != MAGIC or version != VERSION or dst != self._rank or peer is None
                or len(body) != _HEAD.size + n or seq <= peer.last_in
                or not hmac.compare_digest(mac, hmac.digest(self._key, body, "sha256")[:_MAC])):
            self.dropped += 1
            return
        peer.last_in, peer.heard_at = seq, now
        if peer.addr is None:
            peer.addr = (source[0], source[1])  # authenticated: beat back from now on
        link = peer.link
        sent = self._sent_at.get(echo)
        if sent is not None:
            link.rtt = max(0.0, now - sent - held_us / 1e6)
        link.peer_status = body[_HEAD.size:]
        link.beat_heard = now + self._offset
