"""Hostile input on rank 0's control port: real sockets on loopback, real clock.

For every attack: the offending connection is closed by rank 0 and the refusal is
recorded as a typed error (``ctx.rejections``, the ``clusterfsm.states.admission`` log, and the
``HandshakeTimeout`` detail), memory stays bounded, and a legitimate peer arriving
meanwhile or afterwards still reaches ``ready``. Where the attacker is the only peer,
rank 0 ends in ``handshake_timeout`` when its deadline passes, naming the refusal.

Joiner side: a stale rank 0 that holds the key but replays an earlier session's
Challenge or bootstrap frame (or sends a wrong session id) ends the joiner in a typed
error state, never in ``ready``.
"""

from __future__ import annotations

import contextlib
import logging
import random
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import attrs
import pytest
import trio

from clusterfsm.states import admission, seal
from clusterfsm.states.codec import (
    MAX_PAYLOAD,
    Auth,
    BootstrapPayload,
    Challenge,
    FrameDecoder,
    Hello,
    Message,
    Reject,
    Welcome,
    WireBackend,
    decode_message,
    encode_message,
)
from clusterfsm.states.config import Address
from clusterfsm.states.errors import (
    BootstrapRejected,
    FrameError,
    FrameErrorKind,
    HandshakeRejected,
    HandshakeTimeout,
    PeerDisconnected,
    RejectReason,
)
from clusterfsm.states.handshake import (
    PROTOCOL_VERSION,
    CoordinatorHandshake,
    JoinerHandshake,
)
from clusterfsm.states.link import ControlLink
from clusterfsm.states.transport import Conn
from tests.tcp_harness import (
    KEY,
    LOOPBACK,
    RankRun,
    RecordingTransport,
    all_ready,
    joiner_config,
    mlx_env,
    rank0_config,
    run_rank,
)

WRONG_KEY = b"w" * 32
#: Rank 0's handshake deadline when the legitimate peer is expected to get in.
HANDSHAKE_DEADLINE = 3.0
#: ... and when the attacker is the only peer (the test waits for it).
ALONE_DEADLINE = 1.0
#: Per-connection handshake bound at rank 0 during these tests (default 5 s).
SLOW_CLIENT_LIMIT = 0.5
#: Traced memory rank 0 may gain while under one attack (the decoder's bound is one
#: frame, 64 KiB; the rest is sockets and tasks).
MEMORY_BOUND = 2 * 1024 * 1024
FLOOD = 200


@pytest.fixture(autouse=True)
def _short_per_connection_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admission, "PER_CONNECTION_HANDSHAKE", SLOW_CLIENT_LIMIT)


# --------------------------------------------------------------------------- attackers


@attrs.define
class Verdict:
    """What the attacker saw: did rank 0 close the connection, and what it sent."""

    closed_by_peer: bool = False
    received: bytes = b""

    @property
    def messages(self) -> list[Message]:
        return [decode_message(f) for f in FrameDecoder().feed(self.received)]


async def _drain_until_closed(stream: trio.SocketStream, verdict: Verdict,
                              limit: float = 3.0) -> None:
    """Read until rank 0 closes (EOF or reset); bounded."""
    with trio.move_on_after(limit):
        while True:
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, OSError):
                verdict.closed_by_peer = True
                return
            if not data:
                verdict.closed_by_peer = True
                return
            verdict.received += data


Attack = Callable[[Address, trio.Event], Awaitable[Verdict]]


def raw_attack(payload: bytes, *, then_send: bytes = b"", chunks: int = 0) -> Attack:
    """Send ``payload``, then ``chunks`` x ``then_send``, then wait to be closed."""

    async def attack(address: Address, sent: trio.Event) -> Verdict:
        verdict = Verdict()
        stream = await trio.open_tcp_stream(address.host, address.port)
        async with stream:
            try:
                await stream.send_all(payload)
                sent.set()
                for _ in range(chunks):
                    await stream.send_all(then_send)
            except (trio.BrokenResourceError, OSError):
                verdict.closed_by_peer = True
            sent.set()
            if not verdict.closed_by_peer:
                await _drain_until_closed(stream, verdict)
        return verdict

    return attack


def _captured_joiner_frames() -> bytes:
    """A genuine joiner's Hello + Auth from an *earlier* session (right key)."""
    joiner = JoinerHandshake(KEY, b"J" * 16, 1, 2, 6000)
    earlier = CoordinatorHandshake(KEY, b"C" * 16, 2, b"E" * 16, set(), set())
    hello = joiner.start()
    [challenge] = earlier.receive(hello)
    [auth] = joiner.receive(challenge)
    [welcome] = earlier.receive(auth)
    assert isinstance(welcome, Welcome)
    return encode_message(hello) + encode_message(auth)


