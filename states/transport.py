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
from typing import Protocol

import attrs
import trio

from clusterfsm.states.config import Address
from clusterfsm.states.netif import bind_to_interface


@attrs.frozen(auto_exc=True)
class BindFailed(Exception):
    """The control listener could not be opened (address in use, no such address)."""

    address: str
    reason: str

    def __str__(self) -> str:
        return f"cannot listen on {self.address}: {self.reason}"


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

    async def accept(self) -> Conn: ...

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
        stream = await self._listener.accept()
        return _tcp_conn(stream)

    async def aclose(self) -> None:
        await self._listener.aclose()


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
            return _tcp_conn(stream)
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            bind_to_interface(sock, interface)  # type: ignore[arg-type]
            await sock.connect((address.host, address.port))
        except BaseException:
            sock.close()
            raise
        return _tcp_conn(trio.SocketStream(sock))


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


def connection_refused(exc: BaseException) -> bool:
    """True for the errors that mean "nobody listens there yet" (worth retrying)."""
    return isinstance(exc, OSError) and (
        exc.errno in (errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH)
        or "all attempts to connect" in str(exc).lower()
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
        self._ready: list[Conn] = []

    async def accept(self) -> Conn:
        if len(self.listeners) == 1:
            return await self.listeners[0].accept()
        if not self._ready:
            async with trio.open_nursery() as nursery:
                async def one(listener: Listener) -> None:
                    self._ready.append(await listener.accept())
                    nursery.cancel_scope.cancel()

                for listener in self.listeners:
                    nursery.start_soon(one, listener)
        else:
            await trio.lowlevel.checkpoint()
        return self._ready.pop(0)

    async def aclose(self) -> None:
        for conn in self._ready:
            await conn.stream.aclose()
        self._ready.clear()
        for listener in self.listeners:
            await listener.aclose()
