"""Facts about one network interface, and binding sockets to it.

Why this exists: on a Thunderbolt bridge every Mac has a link-local address
(169.254/16) and, with several cables, several interfaces on that same subnet. The
kernel then routes a socket's traffic out of whichever interface comes first, not the
one the peer is on, unless the socket is bound to the interface (``IP_BOUND_IF`` on
macOS, ``SO_BINDTODEVICE`` on Linux). Every socket clusterfsm opens for ``--interface``
discovery (beacons, control listener, control connection) goes through
:func:`bind_to_interface`.

The probes use the ``SIOCGIFFLAGS``/``SIOCGIFADDR``/``SIOCGIFMTU`` ioctls (no
subprocess, no extra package). :func:`interface_status` reports every fact without
judging (``clusterfsm doctor`` prints them, :mod:`clusterfsm.states.linkwatch` waits on
them); :func:`probe_interface` raises :class:`~states.errors.InterfaceUnavailable` naming
what is wrong: missing, administratively down, no carrier (cable out, peer down), no
IPv4 address.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import sys

import attrs

from clusterfsm.states.errors import InterfaceUnavailable

IFF_UP = 0x1
IFF_RUNNING = 0x40
_IFREQ_SIZE = 40  # struct ifreq is 40 bytes on 64-bit Linux, 32 on macOS
if sys.platform == "darwin":
    _SIOCGIFFLAGS, _SIOCGIFADDR, _SIOCGIFMTU = 0xC0206911, 0xC0206921, 0xC0206933
    _IP_BOUND_IF = 25
else:
    _SIOCGIFFLAGS, _SIOCGIFADDR, _SIOCGIFMTU = 0x8913, 0x8915, 0x8921
_SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)


@attrs.frozen
class InterfaceInfo:
    """What discovery needs to know of one interface (returned only when it is up,
    has carrier and has an IPv4 address: :func:`probe_interface` raises otherwise)."""

    name: str
    index: int
    ipv4: str


def _ifreq(name: str) -> bytes:
    raw = name.encode()
    if not 1 <= len(raw) <= 15:
        raise InterfaceUnavailable(name, "interface names are 1..15 bytes")
    return raw.ljust(_IFREQ_SIZE, b"\0")


def _ioctl(ifreq: bytes, request: int) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return fcntl.ioctl(s.fileno(), request, ifreq)


@attrs.frozen
class InterfaceStatus:
    """Everything the ioctls say about one interface, judged by nobody yet."""

    name: str
    exists: bool
    index: int = 0
    up: bool = False
    carrier: bool = False
    ipv4: str | None = None
    mtu: int | None = None

    @property
    def problem(self) -> str | None:
        """Why it cannot carry the cluster (None: it can)."""
        if not self.exists:
            return f"no such interface (have: {', '.join(list_interfaces()) or 'none'})"
        if not self.up:
            return "the interface is down (bring it up)"
        if not self.carrier:
            return "no carrier: the cable is out or the peer's end is down"
        if self.ipv4 is None:
            return ("no IPv4 address (macOS gives a Thunderbolt interface a 169.254 "
                    "address once a peer is plugged in)")
        return None

    @property
    def usable(self) -> bool:
        return self.problem is None


def interface_status(name: str) -> InterfaceStatus:
    """The interface's facts; a missing one has ``exists=False``. Only a name no
    interface can have (empty, over 15 bytes) raises InterfaceUnavailable."""
    request = _ifreq(name)
    try:
        index = socket.if_nametoindex(name)
    except OSError:
        return InterfaceStatus(name, exists=False)
    try:
        flags = struct.unpack_from("H", _ioctl(request, _SIOCGIFFLAGS), 16)[0]
    except OSError:  # it vanished between the two calls (adapter unplugged)
        return InterfaceStatus(name, exists=False)
    try:
        mtu: int | None = struct.unpack_from("i", _ioctl(request, _SIOCGIFMTU), 16)[0]
    except OSError:
        mtu = None
    try:
        ipv4: str | None = socket.inet_ntoa(_ioctl(request, _SIOCGIFADDR)[20:24])
    except OSError:
        ipv4 = None
    return InterfaceStatus(name, True, index, bool(flags & IFF_UP),
                           bool(flags & IFF_RUNNING), ipv4, mtu)


def probe_interface(name: str) -> InterfaceInfo:
    """The interface's index and IPv4 address; raise if it cannot carry us."""
    status = interface_status(name)
    if status.problem is not None or status.ipv4 is None:
        raise InterfaceUnavailable(name, status.problem or "no IPv4 address")
    return InterfaceInfo(name, status.index, status.ipv4)


def list_interfaces() -> list[str]:
    """Names of this host's interfaces (for error messages)."""
    return [name for _index, name in socket.if_nameindex()]


def bind_to_interface(sock: socket.socket, name: str) -> None:
    """Make ``sock`` send and receive only through interface ``name``."""
    try:
        if sys.platform == "darwin":
            index = socket.if_nametoindex(name)
            level = socket.IPPROTO_IP
            sock.setsockopt(level, _IP_BOUND_IF, index)
        elif sys.platform.startswith("linux"):
            sock.setsockopt(socket.SOL_SOCKET, _SO_BINDTODEVICE, name.encode())
        else:
            raise InterfaceUnavailable(name, f"cannot bind sockets to an interface on "
                                       f"{sys.platform}")
    except OSError as exc:
        raise InterfaceUnavailable(name, f"cannot bind a socket to it: {exc}") from exc