def _earlier_bootstrap_frame(session_id: bytes = b"E" * 16) -> BootstrapPayload:
    return BootstrapPayload(
        coordinator_port=0, session_id=session_id, backend=WireBackend.RING, world_size=2,
        topology=((f"{LOOPBACK}:40001",), (f"{LOOPBACK}:40002",)))


def _auth_under(key: bytes, hello: Hello) -> bytes:
    """A well-formed Noise message 2 for ``hello``, made with ``key`` (a host without
    the cluster key cannot open rank 0's message 1, so it answers one of its own)."""
    psk, pro = seal.derive_psk(key), seal.prologue(hello.encode())
    own = seal.InitiatorHandshake(psk, pro)
    responder = seal.ResponderHandshake(psk, pro)
    responder.read_message1(own.write_message1(bytes(17)))
    return responder.write_message2((6000).to_bytes(2, "big"))[0]


async def wrong_key_attack(address: Address, sent: trio.Event) -> Verdict:
    """A well-formed Hello, then an Auth made with the wrong key."""
    verdict = Verdict()
    node, nonce = b"A" * 16, b"N" * 16
    stream = await trio.open_tcp_stream(address.host, address.port)
    async with stream:
        hello = Hello(PROTOCOL_VERSION, node, 1, 2, nonce, "x")
        await stream.send_all(encode_message(hello))
        sent.set()
        decoder = FrameDecoder()
        frames: list[Any] = []
        with trio.move_on_after(3):
            while not frames:
                frames = decoder.feed(await stream.receive_some(65536))
        [challenge] = [decode_message(f) for f in frames]
        assert isinstance(challenge, Challenge)
        await stream.send_all(encode_message(Auth(_auth_under(WRONG_KEY, hello))))
        await _drain_until_closed(stream, verdict)
    return verdict


def _random_bytes() -> bytes:
    data = random.Random(5).randbytes(4096)
    assert data[:1] != b"C"  # seeded: the first byte already betrays it
    return data


HUGE_HEADER = b"CF\x01\x01" + (2**32 - 1).to_bytes(4, "big")  # a 4 GiB HELLO
SLOW_HEADER = b"CF\x01\x01" + (40).to_bytes(4, "big") + b"\x00\x01"  # then silence

#: name -> (attack, the refusal rank 0 must record: type, and kind/reason)
ATTACKS: dict[str, tuple[Attack, type[BaseException], object]] = {
    "random_bytes": (raw_attack(_random_bytes()), FrameError, FrameErrorKind.BAD_MAGIC),
    "4gib_header": (raw_attack(HUGE_HEADER, then_send=b"\xff" * 65536, chunks=16),
                    FrameError, FrameErrorKind.OVERSIZE),
    "slow_client": (raw_attack(SLOW_HEADER), PeerDisconnected, "no handshake within"),
    "unknown_type": (raw_attack(b"CF\x01\x7f\x00\x00\x00\x00"), FrameError,
                     FrameErrorKind.UNKNOWN_TYPE),
    "wrong_key_hello": (wrong_key_attack, HandshakeRejected, RejectReason.BAD_KEY),
    "replayed_handshake": (raw_attack(_captured_joiner_frames()), HandshakeRejected,
                           RejectReason.BAD_KEY),
    "replayed_bootstrap": (raw_attack(encode_message(_earlier_bootstrap_frame())),
                           FrameError, FrameErrorKind.UNEXPECTED),
}


def matches(refusal: BaseException, kind: type[BaseException], what: object) -> bool:
    if not isinstance(refusal, kind):
        return False
    if isinstance(refusal, FrameError):
        return refusal.kind is what
    if isinstance(refusal, HandshakeRejected):
        return refusal.reason is what and not refusal.remote
    return str(what) in str(refusal)


# --------------------------------------------------------------------------- rank 0 side


