"""Discovery on named interfaces: UDP beacons, then a deterministic rank election.

A Thunderbolt cable gives a Mac an interface, not the peer's address. So each rank
broadcasts a small beacon on every ``--interface`` it was given, from a socket bound
to that interface (see :mod:`clusterfsm.states.netif` for why the binding matters), and listens
for the others'. A beacon carries::

    magic "CFB1" | protocol version u16 | node id 16 | instance 8 | world size u8
    | rank claim u8 (255 = auto) | control port u16 | sent at u64 (ms, wall clock)
    | nonce 8 | tag 16

``tag`` is HMAC-SHA256 with the cluster key, truncated to 16 bytes: beacons of another
cluster (another key) are reported, never joined, and a host without the key cannot
steer the election. ``sent at`` and the random ``nonce`` make each beacon usable once:
a :class:`~states.freshness.ReplayGuard` refuses a beacon sent more than 30 s from our
clock or whose nonce it has already accepted (reported as replayed, never heard). A
beacon proves nothing else: the handshake then authenticates whoever answers.

Beacons from another protocol version or world size are reported and ignored. The
same node id with another ``instance`` (random per process) is a second machine with a
copied node id: :class:`~states.errors.DuplicateNodeId`, never a silent split. Our own
broadcasts coming back (same instance) are ignored.

The election is pure (:func:`elect`): with ``--rank auto`` everywhere, ranks follow
the byte order of node ids (lowest is rank 0); with explicit ranks everywhere they
must be distinct and cover 0..N-1; a mix is an :class:`~states.errors.ElectionFailed`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Final, Protocol

import attrs
import trio

from clusterfsm.fsm import report_progress
from clusterfsm.states.errors import DuplicateNodeId, ElectionFailed, InterfaceUnavailable
from clusterfsm.states.freshness import DEFAULT_WINDOW, Replayed, ReplayGuard
from clusterfsm.states.linkwatch import LinkEvents, open_link_events
from clusterfsm.states.netif import (
    InterfaceInfo,
    InterfaceStatus,
    bind_to_interface,
    interface_status,
    probe_interface,
)

BEACON_MAGIC: Final = b"CFB1"
AUTO_RANK: Final = 255
#: Default UDP port for beacons (``--beacon-port``).
DEFAULT_BEACON_PORT: Final = 52417
#: Seconds between beacons; a new peer is answered at once, so two ranks usually
#: find each other in one round trip, not one interval.
BEACON_INTERVAL: Final = 0.1
#: After the last expected peer is heard, listen this long for an extra node (too
#: many nodes for the world size would otherwise split the cluster silently).
SETTLE_TIME: Final = 0.1
#: Ignored beacons kept for the error message (bounded: a flood cannot grow it).
MAX_REPORTS: Final = 16

_BODY = struct.Struct(">4sH16s8sBBHQ8s")
_TAG_LEN = 16
BEACON_SIZE: Final = _BODY.size + _TAG_LEN
_TAG_CONTEXT = b"clusterfsm beacon v2\0"


@attrs.frozen
class Beacon:
    """One rank's announcement on one link."""

    protocol_version: int
    node_id: bytes
    instance: bytes
    world_size: int
    rank_claim: int  # AUTO_RANK for --rank auto
    control_port: int

    def encode(self, key: bytes, *, sent_at: float | None = None,
               nonce: bytes | None = None) -> bytes:
        """The datagram: stamped now (wall clock) with a fresh nonce, unless given."""
        stamp = round((time.time() if sent_at is None else sent_at) * 1000)
        body = _BODY.pack(BEACON_MAGIC, self.protocol_version, self.node_id, self.instance,
                          self.world_size, self.rank_claim, self.control_port, stamp,
                          secrets.token_bytes(8) if nonce is None else nonce)
        return body + _tag(key, body)


class BeaconIgnored(Exception):
    """A datagram that is not a beacon we can use; the message says why."""


def _tag(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, _TAG_CONTEXT + body, hashlib.sha256).digest()[:_TAG_LEN]


def decode_beacon(data: bytes, key: bytes) -> Beacon:
    """Parse and authenticate a beacon; :class:`BeaconIgnored` says what is wrong."""
    return decode_stamped_beacon(data, key)[0]


def decode_stamped_beacon(data: bytes, key: bytes) -> tuple[Beacon, float, bytes]:
    """:func:`decode_beacon`, with when it was sent (s, sender's clock) and its nonce."""
    if len(data) < 6 or data[:4] != BEACON_MAGIC:
        raise BeaconIgnored("not a clusterfsm beacon")
    if len(data) != BEACON_SIZE:
        version = int.from_bytes(data[4:6], "big")
        raise BeaconIgnored(f"beacon of protocol version {version} ({len(data)} bytes)")
    body, tag = data[:_BODY.size], data[_BODY.size:]
    if not hmac.compare_digest(tag, _tag(key, body)):
        raise BeaconIgnored("beacon of another cluster (its tag does not verify with our key)")
    _magic, version, node_id, instance, world, claim, port, stamp, nonce = _BODY.unpack(body)
    return Beacon(version, node_id, instance, world, claim, port), stamp / 1000, nonce


