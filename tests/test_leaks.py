"""Nothing leaks across runs: open file descriptors, trio tasks and threads.

500 runs of the whole machine (two ranks, ready, close) in one process over in-memory
links under a MockClock, and 50 over real TCP on loopback up to and through the
group-init step (env vars, topology file; the MLX call itself is faked). One warm-up
run first, so caches that fill once (trio's thread cache, import-time state) are not
counted as growth.
"""

from __future__ import annotations

import gc
import os
import threading
from typing import Any

import trio

from clusterfsm.states.link import ControlLink
from tests.cluster_harness import config, run_ranks
from tests.tcp_harness import RankRun, RecordingTransport, all_ready, joiner_config
from tests.tcp_harness import rank0_config as tcp_rank0
from tests.tcp_harness import run_rank as run_tcp_rank


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def trio_tasks() -> int:
    """Every task alive in this trio run (walks the task tree from the root)."""
    count = 0
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


def live_links() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, ControlLink))


def assert_no_growth(before: dict[str, int], after: dict[str, int]) -> None:
    """Nothing grew. A count may shrink (trio's idle worker threads retire after
    10 s; an earlier test's garbage is collected) and that is not a leak."""
    grown = {k: (before[k], after[k]) for k in before if after[k] > before[k]}
    assert not grown, f"grew (before, after): {grown}; before={before} after={after}"


def snapshot() -> dict[str, int]:
    gc.collect()  # an earlier test's garbage closing its sockets here is not our leak
    return {"fds": open_fds(), "tasks": trio_tasks(), "threads": threading.active_count(),
            "links": live_links()}


async def _memory_run() -> None:
    results = await run_ranks([config(0), config(1)])
    assert [r.state for r in results] == ["closed", "closed"], [r.path for r in results]


async def test_500_in_memory_runs_leak_nothing(autojump_clock: Any) -> None:
    await _memory_run()
    before = snapshot()
    for _ in range(500):
        await _memory_run()
    assert_no_growth(before, snapshot())


async def _tcp_run() -> None:
    transport = RecordingTransport()
    r0, r1 = RankRun(0), RankRun(1)
    hold = all_ready(2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: run_tcp_rank(tcp_rank0(), r0, transport=transport,
                                                in_ready=hold))
        await transport.bound.wait()
        assert transport.address is not None
        nursery.start_soon(lambda: run_tcp_rank(joiner_config(1, transport.address), r1,
                                                in_ready=hold))
    assert r0.state == r1.state == "closed", (r0.path, r0.error, r1.path, r1.error)
    assert "initializing_group" in r0.path


async def test_50_tcp_runs_leak_nothing() -> None:
    await _tcp_run()
    before = snapshot()
    for _ in range(50):
        await _tcp_run()
    assert_no_growth(before, snapshot())
