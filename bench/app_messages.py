"""App messages on the control link, and what heartbeats cost in ``ready``.

Two ranks, two processes, real TCP on loopback (group init faked at the MLX call):
this process is rank 0, a child process (``--child``) is rank 1. In one session:

- **Heartbeat CPU:** both ranks idle in ``ready`` for ``--idle`` seconds; each one's
  process CPU time over that window, as a share of one core. Baseline: this process
  sleeping in trio for the same time before the session (same run).
- **Latency:** ``--count`` round trips of a 1 KiB message (rank 0 sends, rank 1's app
  sends it back); p50/p99 of the round trip. Baseline: the same round trip over a raw
  trio TCP stream between the same two processes.
- **Throughput:** 64 KiB messages from rank 0 to rank 1's app, until rank 1 has them
  all. Baseline: the same bytes over a raw trio TCP stream.
- **Flood:** both ranks send 64 KiB messages to each other as fast as they can for
  ``--flood`` seconds while reading everything; both must still be ``ready`` (no
  false ``peer_lost``), every message accounted for.

Run: python bench/app_messages.py [--idle 60] [--flood 60] [--count 2000] [--json OUT]
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from common import emit, percentile, row

from clusterfsm.states.api import Cluster, bootstrap_cluster
from clusterfsm.states.config import Address, ClusterConfig
from clusterfsm.states.testing import fake_initializer
from clusterfsm.states.transport import TcpListener, TcpTransport
from clusterfsm.states.watchdog import NoWatchdog

KEY = b"k" * 32
KIB = 1024
BIG = 64 * KIB


def _arg(argv: list[str], name: str, default: float) -> float:
    return float(argv[argv.index(name) + 1]) if name in argv else default


class _Bound(TcpTransport):
    def __init__(self) -> None:
        self.port = trio.Event()
        self.address: Address | None = None

    @asynccontextmanager
    async def listen(self, address: Address, interface: str | None = None
                     ) -> AsyncIterator[TcpListener]:
        async with super().listen(address, interface) as listener:
            self.address = listener.address
            self.port.set()
            yield listener


# -- rank 1 (the child) ------------------------------------------------------------------


async def child(port: int) -> None:
    config = ClusterConfig(rank=1, world_size=2, key=KEY, peers=(Address("127.0.0.1", port),))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    raw_port = listeners[0].socket.getsockname()[1]
    async with bootstrap_cluster(config, initializer=fake_initializer(),
                                 watchdog=NoWatchdog()) as cluster:
        await cluster.send(0, b"P%d" % raw_port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_raw_server, listeners[0])
            await _child_app(cluster, nursery)
            nursery.cancel_scope.cancel()


async def _raw_server(listener: trio.SocketListener) -> None:
    async with listener:
        stream = await listener.accept()
        async with stream:
            while True:  # "E" + 1 KiB: echo it; "S" + n: read n bytes, answer b"k"
                try:
                    tag = await _exactly(stream, 9)
                except EOFError:
                    return
                n = int.from_bytes(tag[1:], "big")
                data = await _exactly(stream, n)
                await stream.send_all(tag + data if tag[:1] == b"E" else b"k")


async def _exactly(stream: trio.SocketStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


async def _child_app(cluster: Cluster, nursery: trio.Nursery) -> None:
    received = 0
    flooding = trio.CancelScope()
    flood_done = trio.Event()
    sent = [0]
    idle_from = 0.0
    async for _rank, data in cluster.messages():
        tag = data[:1]
        if tag == b"E":
            await cluster.send(0, data)
        elif tag == b"I":  # idle window starts / ends
            idle_from = time.process_time()
        elif tag == b"J":
            await cluster.send(0, b"C%f" % (time.process_time() - idle_from))
        elif tag == b"S":
            received += 1
        elif tag == b"T":
            await cluster.send(0, b"R%d" % received)
            received = 0
        elif tag == b"F":
            nursery.start_soon(_flood, cluster, flooding, sent, flood_done)
        elif tag == b"X":
            flooding.cancel()
            await flood_done.wait()  # its last send may still be on its way
            await cluster.send(0, b"Y%d %d %s" % (sent[0], received, cluster.state.encode()))
        elif tag == b"Q":
            return


async def _flood(cluster: Cluster, scope: trio.CancelScope, sent: list[int],
                 done: trio.Event) -> None:
    payload = b"S" + bytes(BIG - 1)
    try:
        with scope:
            while True:
                await cluster.send(0, payload)
                sent[0] += 1
    finally:
        done.set()


# -- rank 0 (this process) ---------------------------------------------------------------


async def parent(idle: float, flood: float, count: int) -> list[dict[str, object]]:
    baseline_cpu = time.process_time()
    await trio.sleep(min(idle, 5.0))
    baseline_share = (time.process_time() - baseline_cpu) / min(idle, 5.0)

    transport = _Bound()
    config = ClusterConfig(rank=0, world_size=2, key=KEY, listen=Address("127.0.0.1", 0))
    proc: subprocess.Popen[bytes] | None = None
    rows: list[dict[str, object]] = []
    try:
        async with trio.open_nursery() as nursery:
            async def start_child() -> None:
                nonlocal proc
                await transport.port.wait()
                assert transport.address is not None
                proc = subprocess.Popen([sys.executable, __file__, "--child",  # noqa: ASYNC220
                                         str(transport.address.port)])

            nursery.start_soon(start_child)
            async with bootstrap_cluster(config, transport=transport,
                                         initializer=fake_initializer(),
                                         watchdog=NoWatchdog()) as cluster:
                rows = await _measure(cluster, idle, flood, count, baseline_share)
                await cluster.send(1, b"Q")
    finally:
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return rows


async def _measure(cluster: Cluster, idle: float, flood: float, count: int,
                   baseline_share: float) -> list[dict[str, object]]:
    inbox = cluster.messages()
    first = await inbox.receive()
    raw_port = int(first[1][1:])
    stream = await trio.open_tcp_stream("127.0.0.1", raw_port)
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)

    # heartbeat CPU while idle in ready
    await cluster.send(1, b"I")
    cpu0 = time.process_time()
    await trio.sleep(idle)
    ours = (time.process_time() - cpu0) / idle
    await cluster.send(1, b"J")
    theirs = float((await inbox.receive())[1][1:]) / idle
    print(f"heartbeat CPU in ready over {idle:g} s: rank 0 {ours * 100:.3f}% of a core, "
          f"rank 1 {theirs * 100:.3f}%; an idle trio process: {baseline_share * 100:.3f}%")

    # latency of 1 KiB
    payload = b"E" + bytes(KIB - 1)
    ours_rt: list[float] = []
    for _ in range(count):
        t0 = time.perf_counter()
        await cluster.send(1, payload)
        await inbox.receive()
        ours_rt.append(time.perf_counter() - t0)
    raw_rt: list[float] = []
    frame = b"E" + KIB.to_bytes(8, "big") + bytes(KIB)
    for _ in range(count):
        t0 = time.perf_counter()
        await stream.send_all(frame)
        await _exactly(stream, len(frame))
        raw_rt.append(time.perf_counter() - t0)
    p50, p99 = percentile(ours_rt, 50) * 1e3, percentile(ours_rt, 99) * 1e3
    r50, r99 = percentile(raw_rt, 50) * 1e3, percentile(raw_rt, 99) * 1e3
    print(f"1 KiB round trip over {count}: p50 {p50:.3f} ms, p99 {p99:.3f} ms; raw TCP "
          f"p50 {r50:.3f} ms, p99 {r99:.3f} ms")

    # throughput of 64 KiB messages
    n = 1600  # 100 MiB
    big = b"S" + bytes(BIG - 1)
    t0 = time.perf_counter()
    for _ in range(n):
        await cluster.send(1, big)
    await cluster.send(1, b"T")
    got = await inbox.receive()
    ours_mbs = n * BIG / (time.perf_counter() - t0) / 1e6
    assert got[1] == b"R%d" % n, got
    t0 = time.perf_counter()
    await stream.send_all(b"S" + (n * BIG).to_bytes(8, "big"))
    for _ in range(n):
        await stream.send_all(big)
    await _exactly(stream, 1)
    raw_mbs = n * BIG / (time.perf_counter() - t0) / 1e6
    print(f"64 KiB messages: {ours_mbs:.0f} MB/s; raw TCP {raw_mbs:.0f} MB/s")
    await stream.aclose()

    # flood both ways
    await cluster.send(1, b"F")
    received = 0
    sent = 0
    reply = b""
    deadline = trio.current_time() + flood
    async with trio.open_nursery() as nursery:
        async def read() -> None:
            nonlocal received, reply
            async for _rank, data in inbox:
                if data[:1] == b"S":
                    received += 1
                elif data[:1] == b"Y":
                    reply = data
                    return

        nursery.start_soon(read)
        while trio.current_time() < deadline:
            await cluster.send(1, big)
            sent += 1
        await cluster.send(1, b"X")
    their_sent, their_received, their_state = reply[1:].split()
    states = (cluster.state, their_state.decode())
    ok = states == ("ready", "ready") and int(their_sent) == received \
        and int(their_received) == sent
    print(f"flood {flood:g} s both ways: rank 0 sent {sent}, got {received}; rank 1 sent "
          f"{int(their_sent)}, got {int(their_received)}; states {states}")

    worst = max(ours, theirs)
    return [
        row("App message 1 KiB round trip (p50 / p99)", f"{p50:.3f} / {p99:.3f} ms",
            f"{r50:.3f} / {r99:.3f} ms raw TCP", f"{p99 / r99:.1f}x at p99", "p99 < 1 ms",
            p99 < 1.0),
        row("App messages 64 KiB throughput", f"{ours_mbs:.0f} MB/s",
            f"{raw_mbs:.0f} MB/s raw TCP", f"{ours_mbs / raw_mbs:.2f}x", ">= 300 MB/s",
            ours_mbs >= 300),
        row(f"App flood, {flood:g} s both ways", f"{sent + received} messages, no loss",
            "-", "-", "no false peer_lost", ok),
        row(f"Heartbeat CPU in ready ({idle:g} s)", f"{worst * 100:.3f}% of a core",
            f"{baseline_share * 100:.3f}% idle trio", "-", "< 0.5%", worst < 0.005),
    ]


def main(argv: list[str]) -> int:
    if "--child" in argv:
        trio.run(child, int(argv[argv.index("--child") + 1]))
        return 0
    rows = trio.run(parent, _arg(argv, "--idle", 60.0), _arg(argv, "--flood", 60.0),
                    int(_arg(argv, "--count", 2000)))
    emit(rows, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
