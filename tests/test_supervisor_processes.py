"""``serve --supervise`` with real processes on loopback and the real MLX ring.

Each supervisor runs in its own process group; whatever happens in the test, the
fixture SIGTERMs the supervisors (they stop their children), then SIGKILLs each whole
group and reaps, so no rank or watchdog outlives the test. Lines are read as they
come (no sleeps); every wait is bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from clusterfsm.states.demo import free_port
from clusterfsm.states.keys import write_key

pytestmark = pytest.mark.integration
CLI = [sys.executable, "-m", "clusterfsm.states.cli"]
RECOVERED = re.compile(r"recovered ([0-9.]+) s after the loss")


class Proc:
    """One process whose stdout+stderr lines are collected as they arrive."""

    def __init__(self, process: trio.Process, name: str) -> None:
        self.process = process
        self.name = name
        self.lines: list[str] = []
        self._changed = trio.Event()

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        buffer = b""
        async with stream:
            while chunk := await stream.receive_some(65536):
                buffer += chunk
                *done, buffer = buffer.split(b"\n")
                self.lines.extend(line.decode(errors="replace") for line in done)
                self._changed.set()
                self._changed = trio.Event()

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    async def wait_for(self, text: str, times: int = 1, limit_s: float = 15.0) -> str:
        """The ``times``-th line containing ``text``; fails with the output so far."""
        with trio.move_on_after(limit_s):
            while True:
                hits = [line for line in self.lines if text in line]
                if len(hits) >= times:
                    return hits[times - 1]
                if self.process.returncode is not None:
                    break
                await self._changed.wait()
        tail = "\n".join(self.lines[-40:])
        raise AssertionError(f"{self.name}: no {times}x {text!r}; output:\n{tail}")


class Cluster:
    """Starts processes in their own process groups; :meth:`close` ends them all."""

    def __init__(self, tmp: Path, nursery: trio.Nursery) -> None:
        self.tmp = tmp
        self.nursery = nursery
        self.procs: list[Proc] = []
        self.key = write_key(tmp / "cluster.key")
        self.port = free_port()
        self.env = dict(os.environ, TMPDIR=str(tmp))

    def rank_args(self, rank: int) -> list[str]:
        where = ["--listen", f"127.0.0.1:{self.port}"] if rank == 0 else [
            "--peer", f"127.0.0.1:{self.port}"]
        return ["serve", "--rank", str(rank), "--world-size", "2", "--key-file",
                str(self.key), "--verify", *where]

    async def start(self, name: str, args: list[str], env: dict[str, str] | None = None
                    ) -> Proc:
        process = await trio.lowlevel.open_process(
            [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=dict(self.env, **(env or {})), start_new_session=True)
        proc = Proc(process, name)
        self.procs.append(proc)
        assert process.stdout is not None
        self.nursery.start_soon(proc.pump, process.stdout)
        return proc

    async def supervised(self, rank: int, *extra: str) -> Proc:
        return await self.start(f"supervisor {rank}", [
            *self.rank_args(rank), "--supervise", "--restart-backoff", "0.1:1",
            "--stop-grace", "1", *extra])

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            for proc in self.procs:
                if proc.process.returncode is None:
                    proc.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(5):
                for proc in self.procs:
                    await proc.process.wait()
            for proc in self.procs:
                with contextlib.suppress(ProcessLookupError):  # the group is gone
                    os.killpg(proc.process.pid, signal.SIGKILL)  # children, watchdogs
                await proc.process.wait()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with trio.open_nursery() as nursery:
        c = Cluster(tmp_path, nursery)
        try:
            yield c
        finally:
            await c.close()
            nursery.cancel_scope.cancel()
    leftovers = list(await trio.Path(tmp_path).glob("clusterfsm-*"))
    assert not leftovers, f"topology directories left behind: {leftovers}"


def child_pid(proc: Proc, generation: int) -> int:
    for line in proc.lines:
        m = re.search(rf"generation {generation} started \(pid (\d+),", line)
        if m:
            return int(m[1])
    raise AssertionError(f"{proc.name}: generation {generation} not started")


def sessions(proc: Proc) -> list[str]:
    return [line.rsplit("session=", 1)[1] for line in proc.lines
            if "DistributedGroup ready" in line]


async def test_killed_rank_1_both_come_back_in_a_new_session(cluster: Cluster) -> None:
    s0, s1 = await cluster.supervised(0), await cluster.supervised(1)
    for s in (s0, s1):
        await s.wait_for("DistributedGroup ready")
    os.kill(child_pid(s1, 1), signal.SIGKILL)
    for s in (s0, s1):
        await s.wait_for("recovered")  # logged once generation 2 is ready
        assert "[gen 2]" in await s.wait_for("DistributedGroup ready", times=2)
        assert s.count("all_sum = 3 (expected 3)") == 2
    first, second = sessions(s0)
    assert sessions(s1) == [first, second] and first != second
    assert "generation 1 ended in peer_lost (PeerLost)" in "\n".join(s0.lines)
    recovered = [float(RECOVERED.search(line)[1])  # type: ignore[index]
                 for line in s0.lines + s1.lines if RECOVERED.search(line)]
    assert len(recovered) == 2
    print(f"time to recover after kill of rank 1: {max(recovered):.3f} s")


async def test_rank_1_never_calls_init_rank_0_restarts_and_recovers(cluster: Cluster) -> None:
    s0 = await cluster.supervised(0, "--deadline", "initializing_group=2")
    bad = await cluster.start("rank 1 (never-init)", [
        *cluster.rank_args(1), "--deadline", "initializing_group=3"],
        env={"CLUSTERFSM_FAULT": "never-init"})
    await s0.wait_for("state group_init_timeout, error GroupInitTimeout")
    await s0.wait_for("generation 2 started")
    with trio.fail_after(10):
        await bad.process.wait()
    t_return = trio.current_time()
    s1 = await cluster.supervised(1)
    await s0.wait_for("DistributedGroup ready")
    t_ready = trio.current_time()
    await s1.wait_for("all_sum = 3 (expected 3)")
    assert "[gen 2] DistributedGroup ready" in await s0.wait_for("DistributedGroup ready")
    recovered = await s0.wait_for("recovered")
    print(f"rank 0 ready {t_ready - t_return:.3f} s after rank 1 returned; {recovered}")


async def test_restart_budget_exhausted_is_the_typed_final_error(cluster: Cluster) -> None:
    s0 = await cluster.supervised(0, "--deadline", "handshaking=1", "--max-restarts", "1")
    with trio.fail_after(15):
        code = await s0.process.wait()
    await s0.wait_for("error RestartBudgetExhausted")
    assert code == 1
    final = await s0.wait_for("state restart_budget_exhausted")
    assert "gave up after 1 restart(s) (2 generation(s))" in final
    assert "handshake_timeout (HandshakeTimeout, exit 1)" in final
    assert s0.count("--relaunch--> launching") == 1


async def test_embedding_iterator_yields_ready_generations(tmp_path: Path) -> None:
    from clusterfsm.states.supervised import supervise_ranks

    key, port = write_key(tmp_path / "k"), free_port()
    common = ["--world-size", "2", "--key-file", str(key), "--verify"]
    ready: dict[int, str] = {}

    async def rank(r: int, where: list[str]) -> None:
        async with supervise_ranks(["--rank", str(r), *common, *where]) as generations:
            async for event in generations:
                assert event.kind == "ready" and event.generation == 1
                ready[r] = event.detail
                break

    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rank, 0, ["--listen", f"127.0.0.1:{port}"])
            nursery.start_soon(rank, 1, ["--peer", f"127.0.0.1:{port}"])
    assert ready[0] == ready[1] and len(ready[0]) == 32


# -- supervised apps (issue 17): the app's worker, no orphans, coordinator loss -----

WORKERS = Path(__file__).resolve().parent.parent / "examples" / "workers.py"
ADMITTED = re.compile(r"\[gen (\d+)\] admitted rank 1 epoch (\d+) from ")


def live_members(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` that are not zombies (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # it ended while we looked
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(entry))
    return found


async def all_gone_within(pgid: int, seconds: float) -> None:
    """Poll until no live process is left in ``pgid``; fail after ``seconds``."""
    with trio.move_on_after(seconds):
        while live_members(pgid):  # noqa: ASYNC110 - /proc offers no event to wait on
            await trio.sleep(0.01)
        return
    raise AssertionError(f"still alive {seconds} s later: {live_members(pgid)}")


def worked(proc: Proc, generation: int) -> str:
    return f"[gen {generation}] rank {proc.name[-1]}: 20 all_sums"


@pytest.mark.skipif(sys.platform != "linux", reason="reads process groups from /proc")
async def test_sigkilled_supervisor_leaves_no_child_or_watchdog(cluster: Cluster) -> None:
    cluster.env["WORKER_REPORT_EVERY"] = "20"
    worker = ["--worker", f"{WORKERS}:all_sum_loop"]
    s0, s1 = await cluster.supervised(0, *worker), await cluster.supervised(1, *worker)
    for s in (s0, s1):
        await s.wait_for(worked(s, 1))  # the app's loop runs on the group
    pgid = s1.process.pid  # the supervisor leads its own group: child, watchdog
    assert len(live_members(pgid)) >= 3
    s1.process.kill()
    await all_gone_within(pgid, 1.0)
    # Rank 0 sees the loss first either in its heartbeats (peer_lost) or in its
    # worker's all_sum, which MLX fails at once when the ring socket closes: both end
    # the generation because rank 1 is gone.
    ended = await s0.wait_for("generation 1 ended in ")
    assert ("ended in peer_lost (PeerLost)" in ended
            or "ended in worker_failed (RuntimeError): [ring] connection to a peer was lost"
            in ended), ended
    s1 = await cluster.supervised(1, *worker)  # restarted from outside
    await s0.wait_for(worked(s0, 2))
    await s1.wait_for(worked(s1, 1))
    assert sessions(s0)[1] == sessions(s1)[0] != sessions(s0)[0]


async def test_coordinator_child_lost_every_rank_starts_a_new_generation(
        cluster: Cluster) -> None:
    cluster.env["WORKER_REPORT_EVERY"] = "20"
    worker = ["--worker", f"{WORKERS}:all_sum_loop"]
    s0, s1 = await cluster.supervised(0, *worker), await cluster.supervised(1, *worker)
    for s in (s0, s1):
        await s.wait_for(worked(s, 1))
    os.kill(child_pid(s0, 1), signal.SIGKILL)
    for s in (s0, s1):
        await s.wait_for("recovered")
        await s.wait_for(worked(s, 2))
    first, second = sessions(s0)
    assert sessions(s1) == [first, second] and first != second
    # Stale-epoch rules: rank 0's second child was handed its predecessor's admission
    # of rank 1 as a floor and admitted only rank 1's newer generation.
    admitted = [(int(m[1]), int(m[2])) for line in s0.lines if (m := ADMITTED.search(line))]
    assert [g for g, _ in admitted] == [1, 2]
    (_, old), (_, new) = admitted
    assert new > old
    assert f"generation 2 started (pid {child_pid(s1, 2)}, epoch {new})" in "\n".join(s1.lines)


async def test_a_failing_worker_ends_its_generation_with_an_error_line(
        cluster: Cluster) -> None:
    worker = ["--worker", f"{WORKERS}:fail_after_ready", "--max-restarts", "0"]
    s0, s1 = await cluster.supervised(0, *worker), await cluster.supervised(1, *worker)
    for rank, s in enumerate((s0, s1)):
        await s.wait_for(f"[gen 1] rank {rank}: state worker_failed, error LookupError: "
                         f"rank {rank} has no model to serve")
        await s.wait_for("[gen 1] Traceback (most recent call last):")
        # "(LookupError): ..." or, if the error line beat the ready line (two pipes),
        # "(LookupError, exit 1): ..." - the failure is named either way.
        await s.wait_for("generation 1 ended in worker_failed (LookupError")
        with trio.fail_after(15):
            assert await s.process.wait() == 1
        await s.wait_for("error RestartBudgetExhausted")


async def test_after_coordinator_loss_an_older_rank_1_is_still_refused(
        cluster: Cluster) -> None:
    """Rank 0 (supervised) loses its child while rank 1 (started by hand at epoch 2000,
    as its supervisor would) is ready. Rank 0's next child still knows epoch 2000 was
    admitted: a rank 1 of an older generation (1000) is refused ``stale_session``, a
    newer one (3000) gets in and the group works."""
    s0 = await cluster.supervised(0)
    first = await cluster.start("rank 1 epoch 2000", cluster.rank_args(1),
                                env={"CLUSTERFSM_EPOCH": "2000"})
    await first.wait_for("DistributedGroup ready")
    await s0.wait_for("admitted rank 1 epoch 2000 from 127.0.0.1")
    await s0.wait_for("DistributedGroup ready")  # rank 0 ready too: it loses its group
    os.kill(child_pid(s0, 1), signal.SIGKILL)
    await first.wait_for("state peer_lost, error PeerLost")
    with trio.fail_after(10):
        assert await first.process.wait() == 1
    await s0.wait_for("generation 2 started")
    old = await cluster.start("rank 1 epoch 1000", cluster.rank_args(1),
                              env={"CLUSTERFSM_EPOCH": "1000"})
    assert "stale_session" in await old.wait_for("error HandshakeRejected")
    fresh = await cluster.start("rank 1 epoch 3000", cluster.rank_args(1),
                                env={"CLUSTERFSM_EPOCH": "3000"})
    await fresh.wait_for("DistributedGroup ready")
    await s0.wait_for("DistributedGroup ready", times=2)
    await s0.wait_for("[gen 2] admitted rank 1 epoch 3000 from 127.0.0.1")
    assert sessions(s0)[1] == sessions(fresh)[0] != sessions(first)[0]


async def test_supervise_ranks_runs_the_apps_worker_and_echoes_its_lines(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clusterfsm.states.supervised import supervise_ranks

    key, port = write_key(tmp_path / "k"), free_port()
    common = ["--world-size", "2", "--key-file", str(key), "--quiet"]
    echoed: dict[int, list[tuple[int, str, str]]] = {0: [], 1: []}

    async def rank(r: int, where: list[str]) -> None:
        worked = trio.Event()

        def echo(generation: int, stream: str, line: str) -> None:
            echoed[r].append((generation, stream, line))
            if line == f"rank {r}: 20 all_sums":
                worked.set()

        async with supervise_ranks(["--rank", str(r), *common, *where],
                                   worker=f"{WORKERS}:all_sum_loop", echo=echo) as gens:
            async for event in gens:
                assert event.kind == "ready" and event.generation == 1
                break
            await worked.wait()

    monkeypatch.setenv("WORKER_REPORT_EVERY", "20")  # the children inherit it
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rank, 0, ["--listen", f"127.0.0.1:{port}"])
            nursery.start_soon(rank, 1, ["--peer", f"127.0.0.1:{port}"])
    for r in (0, 1):
        assert (1, "stdout", f"rank {r}: 20 all_sums") in echoed[r]
        assert any(line.startswith("DistributedGroup ready") for _, _, line in echoed[r])