# -- what has been heard ------------------------------------------------------------


@attrs.frozen
class Peer:
    """Another node as discovery knows it."""

    node_id: bytes
    host: str
    control_port: int
    rank_claim: int
    interfaces: tuple[str, ...]  # our interfaces that heard it (topology)
    #: ``(our interface, its address there)``: where its first beacon on each of our
    #: interfaces came from (the jaccl route check asks the kernel about each).
    addresses: tuple[tuple[str, str], ...] = ()


@attrs.define
class DiscoveryState:
    """Sans-IO record of beacons heard; decides when discovery is complete."""

    me: Beacon
    peers: dict[bytes, Peer] = attrs.field(factory=dict)
    instances: dict[bytes, tuple[bytes, str]] = attrs.field(factory=dict)
    reports: list[str] = attrs.field(factory=list)
    guard: ReplayGuard = attrs.field(factory=ReplayGuard)

    def observe(self, data: bytes, key: bytes, source: str, interface: str,
                now: float | None = None) -> bool:
        """Record one datagram (``now``: our wall clock, default the real one); True
        if it told us of a new peer (answer at once)."""
        try:
            beacon, sent_at, nonce = decode_stamped_beacon(data, key)
        except BeaconIgnored as exc:
            self._report(f"{source} on {interface}: {exc}")
            return False
        if beacon.instance == self.me.instance:
            return False  # our own broadcast, looped back
        try:
            self.guard.check(sent_at, nonce, time.time() if now is None else now)
        except Replayed as exc:
            self._report(f"{source} on {interface}: {exc.kind.value} beacon (a replay, or "
                         f"its clock is more than {DEFAULT_WINDOW:g} s from ours)")
            return False
        if beacon.protocol_version != self.me.protocol_version:
            self._report(f"{source} on {interface}: protocol version "
                         f"{beacon.protocol_version}, ours is {self.me.protocol_version}")
            return False
        if beacon.world_size != self.me.world_size:
            self._report(f"{source} on {interface}: world size {beacon.world_size}, "
                         f"ours is {self.me.world_size}")
            return False
        seen = self.instances.get(beacon.node_id)
        if beacon.node_id == self.me.node_id:
            raise DuplicateNodeId(beacon.node_id.hex(), f"this node and {source} on {interface}")
        if seen is not None and seen[0] != beacon.instance:
            raise DuplicateNodeId(beacon.node_id.hex(), f"{seen[1]} and {source} on {interface}")
        self.instances[beacon.node_id] = (beacon.instance, f"{source} on {interface}")
        old = self.peers.get(beacon.node_id)
        if old is None:
            self.peers[beacon.node_id] = Peer(beacon.node_id, source, beacon.control_port,
                                              beacon.rank_claim, (interface,),
                                              ((interface, source),))
            return True
        if interface not in old.interfaces:
            self.peers[beacon.node_id] = attrs.evolve(
                old, interfaces=(*old.interfaces, interface),
                addresses=(*old.addresses, (interface, source)))
        return False

    def _report(self, text: str) -> None:
        if text not in self.reports and len(self.reports) < MAX_REPORTS:
            self.reports.append(text)

    @property
    def complete(self) -> bool:
        return len(self.peers) >= self.me.world_size - 1

    def summary(self) -> str:
        heard = ", ".join(f"{p.node_id.hex()[:8]} at {p.host} via {'/'.join(p.interfaces)}"
                          for p in self.peers.values()) or "nobody"
        text = f"heard {len(self.peers)} of {self.me.world_size - 1} peers ({heard})"
        if self.reports:
            text += "; ignored: " + "; ".join(self.reports)
        return text


@attrs.frozen
class Election:
    """The outcome: every node's rank, ours included."""

    ranks: dict[bytes, int]
    my_rank: int


def elect(me: Beacon, peers: Iterable[Peer]) -> Election:
    """Ranks for ``me`` and ``peers``; deterministic and identical on every node."""
    peers = list(peers)
    n = me.world_size
    if len(peers) != n - 1:
        raise ElectionFailed(f"{len(peers) + 1} nodes for a world size of {n}: "
                             "every node must run with the same --world-size")
    claims = {me.node_id: me.rank_claim, **{p.node_id: p.rank_claim for p in peers}}
    autos = [node for node, claim in claims.items() if claim == AUTO_RANK]
    if len(autos) == len(claims):
        ordered = sorted(claims)
        ranks = {node: i for i, node in enumerate(ordered)}
    elif autos:
        raise ElectionFailed(f"{len(autos)} node(s) run --rank auto and "
                             f"{len(claims) - len(autos)} an explicit rank: use one or "
                             "the other on every node")
    else:
        by_rank: dict[int, bytes] = {}
        for node, claim in claims.items():
            if not 0 <= claim < n:
                raise ElectionFailed(f"node {node.hex()[:8]} claims rank {claim}, "
                                     f"outside 0..{n - 1}")
            if claim in by_rank:
                raise ElectionFailed(f"nodes {by_rank[claim].hex()[:8]} and "
                                     f"{node.hex()[:8]} both claim rank {claim}")
            by_rank[claim] = node
        ranks = dict(claims)
    return Election(ranks, ranks[me.node_id])