@pytest.mark.parametrize("name", list(ATTACKS))
async def test_attack_is_refused_typed_and_the_legitimate_peer_still_gets_in(
    name: str, caplog: pytest.LogCaptureFixture,
) -> None:
    attack, kind, what = ATTACKS[name]
    env_before = mlx_env()
    transport = RecordingTransport()
    r0, r1 = RankRun(0), RankRun(1)
    hold = all_ready(2)
    verdicts: list[Verdict] = []
    caplog.set_level(logging.WARNING, logger="clusterfsm.states.admission")
    tracemalloc.start()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: run_rank(
                rank0_config(deadlines={"handshaking": HANDSHAKE_DEADLINE}), r0,
                transport=transport, in_ready=hold))
            await transport.bound.wait()
            assert transport.address is not None
            address = transport.address
            sent, refused = trio.Event(), trio.Event()
            baseline = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()

            async def attacker() -> None:
                verdicts.append(await attack(address, sent))
                refused.set()

            nursery.start_soon(attacker)
            await sent.wait()
            # "afterwards": the peer arrives once rank 0 has refused the attacker (the
            # flood test below covers a peer arriving in the middle of an attack).
            await refused.wait()
            peak = tracemalloc.get_traced_memory()[1] - baseline
            nursery.start_soon(lambda: run_rank(
                joiner_config(1, address), r1, in_ready=hold))
    finally:
        tracemalloc.stop()
    [verdict] = verdicts
    assert verdict.closed_by_peer, f"{name}: rank 0 kept the connection open"
    assert r0.reached_ready and r1.reached_ready, (r0.path, r0.error, r1.path, r1.error)
    assert r0.state == r1.state == "closed"
    assert any(matches(r, kind, what) for r in r0.rejections), r0.rejections
    assert any(kind.__name__ in m for m in caplog.messages), caplog.messages
    assert peak < MEMORY_BOUND, f"{name}: rank 0 grew by {peak} bytes under attack"
    assert mlx_env() == env_before
    assert not any(p.exists() for p in r0.topology_dirs + r1.topology_dirs)
    if kind is HandshakeRejected:
        # rank 0 tells the impostor why, in a Reject, before closing
        assert any(isinstance(m, Reject) and m.reason is RejectReason.BAD_KEY
                   for m in verdict.messages)


async def test_every_attack_alone_ends_rank0_in_handshake_timeout_naming_it() -> None:
    """All attacks at once, each against its own rank 0 (so the test costs one deadline)."""
    runs = {name: RankRun(0) for name in ATTACKS}
    verdicts: dict[str, Verdict] = {}

    async def one(name: str) -> None:
        attack, _, _ = ATTACKS[name]
        transport = RecordingTransport()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: run_rank(
                rank0_config(deadlines={"handshaking": ALONE_DEADLINE}), runs[name],
                transport=transport))
            await transport.bound.wait()
            assert transport.address is not None
            verdicts[name] = await attack(transport.address, trio.Event())

    async with trio.open_nursery() as nursery:
        for name in ATTACKS:
            nursery.start_soon(one, name)
    for name, (_, _kind, what) in ATTACKS.items():
        run = runs[name]
        assert verdicts[name].closed_by_peer, name
        assert run.state == "handshake_timeout", (name, run.path, run.error)
        assert isinstance(run.error, HandshakeTimeout), name
        assert "waiting for ranks [1]" in run.error.detail
        assert "refused 1 connection(s)" in run.error.detail, (name, run.error.detail)
        expected = what.value if isinstance(what, FrameErrorKind) else (
            what.name.lower() if isinstance(what, RejectReason) else str(what))
        assert expected in run.error.detail, (name, run.error.detail)
        assert run.seconds_in("handshaking") < ALONE_DEADLINE + 1.0


async def _open_silent(address: Address, n: int) -> list[trio.SocketStream]:
    streams = []
    for _ in range(n):
        streams.append(await trio.open_tcp_stream(address.host, address.port))
    return streams


