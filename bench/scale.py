"""Scale in one process: many 2-rank bootstraps at once over in-memory links.

Every rank runs the real machine, runner, activities, codec, Noise handshake, control
links and heartbeats (default interval, 0.1 s); group init is
:func:`clusterfsm.states.testing.fake_initializer`, which takes the real path up to the MLX
call (env, private topology directory and file, read back as MLX would) and returns
a fake group. All sessions start together in one ``trio.run`` on the real clock. A
rank holds ``ready`` only until its peer is there too (an app that is done with the
cluster), then closes; the total is from the start to the last rank closed. Peak
memory is the process's peak RSS (``ru_maxrss``), next to the RSS before the run.

The in-memory network is the states' :class:`~states.testing.MemoryNetwork` with
:func:`pipe_pair` connections: pairs of unbounded in-memory byte pipes whose
``send_all``/``receive_some`` checkpoint once, as trio's TCP ``SocketStream`` does.
The tests' default, ``trio.testing.memory_stream_pair``, checkpoints twice in every
call on purpose (to catch two tasks using one stream in tests): harness cost that a real
link does not have. The same run measures the tests' network too (cross-check).

Also in the same run, to say where the time goes: the same bootstraps with CPython's
cyclic garbage collector off during the run, then on but collecting less often (what
an app running thousands of sessions can choose), and the topology-directory system
calls alone (``TopologyDir`` create, write, read back, close: 2 x N times). Every
run starts after a ``gc.collect()``; the peak RSS is the first run's.

Baseline: one bootstrap alone (wall, it includes the ring's 5 ms release delay);
the ratio is the total over N x one bootstrap's time.
``--mock-clock`` adds the same run under trio's MockClock as a cross-check (virtual
time: no heartbeat is due, so only the bootstrap work itself is left).

Run: python bench/scale.py [--sessions 1000] [--mock-clock] [--json OUT]
"""

from __future__ import annotations

import gc
import math
import resource
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable

import trio
import trio.testing
from common import emit, row

from clusterfsm.states.api import bootstrap_cluster
from clusterfsm.states.config import Address, ClusterConfig
from clusterfsm.states.groupinit import TopologyDir
from clusterfsm.states.testing import FakePortReservation, MemoryNetwork, fake_initializer
from clusterfsm.states.watchdog import NoWatchdog

KEY = b"k" * 32
#: What an app running thousands of sessions in one process can set (default
#: (700, 10, 10)): with every session's objects alive for the whole run, each full
#: collection walks all of them, and at the default rate there are ~20 in a run.
APP_GC_THRESHOLD = (50_000, 20, 100)


def rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux: KiB units)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


# -- the bench's in-memory network ----------------------------------------------------


class PipeStream(trio.abc.Stream):
    """One end of an in-memory connection: a byte pipe each way, one checkpoint a call.

    Closing sends EOF to the peer; sending to a peer that closed raises
    ``trio.BrokenResourceError``, using a closed end ``trio.ClosedResourceError``,
    as with TCP.
    """

    def __init__(self, send: trio.MemorySendChannel[bytes],
                 receive: trio.MemoryReceiveChannel[bytes]) -> None:
        self._send = send
        self._receive = receive
        self._buffered = b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            self._send.send_nowait(bytes(data))
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._buffered:
            await trio.lowlevel.checkpoint()
        else:
            try:
                self._buffered = await self._receive.receive()
            except trio.EndOfChannel:
                return b""
        cut = len(self._buffered) if max_bytes is None else max_bytes
        data, self._buffered = self._buffered[:cut], self._buffered[cut:]
        return data

    async def aclose(self) -> None:
        self._send.close()
        self._receive.close()
        await trio.lowlevel.checkpoint()


def pipe_pair() -> tuple[PipeStream, PipeStream]:
    a_to_b, b_from_a = trio.open_memory_channel[bytes](math.inf)
    b_to_a, a_from_b = trio.open_memory_channel[bytes](math.inf)
    return PipeStream(a_to_b, a_from_b), PipeStream(b_to_a, b_from_a)


def bench_network() -> MemoryNetwork:
    """The states' in-memory network, connected by :func:`pipe_pair` streams."""
    return MemoryNetwork(stream_pair=pipe_pair)


# -- the run --------------------------------------------------------------------------

async def session(network: MemoryNetwork, i: int, ready_at: list[float],
                  failed: Counter[str]) -> None:
    coord = Address(f"s{i}n0", 7700)
    both = trio.Event()
    arrived: list[int] = []

    async def rank(r: int) -> None:
        cfg = ClusterConfig(rank=r, world_size=2, key=KEY,
                            listen=coord if r == 0 else None,
                            peers=() if r == 0 else (coord,))
        try:
            async with bootstrap_cluster(
                cfg, transport=network.transport(f"s{i}n{r}"),
                initializer=fake_initializer(), watchdog=NoWatchdog(),
                allocate_port=FakePortReservation,
            ) as cluster:
                assert cluster.group.size() == 2
                ready_at.append(trio.current_time())
                arrived.append(r)
                if len(arrived) == 2:
                    both.set()
                with trio.move_on_after(30):
                    await both.wait()
        except Exception as exc:  # noqa: BLE001 - counted and reported by type
            failed[type(exc).__name__] += 1
            both.set()  # the peer is done waiting for us

    async with trio.open_nursery() as nursery:
        nursery.start_soon(rank, 0)
        nursery.start_soon(rank, 1)


