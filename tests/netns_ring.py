"""Three network namespaces cabled in a ring: three Macs, each with two Thunderbolt cables.

Why: a rank with two interfaces (a ring of 3 Macs) must lose its group when *one* of
its cables is pulled, and come back when it is replugged; a pair of namespaces cannot
show that. Cable ``k`` joins node ``k`` to node ``(k + 1) % 3`` (a veth pair, a /30 of
TEST-NET-2 per cable), so every node has two interfaces and every pair of nodes one
cable: the full mesh jaccl needs, too. Host routes let a node reach a neighbour's
other address over their shared cable (MLX's ring dials the address rank 0 saw).

Guarantees as for :class:`tests.netns.NetnsPair`: unique names, and :meth:`close` (run
by the fixture, on failure too) kills and reaps every process started through a node,
then deletes the namespaces (and with them the veths).
"""

from __future__ import annotations

from collections.abc import Iterator

import attrs
import pytest

from tests.netns import SUBNET_PREFIX, Namespace, _ip, building, fresh, fresh_tag


@attrs.define
class Node:
    """One namespace and its two interfaces (``interfaces[k]`` is on cable ``k``)."""

    ns: Namespace
    interfaces: dict[int, str] = attrs.field(factory=dict)


@attrs.define
class NetnsRing:
    nodes: list[Node]
    #: cable k -> ((node, interface), (node, interface))
    cables: dict[int, tuple[tuple[int, str], tuple[int, str]]]
    up: set[int] = attrs.field(factory=set)
    _closed: bool = False

    @classmethod
    def create(cls) -> NetnsRing:
        tag = fresh_tag()
        nodes = [Node(Namespace(f"cfsm-r{i}{tag}", "", "")) for i in range(3)]
        ring = cls(nodes, {})
        with building(ring.close):
            for node in nodes:
                _ip("netns", "add", node.ns.name)
                _ip("-n", node.ns.name, "link", "set", "lo", "up")
            for k in range(3):
                ends = ((k, f"cr{tag}{k}a"[:15]), ((k + 1) % 3, f"cr{tag}{k}b"[:15]))
                _ip("link", "add", ends[0][1], "type", "veth", "peer", "name", ends[1][1])
                for side, (i, name) in enumerate(ends):
                    ns = nodes[i].ns.name
                    _ip("link", "set", name, "netns", ns)
                    _ip("-n", ns, "addr", "add", f"{SUBNET_PREFIX}{4 * k + side + 1}/30",
                        "dev", name)
                    nodes[i].interfaces[k] = name
                ring.cables[k] = ends
            for k in range(3):
                ring.plug(k)
        return ring

    def address(self, cable: int, node: int) -> str:
        side = 0 if self.cables[cable][0][0] == node else 1
        return f"{SUBNET_PREFIX}{4 * cable + side + 1}"

    def _route_across(self) -> None:
        """Every node reaches every address of a neighbour over their own cable (a
        host route; Linux answers ARP for any of its addresses on any interface), as
        MLX's ring, given one address per rank, needs. A link set down loses its
        routes, so they are set again on every plug."""
        for i, node in enumerate(self.nodes):
            for k, ends in self.cables.items():
                if i in (ends[0][0], ends[1][0]):
                    continue
                for j, _name in ends:
                    shared = next(c for c, e in self.cables.items()
                                  if {e[0][0], e[1][0]} == {i, j})
                    if shared in self.up:
                        _ip("-n", node.ns.name, "route", "replace",
                            f"{self.address(k, j)}/32", "dev", node.interfaces[shared])

    def pull(self, cable: int) -> None:
        """Pull cable ``cable``: both of its ends go down."""
        self.up.discard(cable)
        for i, name in self.cables[cable]:
            _ip("-n", self.nodes[i].ns.name, "link", "set", name, "down")

    def plug(self, cable: int) -> None:
        for i, name in self.cables[cable]:
            _ip("-n", self.nodes[i].ns.name, "link", "set", name, "up")
        self.up.add(cable)
        if len(self.cables) == 3:
            self._route_across()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for node in self.nodes:
            node.ns._reap()
        for node in self.nodes:
            _ip("netns", "del", node.ns.name, check=False)

    def exists(self) -> bool:
        names = _ip("netns", "list", check=False).stdout
        return any(node.ns.name in names for node in self.nodes)


@pytest.fixture
def netns_ring() -> Iterator[NetnsRing]:
    """A fresh ring of three namespaces for one test; skipped where impossible."""
    yield from fresh(NetnsRing.create)
