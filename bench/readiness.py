"""Readiness latency: from the heartbeat answer (Pong) that makes the session healthy
to the machine entering the next state (``exchanging_bootstrap``).

Two-rank bootstraps over in-memory links on the real trio clock (group init faked
at the MLX call). The bench wraps ``ControlLink._dispatch`` to stamp the first Pong
each link receives, and an observer stamps the entry into ``exchanging_bootstrap``;
for each rank the latency is entry minus its last first-Pong. Baseline, in the same
run: the bare wake-up latency of a trio task waiting on a ``trio.Event``.

Run: python bench/readiness.py [--sessions 300] [--json OUT]
"""

from __future__ import annotations

import sys
import time

import trio
import trio.lowlevel
from common import emit, median, percentile, row

from clusterfsm.states.api import bootstrap_cluster
from clusterfsm.states.codec import Pong
from clusterfsm.states.config import Address, ClusterConfig
from clusterfsm.states.link import ControlLink
from clusterfsm.states.testing import FakePortReservation, MemoryNetwork, fake_initializer
from clusterfsm.states.watchdog import NoWatchdog

KEY = b"k" * 32


def config(rank: int, host: str) -> ClusterConfig:
    coord = Address(host, 7700)
    return ClusterConfig(rank=rank, world_size=2, key=KEY,
                         listen=coord if rank == 0 else None,
                         peers=() if rank == 0 else (coord,))


async def one_session(i: int, samples: list[float]) -> None:
    network = MemoryNetwork()
    pong_at: dict[str, float] = {}  # local host -> time its link got its first Pong
    both = trio.Event()
    arrived: list[int] = []
    original = ControlLink._dispatch

    async def timed_dispatch(self: ControlLink, msg: object) -> None:
        if isinstance(msg, Pong) and not self.first_pong.is_set():
            pong_at[self.conn.local_host] = time.perf_counter()
        await original(self, msg)  # type: ignore[arg-type]

    async def rank(r: int) -> None:
        host = f"s{i}n{r}"

        def observe(rec: object) -> None:
            if getattr(rec, "dest", None) == "exchanging_bootstrap":
                samples.append(time.perf_counter() - pong_at[host])

        async with bootstrap_cluster(
            config(r, f"s{i}n0"), transport=network.transport(host),
            initializer=fake_initializer(), watchdog=NoWatchdog(),
            allocate_port=FakePortReservation, observers=[observe],
        ):
            arrived.append(r)
            if len(arrived) == 2:
                both.set()
            with trio.move_on_after(5):
                await both.wait()

    ControlLink._dispatch = timed_dispatch  # type: ignore[method-assign]
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rank, 0)
            nursery.start_soon(rank, 1)
    finally:
        ControlLink._dispatch = original  # type: ignore[method-assign]


async def event_wakeup(n: int) -> list[float]:
    """Baseline: set an Event in one task, measure when the waiting task runs."""
    out: list[float] = []
    for _ in range(n):
        event = trio.Event()
        set_at = [0.0]

        async def waiter(ev: trio.Event = event, at: list[float] = set_at) -> None:
            await ev.wait()
            out.append(time.perf_counter() - at[0])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.lowlevel.checkpoint()
            set_at[0] = time.perf_counter()
            event.set()
    return out


def measure(sessions: int) -> list[dict[str, object]]:
    async def main() -> tuple[list[float], list[float]]:
        samples: list[float] = []
        for i in range(sessions):
            await one_session(i, samples)
        return samples, await event_wakeup(sessions * 2)

    samples, base = trio.run(main)
    us = [s * 1e6 for s in samples]
    base_us = [b * 1e6 for b in base]
    p99, p50 = percentile(us, 99), median(us)
    print(f"readiness latency over {len(us)} rank-sessions ({sessions} 2-rank bootstraps, "
          "in-memory links, real clock):")
    print(f"  p50 {p50:7.1f} us   p99 {p99:7.1f} us   max {max(us):7.1f} us")
    print(f"  baseline, bare trio.Event wake-up: p50 {median(base_us):.1f} us, "
          f"p99 {percentile(base_us, 99):.1f} us")
    print(f"  ratio p99 ours / p99 bare wake-up: {p99 / percentile(base_us, 99):.1f}x; "
          "a 100 ms polling loop would average 50,000 us")
    return [row("Readiness latency: first healthy Pong -> next state entered (p99)",
                f"p99 {p99:.0f} us (p50 {p50:.0f}, max {max(us):.0f}, n={len(us)})",
                f"bare trio.Event wake-up p99 {percentile(base_us, 99):.0f} us",
                f"{p99 / percentile(base_us, 99):.1f}x",
                "p99 < 1 ms", p99 < 1000)]


def main(argv: list[str]) -> None:
    sessions = int(argv[argv.index("--sessions") + 1]) if "--sessions" in argv else 300
    emit(measure(sessions), argv)


if __name__ == "__main__":
    main(sys.argv[1:])