async def run_sessions(n: int, network: MemoryNetwork, ready_at: list[float],
                       failed: Counter[str]) -> float:
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(session, network, i, ready_at, failed)
    return start


class Run:
    """One timed run: wall and CPU seconds, when each rank reached ``ready``, and
    how many ranks failed (by error type; under heavy load a state can pass its
    deadline, and that is a result, not a crash of the bench)."""

    def __init__(self, n: int, network: Callable[[], MemoryNetwork] = bench_network,
                 clock: trio.abc.Clock | None = None, gc_off: bool = False,
                 gc_threshold: tuple[int, int, int] | None = None) -> None:
        ready_at: list[float] = []
        self.failed: Counter[str] = Counter()
        gc.collect()  # every run starts from the same heap, not the last run's garbage
        default_threshold = gc.get_threshold()
        if gc_off:
            gc.disable()
        if gc_threshold is not None:
            gc.set_threshold(*gc_threshold)
        try:
            cpu, start = time.process_time(), time.perf_counter()
            t0 = trio.run(run_sessions, n, network(), ready_at, self.failed, clock=clock)
            self.wall = time.perf_counter() - start
            self.cpu = time.process_time() - cpu
        finally:
            gc.enable()
            gc.set_threshold(*default_threshold)
        self.ready = sorted(t - t0 for t in ready_at) or [math.nan]
        self.ok = len(ready_at) == 2 * n and not self.failed

    def failures(self) -> str:
        if not self.failed:
            return ""
        return " FAILED: " + ", ".join(f"{k} x{v}" for k, v in self.failed.most_common())


def topology_files_alone(count: int) -> float:
    """Seconds for ``count`` topology-directory lifecycles, in the run's pattern: all
    are created, then written, read back and removed (the sessions move together)."""
    start = time.perf_counter()
    dirs = [TopologyDir() for _ in range(count)]
    paths = [d.write(f"hostfile-{i:08x}.json", [[f"s{i}n0:50001"], [f"s{i}n1:50002"]])
             for i, d in enumerate(dirs)]
    for path in paths:
        with open(path) as f:
            f.read()
    for d in dirs:
        d.close()
    return time.perf_counter() - start


def measure(n: int, mock_clock: bool) -> list[dict[str, object]]:
    Run(1)  # warm-up (imports, caches)
    one = min(Run(1).wall for _ in range(5))
    before = rss_mb()
    main = Run(n)
    peak = rss_mb()
    total, last_ready = main.wall, main.ready[-1]
    print(f"{n} simulated 2-rank bootstraps at once ({2 * n} machines), one process, "
          "real clock, in-memory links:")
    print(f"  every rank ready after {last_ready:.2f} s (first {main.ready[0]:.2f} s, median "
          f"{statistics.median(main.ready):.2f} s: all progress together, as trio runs "
          "every runnable task in turn)")
    print(f"  total with every session closed {total:.2f} s wall, {main.cpu:.2f} s CPU; "
          f"peak RSS {peak:.0f} MB (before the run {before:.0f} MB){main.failures()}")
    print(f"  baseline, one bootstrap alone: {one * 1000:.2f} ms; "
          f"ratio total / ({n} x one) = {total / (n * one):.2f}x")
    print("  where the time goes (same process, same sessions):")
    tests_net = Run(n, MemoryNetwork)
    print(f"    over the tests' MemoryNetwork (trio.testing streams, 2 checkpoints a "
          f"call): {tests_net.wall:.2f} s{tests_net.failures()}")
    no_gc = Run(n, gc_off=True)
    print(f"    with CPython's cyclic GC off during the run: {no_gc.wall:.2f} s "
          f"(so the GC's share is about {max(0.0, total - no_gc.wall):.2f} s)"
          f"{no_gc.failures()}")
    tuned = Run(n, gc_threshold=APP_GC_THRESHOLD)
    print(f"    with the GC on but collecting less often, gc.set_threshold"
          f"{APP_GC_THRESHOLD} (an app running thousands of sessions): "
          f"{tuned.wall:.2f} s{tuned.failures()}")
    files = topology_files_alone(2 * n)
    print(f"    topology directories alone ({2 * n} created, written, read, removed in "
          f"{tempfile.gettempdir()}): {files:.2f} s")
    if mock_clock:
        mock = Run(n, clock=trio.testing.MockClock(autojump_threshold=0))
        print(f"    under MockClock (virtual time, so no heartbeat falls due): "
              f"{mock.wall:.2f} s wall{mock.failures()}")
    met = main.ok and total < 5 and peak < 300
    return [row(f"Scale: {n} simulated 2-rank bootstraps at once, one process",
                f"{total:.2f} s to all closed (all ready at {last_ready:.2f} s), peak RSS "
                f"{peak:.0f} MB (before {before:.0f} MB){main.failures()}",
                f"one bootstrap alone {one * 1000:.1f} ms",
                f"{total / (n * one):.2f}x of {n} x one",
                "< 5 s and < 300 MB", met)]


def main(argv: list[str]) -> None:
    n = int(argv[argv.index("--sessions") + 1]) if "--sessions" in argv else 1000
    emit(measure(n, "--mock-clock" in argv), argv)


if __name__ == "__main__":
    main(sys.argv[1:])
