"""How ranks reach each other: TCP for real, an in-memory network for tests.

Both give a :class:`Conn`: a trio stream plus the addresses the connection was made
between. The addresses matter: the ring hostfile is built from what the handshake
connections actually used (the peer's address as rank 0 saw it), never from
configuration that may name a different interface.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import ClassVar, Protocol

import attrs
import trio

from clusterfsm.states.config import Address
from clusterfsm.states.errors import ClusterError
from clusterfsm.states.netif import bind_to_interface


@attrs.frozen(auto_exc=True)
class BindFailed(ClusterError):
    """The control listener could not be opened (address in use, no such address).

    Retryable: the usual cause is a port still held by the previous generation."""

    retryable: ClassVar[bool] = True

    address: str
    reason: str

    def __str__(self) -> str:
        return f"cannot listen on {self.address}: {self.reason}"


@attrs.frozen(auto_exc=True)
class AcceptFailed(Exception):
    """One incoming connection could not be taken: reset before we looked at it
    (``getpeername`` ENOTCONN), or ``accept`` itself failed (``exhausted``: out of file
    descriptors or buffers, so the caller backs off before it accepts again).

    The listener is still open and serving: this is about one connection, never a
    reason to stop listening. Its connection (if any) is already closed.
    """

    peer: str
    reason: str
    exhausted: bool = False

    def __str__(self) -> str:
        return f"cannot take a connection from {self.peer}: {self.reason}"


#: ``accept`` errors that mean "out of descriptors or kernel memory": back off.
EXHAUSTION_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@attrs.frozen
class Conn:
    """An established connection: its stream and both ends' hosts."""

    stream: trio.abc.Stream = attrs.field(eq=False)
    local_host: str
    remote: str  # "host:port" of the other end, for messages and the hostfile

    @property
    def remote_host(self) -> str:
        return Address.parse(self.remote).host


class Listener(Protocol):
    address: Address

    async def accept(self) -> Conn:
        """The next connection; :class:`AcceptFailed` for one that could not be taken."""
        ...

    async def aclose(self) -> None: ...


class Transport(Protocol):
    """What the machine needs from the network."""

    def listen(self, address: Address, interface: str | None = None
               ) -> AbstractAsyncContextManager[Listener]: ...

    async def connect(self, address: Address, interface: str | None = None) -> Conn: ...


# -- TCP ----------------------------------------------------------------------------


class TcpListener:
    def __init__(self, listener: trio.SocketListener, address: Address) -> None:
        self._listener = listener
        self.address = address

    async def accept(self) -> Conn:
        """The next connection, or :class:`AcceptFailed` (the listener stays usable).

        A client can reset its connection between the kernel's accept and our
        ``getpeername``/``setsockopt`` (ENOTCONN, EINVAL): that one connection is
        closed and reported, nothing else. trio already skips the routine accept errors
        (ECONNABORTED, EPROTO ...); any other, fd exhaustion included, is reported too.
        """
        try:
            stream = await self._listener.accept()
        except OSError as exc:
            raise AcceptFailed("(not accepted)", f"accept: {exc}",
                               exhausted=exc.errno in EXHAUSTION_ERRNOS) from exc
        try:
            return _tcp_conn(stream)
        except OSError as exc:
            await stream.aclose()
            raise AcceptFailed(_peer_of(stream), f"reset before it was read: {exc}") from exc

    async def aclose(self) -> None:
        await self._listener.aclose()


def _peer_of(stream: trio.SocketStream) -> str:
    """The peer's address for a message, if the socket can still tell it."""
    try:
        remote = stream.socket.getpeername()
    except OSError:
        return "(unknown peer)"
    return str(Address(str(remote[0]), int(remote[1])))


def _tcp_conn(stream: trio.SocketStream) -> Conn:
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    local = stream.socket.getsockname()
    remote = stream.socket.getpeername()
    return Conn(stream, str(local[0]), str(Address(str(remote[0]), int(remote[1]))))


