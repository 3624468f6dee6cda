"""Ranks that start at different times (issue 12, item 2), deterministically.

World size 3: ranks 0 and 1 start together, rank 2 starts 6 to 8 s later, inside rank
0's 15 s handshaking deadline. Rank 1, admitted at once, must stay healthy until rank
2 arrives (rank 0 answers its link meanwhile, and a joiner waits in ``handshaking``
until rank 0's first heartbeat says the session is full). When rank 2 never arrives,
the first error on every rank names it: rank 0's ``handshake_timeout`` says "waiting
for ranks [2]", and its ABORT says so to rank 1.

In-memory network, ``MockClock``, the default deadlines; and once with real ``serve``
processes.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import trio

from clusterfsm.states.api import bootstrap_cluster
from clusterfsm.states.demo import free_port
from clusterfsm.states.errors import HandshakeTimeout, PeerAborted, PeerDisconnected
from clusterfsm.states.testing import FakePortReservation, MemoryNetwork, fake_initializer
from clusterfsm.states.watchdog import NoWatchdog
from tests.cluster_harness import RankResult, config, run_rank
from tests.test_faults import Peers, peers  # noqa: F401 - fixture

WORLD = 3


async def _run(delays: dict[int, float | None]) -> dict[int, RankResult]:
    """Start each rank after its delay (``None``: never); hold ready ranks until all
    started ranks are ready or have failed."""
    network = MemoryNetwork()
    results = {rank: RankResult(rank) for rank in delays}
    started = [r for r, d in delays.items() if d is not None]
    arrived: list[int] = []
    everyone = trio.Event()

    async def hold(cluster: Any) -> None:
        arrived.append(cluster.rank)
        if len(arrived) == len(started):
            everyone.set()
        with trio.move_on_after(5):
            await everyone.wait()

    async def one(rank: int, delay: float) -> None:
        await trio.sleep(delay)
        await run_rank(network, config(rank, WORLD), results[rank], in_ready=hold)

    async with trio.open_nursery() as nursery:
        for rank in started:
            nursery.start_soon(one, rank, delays[rank])
    return results


@pytest.mark.parametrize("late", [6.0, 7.0, 8.0, 14.0])
async def test_a_late_rank_inside_rank0s_deadline_gets_everyone_ready(
    autojump_clock: Any, late: float,
) -> None:
    results = await _run({0: 0.0, 1: 0.0, 2: late})
    for rank, result in results.items():
        assert result.error is None and "ready" in result.path, (rank, result.path,
                                                                 result.error)


async def test_an_early_joiner_waits_in_handshaking_answering_rank0(
    autojump_clock: Any,
) -> None:
    """Rank 1 leaves handshaking only once the session is full (rank 2 at 7 s)."""
    network = MemoryNetwork()
    r0, r2 = RankResult(0), RankResult(2)
    entered: dict[str, float] = {}
    state: list[str] = []

    async def late() -> None:
        await trio.sleep(7.0)
        await run_rank(network, config(2, WORLD), r2)

    async def rank1() -> None:
        def observe(record: Any) -> None:
            entered.setdefault(record.dest, trio.current_time())

        async with bootstrap_cluster(
            config(1, WORLD), transport=network.transport("node1"),
            initializer=fake_initializer(), watchdog=NoWatchdog(),
            allocate_port=FakePortReservation, observers=[observe],
        ) as cluster:
            state.append(cluster.state)

    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_rank, network, config(0, WORLD), r0)
        nursery.start_soon(rank1)
        nursery.start_soon(late)
    assert state == ["ready"], entered
    assert entered["awaiting_session"] - t0 >= 7.0, entered


async def test_a_rank_that_never_arrives_is_named_on_every_rank(autojump_clock: Any) -> None:
    results = await _run({0: 0.0, 1: 0.0, 2: None})
    r0, r1 = results[0], results[1]
    assert r0.state == "handshake_timeout" and isinstance(r0.error, HandshakeTimeout)
    assert "waiting for ranks [2]" in str(r0.error)
    # Rank 1's first (and only) error is rank 0's verdict, naming rank 2.
    assert r1.state == "peer_aborted", r1.path
    assert isinstance(r1.error, PeerAborted) and r1.error.rank == 0
    assert r1.error.error == "HandshakeTimeout"
    assert "waiting for ranks [2]" in str(r1.error)
    assert r1.path.count("peer_aborted") == 1


async def test_an_admitted_rank_that_leaves_may_come_back(autojump_clock: Any) -> None:
    """Rank 1 is admitted, its process dies (EOF), a new rank 1 joins: no failure."""
    network = MemoryNetwork()
    results = {r: RankResult(r) for r in range(WORLD)}
    gone = RankResult(1)

    async def first_rank1() -> None:
        with trio.move_on_after(2.0):  # dies (cancelled) while waiting for rank 2
            await run_rank(network, config(1, WORLD), gone)

    async def later(rank: int, delay: float) -> None:
        await trio.sleep(delay)
        await run_rank(network, config(rank, WORLD), results[rank])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_rank, network, config(0, WORLD), results[0])
        nursery.start_soon(first_rank1)
        nursery.start_soon(later, 1, 4.0)
        nursery.start_soon(later, 2, 5.0)
    assert gone.path[-1] == "cancelled", gone.path
    for rank, result in results.items():
        assert "ready" in result.path, (rank, result.path, result.error)
    assert not isinstance(results[0].error, PeerDisconnected)


@pytest.mark.integration
def test_staggered_serve_processes_all_get_ready(
        peers: Peers) -> None:  # noqa: F811 - the fixture
    """The same with real ``serve`` processes (MLX ring over loopback), shortened:
    awaiting_session 1 s, rank 2 starts 2.5 s after ranks 0 and 1 (before the fix,
    rank 1 ended in ``session_unavailable`` 1 s after its own handshake)."""
    port = free_port()
    short = ("--world-size", "3", "--deadline", "handshaking=8",
             "--deadline", "awaiting_session=1")
    first = [peers.serve("--rank", "0", "--listen", f"127.0.0.1:{port}", "--once", *short),
             peers.serve("--rank", "1", "--peer", f"127.0.0.1:{port}", "--once", *short)]
    time.sleep(2.5)  # the stagger itself, not a wait for something to happen
    late = peers.serve("--rank", "2", "--peer", f"127.0.0.1:{port}", "--once", *short)
    for rank, proc in enumerate([*first, late]):
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, (rank, out, err)
