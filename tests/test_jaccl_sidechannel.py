"""jaccl's all-gather side channel over real TCP control links, without MLX.

MLX calls the all-gather from the thread that runs ``init`` (holding the GIL); these
tests call it the same way, from trio worker threads, so the bridge to the trio loop
(``trio.from_thread.run``) is exercised for real, over loopback TCP, with 2, 3 and 4
ranks: first the side channel alone, then the whole machine with ``--backend jaccl``
up to the MLX call (discovery beacons on in-memory links; control links on TCP bound
to ``lo``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from clusterfsm.states.api import bootstrap_cluster
from clusterfsm.states.codec import Ping
from clusterfsm.states.config import Address, ClusterConfig
from clusterfsm.states.context import PortReservation
from clusterfsm.states.errors import PeerDisconnected, PrecheckFailed
from clusterfsm.states.link import ControlLink
from clusterfsm.states.sidechannel import JacclSideChannel, SideChannelError
from clusterfsm.states.testing import MemoryLinks, fake_initializer
from clusterfsm.states.transport import TcpTransport
from clusterfsm.states.watchdog import NoWatchdog
from tests.tcp_harness import KEY, MLX_ENV

SESSION = b"S" * 16


@pytest.fixture(autouse=True)
def restore_mlx_env() -> Iterator[None]:
    """Several ranks in one process overlap their (process-global) env blocks."""
    saved = {name: os.environ.get(name) for name in MLX_ENV}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@asynccontextmanager
async def star(world: int) -> AsyncIterator[list[dict[int, ControlLink]]]:
    """Real TCP links: rank 0 to every other rank; ``links[r]`` as rank r sees them.
    Every link is closed on the way out (no socket left for the GC)."""
    async with trio.open_nursery() as nursery:
        links = await _star(nursery, world)
        try:
            yield links
        finally:
            with trio.CancelScope(shield=True):
                for per_rank in links:
                    for link in per_rank.values():
                        await link.aclose()
            nursery.cancel_scope.cancel()


async def _star(nursery: trio.Nursery, world: int) -> list[dict[int, ControlLink]]:
    transport = TcpTransport()
    links: list[dict[int, ControlLink]] = [{} for _ in range(world)]
    listener = await nursery.start(_serve_listener, transport)
    for rank in range(1, world):
        conn = await transport.connect(listener.address)
        link = ControlLink(conn, peer_rank=0)
        await link.send(Ping(rank))  # says which rank this connection is
        links[rank][0] = link
    for _ in range(1, world):
        conn = await listener.accept()
        link = ControlLink(conn)
        hello = await link.receive()
        assert isinstance(hello, Ping)
        link.peer_rank = hello.seq
        links[0][hello.seq] = link
    for per_rank in links:
        for link in per_rank.values():
            link.start(nursery, heartbeat_interval=0.05)
    return links


async def _serve_listener(transport: TcpTransport,
                          task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    async with transport.listen(Address("127.0.0.1", 0)) as listener:
        task_status.started(listener)
        await trio.sleep_forever()


def mlx_like_rounds(channel: JacclSideChannel, rounds: int) -> list[bytes]:
    """What jaccl does in its thread: the factory, then blocking all-gathers."""
    gather = channel.factory(channel.rank, channel.world_size)
    return [gather(bytes([channel.rank]) * (1 + 50 * r), 1 + 50 * r) for r in range(rounds)]


@pytest.mark.parametrize("world", [2, 3, 4])
async def test_all_gather_over_tcp_from_mlx_style_threads(world: int) -> None:
    with trio.fail_after(20):
        async with star(world) as links:
            channels = [JacclSideChannel(r, world, SESSION, links[r]) for r in range(world)]
            results: dict[int, list[bytes]] = {}

            async def rank(r: int) -> None:
                results[r] = await trio.to_thread.run_sync(mlx_like_rounds, channels[r], 4)

            async with trio.open_nursery() as ranks:
                for r in range(world):
                    ranks.start_soon(rank, r)
    for r in range(4):
        n = 1 + 50 * r
        expected = b"".join(bytes([i]) * n for i in range(world))
        assert all(results[k][r] == expected for k in range(world))


async def test_a_peer_lost_mid_gather_is_typed_not_a_hang() -> None:
    with trio.fail_after(20):
        async with star(3) as links:
            channel = JacclSideChannel(0, 3, SESSION, links[0], round_timeout=5)
            await links[2][0].aclose()  # rank 2 goes away; rank 1 never contributes
            with pytest.raises(SideChannelError):
                await trio.to_thread.run_sync(mlx_like_rounds, channel, 1)
            assert isinstance(channel.failure, PeerDisconnected)


async def test_jaccl_rank_mismatch_is_refused() -> None:
    channel = JacclSideChannel(1, 2, SESSION, {})
    with pytest.raises(SideChannelError, match="rank 0 of 2"):
        channel.factory(0, 2)


@pytest.mark.parametrize("world", [2, 3, 4])
async def test_whole_machine_with_jaccl_side_channel_over_tcp(world: int) -> None:
    """Every rank elected from beacons, the device matrix agreed, and init's
    all-gathers done over the authenticated TCP control links."""
    links = MemoryLinks()
    arrived: list[int] = []
    everyone = trio.Event()
    states: dict[int, str] = {}
    sizes: list[int] = []

    async def node(i: int) -> None:
        config = ClusterConfig(rank=None, world_size=world, key=KEY, backend="jaccl",
                               interfaces=("lo",), node_id=bytes([i + 1]) * 16)
        last = ""
        try:
            async with bootstrap_cluster(
                config, transport=TcpTransport(),
                initializer=fake_initializer(side_channel_rounds=3),
                watchdog=NoWatchdog(), allocate_port=PortReservation,
                discovery_net=links.node("127.0.0.1", {"lo": "mesh"}),
            ) as cluster:
                sizes.append(cluster.group.size())
                arrived.append(i)
                if len(arrived) == world:
                    everyone.set()
                with trio.move_on_after(10):
                    await everyone.wait()
                last = cluster.state
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            last = f"{type(exc).__name__}: {exc}"
        states[i] = last

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(world):
                nursery.start_soon(node, i)
    assert set(states.values()) == {"ready"}, states
    assert sizes == [world] * world


async def test_cancelling_the_state_reaches_a_round_in_mlxs_thread() -> None:
    """The round runs as part of the task waiting for init, so the state's deadline
    (or the app's cancellation) ends it now, not after the round timeout."""
    async with star(2) as links:
        channel = JacclSideChannel(0, 2, SESSION, links[0], round_timeout=30)
        raised: SideChannelError | None = None
        # fail_after only guards against a hang (the round's own timeout is 30 s)
        with trio.fail_after(10), trio.move_on_after(0.3):
            try:
                await trio.to_thread.run_sync(mlx_like_rounds, channel, 1)  # rank 1 silent
            except SideChannelError as exc:  # what MLX sees, and raises out of init
                raised = exc
        assert raised is not None and "cancelled" in str(raised)
        assert isinstance(channel.failure, PrecheckFailed), repr(channel.failure)


async def run_pair(inits: list[Any], init_deadline: float) -> dict[int, str]:
    """Two jaccl ranks over TCP on ``lo``; where each one ended."""
    links = MemoryLinks()
    states: dict[int, str] = {}

    async def node(i: int) -> None:
        config = ClusterConfig(rank=None, world_size=2, key=KEY, backend="jaccl",
                               interfaces=("lo",), node_id=bytes([i + 1]) * 16,
                               deadlines={"initializing_group": init_deadline})
        try:
            async with bootstrap_cluster(
                config, transport=TcpTransport(), initializer=inits[i],
                watchdog=NoWatchdog(), allocate_port=PortReservation,
                discovery_net=links.node("127.0.0.1", {"lo": "mesh"}),
            ) as cluster:
                states[i] = cluster.state
        except Exception as exc:  # noqa: BLE001 - the state is what the test checks
            note = " ".join(getattr(exc, "__notes__", []))
            states[i] = note.rsplit("'", 2)[-2] if "ended in state" in note else repr(exc)

    with trio.fail_after(20):  # a hang guard, not a timing assertion
        async with trio.open_nursery() as nursery:
            for i in range(2):
                nursery.start_soon(node, i)
    return states


async def test_a_silent_peer_in_jaccls_exchange_ends_in_group_init_timeout() -> None:
    """The exchange waiting on a rank that never answers is bounded by the init
    deadline and reported as that (the round is cancelled with its state)."""
    silent = fake_initializer()

    async def never(fn: Any) -> Any:
        await trio.sleep_forever()

    silent.run_blocking = never
    states = await run_pair([fake_initializer(side_channel_rounds=2), silent], 1.0)
    assert states[0] == "group_init_timeout"
    assert states[1] in ("group_init_timeout", "peer_aborted")


async def test_a_peer_that_skips_jacclss_exchange_is_a_protocol_error() -> None:
    """Rank 1 claims its group is up (GROUP_CONFIRM) while rank 0 still waits for its
    all-gather part: a message not allowed there, reported at once."""
    states = await run_pair([fake_initializer(side_channel_rounds=2), fake_initializer()],
                            10.0)
    assert states == {0: "protocol_error", 1: "peer_aborted"}
