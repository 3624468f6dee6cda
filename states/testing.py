"""Test doubles for the cluster machine, kept out of the production modules.

As ``trio.testing`` is to trio: tests, benchmarks and embedders' own tests import
this module; the production path (``serve``, :func:`clusterfsm.states.api.bootstrap_cluster`
with its defaults) never does, and a test checks that. What is here:

- the network: :class:`MemoryNetwork` (an in-process loopback, deterministic under
  ``MockClock``) and its :class:`MemoryTransport` / :class:`MemoryListener`, which
  stand in for :class:`~states.transport.TcpTransport`;
- discovery: :class:`MemoryLinks` (named links between nodes' interfaces) and its
  :class:`MemoryDiscoveryNet` / :class:`MemoryBeaconSocket`, for
  :class:`~states.discovery.UdpDiscoveryNet`;
- group init: :func:`fake_initializer`, which takes the real path up to the MLX call
  and returns a :class:`FakeGroup`;
- the data-plane port: :class:`FakePortReservation`, which binds nothing.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import attrs
import trio
from trio.testing import memory_stream_pair

from clusterfsm.states.config import Address
from clusterfsm.states.errors import BackendUnavailable, InterfaceUnavailable
from clusterfsm.states.groupinit import (
    Group,
    GroupInitializer,
    InitializedGroups,
    InitPlan,
    _in_worker_thread,
)
from clusterfsm.states.initledger import InitLedger, NoLedger
from clusterfsm.states.linkwatch import LinkEvents
from clusterfsm.states.netif import InterfaceInfo, InterfaceStatus
from clusterfsm.states.sidechannel import AllGatherFactory
from clusterfsm.states.transport import BindFailed, Conn

# -- the network --------------------------------------------------------------------


#: Makes the two ends of one in-memory connection.
StreamPairFactory = Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]]


class MemoryListener:
    def __init__(self, network: MemoryNetwork, address: Address) -> None:
        self.address = address
        self._network = network
        self._send, self._receive = trio.open_memory_channel[Conn](math.inf)

    async def accept(self) -> Conn:
        return await self._receive.receive()

    async def aclose(self) -> None:
        self._network._listeners.pop(self.address, None)
        self._send.close()
        self._receive.close()


class MemoryNetwork:
    """A loopback network in one process: deterministic under ``MockClock``.

    Each node has its own host name; ``connect`` to an address nobody listens on
    raises ``ConnectionRefusedError`` like TCP does. Connections are
    ``trio.testing.memory_stream_pair`` (which checks for misuse, at some cost) unless
    ``stream_pair`` makes them otherwise (the scale benchmark's cheaper pipes).
    """

    def __init__(self, stream_pair: StreamPairFactory | None = None) -> None:
        self._listeners: dict[Address, MemoryListener] = {}
        self._next_port = 40000
        self._stream_pair = stream_pair

    def transport(self, host: str) -> MemoryTransport:
        return MemoryTransport(self, host)


class MemoryTransport:
    def __init__(self, network: MemoryNetwork, host: str) -> None:
        self.network = network
        self.host = host

    @asynccontextmanager
    async def listen(self, address: Address, interface: str | None = None
                     ) -> AsyncIterator[MemoryListener]:
        if address.port == 0:
            self.network._next_port += 1
            address = Address(address.host, self.network._next_port)
        if address in self.network._listeners:
            raise BindFailed(str(address), "address already in use")
        listener = MemoryListener(self.network, address)
        self.network._listeners[address] = listener
        try:
            yield listener
        finally:
            await listener.aclose()

    async def connect(self, address: Address, interface: str | None = None) -> Conn:
        await trio.lowlevel.checkpoint()
        listener = self.network._listeners.get(address)
        if listener is None:
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"nobody listens on {address}")
        self.network._next_port += 1
        mine = Address(self.host, self.network._next_port)
        if self.network._stream_pair is not None:
            a, b = self.network._stream_pair()
        else:
            a, b = memory_stream_pair()
        listener._send.send_nowait(Conn(b, address.host, str(mine)))
        return Conn(a, self.host, str(address))


# -- discovery ----------------------------------------------------------------------


class MemoryBeaconSocket:
    def __init__(self, bus: MemoryLinks, host: str, interface: str, link: str) -> None:
        self.interface = interface
        self._bus, self._host, self._link = bus, host, link
        self._send, self._receive = trio.open_memory_channel[tuple[bytes, str]](math.inf)

    async def broadcast(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        for other in self._bus.members.get(self._link, []):
            if other is not self and self._link not in self._bus.down:
                if self._bus.loss and self._bus.rng.random() < self._bus.loss:
                    continue  # a lossy link (seeded): beacons must be repeated
                other._send.send_nowait((data, self._host))

    async def receive(self) -> tuple[bytes, str]:
        return await self._receive.receive()


class MemoryLinks:
    """In-memory links for deterministic tests: nodes' interfaces attached to named
    links; a broadcast reaches every other socket on the same link."""

    def __init__(self, *, loss: float = 0.0, seed: int = 0) -> None:
        self.members: dict[str, list[MemoryBeaconSocket]] = {}
        self.down: set[str] = set()
        self.loss = loss
        self.rng = random.Random(seed)
        self.changed = trio.Event()

    def pull(self, link: str) -> None:
        """Pull the cable of ``link`` (both ends lose carrier); link watchers wake."""
        self.down.add(link)
        self._changed()

    def plug(self, link: str) -> None:
        self.down.discard(link)
        self._changed()

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def node(self, host: str, attached: dict[str, str]) -> MemoryDiscoveryNet:
        """A node ``host`` whose interface ``name`` is on link ``attached[name]``."""
        return MemoryDiscoveryNet(self, host, attached)


class MemoryLinkEvents:
    """Wakes when a test pulls or plugs a memory link."""

    kind = "memory"

    def __init__(self, bus: MemoryLinks) -> None:
        self._bus = bus

    async def changed(self) -> None:
        await self._bus.changed.wait()


class MemoryDiscoveryNet:
    def __init__(self, bus: MemoryLinks, host: str, attached: dict[str, str]) -> None:
        self._bus, self._host, self._attached = bus, host, attached

    def probe(self, interface: str) -> InterfaceInfo:
        link = self._attached.get(interface)
        if link is None:
            raise InterfaceUnavailable(interface, "no such interface")
        if link in self._bus.down:
            raise InterfaceUnavailable(interface, "no carrier: the cable is out or the "
                                       "peer's end is down")
        return InterfaceInfo(interface, 1, self._host)

    def status(self, interface: str) -> InterfaceStatus:
        link = self._attached.get(interface)
        if link is None:
            return InterfaceStatus(interface, exists=False)
        carrier = link not in self._bus.down
        return InterfaceStatus(interface, True, 1, True, carrier,
                               self._host if carrier else None, 1500)

    @asynccontextmanager
    async def link_events(self) -> AsyncIterator[LinkEvents]:
        await trio.lowlevel.checkpoint()
        yield MemoryLinkEvents(self._bus)

    @asynccontextmanager
    async def beacon_socket(self, interface: str, port: int
                            ) -> AsyncIterator[MemoryBeaconSocket]:
        link = self._attached[interface]
        sock = MemoryBeaconSocket(self._bus, self._host, interface, link)
        self._bus.members.setdefault(link, []).append(sock)
        try:
            yield sock
        finally:
            self._bus.members[link].remove(sock)


# -- group init ---------------------------------------------------------------------


@attrs.frozen
class FakeGroup:
    """A stand-in group for deterministic tests and the scale benchmark."""

    _rank: int
    _size: int

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def fake_initializer(
    *,
    size: int | None = None,
    error: str | None = None,
    unavailable: str | None = None,
    plan_check: Callable[[InitPlan], Awaitable[None]] | None = None,
    side_channel_rounds: int = 0,
    side_channel_supported: bool = True,
    groups: InitializedGroups | None = None,
    mlx_version: str | None = None,
    backends: tuple[str, ...] | None = None,
    ledger: InitLedger | None = None,
) -> GroupInitializer:
    """A :class:`GroupInitializer` that takes the real path up to the MLX call.

    It reads back the env the real call would see (``MLX_RANK``, the topology file)
    and returns a :class:`FakeGroup`; ``error`` makes it raise like a failed init,
    ``size`` overrides the group size, ``unavailable`` fails the backend check.
    ``plan_check`` replaces the system checks (default: the matrix rules only).
    ``mlx_version`` is the version it reports for the cross-rank comparison (default:
    the installed one, so it fits real ``serve`` processes). ``backends`` are the ones
    its backend check accepts (default: every one), e.g. ``("ring",)`` to play an MLX
    build without jaccl, as on Linux.

    With ``side_channel_rounds`` (jaccl) it behaves like jaccl's init instead: it runs
    in a real worker thread and does that many all-gather rounds through the factory
    it is given, checking every answer, as MLX would. Several such ranks in one
    process share the process env, so it takes its rank from the side channel.

    A fake rank keeps no jaccl init ledger unless given one (``ledger``, e.g. in a
    test's temporary directory, with a fake boot time): its init reaches no RDMA.

    Each fake rank is its own "process" for MLX's one-group-per-process rule: it gets
    a fresh :class:`~states.groupinit.InitializedGroups` unless ``groups`` is given
    (pass one record to two bootstraps to play a second bootstrap in one process).
    """

    def init_fn(backend: str, factory: AllGatherFactory | None) -> Group:
        if error is not None:
            raise RuntimeError(error)
        if side_channel_rounds and factory is not None:
            return _fake_jaccl_rounds(factory, side_channel_rounds)
        if "MLX_RANK" not in os.environ:
            # As MLX: a non-strict init with no group to join (world size 1, where
            # every backend variable is cleared) gives the single-process group.
            return FakeGroup(0, 1 if size is None else size)
        rank = int(os.environ["MLX_RANK"])
        path = os.environ["MLX_HOSTFILE" if backend == "ring" else "MLX_IBV_DEVICES"]
        with open(path) as f:
            world = len(json.load(f))
        return FakeGroup(rank, world if size is None else size)

    async def direct(fn: Callable[[], Group]) -> Group:
        # Like the real call, nothing else runs while it reads the process-global
        # env: several fake ranks can share one process.
        group = fn()
        await trio.lowlevel.checkpoint()
        return group

    def precheck(backend: str) -> None:
        if unavailable is not None:
            raise BackendUnavailable(backend, unavailable)
        if backends is not None and backend not in backends:
            raise BackendUnavailable(backend, f"this fake MLX has only {', '.join(backends)}")

    async def matrix_only(plan: InitPlan) -> None:
        if plan.backend == "jaccl":
            from clusterfsm.states.topology import check_matrix

            check_matrix(plan.topology, plan.world_size)
        await trio.lowlevel.checkpoint()

    return GroupInitializer(init_fn, _in_worker_thread if side_channel_rounds else direct,
                            precheck, prepare=lambda: None,
                            plan_check=plan_check or matrix_only,
                            side_channel_supported=lambda: side_channel_supported,
                            groups=groups if groups is not None else InitializedGroups(),
                            mlx_version=(lambda: mlx_version) if mlx_version else None,
                            first_listener=_no_listener_wait,
                            ledger=ledger if ledger is not None else NoLedger())


async def _no_listener_wait(_plan: InitPlan) -> None:
    """Fake ranks have no MLX listener to wait for."""
    await trio.lowlevel.checkpoint()


def _fake_jaccl_rounds(factory: AllGatherFactory, rounds: int) -> Group:
    """What jaccl's init does with the factory: all-gathers of growing size."""
    channel = factory.__self__  # type: ignore[attr-defined]  # a bound JacclSideChannel method
    rank, size = channel.rank, channel.world_size
    gather = factory(rank, size)
    for r in range(rounds):
        n = 1 + 37 * r
        mine = bytes([rank]) * n
        got = gather(mine, n)
        expected = b"".join(bytes([i]) * n for i in range(size))
        if got != expected:
            raise RuntimeError(f"all-gather round {r} returned the wrong bytes")
    return FakeGroup(rank, size)


# -- the data-plane port ------------------------------------------------------------


class FakePortReservation:
    """For in-memory tests: hands out distinct numbers, binds nothing."""

    _next = 50000

    def __init__(self, host: str) -> None:
        FakePortReservation._next += 1
        self.port = FakePortReservation._next

    def release(self) -> None:
        return None
