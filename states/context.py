"""The run's shared context: what the bootstrap activities learn and hand on.

One :class:`ClusterContext` lives for one bootstrap run of one rank. Activities read
the configuration and the injected parts (transport, group initializer, watchdog,
port allocator) from it, and write what they learn (links, session id, plan, group).
Background tasks (link readers, heartbeats) live in :attr:`nursery`, owned by
:func:`clusterfsm.states.api.bootstrap_cluster`, so they span states but never outlive the run.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Protocol

import attrs
import trio

from clusterfsm.states.appmsg import AppRouter
from clusterfsm.states.beats import Beats
from clusterfsm.states.config import Address, ClusterConfig
from clusterfsm.states.dataplane import reservation_host
from clusterfsm.states.discovery import DiscoveryNet, UdpDiscoveryNet
from clusterfsm.states.groupinit import Group, GroupInitializer, InitPlan, TopologyDir
from clusterfsm.states.link import ControlLink
from clusterfsm.states.transport import Listener, Transport
from clusterfsm.states.watchdog import InitWatchdog, NoWatchdog


class PortReservation:
    """A data-plane port held for this session until the group is up.

    The socket is bound (not listening) with ``SO_REUSEPORT``, as MLX's ring listener
    is, so MLX can bind the same port while no other program can take it meanwhile.
    ``host`` is the control link's local host; the port is held on the IPv4 address
    the ring uses for it (:func:`clusterfsm.states.dataplane.reservation_host`: MLX's
    ring is ``AF_INET`` only, whatever family the control link uses).
    """

    def __init__(self, host: str) -> None:
        self._sock: socket.socket | None = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self._sock.bind((reservation_host(host), 0))
        self.port: int = self._sock.getsockname()[1]

    def release(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Reservation(Protocol):
    """A data-plane port held until the group is up (:class:`PortReservation`, or a
    test's stand-in that binds nothing)."""

    port: int

    def release(self) -> None: ...


#: Reserves a data-plane port on the given local host.
PortAllocator = Callable[[str], Reservation]


@attrs.define
class ClusterContext:
    """Everything one rank's bootstrap run shares between its states."""

    config: ClusterConfig
    transport: Transport
    initializer: GroupInitializer
    nursery: trio.Nursery
    watchdog: InitWatchdog | NoWatchdog = attrs.field(factory=NoWatchdog)
    allocate_port: PortAllocator = PortReservation
    trace_path: str | None = None
    exits: AsyncExitStack = attrs.field(factory=AsyncExitStack)
    discovery_net: DiscoveryNet = attrs.field(factory=UdpDiscoveryNet)
    #: Random per run: tells our own looped-back beacons from a copied node id's.
    instance: bytes = attrs.field(factory=lambda: secrets.token_bytes(8))

    # learned along the way
    listener: Listener | None = None
    links: dict[int, ControlLink] = attrs.field(factory=dict)
    session_id: bytes | None = None
    hosts: dict[int, str] = attrs.field(factory=dict)
    data_ports: dict[int, int] = attrs.field(factory=dict)
    reservation: Reservation | None = None
    rejections: list[BaseException] = attrs.field(factory=list)
    plan: InitPlan | None = None
    files: TopologyDir | None = None
    group: Group | None = None
    close_requested: trio.Event = attrs.field(factory=trio.Event)
    #: Interface discovery: every node's rank (ours included), where to dial rank
    #: 0, which of our interfaces reached which peer, and the beacons' cancel scope.
    node_ranks: dict[bytes, int] = attrs.field(factory=dict)
    dial_targets: list[tuple[Address, str | None]] = attrs.field(factory=list)
    peer_interfaces: dict[bytes, tuple[str, ...]] = attrs.field(factory=dict)
    #: Interface discovery: each peer's address on each of our interfaces that heard it.
    peer_addresses: dict[bytes, dict[str, str]] = attrs.field(factory=dict)
    listeners_by_interface: dict[str, Listener] = attrs.field(factory=dict)
    beacons: trio.CancelScope | None = None
    #: In ``ready``: app messages (made on first use, :meth:`app`), the off-loop
    #: heartbeat thread (None on links without real sockets), the app's status.
    router: AppRouter | None = None
    beats: Beats | None = None
    status: bytes = b""
    #: Set by ``ready`` once heartbeats run: from then on the app may block its loop.
    serving: trio.Event = attrs.field(factory=trio.Event)

    @property
    def rank(self) -> int:
        """The configured rank, or the elected one once discovery decided it."""
        if self.config.rank is not None:
            return self.config.rank
        if self.config.node_id not in self.node_ranks:
            raise RuntimeError("the rank is not elected yet (still discovering)")
        return self.node_ranks[self.config.node_id]

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    @property
    def world_size(self) -> int:
        return self.config.world_size

    def mark_links(self, state: str) -> None:
        """Name the state link failures are reported in."""
        for link in self.links.values():
            link.state = state

    def app(self) -> AppRouter:
        """The app-message router, started on first use (by ``ready`` or the app,
        whichever comes first: the app may send before ``ready``'s activity ran)."""
        if self.router is None:
            self.router = AppRouter(self.rank, self.world_size, self.links)
            self.router.start(self.nursery)
        return self.router

    def set_status(self, status: bytes) -> None:
        """Our app status, carried from now on by every heartbeat we send."""
        self.status = status
        for link in self.links.values():
            link.local_status = status
        if self.beats is not None:
            self.beats.status = status

    def release_port(self) -> None:
        if self.reservation is not None:
            self.reservation.release()
            self.reservation = None
