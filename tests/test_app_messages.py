"""App messages on the link (states/appmsg.py): order, relay, limits, back-pressure,
and status on heartbeats. Deterministic: in-memory network, MockClock."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import trio

from clusterfsm.states.api import Cluster
from clusterfsm.states.appmsg import (
    INBOX,
    MAX_APP_MESSAGE,
    WINDOW,
    AppLane,
    MessageTooLarge,
    UnknownRank,
)
from clusterfsm.states.codec import MAX_APP_CHUNK, MAX_STATUS, AppData, Message
from clusterfsm.states.errors import FrameError
from clusterfsm.states.seal import Sealer
from tests.cluster_harness import config, run_ranks


def _payload(src: int, i: int, size: int = 16) -> bytes:
    return bytes([src]) + i.to_bytes(4, "big") + bytes(max(0, size - 5))


async def _all(world: int, body: Any) -> list[Any]:
    """Run ``world`` ranks; ``body(cluster, everyone)`` runs in each one's ready."""
    arrived: list[int] = []
    everyone = trio.Event()
    done: list[int] = []
    all_done = trio.Event()

    async def in_ready(cluster: Cluster) -> None:
        arrived.append(cluster.rank)
        if len(arrived) == world:
            everyone.set()
        with trio.fail_after(60):
            await everyone.wait()
            await body(cluster)
            done.append(cluster.rank)
            if len(done) == world:
                all_done.set()
            await all_done.wait()

    return await run_ranks([config(r, world) for r in range(world)], in_ready=in_ready)


async def test_send_is_ordered_per_peer_and_relayed_between_joiners(
        autojump_clock: Any) -> None:
    n = 200
    got: dict[int, list[tuple[int, bytes]]] = {0: [], 1: [], 2: []}

    async def body(cluster: Cluster) -> None:
        async def receive() -> None:
            async for rank, data in cluster.messages():
                got[cluster.rank].append((rank, data))
                if len(got[cluster.rank]) == 2 * n:
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            for i in range(n):
                for peer in range(3):
                    if peer != cluster.rank:
                        await cluster.send(peer, _payload(cluster.rank, i))

    results = await _all(3, body)
    assert [r.state for r in results] == ["closed"] * 3, [r.error for r in results]
    for rank, messages in got.items():
        for src in range(3):
            if src != rank:
                from_src = [d for s, d in messages if s == src]
                assert from_src == [_payload(src, i) for i in range(n)]