class EvictionCounter(logging.Handler):
    """Counts rank 0's eviction log records; wakes a waiter at a given count."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self._want = 0
        self._event = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "evicted" in record.getMessage():
            self.count += 1
            if self.count >= self._want:
                self._event.set()

    async def reached(self, n: int) -> None:
        self._want = n
        if self.count < n:
            await self._event.wait()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        log = logging.getLogger("clusterfsm.states.admission")
        log.addHandler(self)
        try:
            yield
        finally:
            log.removeHandler(self)


def _open_fds() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


async def test_200_silent_connections_do_not_lock_out_the_legitimate_peer() -> None:
    """A flood of silent connections holds no more than the pending-handshake limit.

    Rank 0 evicts the oldest unauthenticated connection when the limit is reached, so a
    legitimate peer arriving in the middle of the flood is handled at once instead of
    queueing behind 200 connections x the per-connection time limit.
    """
    transport = RecordingTransport()
    r0, r1 = RankRun(0), RankRun(1)
    hold = all_ready(2)
    evictions = EvictionCounter()
    closed: list[bool] = []
    fds_during: list[int] = []
    # The per-connection limit at its default, so only eviction can let the peer in.
    limit = 5.0
    with pytest.MonkeyPatch.context() as mp, evictions.installed():
        mp.setattr(admission, "PER_CONNECTION_HANDSHAKE", limit)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: run_rank(
                rank0_config(deadlines={"handshaking": 2.0}), r0, transport=transport,
                in_ready=hold))
            await transport.bound.wait()
            assert transport.address is not None
            address = transport.address
            before = _open_fds()
            flood = await _open_silent(address, FLOOD)
            # Wait (on log events) until rank 0 has accepted the whole flood: by then
            # it has evicted all but the pending limit.
            with trio.fail_after(5):
                await evictions.reached(FLOOD - admission.MAX_PENDING_HANDSHAKES)
            # ours (FLOOD) + rank 0's side, which must stay at the pending limit
            fds_during.append(_open_fds() - before - FLOOD)
            nursery.start_soon(lambda: run_rank(joiner_config(1, address), r1,
                                                in_ready=hold))

            async def closed_by_peer(stream: trio.SocketStream) -> None:
                verdict = Verdict()
                async with stream:
                    await _drain_until_closed(stream, verdict, limit=4.0)
                closed.append(verdict.closed_by_peer)

            for stream in flood:
                nursery.start_soon(closed_by_peer, stream)
    assert r0.reached_ready and r1.reached_ready, (r0.path, r0.error, r1.path, r1.error)
    assert fds_during[0] <= admission.MAX_PENDING_HANDSHAKES + 4, fds_during
    assert len(closed) == FLOOD and all(closed), f"{closed.count(False)} left open"
    assert r0.rejections and all(isinstance(r, PeerDisconnected) for r in r0.rejections)


# --------------------------------------------------------------------------- joiner side


class StaleCoordinator:
    """A rank 0 that holds the key but belongs to another session (stale or replaying)."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.address: Address | None = None
        self.bound = trio.Event()

    async def run(self) -> None:
        [listener] = await trio.open_tcp_listeners(0, host=LOOPBACK)
        async with listener:
            host, port = listener.socket.getsockname()[:2]
            self.address = Address(host, port)
            self.bound.set()
            stream = await listener.accept()
        conn = Conn(stream, LOOPBACK, f"{LOOPBACK}:1")
        link = ControlLink(conn)
        async with trio.open_nursery() as nursery:
            hello = await link.receive()
            assert isinstance(hello, Hello)
            if self.behaviour == "replayed_challenge":
                # A Challenge genuinely made by rank 0 (right key) for an earlier
                # connection: it answers another nonce.
                earlier = CoordinatorHandshake(KEY, b"C" * 16, 2, b"E" * 16, set(), set())
                old = Hello(hello.protocol_version, hello.node_id, hello.rank,
                            hello.world_size, b"O" * 16, hello.software)
                await link.send(earlier.receive(old)[0])
                with trio.move_on_after(3):  # the joiner's Reject, then EOF
                    while True:
                        try:
                            await link.receive()
                        except (PeerDisconnected, FrameError):
                            break
            else:
                hs = CoordinatorHandshake(KEY, b"C" * 16, 2, b"S" * 16, set(), set())
                for reply in hs.receive(hello):
                    await link.send(reply)
                await admission.drive_handshake(link, hs)
                link.start(nursery, heartbeat_interval=0.05)
                session = b"E" * 16 if self.behaviour == "replayed_bootstrap" else b"X" * 16
                await link.send(_earlier_bootstrap_frame(session))
            with trio.move_on_after(3):
                await link.failed.wait()
            await link.aclose()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("behaviour", "state", "error"),
    [("replayed_challenge", "handshake_rejected", HandshakeRejected),
     ("replayed_bootstrap", "bootstrap_rejected", BootstrapRejected),
     ("wrong_session_id", "bootstrap_rejected", BootstrapRejected)],
)
async def test_joiner_refuses_a_stale_coordinator(
    behaviour: str, state: str, error: type[BaseException],
) -> None:
    env_before = mlx_env()
    fake = StaleCoordinator(behaviour)
    r1 = RankRun(1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake.run)
        await fake.bound.wait()
        assert fake.address is not None
        await run_rank(joiner_config(1, fake.address), r1)
    assert r1.state == state, (r1.path, r1.error)
    assert isinstance(r1.error, error)
    assert not r1.reached_ready
    if isinstance(r1.error, HandshakeRejected):
        assert r1.error.reason is RejectReason.BAD_KEY and not r1.error.remote
    else:
        assert "is not this session's" in str(r1.error)
    assert mlx_env() == env_before


def test_the_decoder_bound_is_one_frame() -> None:
    """The memory bound the tests above rely on: a 4 GiB header costs 8 bytes."""
    dec = FrameDecoder()
    with pytest.raises(FrameError) as info:
        dec.feed(HUGE_HEADER[:5])
    assert info.value.kind is FrameErrorKind.OVERSIZE
    assert dec.buffered == 0
    dec2 = FrameDecoder()
    dec2.feed(b"CF\x01\x01" + MAX_PAYLOAD.to_bytes(4, "big") + b"\x00" * 1000)
    assert dec2.buffered == 8 + 1000
