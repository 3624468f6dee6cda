"""Facts about one network interface, and binding sockets to it.

Why this exists: on a Thunderbolt bridge every Mac has a link-local address
(169.254/16) and, with several cables, several interfaces on that same subnet. The
kernel then routes a socket's traffic out of whichever interface comes first, not the
one the peer is on, unless the socket is bound to the interface (``IP_BOUND_IF`` on
macOS, ``SO_BINDTODEVICE`` on Linux). Every socket clusterfsm opens for ``--interface``
discovery (beacons, control listener, control connection) goes through
:func:`bind_to_interface`.

The probes use the ``SIOCGIFFLAGS``/``SIOCGIFADDR`` ioctls (no subprocess, no extra
package) and report a problem as :class:`~states.errors.InterfaceUnavailable` naming
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
    _SIOCGIFFLAGS, _SIOCGIFADDR = 0xC0206911, 0xC0206921
    _IP_BOUND_IF = 25
else:
    _SIOCGIFFLAGS, _SIOCGIFADDR = 0x8913, 0x8915
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


def _ioctl(name: str, request: int) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return fcntl.ioctl(s.fileno(), request, _ifreq(name))


def probe_interface(name: str) -> InterfaceInfo:
    """The interface's index, flags and IPv4 address; raise if it cannot carry us."""
    try:
        index = socket.if_nametoindex(name)
    except OSError:
        raise InterfaceUnavailable(
            name, f"no such interface (have: {', '.join(list_interfaces()) or 'none'})"
        ) from None
    try:
        flags = struct.unpack_from("H", _ioctl(name, _SIOCGIFFLAGS), 16)[0]
    except OSError as exc:  # it vanished between the two calls (adapter unplugged)
        raise InterfaceUnavailable(name, f"cannot read its flags: {exc}") from None
    if not flags & IFF_UP:
        raise InterfaceUnavailable(name, "the interface is down (bring it up)")
    if not flags & IFF_RUNNING:
        raise InterfaceUnavailable(name, "no carrier: the cable is out or the peer's end "
                                   "is down")
    try:
        ipv4 = socket.inet_ntoa(_ioctl(name, _SIOCGIFADDR)[20:24])
    except OSError:
        raise InterfaceUnavailable(name, "no IPv4 address (macOS gives a Thunderbolt "
                                   "bridge a 169.254 address once a peer is plugged "
                                   "in)") from None
    return InterfaceInfo(name, index, ipv4)


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
