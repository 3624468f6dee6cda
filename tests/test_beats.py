"""Heartbeat datagrams (states/beats.py): what counts, what is dropped, and the thread's
start and stop. Packets are fed to the receive path directly (no timing involved),
plus one real exchange between two sockets on loopback."""

from __future__ import annotations

import hmac
import math
import threading

import pytest
import trio

from clusterfsm.states.beats import _HEAD, MAGIC, MAX_PACKET, VERSION, Beats, beat_key
from clusterfsm.states.codec import MAX_STATUS

KEY = b"k" * 32
SID = b"s" * 16
SOURCE = ("127.0.0.1", 40000)


class Peer:
    def __init__(self, rank: int) -> None:
        self.peer_rank = rank
        self.peer_status = b""
        self.rtt: float | None = None
        self.beat_heard = -math.inf


class WatchedPeer(Peer):
    """Tells the test (thread-safely) when the thread measured an RTT."""

    def __init__(self, rank: int) -> None:
        self.measured = threading.Event()
        super().__init__(rank)

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        if name == "rtt" and value is not None:
            self.measured.set()


def packet(src: int, dst: int, seq: int, status: bytes = b"", *, echo: int = 0,
           held_us: int = 0, key: bytes = KEY, sid: bytes = SID) -> bytes:
    body = _HEAD.pack(MAGIC, VERSION, src, dst, seq, echo, held_us, len(status)) + status
    return body + hmac.digest(beat_key(key, sid), body, "sha256")[:16]


def make(rank: int = 0, peers: tuple[Peer, ...] = ()) -> Beats:
    return Beats("127.0.0.1", KEY, SID, rank, 0.1, peers)


async def test_a_good_heartbeat_counts_once() -> None:
    peer = Peer(1)
    beats = make(0, (peer,))
    try:
        beats._receive(packet(1, 0, 5, b"busy"), SOURCE)
        assert peer.beat_heard > -math.inf and peer.peer_status == b"busy"
        assert peer.rtt is None  # it echoes none of ours
        heard = peer.beat_heard
        beats._receive(packet(1, 0, 5, b"replayed"), SOURCE)  # same seq: a replay
        beats._receive(packet(1, 0, 4), SOURCE)  # older
        assert peer.beat_heard == heard and peer.peer_status == b"busy"
        assert beats.dropped == 2
    finally:
        for sock in (beats.sock, beats._wake_r, beats._wake_w):
            sock.close()


@pytest.mark.parametrize("bad", [
    packet(1, 0, 1, key=b"x" * 32),          # another key
    packet(1, 0, 1, sid=b"t" * 16),          # another session
    packet(1, 2, 1),                          # not for us
    packet(3, 0, 1),                          # not a linked peer
    packet(0, 0, 1),                          # ourselves (reflected)
    packet(1, 0, 0),                          # seq 0 is never sent
    packet(1, 0, 1)[:-1],                     # MAC cut short
    packet(1, 0, 1)[:10],                     # truncated header
    b"CB" + bytes(MAX_PACKET),                # too long
    packet(1, 0, 1, bytes(MAX_STATUS + 1)),   # status above the limit
    b"XX" + packet(1, 0, 1)[2:],              # bad magic
], ids=["key", "session", "dst", "src", "self", "seq-0", "short-mac", "short",
        "long", "status", "magic"])
async def test_bad_datagrams_are_dropped(bad: bytes) -> None:
    peer = Peer(1)
    beats = make(0, (peer,))
    try:
        beats._receive(bad, SOURCE)
        assert beats.dropped == 1 and peer.beat_heard == -math.inf
    finally:
        for sock in (beats.sock, beats._wake_r, beats._wake_w):
            sock.close()


async def test_two_threads_beat_and_stop_with_their_nursery() -> None:
    """Real sockets on loopback: each side hears the other, gets an RTT and the
    status; cancelling the nursery stops both threads."""
    a_peer, b_peer = WatchedPeer(1), WatchedPeer(0)
    a, b = make(0, (a_peer,)), make(1, (b_peer,))
    b.status = b"rank 1 status"
    a.set_address(1, "127.0.0.1", b.port)  # b learns a's from a's first heartbeat
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.run)
            nursery.start_soon(b.run)
            for peer in (a_peer, b_peer):  # each measured a round trip to the other
                assert await trio.to_thread.run_sync(peer.measured.wait, 15)
            nursery.cancel_scope.cancel()
    assert a_peer.peer_status == b"rank 1 status"
    # The nursery exited, so both threads returned (``to_thread.run_sync`` does not
    # abandon its thread) and the sockets are closed.
    assert a.sock.fileno() == -1 and b.sock.fileno() == -1
