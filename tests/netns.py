"""Two network namespaces joined by a veth pair: a private "Thunderbolt bridge" for tests.

Why: pulling a cable (or a peer on another host) cannot be faked on loopback, where a
"link" never goes down. A namespace pair gives each rank its own network stack and one
point-to-point link between them that a test can set down and up, and nothing in it
can reach the host's real network.

Usage (a pytest fixture, ``netns_pair``, wraps it)::

    with NetnsPair.create() as pair:           # skips the test if namespaces can't be made
        proc = pair.a.popen(["python", "-m", "clusterfsm.states.cli", "serve", ...])
        pair.link_down()                       # both ends; link_down("b") for one end
        pair.link_up()

Guarantees: names are unique per pair (pid + counter + random), so parallel or leftover
runs never collide; :meth:`NetnsPair.close` (also run by the context manager and the
fixture, on failure too) kills and reaps every process started through the pair, then
deletes both namespaces, which removes the veth pair with them. Traffic stays inside
the two namespaces: the addresses are a /30 from TEST-NET-2 (198.51.100.0/24, RFC 5737)
with no route anywhere else.

:class:`NetnsSwitched` (fixture ``netns_switched``) puts a switch between the two: each
end is cabled to a bridge in a third namespace, so a pulled cable takes the carrier
from one host only, and the other can learn of it only from the silence.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

import attrs
import pytest

from tests.processes import kill_and_reap

_counter = itertools.count()
SUBNET_PREFIX = "198.51.100."
PREFIX_LEN = 30


class NetnsUnavailable(Exception):
    """Namespaces cannot be made here (not root, no ``ip``, no CAP_SYS_ADMIN...)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=10)


def fresh_tag() -> str:
    """A tag that makes this test's namespace and interface names unique (pid, counter,
    random); raises :class:`NetnsUnavailable` where namespaces cannot be made at all."""
    if shutil.which("ip") is None:
        raise NetnsUnavailable("the `ip` command (iproute2) is not installed")
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root")
    return f"{os.getpid() % 100000}{next(_counter)}{secrets.token_hex(2)}"


@contextmanager
def building(undo: Callable[[], None]) -> Iterator[None]:
    """Around the ``ip`` commands that build a topology: a failing one undoes what was
    built (``undo``, the topology's close) and becomes :class:`NetnsUnavailable`."""
    try:
        yield
    except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired) as exc:
        undo()
        detail = getattr(exc, "stderr", "") or str(exc)
        raise NetnsUnavailable(f"cannot create namespaces: {detail.strip()}") from exc


class Topology(Protocol):
    def close(self) -> None: ...
    def exists(self) -> bool: ...


T = TypeVar("T", bound=Topology)


def fresh(create: Callable[[], T]) -> Iterator[T]:
    """A fixture's body: a new topology for one test, skipped with the reason where
    namespaces cannot be made; closed afterwards, on failure too, and checked gone."""
    try:
        net = create()
    except NetnsUnavailable as exc:
        pytest.skip(f"network namespaces unavailable: {exc}")
    try:
        yield net
    finally:
        net.close()
        assert not net.exists(), "namespaces left behind"


def two_hosts(tag: str) -> tuple[Namespace, Namespace]:
    """Hosts ``a`` and ``b`` of a two-host topology: names, interface, address."""
    return (Namespace(f"cfsm-a{tag}", f"cfa{tag}"[:15], f"{SUBNET_PREFIX}1"),
            Namespace(f"cfsm-b{tag}", f"cfb{tag}"[:15], f"{SUBNET_PREFIX}2"))


