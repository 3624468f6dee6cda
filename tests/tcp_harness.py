"""Ranks of the real bootstrap machine in this process, over real TCP on loopback.

For the hostile-input, fault and leak tests: real sockets (so the kernel's behaviour -
resets, half-closed streams, backlog - is the one users get), the real clock with short
deadlines, the real codec/handshake/link, and a fake group initializer that takes the
real path up to the MLX call (env vars, topology file) unless a test passes another.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from clusterfsm.fsm import TraceRecord
from clusterfsm.states.api import Cluster, bootstrap_cluster
from clusterfsm.states.config import Address, ClusterConfig
from clusterfsm.states.groupinit import GroupInitializer
from clusterfsm.states.testing import fake_initializer
from clusterfsm.states.transport import TcpListener, TcpTransport
from clusterfsm.states.watchdog import NoWatchdog

KEY = b"k" * 32
LOOPBACK = "127.0.0.1"
#: The env vars group init touches; every test checks they come back unchanged.
MLX_ENV = ("MLX_RANK", "MLX_HOSTFILE", "MLX_IBV_DEVICES", "MLX_JACCL_COORDINATOR",
           "MLX_JACCL_RING", "JACCL_RANK", "JACCL_IBV_DEVICES", "JACCL_COORDINATOR",
           "JACCL_RING")


def mlx_env() -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in MLX_ENV}


class RecordingTransport(TcpTransport):
    """TCP, remembering the address rank 0 actually bound (it listens on port 0)."""

    def __init__(self) -> None:
        self.bound = trio.Event()
        self.address: Address | None = None

    @asynccontextmanager
    async def listen(self, address: Address) -> AsyncIterator[TcpListener]:
        async with super().listen(address) as listener:
            self.address = listener.address
            self.bound.set()
            yield listener


@attrs.define
class RankRun:
    """Where one rank's run went: its path, final state, error and timings."""

    rank: int
    state: str = ""
    error: BaseException | None = None
    records: list[TraceRecord] = attrs.field(factory=list)
    reached_ready: bool = False
    rejections: list[BaseException] = attrs.field(factory=list)
    topology_dirs: list[Any] = attrs.field(factory=list)

    @property
    def path(self) -> list[str]:
        return [r.dest for r in self.records]

    def observe(self, record: TraceRecord) -> None:
        self.records.append(record)
        self.state = record.dest
        if record.dest == "ready":
            self.reached_ready = True

    def seconds_in(self, state: str) -> float:
        """How long the run stayed in ``state`` (entry to exit, trace clock)."""
        entered = next(r.t for r in self.records if r.dest == state)
        left = next(r.t for r in self.records if r.source == state)
        return left - entered


def rank0_config(world: int = 2, **kw: Any) -> ClusterConfig:
    return ClusterConfig(rank=0, world_size=world, key=KEY,
                         listen=Address(LOOPBACK, 0), **kw)


def joiner_config(rank: int, address: Address, world: int = 2, **kw: Any) -> ClusterConfig:
    return ClusterConfig(rank=rank, world_size=world, key=KEY, peers=(address,), **kw)


async def run_rank(
    cfg: ClusterConfig,
    result: RankRun,
    *,
    transport: TcpTransport | None = None,
    initializer: GroupInitializer | None = None,
    in_ready: Callable[[Cluster], Awaitable[None]] | None = None,
    observers: tuple[Callable[[TraceRecord], None], ...] = (),
) -> None:
    """Bootstrap one rank; record where it ended (never raises the machine's error)."""
    try:
        async with bootstrap_cluster(
            cfg, transport=transport or TcpTransport(),
            initializer=initializer or fake_initializer(), watchdog=NoWatchdog(),
            observers=[result.observe, *observers],
        ) as cluster:
            ctx = cluster._ctx
            result.rejections = list(ctx.rejections)
            if ctx.files is not None:
                result.topology_dirs.append(ctx.files.path)
            if in_ready is not None:
                await in_ready(cluster)
            result.error = cluster.error
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        result.error = exc


def hold_until(event: trio.Event, at_most: float = 5.0) -> Callable[[Cluster], Awaitable[None]]:
    """An ``in_ready`` that keeps the rank in ``ready`` until ``event`` (bounded)."""

    async def hold(cluster: Cluster) -> None:
        with trio.move_on_after(at_most):
            await event.wait()

    return hold


def all_ready(n: int, at_most: float = 5.0) -> Callable[[Cluster], Awaitable[None]]:
    """An ``in_ready`` holding each of ``n`` ranks in ready until all are there."""
    arrived: list[int] = []
    everyone = trio.Event()

    async def hold(cluster: Cluster) -> None:
        arrived.append(cluster.rank)
        if len(arrived) == n:
            everyone.set()
        with trio.move_on_after(at_most):
            await everyone.wait()

    return hold