class TcpTransport:
    """Real TCP. Connection attempts are bounded by the caller's cancel scope."""

    @asynccontextmanager
    async def listen(self, address: Address, interface: str | None = None
                     ) -> AsyncIterator[TcpListener]:
        try:
            if interface is None:
                listeners = await trio.open_tcp_listeners(address.port, host=address.host)
            else:
                listeners = [await _listener_on_interface(address, interface)]
        except OSError as exc:
            raise BindFailed(str(address), exc.strerror or str(exc)) from exc
        listener = listeners[0]
        for extra in listeners[1:]:
            await extra.aclose()
        sockname = listener.socket.getsockname()
        bound = TcpListener(listener, Address(str(sockname[0]), int(sockname[1])))
        try:
            yield bound
        finally:
            await bound.aclose()

    async def connect(self, address: Address, interface: str | None = None) -> Conn:
        if interface is None:
            stream = await trio.open_tcp_stream(address.host, address.port)
        else:
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                bind_to_interface(sock, interface)  # type: ignore[arg-type]
                await sock.connect((address.host, address.port))
            except BaseException:
                sock.close()
                raise
            stream = trio.SocketStream(sock)
        try:
            return _tcp_conn(stream)
        except OSError as exc:  # reset at once (ENOTCONN, or EINVAL on macOS)
            await stream.aclose()
            raise ConnectionResetError(errno.ECONNRESET,
                                       f"connection reset as it opened: {exc}") from exc


async def _listener_on_interface(address: Address, interface: str) -> trio.SocketListener:
    """A listener whose accepted connections stay on ``interface`` (see states.netif)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        bind_to_interface(sock, interface)  # type: ignore[arg-type]
        await sock.bind((address.host, address.port))
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


#: ``connect`` errors worth another try while the deadline lasts: nobody listens there
#: yet, or the connection was reset or dropped on its way (a restarting rank 0, a busy
#: backlog, a middlebox).
_REDIAL_ERRNOS = frozenset({
    errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EHOSTUNREACH,
    errno.ENETUNREACH, errno.ENOTCONN, errno.ETIMEDOUT, errno.EPIPE,
})


def worth_redialing(exc: BaseException) -> bool:
    """True for the connect errors that mean "not now" rather than "never" (retry).

    A name lookup that failed *temporarily* (``EAI_AGAIN``: no resolver reachable yet,
    as on a Mac whose network is still coming up) is "not now" too; a name that does
    not exist (``EAI_NONAME``) is "never"."""
    if isinstance(exc, socket.gaierror):
        return exc.errno == socket.EAI_AGAIN
    return isinstance(exc, OSError) and (
        exc.errno in _REDIAL_ERRNOS or "all attempts to connect" in str(exc).lower()
    )


class MultiListener:
    """Several listeners (one per interface) seen as one: ``accept`` returns the next
    connection from any of them. Connections that arrive together are queued, never
    dropped."""

    def __init__(self, listeners: list[Listener]) -> None:
        if not listeners:
            raise ValueError("MultiListener needs at least one listener")
        self.listeners = listeners
        self.address = listeners[0].address
        #: Connections (or one listener's :class:`AcceptFailed`) in arrival order.
        self._ready: list[Conn | AcceptFailed] = []

    async def accept(self) -> Conn:
        if len(self.listeners) == 1:
            return await self.listeners[0].accept()
        if not self._ready:
            async with trio.open_nursery() as nursery:
                async def one(listener: Listener) -> None:
                    try:
                        self._ready.append(await listener.accept())
                    except AcceptFailed as exc:  # one connection, not this nursery's end
                        self._ready.append(exc)
                    nursery.cancel_scope.cancel()

                for listener in self.listeners:
                    nursery.start_soon(one, listener)
        else:
            await trio.lowlevel.checkpoint()
        item = self._ready.pop(0)
        if isinstance(item, AcceptFailed):
            raise item
        return item

    async def aclose(self) -> None:
        for item in self._ready:
            if isinstance(item, Conn):
                await item.stream.aclose()
        self._ready.clear()
        for listener in self.listeners:
            await listener.aclose()