@attrs.define
class Namespace:
    """One end: the namespace, its veth interface and address."""

    name: str
    interface: str
    address: str
    procs: list[subprocess.Popen[Any]] = attrs.field(factory=list)

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the namespace to completion (bounded, default 30 s)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 30)
        return subprocess.run(self.command(argv), check=False, **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the namespace; it is killed and reaped on close."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self.command(argv), **kw)
        self.procs.append(proc)
        return proc

    def _reap(self) -> None:
        kill_and_reap(self.procs)
        self.procs.clear()


@attrs.define
class NetnsPair:
    """Namespaces ``a`` and ``b`` joined by one veth link."""

    a: Namespace
    b: Namespace
    _closed: bool = False

    @classmethod
    def create(cls) -> NetnsPair:
        """Make the pair; raise :class:`NetnsUnavailable` (with why) if this host can't."""
        a, b = two_hosts(fresh_tag())
        pair = cls(a, b)
        with building(pair.close):
            for ns in (a, b):
                _ip("netns", "add", ns.name)
            _ip("link", "add", a.interface, "type", "veth", "peer", "name", b.interface)
            for ns in (a, b):
                _ip("link", "set", ns.interface, "netns", ns.name)
                _ip("-n", ns.name, "addr", "add", f"{ns.address}/{PREFIX_LEN}",
                    "dev", ns.interface)
                _ip("-n", ns.name, "link", "set", "lo", "up")
            pair.link_up()
        return pair

    def _ends(self, which: str) -> list[Namespace]:
        return {"a": [self.a], "b": [self.b], "both": [self.a, self.b]}[which]

    def link_down(self, which: str = "both") -> None:
        """Pull the cable: set the veth end(s) down (``a``, ``b`` or ``both``)."""
        for ns in self._ends(which):
            _ip("-n", ns.name, "link", "set", ns.interface, "down")

    def link_up(self, which: str = "both") -> None:
        for ns in self._ends(which):
            _ip("-n", ns.name, "link", "set", ns.interface, "up")

    def close(self) -> None:
        """Kill and reap processes started in the pair; delete both namespaces (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for ns in (self.a, self.b):
            ns._reap()
        for ns in (self.a, self.b):
            _ip("netns", "del", ns.name, check=False)
        # Deleting a namespace destroys its veth end, and with it the peer end; if the
        # pair was never moved into a namespace, remove it here.
        _ip("link", "del", self.a.interface, check=False)

    def exists(self) -> bool:
        names = _ip("netns", "list", check=False).stdout
        return self.a.name in names or self.b.name in names

    def __enter__(self) -> NetnsPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@attrs.define
class NetnsSwitched:
    """Namespaces ``a`` and ``b``, each cabled (a veth pair) to a bridge in a third
    namespace, ``switch``: two hosts on one switch.

    Why a switch: pulling the cable of a direct veth pair takes the carrier from *both*
    ends (as from both Macs on a Thunderbolt cable), so both ranks see ``link_lost`` at
    once. Behind a switch only the host whose cable is pulled loses its carrier; the
    other's link stays up, and only the heartbeats can tell it that its peer is gone.
    Same addresses and guarantees as :class:`NetnsPair`; the bridge runs no STP, so a
    replugged port forwards at once.
    """

    a: Namespace
    b: Namespace
    switch: str
    #: the switch's port (an interface inside ``switch``) cabled to ``a`` and to ``b``
    ports: dict[str, str]
    _closed: bool = False

    @classmethod
    def create(cls) -> NetnsSwitched:
        """Make the three namespaces; raise :class:`NetnsUnavailable` (with why)."""
        tag = fresh_tag()
        a, b = two_hosts(tag)
        net = cls(a, b, f"cfsm-s{tag}", {"a": f"csa{tag}"[:15], "b": f"csb{tag}"[:15]})
        with building(net.close):
            for name in (a.name, b.name, net.switch):
                _ip("netns", "add", name)
                _ip("-n", name, "link", "set", "lo", "up")
            _ip("-n", net.switch, "link", "add", "br0", "type", "bridge", "stp_state", "0",
                "forward_delay", "0")
            _ip("-n", net.switch, "link", "set", "br0", "up")
            for end, ns in (("a", a), ("b", b)):
                port = net.ports[end]
                _ip("link", "add", ns.interface, "type", "veth", "peer", "name", port)
                _ip("link", "set", port, "netns", net.switch)
                _ip("-n", net.switch, "link", "set", port, "master", "br0", "up")
                _ip("link", "set", ns.interface, "netns", ns.name)
                _ip("-n", ns.name, "addr", "add", f"{ns.address}/{PREFIX_LEN}",
                    "dev", ns.interface)
                _ip("-n", ns.name, "link", "set", ns.interface, "up")
        return net

    def pull(self, end: str) -> None:
        """Pull ``end``'s cable at the switch: the switch's port goes down, so ``end``'s
        interface loses its carrier (it stays administratively up, as a NIC whose cable
        is pulled does); the other host's link is untouched."""
        _ip("-n", self.switch, "link", "set", self.ports[end], "down")

    def plug(self, end: str) -> None:
        _ip("-n", self.switch, "link", "set", self.ports[end], "up")

    def close(self) -> None:
        """Kill and reap processes started in ``a`` and ``b``; delete the three
        namespaces, and with them every veth and the bridge (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for ns in (self.a, self.b):
            ns._reap()
        for name in (self.a.name, self.b.name, self.switch):
            _ip("netns", "del", name, check=False)
        for ns in (self.a, self.b):  # a veth never moved into a namespace
            _ip("link", "del", ns.interface, check=False)

    def exists(self) -> bool:
        names = _ip("netns", "list", check=False).stdout
        return any(name in names for name in (self.a.name, self.b.name, self.switch))

    def __enter__(self) -> NetnsSwitched:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def netns_pair() -> Iterator[NetnsPair]:
    """A fresh namespace pair for one test; skipped with the reason where impossible."""
    yield from fresh(NetnsPair.create)


@pytest.fixture
def netns_switched() -> Iterator[NetnsSwitched]:
    """Two hosts on one switch, fresh for one test; skipped with the reason where
    impossible."""
    yield from fresh(NetnsSwitched.create)