async def test_broadcast_and_a_message_of_the_maximum_size(autojump_clock: Any) -> None:
    big = bytes(range(256)) * (MAX_APP_MESSAGE // 256)
    got: dict[int, list[tuple[int, bytes]]] = {1: [], 2: []}

    async def body(cluster: Cluster) -> None:
        if cluster.rank == 0:
            await cluster.broadcast(big)
            await cluster.broadcast(b"")
            with pytest.raises(MessageTooLarge):
                await cluster.send(1, big + b"x")
            for bad in (0, 3, -1):
                with pytest.raises(UnknownRank):
                    await cluster.send(bad, b"x")
        else:
            async for rank, data in cluster.messages():
                got[cluster.rank].append((rank, data))
                if len(got[cluster.rank]) == 2:
                    return

    results = await _all(3, body)
    assert [r.state for r in results] == ["closed"] * 3, [r.error for r in results]
    assert got == {1: [(0, big), (0, b"")], 2: [(0, big), (0, b"")]}


async def test_a_slow_reader_slows_the_sender_and_heartbeats_go_on(
        autojump_clock: Any) -> None:
    """Rank 1 reads nothing for 30 s (ten times peer_lost_after): rank 0's sends stop
    once the window and the inbox are full; nobody is lost; nothing is dropped."""
    n = 500
    sent: list[int] = []
    got: list[bytes] = []

    async def body(cluster: Cluster) -> None:
        if cluster.rank == 0:
            for i in range(n):
                await cluster.send(1, _payload(0, i, 1024))
                sent.append(i)
        else:
            await trio.sleep(30)
            assert cluster.state == "ready"
            # Bounded: at most the window (in flight), the inbox, one being delivered.
            assert WINDOW <= len(sent) <= WINDOW + INBOX + 1
            async for _rank, data in cluster.messages():
                got.append(data)
                if len(got) == n:
                    return

    results = await _all(2, body)
    assert [r.state for r in results] == ["closed"] * 2, [r.error for r in results]
    assert got == [_payload(0, i, 1024) for i in range(n)]


async def test_status_and_rtt_reach_the_peer(autojump_clock: Any) -> None:
    seen: dict[int, Any] = {}

    async def body(cluster: Cluster) -> None:
        cluster.set_status(f"rank {cluster.rank} loaded".encode())
        with pytest.raises(MessageTooLarge):
            cluster.set_status(bytes(MAX_STATUS + 1))
        await trio.sleep(1)  # ten heartbeat intervals
        seen[cluster.rank] = cluster.peers

    results = await _all(2, body)
    assert [r.state for r in results] == ["closed"] * 2, [r.error for r in results]
    assert seen[0][1].status == b"rank 1 loaded"
    assert seen[1][0].status == b"rank 0 loaded"
    for peers in seen.values():
        (info,) = peers.values()
        assert info.rtt is not None and info.rtt >= 0
        assert info.last_heard > 0


async def test_a_64_kib_message_is_one_sealed_frame_on_the_wire(
        autojump_clock: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``cluster.send`` of 64 KiB: one APP_DATA frame sealed (one seal, one credit), the
    whole message in it; one byte more is two. Counted where frames are sealed."""
    sealed: list[tuple[int, int]] = []
    real_seal = Sealer.seal

    def counting(self: Sealer, msg_type: int, payload: bytes) -> bytes:
        sealed.append((msg_type, len(payload)))
        return real_seal(self, msg_type, payload)

    monkeypatch.setattr(Sealer, "seal", counting)
    kib64 = bytes(range(256)) * 256
    got: list[bytes] = []
    app_frames: list[list[int]] = []

    async def body(cluster: Cluster) -> None:
        if cluster.rank == 0:
            for data in (kib64, kib64 + b"x"):
                before = len(sealed)
                await cluster.send(1, data)
                app_frames.append([n for t, n in sealed[before:] if t == AppData.TYPE])
        else:
            async for _rank, data in cluster.messages():
                got.append(data)
                if len(got) == 2:
                    return

    results = await _all(2, body)
    assert [r.state for r in results] == ["closed"] * 2, [r.error for r in results]
    assert got == [kib64, kib64 + b"x"]
    assert app_frames == [[3 + 65536], [3 + MAX_APP_CHUNK, 3 + 1]]


async def test_a_lane_sends_a_whole_chunk_in_one_frame() -> None:
    link = _Link()
    lane = AppLane(link, window=4)
    await lane.send(0, 1, bytes(65536))
    assert link.sent == [AppData(0, 1, False, bytes(65536))]
    await lane.send(0, 1, bytes(MAX_APP_CHUNK + 1))
    assert [(m.more, len(m.body)) for m in link.sent[1:]] == [  # type: ignore[attr-defined]
        (True, MAX_APP_CHUNK), (False, 1)]


class _Link:
    peer = "peer:1"

    def __init__(self) -> None:
        self.failed = trio.Event()
        self.failure: BaseException | None = None
        self.sent: list[Message] = []

    async def send(self, msg: Message) -> None:
        self.sent.append(msg)
        await trio.lowlevel.checkpoint()

    async def send_many(self, msgs: Sequence[Message]) -> None:
        for msg in msgs:
            await self.send(msg)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_a_peer_sending_beyond_its_credit_breaks_the_protocol() -> None:
    lane = AppLane(_Link(), window=4)
    for _ in range(4):
        lane.received(AppData(1, 0, False, b"x"))
    with pytest.raises(FrameError, match="credit"):
        lane.received(AppData(1, 0, False, b"x"))


async def test_credit_beyond_what_is_in_flight_breaks_the_protocol() -> None:
    link = _Link()
    lane = AppLane(link, window=4)
    await lane.send(0, 1, b"a")
    lane.credited(1)
    with pytest.raises(FrameError, match="in flight"):
        lane.credited(1)


async def test_a_sender_waits_for_credit(autojump_clock: Any) -> None:
    link = _Link()
    lane = AppLane(link, window=2)
    with trio.move_on_after(1) as scope:
        for _ in range(3):
            await lane.send(0, 1, b"m")
    assert scope.cancelled_caught and len(link.sent) == 2
    lane.credited(2)
    await lane.send(0, 1, b"m")
    assert len(link.sent) == 3


async def test_a_cancelled_send_leaves_no_half_message(autojump_clock: Any) -> None:
    """A two-chunk message waits for credit for both chunks; cancelled meanwhile,
    nothing of it is sent; with the credit it goes out whole."""
    link = _Link()
    lane = AppLane(link, window=3)
    await lane.send(0, 1, b"a")
    await lane.send(0, 1, b"b")
    big = bytes(MAX_APP_CHUNK + 1)
    with trio.move_on_after(1) as scope:
        await lane.send(0, 1, big)
    assert scope.cancelled_caught and len(link.sent) == 2
    lane.credited(2)
    await lane.send(0, 1, big)
    assert [m.more for m in link.sent[2:]] == [True, False]  # type: ignore[attr-defined]
