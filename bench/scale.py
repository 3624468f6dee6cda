"""Scale in one process: many 2-rank bootstraps at once over in-memory links.

Every rank runs the real machine, activities, codec, handshake and heartbeats; group
init is :func:`states.groupinit.fake_initializer`, which takes the real path up to
the MLX call (env, private topology file) and returns a fake group. All sessions
start together in one ``trio.run`` on the real clock; each holds ``ready`` until its
peer is there too, then closes. Peak memory is the process's peak RSS
(``ru_maxrss``), next to the RSS before the run.

Baseline, in the same process: one bootstrap alone; the ratio is the total time over
(N x one bootstrap's time), i.e. how much running them together costs or saves.
``--mock-clock`` runs the same thing under trio's MockClock as a cross-check
(virtual time: only the CPU time is real).

Run: python bench/scale.py [--sessions 1000] [--mock-clock] [--json OUT]
"""

from __future__ import annotations

import resource
import sys
import time

import trio
import trio.testing
from common import emit, row

from states.api import bootstrap_cluster
from states.config import Address, ClusterConfig
from states.context import FakePortReservation
from states.groupinit import fake_initializer
from states.transport import MemoryNetwork
from states.watchdog import NoWatchdog

KEY = b"k" * 32


def rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux: KiB units)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


async def session(network: MemoryNetwork, i: int, ready: list[int]) -> None:
    coord = Address(f"s{i}n0", 7700)
    both = trio.Event()
    arrived: list[int] = []

    async def rank(r: int) -> None:
        cfg = ClusterConfig(rank=r, world_size=2, key=KEY,
                            listen=coord if r == 0 else None,
                            peers=() if r == 0 else (coord,))
        async with bootstrap_cluster(
            cfg, transport=network.transport(f"s{i}n{r}"), initializer=fake_initializer(),
            watchdog=NoWatchdog(), allocate_port=FakePortReservation,
        ) as cluster:
            assert cluster.group.size() == 2
            arrived.append(r)
            if len(arrived) == 2:
                both.set()
            with trio.move_on_after(30):
                await both.wait()
            ready.append(r)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(rank, 0)
        nursery.start_soon(rank, 1)


async def run_sessions(n: int) -> int:
    network = MemoryNetwork()
    ready: list[int] = []
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(session, network, i, ready)
    return len(ready)


def timed(n: int, clock: trio.abc.Clock | None = None) -> float:
    start = time.perf_counter()
    done = trio.run(run_sessions, n, clock=clock)
    elapsed = time.perf_counter() - start
    if done != 2 * n:
        raise RuntimeError(f"only {done} of {2 * n} ranks reached ready")
    return elapsed


def measure(n: int, mock_clock: bool) -> list[dict[str, object]]:
    timed(1)  # warm-up (imports, caches)
    one = min(timed(1) for _ in range(5))
    before = rss_mb()
    total = timed(n)
    peak = rss_mb()
    print(f"{n} simulated 2-rank bootstraps at once ({2 * n} machines), one process, "
          "real clock:")
    print(f"  total {total:.2f} s ({total / n * 1000:.2f} ms per bootstrap); "
          f"peak RSS {peak:.0f} MB (before the run {before:.0f} MB)")
    print(f"  baseline, one bootstrap alone: {one * 1000:.2f} ms; "
          f"ratio total / ({n} x one) = {total / (n * one):.2f}x")
    if mock_clock:
        mock = timed(n, trio.testing.MockClock(autojump_threshold=0))
        print(f"  cross-check under MockClock (autojump): {mock:.2f} s wall")
    return [row(f"Scale: {n} simulated 2-rank bootstraps at once, one process",
                f"{total:.2f} s, peak RSS {peak:.0f} MB (before {before:.0f} MB)",
                f"one bootstrap alone {one * 1000:.1f} ms",
                f"{total / (n * one):.2f}x of {n} x one",
                "< 5 s and < 300 MB", total < 5 and peak < 300)]


def main(argv: list[str]) -> None:
    n = int(argv[argv.index("--sessions") + 1]) if "--sessions" in argv else 1000
    emit(measure(n, "--mock-clock" in argv), argv)


if __name__ == "__main__":
    main(sys.argv[1:])