# -- beacon sockets -----------------------------------------------------------------


class BeaconSocket(Protocol):
    """A datagram socket on one interface that can broadcast on its link."""

    interface: str

    async def broadcast(self, data: bytes) -> None: ...

    async def receive(self) -> tuple[bytes, str]: ...


class DiscoveryNet(Protocol):
    """What discovery needs from the host: interface facts, change events (to wait
    for a cable and notice its loss, see states.linkwatch) and beacon sockets."""

    def probe(self, interface: str) -> InterfaceInfo: ...

    def status(self, interface: str) -> InterfaceStatus: ...

    def link_events(self) -> AbstractAsyncContextManager[LinkEvents]: ...

    def beacon_socket(self, interface: str, port: int
                      ) -> AbstractAsyncContextManager[BeaconSocket]: ...


class UdpBeaconSocket:
    """A UDP socket bound to one interface; beacons go to the limited broadcast
    address, which the binding keeps on that interface's link."""

    def __init__(self, sock: trio.socket.SocketType, interface: str, port: int) -> None:
        self._sock = sock
        self.interface = interface
        self._port = port

    async def broadcast(self, data: bytes) -> None:
        try:
            await self._sock.sendto(data, ("255.255.255.255", self._port))
        except OSError as exc:
            raise InterfaceUnavailable(self.interface, f"cannot send a beacon: {exc}") from exc

    async def receive(self) -> tuple[bytes, str]:
        try:
            data, source = await self._sock.recvfrom(BEACON_SIZE + 64)
        except OSError as exc:
            raise InterfaceUnavailable(self.interface, f"cannot receive beacons: {exc}") from exc
        return data, str(source[0])


class UdpDiscoveryNet:
    """The real host: ioctl probes and UDP sockets bound to interfaces."""

    def probe(self, interface: str) -> InterfaceInfo:
        return probe_interface(interface)

    def status(self, interface: str) -> InterfaceStatus:
        return interface_status(interface)

    def link_events(self) -> AbstractAsyncContextManager[LinkEvents]:
        return open_link_events()

    @asynccontextmanager
    async def beacon_socket(self, interface: str, port: int) -> AsyncIterator[UdpBeaconSocket]:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            bind_to_interface(sock, interface)  # type: ignore[arg-type]
            try:
                await sock.bind(("", port))
            except OSError as exc:
                raise InterfaceUnavailable(
                    interface, f"cannot bind the beacon port {port}: {exc}") from exc
            yield UdpBeaconSocket(sock, interface, port)


# -- the driver ---------------------------------------------------------------------


async def discover(sockets: list[tuple[BeaconSocket, Beacon]], key: bytes,
                   me: Beacon) -> tuple[DiscoveryState, Election]:
    """Beacon on every socket until every peer is heard, then elect.

    ``sockets`` pairs each interface's socket with the beacon sent on it (the control
    port differs per interface). Returns once ``world_size - 1`` peers were heard and
    no extra node showed up within :data:`SETTLE_TIME`. Unbounded by itself: the
    state's deadline bounds it, and its timeout names what was heard
    (:meth:`DiscoveryState.summary`, via ``report_progress``).
    """
    state = DiscoveryState(me)
    complete = trio.Event()

    async def listen(sock: BeaconSocket, beacon: Beacon) -> None:
        while True:
            data, source = await sock.receive()
            reported = len(state.reports)
            if state.observe(data, key, source, sock.interface):
                await sock.broadcast(beacon.encode(key))  # answer a newcomer at once
                report_progress(state.summary())
            elif len(state.reports) != reported:
                report_progress(state.summary())
            if state.complete:
                complete.set()

    async with trio.open_nursery() as nursery:
        for sock, beacon in sockets:
            nursery.start_soon(listen, sock, beacon)
        nursery.start_soon(announce, sockets, key)
        report_progress(state.summary())
        await complete.wait()
        await trio.sleep(SETTLE_TIME)  # an extra node would be heard meanwhile
        nursery.cancel_scope.cancel()
    return state, elect(me, state.peers.values())


async def keep_beaconing(sockets: list[tuple[BeaconSocket, Beacon]], key: bytes) -> None:
    """Go on announcing (a slower peer may still be discovering) until cancelled.

    Runs in the cluster's nursery under its own cancel scope, which the bootstrap
    exchange cancels once every rank is in the session. A send error (the link went
    down) ends the announcing; the handshake's own deadline then reports the real
    problem.
    """
    await trio.sleep(BEACON_INTERVAL)  # discover() announced a moment ago
    try:
        await announce(sockets, key)
    except InterfaceUnavailable as exc:
        report_progress(str(exc))


async def announce(sockets: list[tuple[BeaconSocket, Beacon]], key: bytes) -> None:
    """Broadcast each socket's beacon now and every :data:`BEACON_INTERVAL` (UDP may
    drop one) until cancelled; a send that fails raises ``InterfaceUnavailable``."""
    while True:
        for sock, beacon in sockets:
            await sock.broadcast(beacon.encode(key))
        await trio.sleep(BEACON_INTERVAL)
