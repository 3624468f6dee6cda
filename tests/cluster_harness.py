"""Run several ranks of the real bootstrap machine in one process, deterministically.

Real activities, real codec and handshake, an in-memory network, a fake group
initializer that takes the real path up to the MLX call, no watchdog process, and a
MockClock (pytest-trio's ``autojump_clock``) so deadlines cost no real time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from clusterfsm.states.api import bootstrap_cluster
from clusterfsm.states.config import Address, ClusterConfig
from clusterfsm.states.discovery import DiscoveryNet
from clusterfsm.states.groupinit import GroupInitializer
from clusterfsm.states.testing import FakePortReservation, MemoryNetwork, fake_initializer
from clusterfsm.states.watchdog import NoWatchdog

if TYPE_CHECKING:
    from clusterfsm.states.handshake import JoinerHandshake
    from clusterfsm.states.link import ControlLink

KEY = b"k" * 32
COORD = Address("node0", 7700)


def config(rank: int, world: int = 2, **kw: Any) -> ClusterConfig:
    base: dict[str, Any] = {
        "rank": rank, "world_size": world, "key": KEY,
        "listen": COORD if rank == 0 else None,
        "peers": () if rank == 0 else (COORD,),
    }
    base.update(kw)
    return ClusterConfig(**base)


@attrs.define
class RankResult:
    rank: int
    state: str = ""
    error: BaseException | None = None
    path: list[str] = attrs.field(factory=list)
    group_size: int = 0
    #: When (trio clock) each state was last entered.
    entered: dict[str, float] = attrs.field(factory=dict)
    #: The note (``note_outcome``) of each state's step, by the state it left.
    notes: dict[str, str] = attrs.field(factory=dict)


async def run_rank(
    network: MemoryNetwork,
    cfg: ClusterConfig,
    result: RankResult,
    *,
    initializer: GroupInitializer | None = None,
    in_ready: Callable[[Any], Awaitable[None]] | None = None,
    host: str | None = None,
    discovery_net: DiscoveryNet | None = None,
) -> None:
    """Bootstrap one rank; record where it ended. ``in_ready`` runs while ready."""
    def observe(rec: Any) -> None:
        result.path.append(rec.dest)
        result.state = rec.dest
        result.entered[rec.dest] = trio.current_time()
        if rec.note is not None:
            result.notes[rec.source] = rec.note

    try:
        async with bootstrap_cluster(
            cfg,
            transport=network.transport(host or f"node{cfg.rank}"),
            initializer=initializer or fake_initializer(),
            watchdog=NoWatchdog(),
            allocate_port=FakePortReservation,
            observers=[observe],
            discovery_net=discovery_net,
        ) as cluster:
            result.group_size = cluster.group.size()
            if in_ready is not None:
                await in_ready(cluster)
            result.error = cluster.error
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        result.error = exc


async def run_ranks(
    configs: list[ClusterConfig],
    *,
    initializers: dict[int, GroupInitializer] | None = None,
    in_ready: Callable[[Any], Awaitable[None]] | None = None,
    network: MemoryNetwork | None = None,
    extra: Callable[[trio.Nursery, MemoryNetwork], None] | None = None,
) -> list[RankResult]:
    network = network or MemoryNetwork()
    results = [RankResult(c.rank) for c in configs]
    if in_ready is None:
        # Hold every rank in ``ready`` until all are there, as an app would: a rank
        # that closes at once is (correctly) a lost peer for the slower ones.
        arrived: list[int] = []
        everyone = trio.Event()

        async def all_ready(cluster: Any) -> None:
            arrived.append(cluster.rank)
            if len(arrived) == len(configs):
                everyone.set()
            with trio.move_on_after(5):
                await everyone.wait()

        in_ready = all_ready
    async with trio.open_nursery() as nursery:
        if extra is not None:
            extra(nursery, network)
        for cfg, res in zip(configs, results, strict=True):
            nursery.start_soon(
                lambda c=cfg, r=res: run_rank(
                    network, c, r, initializer=(initializers or {}).get(c.rank),
                    in_ready=in_ready))
    return results


async def handshaken_joiner(network: MemoryNetwork, key: bytes = KEY
                            ) -> tuple[ControlLink, JoinerHandshake]:
    """A scripted rank 1 (world 2) that dials rank 0 until it listens and does a real
    handshake; the link is not started. For tests that then send what a real rank
    would not."""
    from clusterfsm.states.admission import drive_handshake
    from clusterfsm.states.handshake import JoinerHandshake
    from clusterfsm.states.link import ControlLink

    transport = network.transport("node1")
    while True:
        try:
            conn = await transport.connect(COORD)
            break
        except ConnectionRefusedError:
            await trio.sleep(0.01)  # rank 0 not listening yet (mock clock: no real time)
    link = ControlLink(conn, peer_rank=0)
    hs = JoinerHandshake(key, b"\x02" * 16, 1, 2, 9000, peer=conn.remote)
    await link.send(hs.start())
    await drive_handshake(link, hs)
    assert hs.session_id is not None
    return link, hs
