"""Liveness does not depend on the app's event loop (states/beats.py), and a stopped
rank is still found lost.

Real time is unavoidable here: what is tested is a thread that keeps answering while
another thread is blocked. Each case is bounded (about 5 s and 3 s).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest
import trio

from clusterfsm.states.api import Cluster
from clusterfsm.states.errors import PeerLost
from tests.processes import kill_and_reap
from tests.tcp_harness import RankRun, RecordingTransport, joiner_config, rank0_config, run_rank

BLOCK = 5.0  # longer than peer_lost_after (3 s by default)


def test_a_rank_whose_loop_blocks_for_5_s_is_not_lost() -> None:
    """Rank 1 blocks its trio thread (``time.sleep`` in its app task, as a long
    ``mx.eval`` would); rank 0 keeps it alive through its heartbeat thread."""
    transport = RecordingTransport()
    bound = threading.Event()
    runs = [RankRun(0), RankRun(1)]
    got: list[tuple[int, bytes]] = []
    health: list[str] = []

    async def rank0_app(cluster: Cluster) -> None:
        with trio.fail_after(BLOCK + 20):
            async for item in cluster.messages():
                got.append(item)
                break
        health.append(cluster.health())

    async def rank1_app(cluster: Cluster) -> None:
        time.sleep(BLOCK)  # noqa: ASYNC251 - the point: this rank's loop is blocked
        await cluster.send(0, b"done")

    async def rank0() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: run_rank(rank0_config(), runs[0], transport=transport,
                                                in_ready=rank0_app))
            await transport.bound.wait()
            bound.set()

    def rank1() -> None:
        assert bound.wait(30)
        assert transport.address is not None
        trio.run(lambda: run_rank(joiner_config(1, transport.address), runs[1],
                                  in_ready=rank1_app))

    other = threading.Thread(target=rank1)
    other.start()
    try:
        trio.run(rank0)
    finally:
        bound.set()
        other.join(60)
    assert not other.is_alive()
    assert got == [(1, b"done")]
    for run in runs:
        assert run.state in ("closed", "peer_left"), (run.rank, run.path, run.error)
    assert health == ["healthy"]


CHILD = """
import sys, trio
from clusterfsm.states.api import bootstrap_cluster
from clusterfsm.states.config import Address, ClusterConfig
from clusterfsm.states.testing import fake_initializer
from clusterfsm.states.watchdog import NoWatchdog

async def main(port):
    config = ClusterConfig(rank=1, world_size=2, key=b"k" * 32,
                           peers=(Address("127.0.0.1", port),))
    async with bootstrap_cluster(config, initializer=fake_initializer(),
                                 watchdog=NoWatchdog()) as cluster:
        print("ready", flush=True)
        with trio.move_on_after(60):
            await cluster.wait_lost()

trio.run(main, int(sys.argv[1]))
"""


@pytest.mark.integration
async def test_a_stopped_rank_is_lost_within_its_deadline() -> None:
    """SIGSTOP freezes the whole process, heartbeat thread included: lost after
    ``peer_lost_after``, as before."""
    lost_after = 1.0
    transport = RecordingTransport()
    run = RankRun(0)
    procs: list[subprocess.Popen[str]] = []
    detected: list[float] = []

    async def app(cluster: Cluster) -> None:
        proc = procs[0]
        await trio.sleep(0.5)  # a few heartbeats through the thread first
        assert cluster.health() == "healthy"
        proc.send_signal(signal.SIGSTOP)
        stopped = trio.current_time()
        with trio.fail_after(lost_after + 10):
            error = await cluster.wait_lost()
        detected.append(trio.current_time() - stopped)
        assert isinstance(error, PeerLost), error

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: run_rank(
                rank0_config(peer_lost_after=lost_after), run, transport=transport,
                in_ready=app))
            await transport.bound.wait()
            assert transport.address is not None
            procs.append(subprocess.Popen(  # noqa: ASYNC220 - one quick spawn
                [sys.executable, "-c", CHILD, str(transport.address.port)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    finally:
        kill_and_reap(procs)
    assert run.state == "peer_lost" and isinstance(run.error, PeerLost), (run.path, run.error)
    assert "no heartbeat" in str(run.error)
    (seconds,) = detected
    assert lost_after - 0.2 <= seconds <= lost_after + 2.0

