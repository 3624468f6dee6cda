"""An on-path attacker on the sealed control link: a TCP proxy between rank 1 and rank 0.

Two real ranks (in this process, tests/tcp_harness.py) over real loopback TCP, rank 1
dialling a proxy that relays rank 0's port frame by frame and, per case, alters one
frame after the handshake: flips a bit, re-injects an earlier frame, swaps two,
truncates one, or injects a forged GOODBYE, ABORT or bootstrap frame (0x07); and a
whole recorded earlier session is replayed to a fresh rank 0 and to a fresh rank 1.

Each case ends the receiving rank in its typed state (``link_tampered`` for a frame
after the handshake, ``handshake_timeout``/``handshake_rejected`` for a replayed
handshake) within that state's deadline; no case reaches ``ready`` through the
attacker, and a forged GOODBYE never makes a ``peer_left``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import attrs
import pytest
import trio

from clusterfsm.states.codec import (
    Abort,
    BootstrapPayload,
    ClusterMsgType,
    Frame,
    FrameDecoder,
    Goodbye,
    Reject,
    WireBackend,
    decode_message,
    encode_frame,
    encode_message,
)
from clusterfsm.states.config import Address
from clusterfsm.states.errors import (
    HandshakeRejected,
    HandshakeTimeout,
    LinkTampered,
    RejectReason,
    TamperKind,
)
from tests.tcp_harness import (
    LOOPBACK,
    RankRun,
    RecordingTransport,
    hold_until,
    joiner_config,
    rank0_config,
    run_rank,
)

TO_JOINER, TO_RANK0 = "to rank 1", "to rank 0"
#: A hang guard for a whole case, far above every deadline below (not a timing assert).
CASE_LIMIT = 30.0
DEADLINES = {"handshaking": 3.0, "awaiting_session": 3.0, "exchanging_bootstrap": 3.0,
             "initializing_group": 5.0, "confirming_group": 3.0}

#: (direction, index of the sealed frame in that direction, raw frame) -> what to forward.
Tamper = Callable[[str, int, bytes], list[bytes]]


def _relay_all(_direction: str, _index: int, frame: bytes) -> list[bytes]:
    return [frame]


def encode_message_frame(msg_type: ClusterMsgType, payload: bytes) -> bytes:
    return encode_frame(Frame(msg_type, payload))


@attrs.define
class FrameProxy:
    """Relays one connection to ``upstream`` frame by frame; ``tamper`` sees every
    sealed frame (numbered per direction) and returns what to forward instead."""

    upstream: Address
    tamper: Tamper = _relay_all
    address: Address | None = None
    bound: trio.Event = attrs.field(factory=trio.Event)
    recorded: dict[str, bytes] = attrs.field(factory=lambda: {TO_JOINER: b"", TO_RANK0: b""})
    _sides: dict[str, trio.SocketStream] = attrs.field(factory=dict)
    _locks: dict[str, trio.Lock] = attrs.field(
        factory=lambda: {TO_JOINER: trio.Lock(), TO_RANK0: trio.Lock()})
    connected: trio.Event = attrs.field(factory=trio.Event)

    async def run(self) -> None:
        listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
        async with listeners[0] as listener:
            host, port = listener.socket.getsockname()[:2]
            self.address = Address(host, port)
            self.bound.set()
            joiner = await listener.accept()
        async with joiner, await trio.open_tcp_stream(self.upstream.host,
                                                      self.upstream.port) as rank0:
            self._sides = {TO_JOINER: joiner, TO_RANK0: rank0}
            self.connected.set()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, joiner, TO_RANK0, nursery.cancel_scope)
                nursery.start_soon(self._pump, rank0, TO_JOINER, nursery.cancel_scope)

    async def inject(self, direction: str, data: bytes) -> None:
        """Write ``data`` into one direction, between two whole frames."""
        await self.connected.wait()
        async with self._locks[direction]:
            # A side that has closed already leaves nothing to attack.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._sides[direction].send_all(data)

    async def _pump(self, source: trio.SocketStream, direction: str,
                    scope: trio.CancelScope) -> None:
        decoder = FrameDecoder()
        sealed = 0
        try:
            while data := await source.receive_some(65536):
                self.recorded[direction] += data
                for frame in decoder.feed(data):
                    raw = encode_message_frame(frame.type, frame.payload)
                    out = [raw]
                    if frame.type is ClusterMsgType.SEALED:
                        out = self.tamper(direction, sealed, raw)
                        sealed += 1
                    for chunk in out:
                        await self.inject(direction, chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()  # one side closed: close both, as a relay does


async def run_pair(proxy_tamper: Tamper, *, during_ready: Callable[[FrameProxy], Any] | None
                   = None) -> tuple[RankRun, RankRun, FrameProxy]:
    """Rank 0 and rank 1 through a proxy; returns both runs and the proxy."""
    transport = RecordingTransport()
    r0, r1 = RankRun(0), RankRun(1)
    release = trio.Event()
    with trio.fail_after(CASE_LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: run_rank(rank0_config(deadlines=DEADLINES), r0,
                                                transport=transport,
                                                in_ready=hold_until(release)))
            await transport.bound.wait()
            assert transport.address is not None
            proxy = FrameProxy(transport.address, proxy_tamper)
            nursery.start_soon(proxy.run)
            await proxy.bound.wait()
            assert proxy.address is not None
            hold = hold_until(release)
            left_ready = trio.Event()

            def watch(record: Any) -> None:
                if record.source == "ready":
                    left_ready.set()

            async def attack_then_hold(cluster: Any) -> None:
                if during_ready is None:
                    await hold(cluster)
                    return
                await during_ready(proxy)
                with trio.move_on_after(5):  # bounded; rank 1 leaves ready on its own
                    await left_ready.wait()

            await run_rank(joiner_config(1, proxy.address, deadlines=DEADLINES), r1,
                           in_ready=attack_then_hold, observers=(watch,))
            release.set()
    return r0, r1, proxy


def _tampered(run: RankRun, *kinds: TamperKind) -> LinkTampered:
    assert run.state == "link_tampered", run.path
    assert isinstance(run.error, LinkTampered), run.error
    assert run.error.kind in kinds, run.error
    return run.error


# --------------------------------------------------------------------------- the cases


def flip_bit(target: str, index: int) -> Tamper:
    def tamper(direction: str, i: int, frame: bytes) -> list[bytes]:
        if (direction, i) == (target, index):
            altered = bytearray(frame)
            altered[-5] ^= 0x10  # inside the ciphertext
            return [bytes(altered)]
        return [frame]
    return tamper


def reinject(target: str, index: int) -> Tamper:
    """Forward frame ``index``, then frame ``index - 1`` again (same session)."""
    earlier: dict[int, bytes] = {}

    def tamper(direction: str, i: int, frame: bytes) -> list[bytes]:
        if direction != target:
            return [frame]
        earlier[i] = frame
        return [frame, earlier[i - 1]] if i == index else [frame]
    return tamper


def swap(target: str, index: int) -> Tamper:
    """Hold frame ``index`` back and send it after frame ``index + 1``."""
    held: list[bytes] = []

    def tamper(direction: str, i: int, frame: bytes) -> list[bytes]:
        if direction != target:
            return [frame]
        if i == index:
            held.append(frame)
            return []
        if i == index + 1:
            return [frame, *held]
        return [frame]
    return tamper


def truncate(target: str, index: int) -> Tamper:
    """Cut the last byte of one frame (and its declared length, so framing holds)."""
    def tamper(direction: str, i: int, frame: bytes) -> list[bytes]:
        if (direction, i) == (target, index):
            length = int.from_bytes(frame[4:8], "big") - 1
            return [frame[:4] + length.to_bytes(4, "big") + frame[8:-1]]
        return [frame]
    return tamper


def inject_before(target: str, index: int, forged: bytes) -> Tamper:
    """Put a forged frame in front of sealed frame ``index`` of ``target``."""
    def tamper(direction: str, i: int, frame: bytes) -> list[bytes]:
        if (direction, i) == (target, index):
            return [forged, frame]
        return [frame]
    return tamper


SID = b"S" * 16  # the attacker cannot read the real session id: any will do
FORGED_BOOTSTRAP = encode_message(BootstrapPayload(
    coordinator_port=0, session_id=SID, backend=WireBackend.RING, world_size=2,
    topology=((f"{LOOPBACK}:40001",), (f"{LOOPBACK}:40002",))))
FORGED_ABORT = encode_message(Abort(SID, "confirming_group", "Forged", "forged"))
#: A SEALED frame the attacker made up (it has no key): random bytes as ciphertext.
FORGED_SEALED = encode_message_frame(ClusterMsgType.SEALED, bytes(range(40)))


@pytest.mark.parametrize(
    ("tamper", "victim", "kinds"),
    [
        (flip_bit(TO_JOINER, 1), 1, (TamperKind.FORGED,)),
        (flip_bit(TO_RANK0, 0), 0, (TamperKind.FORGED,)),
        (reinject(TO_RANK0, 1), 0, (TamperKind.FORGED,)),
        (reinject(TO_JOINER, 2), 1, (TamperKind.FORGED,)),
        (swap(TO_JOINER, 1), 1, (TamperKind.FORGED,)),
        (truncate(TO_RANK0, 1), 0, (TamperKind.FORGED,)),
        (inject_before(TO_JOINER, 1, FORGED_BOOTSTRAP), 1, (TamperKind.UNSEALED,)),
        (inject_before(TO_RANK0, 1, FORGED_ABORT), 0, (TamperKind.UNSEALED,)),
        (inject_before(TO_JOINER, 2, FORGED_SEALED), 1, (TamperKind.FORGED,)),
    ],
    ids=["flip-bit-to-1", "flip-bit-to-0", "reinject-to-0", "reinject-to-1", "swap-to-1",
         "truncate-to-0", "forged-0x07-to-1", "forged-abort-to-0", "forged-sealed-to-1"],
)
async def test_a_frame_altered_after_the_handshake_ends_the_receiver_in_link_tampered(
    tamper: Tamper, victim: int, kinds: tuple[TamperKind, ...],
) -> None:
    r0, r1, _ = await run_pair(tamper)
    _tampered((r0, r1)[victim], *kinds)
    assert not r0.reached_ready and not r1.reached_ready, (r0.path, r1.path)
    # The other rank sees its link closed: a typed error too, never a hang or ready.
    other = (r0, r1)[1 - victim]
    assert other.error is not None and other.state != "ready", other.path


@pytest.mark.parametrize("forged", [encode_message(Goodbye(SID)), FORGED_SEALED,
                                    encode_message(Abort(SID, "ready", "Forged", "x"))],
                         ids=["goodbye", "sealed-garbage", "abort"])
async def test_a_forged_frame_in_ready_is_tampering_never_a_departure(forged: bytes) -> None:
    async def inject(proxy: FrameProxy) -> None:
        await proxy.inject(TO_JOINER, forged)

    _, r1, _ = await run_pair(_relay_all, during_ready=inject)
    assert r1.reached_ready
    assert r1.state != "peer_left"
    _tampered(r1, TamperKind.UNSEALED, TamperKind.FORGED)


async def test_an_untouched_relay_is_just_a_slower_wire() -> None:
    """Sanity for the cases above: the proxy alone changes nothing."""
    r0, r1, proxy = await run_pair(_relay_all)
    assert r0.reached_ready and r1.reached_ready, (r0.path, r1.path)
    assert proxy.recorded[TO_RANK0] and proxy.recorded[TO_JOINER]


# --------------------------------------------------------------------------- replayed sessions


async def _rank0_sent(data: bytes, *, drain_s: float) -> tuple[RankRun, bytes]:
    """A real rank 0 (handshake deadline 1 s) sent ``data`` by a scripted joiner, which
    then reads for ``drain_s``; the run and what rank 0 answered."""
    transport = RecordingTransport()
    r0 = RankRun(0)
    received = b""
    with trio.fail_after(CASE_LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: run_rank(
                rank0_config(deadlines={"handshaking": 1.0}), r0, transport=transport))
            await transport.bound.wait()
            assert transport.address is not None
            stream = await trio.open_tcp_stream(transport.address.host, transport.address.port)
            async with stream:
                await stream.send_all(data)
                with trio.move_on_after(drain_s):
                    while chunk := await stream.receive_some(65536):
                        received += chunk
    return r0, received


async def _joiner_answered_with(answer: bytes, *, drain_s: float) -> RankRun:
    """A real rank 1 against a scripted rank 0 that answers its Hello with ``answer``
    (bytes recorded or built by the test), then reads whatever comes for ``drain_s``."""
    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    r1 = RankRun(1)
    with trio.fail_after(CASE_LIMIT):
        async with listeners[0] as listener, trio.open_nursery() as nursery:
            host, port = listener.socket.getsockname()[:2]

            async def scripted_rank0() -> None:
                stream = await listener.accept()
                async with stream:
                    await stream.receive_some(65536)  # the joiner's Hello
                    await stream.send_all(answer)
                    with trio.move_on_after(drain_s):
                        while await stream.receive_some(65536):
                            pass

            nursery.start_soon(scripted_rank0)
            await run_rank(joiner_config(1, Address(host, port), deadlines=DEADLINES), r1)
    return r1


async def _record_a_session() -> dict[str, bytes]:
    r0, r1, proxy = await run_pair(_relay_all)
    assert r0.reached_ready and r1.reached_ready
    return proxy.recorded


async def test_a_recorded_session_replayed_to_a_fresh_rank0_never_gets_in() -> None:
    recorded = await _record_a_session()
    # Hello, Auth, sealed frames
    r0, _answer = await _rank0_sent(recorded[TO_RANK0], drain_s=2)
    assert r0.state == "handshake_timeout", r0.path
    assert isinstance(r0.error, HandshakeTimeout)
    assert "bad_key" in str(r0.error), r0.error


async def test_a_recorded_session_replayed_to_a_fresh_rank1_never_gets_in() -> None:
    recorded = await _record_a_session()
    # the fresh Hello is answered with the old Challenge, ...
    r1 = await _joiner_answered_with(recorded[TO_JOINER], drain_s=2)
    assert r1.state == "handshake_rejected", r1.path
    assert isinstance(r1.error, HandshakeRejected)
    assert r1.error.reason is RejectReason.BAD_KEY and not r1.error.remote


# --------------------------------------------------------------------------- old version

#: Protocol 1's frames, as its ranks send them (docs/protocol.md, `hello-v1`; the
#: CHALLENGE is protocol 1's documented vector).
V1_HELLO = bytes.fromhex(
    "434601010000003c0001101112131415161718191a1b1c1d1e1f0102303132333435363738393a3b"
    "3c3d3e3f000e636c757374657266736d2f302e3117979cfe362a0000")
V1_CHALLENGE = bytes.fromhex(
    "43460102000000430001202122232425262728292a2b2c2d2e2f02404142434445464748494a4b4c4d"
    "4e4fe155f77c23b6e92ba41b6684b0f3137576adb04d02bbc06e3f3f7a82bae20bc6")
#: Protocol 2's (the build whose APP_DATA frame carried 65533 app bytes, so that it
#: refuses a protocol 3 rank's 64 KiB frame as OVERSIZE): docs/protocol.md `hello-v2`,
#: and the CHALLENGE protocol 2 documented for the same inputs.
V2_HELLO = bytes.fromhex(
    "434601010000003c0002101112131415161718191a1b1c1d1e1f0102303132333435363738393a3b"
    "3c3d3e3f000e636c757374657266736d2f302e3117979cfe362a0000")
V2_CHALLENGE = bytes.fromhex(
    "43460102000000430002392d174a38b3b1beafaf1fe824870841c5fa531bc6eafdb6402c124664488c"
    "1c31c53706c19d3817bccc2190d300c6e7b489ae9a5ef6d305bff8775aa85aabe6b8")


@pytest.mark.parametrize(("hello", "version"), [(V1_HELLO, 1), (V2_HELLO, 2)],
                         ids=["v1", "v2"])
async def test_an_older_joiner_is_refused_by_version_in_a_frame_it_decodes(
    hello: bytes, version: int,
) -> None:
    r0, received = await _rank0_sent(hello, drain_s=3)
    [reject] = [decode_message(f) for f in FrameDecoder().feed(received)]
    assert isinstance(reject, Reject) and reject.reason is RejectReason.VERSION_MISMATCH
    assert f"speaks {version}" in reject.detail
    assert r0.state == "handshake_timeout" and "version_mismatch" in str(r0.error)


@pytest.mark.parametrize("answer", [V1_CHALLENGE, encode_message(
    Reject(RejectReason.VERSION_MISMATCH, "joiner speaks 3, we speak 1")), V2_CHALLENGE,
    encode_message(Reject(RejectReason.VERSION_MISMATCH, "joiner speaks 3, we speak 2"))],
    ids=["v1-challenge", "v1-reject", "v2-challenge", "v2-reject"])
async def test_an_older_coordinator_ends_the_joiner_in_a_version_refusal(
    answer: bytes,
) -> None:
    r1 = await _joiner_answered_with(answer, drain_s=3)
    assert r1.state == "handshake_rejected", r1.path
    assert isinstance(r1.error, HandshakeRejected)
    assert r1.error.reason is RejectReason.VERSION_MISMATCH


# ---------------------------------------------- every state that reads the link (in memory)


class TamperingStream(trio.abc.Stream):
    """Rank 1's end of an in-memory connection: flips a bit in the first sealed frame
    that arrives while ``when()`` is true (frame-aware, so chunking does not matter)."""

    def __init__(self, inner: trio.abc.Stream, when: Callable[[], bool]) -> None:
        self.inner = inner
        self.when = when
        self.done = False
        self._decoder = FrameDecoder()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        while True:
            data = await self.inner.receive_some(max_bytes)
            if not data:
                return data
            out = b""
            for frame in self._decoder.feed(bytes(data)):
                raw = encode_message_frame(frame.type, frame.payload)
                if (frame.type is ClusterMsgType.SEALED and not self.done
                        and self.when()):
                    self.done = True
                    raw = raw[:-1] + bytes([raw[-1] ^ 0x01])
                out += raw
            if out:
                return out

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize("state", ["handshaking", "awaiting_session", "exchanging_bootstrap",
                                   "initializing_group", "confirming_group", "ready"])
async def test_every_state_reading_the_link_ends_in_link_tampered(
    autojump_clock: Any, state: str,
) -> None:
    from clusterfsm.states.testing import MemoryNetwork
    from tests.cluster_harness import RankResult, config
    from tests.cluster_harness import run_rank as run_memory_rank

    r0, r1 = RankResult(0), RankResult(1)
    streams: list[TamperingStream] = []

    def pair() -> tuple[trio.abc.Stream, trio.abc.Stream]:
        from trio.testing import memory_stream_pair

        a, b = memory_stream_pair()  # a: the connecting side, rank 1
        streams.append(TamperingStream(a, lambda: r1.state == state))
        return streams[-1], b

    async def stay(_cluster: Any) -> None:
        await trio.sleep(5)

    network = MemoryNetwork(stream_pair=pair)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: run_memory_rank(network, config(0), r0, in_ready=stay))
        await run_memory_rank(network, config(1), r1, in_ready=stay)
    assert streams and streams[0].done
    assert r1.path[-2:] == [state, "link_tampered"], r1.path
    assert isinstance(r1.error, LinkTampered) and r1.error.kind is TamperKind.FORGED
    assert r0.state != "ready"
