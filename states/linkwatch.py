"""Waiting for a cable, and noticing at once when it is pulled.

A provider's rank lives for days while cables are moved. An ``--interface`` that is
down, has no carrier or no address *yet* is something to wait for, not a failure
(:func:`wait_for_link`); and in ``ready`` a pulled cable must end the group within a
second, naming the interface (:func:`watch_for_loss` raises
:class:`~states.errors.LinkLost`), long before the peers' heartbeat deadline.

How each platform learns of a change (:func:`open_link_events`):

- **Linux: rtnetlink.** A ``NETLINK_ROUTE`` socket subscribed to ``RTMGRP_LINK |
  RTMGRP_IPV4_IFADDR``: the kernel sends a message on every change of a link's flags or
  carrier and every IPv4 address added or removed. Tested with real processes in
  network namespaces (``tests/test_linkwatch.py``).
- **macOS: the routing socket.** A ``PF_ROUTE`` raw socket gets ``RTM_IFINFO`` on link
  flag and carrier changes and ``RTM_NEWADDR``/``RTM_DELADDR`` on address changes.
  Written from the BSD ``route(4)`` interface; it has **not** run here (no Mac), which
  is why a failure to open it falls back to polling instead of failing.
- **Anything else**, or a socket that cannot be opened: a poll every
  :data:`POLL_INTERVAL` seconds.

A message is only a wake-up: the interface's state is always read again with the
ioctls of :mod:`clusterfsm.states.netif`, so an unrelated message or one we cannot parse
costs one re-read, never a wrong answer. Even with events the state is re-read every
:data:`RECHECK_INTERVAL` seconds, because a netlink socket that overflows drops
messages (``ENOBUFS``). Nothing here waits without a bound of its own except the
caller's deadline.
"""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import NoReturn, Protocol

import trio

from clusterfsm.states.errors import InterfaceUnavailable, LinkLost
from clusterfsm.states.netif import InterfaceInfo, InterfaceStatus, interface_status

#: Seconds between two reads of the interface state when no event source works.
POLL_INTERVAL = 0.2
#: Seconds between two reads even with events (a dropped message is noticed by then).
RECHECK_INTERVAL = 1.0
#: rtnetlink multicast groups (linux/rtnetlink.h).
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10

Probe = Callable[[str], InterfaceStatus]


class LinkEvents(Protocol):
    """Something that wakes its caller when an interface may have changed."""

    #: "rtnetlink", "routing socket" or "poll": said in logs and by ``doctor``.
    kind: str

    async def changed(self) -> None:
        """Return when something may have changed (or after at most a poll interval)."""


class PollEvents:
    """The fallback: every ``POLL_INTERVAL`` seconds "something may have changed"."""

    kind = "poll"

    def __init__(self, interval: float = POLL_INTERVAL) -> None:
        self.interval = interval

    async def changed(self) -> None:
        await trio.sleep(self.interval)


class SocketEvents:
    """Wake-ups from a kernel notification socket (rtnetlink or PF_ROUTE).

    The socket is non-blocking; after one message every queued one is read too, so a
    burst of messages is one wake-up. A read error other than "nothing queued"
    (``ENOBUFS``: messages were dropped) is a wake-up as well: the state is re-read.
    """

    def __init__(self, sock: socket.socket, kind: str) -> None:
        self._sock = sock
        self.kind = kind

    async def changed(self) -> None:
        with trio.move_on_after(RECHECK_INTERVAL):
            await trio.lowlevel.wait_readable(self._sock)
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                self._sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.ENOBUFS, errno.EINTR):
                    continue
                return


def _open_kernel_socket() -> tuple[socket.socket, str] | None:
    """The platform's notification socket, subscribed; None where there is none."""
    try:
        if sys.platform.startswith("linux"):
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            try:
                sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR))
            except OSError:
                sock.close()
                raise
            kind = "rtnetlink"
        elif sys.platform == "darwin" or "bsd" in sys.platform:
            sock = socket.socket(socket.AF_ROUTE, socket.SOCK_RAW, 0)
            kind = "routing socket"
        else:
            return None
    except OSError:
        return None
    sock.setblocking(False)
    return sock, kind


@asynccontextmanager
async def open_link_events() -> AsyncIterator[LinkEvents]:
    """The best event source this platform allows (see the module docstring)."""
    opened = _open_kernel_socket()
    if opened is None:
        await trio.lowlevel.checkpoint()
        yield PollEvents()
        return
    sock, kind = opened
    with sock:
        await trio.lowlevel.checkpoint()
        yield SocketEvents(sock, kind)


async def wait_for_link(names: Sequence[str], events: LinkEvents, *,
                        probe: Probe = interface_status,
                        on_waiting: Callable[[InterfaceStatus], None] = lambda _s: None,
                        ) -> dict[str, InterfaceInfo]:
    """Return once every interface in ``names`` is up, has carrier and an IPv4 address.

    Subscribe first (``events`` is open), then read: a change between the two is not
    missed. An interface that does not exist at all is a typo, not a cable to wait
    for: :class:`InterfaceUnavailable` at once. ``on_waiting`` hears each interface
    that is not usable yet, once per change of its state (for progress reports).
    """
    told: dict[str, InterfaceStatus] = {}
    while True:
        statuses = [probe(name) for name in names]
        for status in statuses:
            if not status.exists:
                raise InterfaceUnavailable(status.name, status.problem or "missing")
        waiting = [s for s in statuses if not s.usable]
        if not waiting:
            return {s.name: InterfaceInfo(s.name, s.index, s.ipv4 or "") for s in statuses}
        for status in waiting:
            if told.get(status.name) != status:
                told[status.name] = status
                on_waiting(status)
        await events.changed()


async def watch_for_loss(names: Sequence[str], events: LinkEvents, *,
                         probe: Probe = interface_status) -> NoReturn:
    """Raise :class:`LinkLost` naming the first interface that stops being usable
    (down, no carrier, address gone, or the interface itself gone)."""
    while True:
        for name in names:
            status = probe(name)
            if status.problem is not None:
                raise LinkLost(name, status.problem)
        await events.changed()
