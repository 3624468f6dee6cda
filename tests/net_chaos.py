"""Misbehaving connections and a slow path, on real loopback sockets, for the
admission tests: what a port scanner, a health check, a flood or a far peer does to
rank 0's control port. A TCP reset cannot be faked in memory, so these are real.
"""

from __future__ import annotations

import socket
import struct

import attrs
import trio

from clusterfsm.states.codec import Hello, encode_message
from clusterfsm.states.config import Address
from clusterfsm.states.handshake import PROTOCOL_VERSION

#: ``SO_LINGER`` on, 0 s: ``close`` sends RST instead of FIN.
_LINGER_RESET = struct.pack("ii", 1, 0)


def _valid_hello(world: int = 2) -> bytes:
    return encode_message(Hello(PROTOCOL_VERSION, b"X" * 16, 1, world, b"N" * 16, "x"))


async def reset(address: Address) -> None:
    """Connect, then reset (RST) at once: what rank 0's getpeername met as ENOTCONN."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        await sock.connect((address.host, address.port))


async def close_at_once(address: Address) -> None:
    stream = await trio.open_tcp_stream(address.host, address.port)
    await stream.aclose()


async def half_close(address: Address, hold: float = 1.0) -> None:
    """Shut our sending side; keep reading for a while (bounded)."""
    stream = await trio.open_tcp_stream(address.host, address.port)
    async with stream:
        await stream.send_eof()
        with trio.move_on_after(hold):
            while await _read_or_reset(stream):
                pass


async def garbage(address: Address) -> None:
    stream = await trio.open_tcp_stream(address.host, address.port)
    async with stream:
        try:
            await stream.send_all(b"GET / HTTP/1.0\r\n\r\n\x00\xff" * 8)
        except (trio.BrokenResourceError, OSError):
            return
        with trio.move_on_after(1.0):
            while await _read_or_reset(stream):
                pass


async def silence(address: Address, hold: float = 1.0) -> None:
    stream = await trio.open_tcp_stream(address.host, address.port)
    async with stream:
        with trio.move_on_after(hold):
            while await _read_or_reset(stream):
                pass


async def prefix_then_reset(address: Address) -> None:
    """A valid HELLO (no key needed), then a reset before the AUTH."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        await sock.connect((address.host, address.port))
        await sock.send(_valid_hello())
        with trio.move_on_after(0.05):
            await sock.recv(1024)


async def one_byte_a_second(address: Address, hold: float = 2.0) -> None:
    """A slowloris: a valid HELLO, one byte a second (bounded)."""
    stream = await trio.open_tcp_stream(address.host, address.port)
    async with stream:
        with trio.move_on_after(hold):
            for byte in _valid_hello():
                try:
                    await stream.send_all(bytes([byte]))
                except (trio.BrokenResourceError, OSError):
                    return
                await trio.sleep(1.0)


async def _read_or_reset(stream: trio.SocketStream) -> bool:
    try:
        return bool(await stream.receive_some(4096))
    except (trio.BrokenResourceError, OSError):
        return False


BEHAVIOURS = {
    "reset": reset,
    "close": close_at_once,
    "half_close": half_close,
    "garbage": garbage,
    "silence": silence,
    "prefix_then_reset": prefix_then_reset,
    "one_byte_a_second": one_byte_a_second,
}


@attrs.define
class DelayRelay:
    """A user-space path with ``delay`` seconds each way (``tc netem`` is not
    available here), in front of ``target``: for each client it waits ``delay`` (the
    SYN's trip), connects to the target, then forwards every chunk ``delay`` later,
    in order, both ways. ``reset_first`` connections are reset at once instead
    (a middlebox's RST), ``close_after_first_chunk`` are closed after forwarding their
    first chunk (an EOF before WELCOME)."""

    target: Address
    delay: float = 0.05
    reset_first: int = 0
    close_after_first_chunk: int = 0
    address: Address | None = None
    connections: int = 0

    async def serve(self, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
                    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        self.address = Address("127.0.0.1", port)
        async with trio.open_nursery() as nursery:
            task_status.started(self.address)
            await trio.serve_listeners(self._client, listeners, handler_nursery=nursery)

    async def _client(self, client: trio.SocketStream) -> None:
        self.connections += 1
        n = self.connections
        async with client:
            if n <= self.reset_first:
                client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                return
            await trio.sleep(self.delay)
            try:
                upstream = await trio.open_tcp_stream(self.target.host, self.target.port)
            except OSError:
                return
            cut = n <= self.reset_first + self.close_after_first_chunk
            async with upstream, trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope, cut)
                nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope, False)

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream,
                    done: trio.CancelScope, cut_after_first: bool) -> None:
        send, receive = trio.open_memory_channel[tuple[float, bytes]](256)

        async def forward() -> None:
            async for at, data in receive:
                await trio.sleep_until(at)
                try:
                    await sink.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    break
                if cut_after_first:
                    break
            done.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(forward)
            async with send:
                while True:
                    try:
                        data = await source.receive_some(65536)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        data = b""
                    if not data:
                        break
                    await send.send((trio.current_time() + self.delay, data))
