"""Supervised apps without a cluster: worker names, the epoch environment, the
lifeline, and the bare exceptions of ``supervise_ranks`` (issue 17).

Real processes here are tiny Python children; the MLX ring cases are in
tests/test_supervisor_processes.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trio

from clusterfsm.states.child_process import PDEATHSIG_SPAWN
from clusterfsm.states.config import Address, ClusterConfig
from clusterfsm.states.epochs import EPOCH_ENV, EPOCH_FLOORS_ENV, supervised_config
from clusterfsm.states.lifeline import lifeline_env, open_lifeline
from clusterfsm.states.supervised import supervise_ranks
from clusterfsm.states.supervisor import RestartBudgetExhausted, RestartPolicy
from clusterfsm.states.supervisor_child import InboxItem, ProcessLauncher
from clusterfsm.states.worker import WorkerSpecError, load_worker, worker_spec

ROOT = Path(__file__).resolve().parent.parent
WORKERS = ROOT / "examples" / "workers.py"


async def module_level_worker(_cluster: object) -> None:
    return None


def test_worker_spec_names_a_module_level_async_function() -> None:
    assert worker_spec(module_level_worker) == f"{__name__}:module_level_worker"
    assert load_worker(worker_spec(module_level_worker)) is module_level_worker
    assert worker_spec("pkg.mod:fn") == "pkg.mod:fn"


def test_worker_spec_refuses_what_a_child_cannot_import() -> None:
    async def local(_cluster: object) -> None:
        return None

    def not_async(_cluster: object) -> None:
        return None

    with pytest.raises(WorkerSpecError, match="not importable by name"):
        worker_spec(local)
    with pytest.raises(WorkerSpecError, match="not an async function"):
        worker_spec(not_async)  # type: ignore[arg-type]


def test_load_worker_by_path_and_its_usage_errors() -> None:
    worker = load_worker(f"{WORKERS}:all_sum_loop")
    assert worker.__name__ == "all_sum_loop"
    for spec, words in [("nocolon", "MODULE:FUNCTION"),
                        ("no_such_module_xyz:fn", "cannot import"),
                        (f"{WORKERS}:missing", "has no missing"),
                        (f"{WORKERS}:REPORT_EVERY", "not an async function"),
                        ("/nowhere/at/all.py:fn", "no such file")]:
        with pytest.raises(WorkerSpecError, match=words):
            load_worker(spec)


def test_supervised_config_reads_what_the_supervisor_set() -> None:
    config = ClusterConfig(rank=0, world_size=2, key=b"k" * 32,
                           listen=Address("127.0.0.1", 7700))
    assert supervised_config(config, {}) is config
    out = supervised_config(config, {EPOCH_ENV: "7", EPOCH_FLOORS_ENV: "1=5,2=6"},
                            admissions=sys.stderr)
    assert (out.epoch, dict(out.epoch_floors)) == (7, {1: 5, 2: 6})
    with pytest.raises(ValueError, match=EPOCH_FLOORS_ENV):
        supervised_config(config, {EPOCH_FLOORS_ENV: "x"})


async def test_a_child_ends_when_its_lifeline_closes() -> None:
    """The supervisor's side of the pipe closes (as when it is SIGKILLed): the child
    (here a tiny program running watch_lifeline) ends by SIGKILL."""
    read_end, write_end = open_lifeline()
    program = "import trio; from clusterfsm.states.lifeline import watch_lifeline; " \
              "print('watching', flush=True); trio.run(watch_lifeline)"
    try:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-c", program], env=dict(os.environ, **lifeline_env(read_end)),
            pass_fds=(read_end,), stdout=subprocess.PIPE)
    finally:
        os.close(read_end)
    try:
        assert process.stdout is not None
        with trio.fail_after(10):
            assert b"watching" in await process.stdout.receive_some(100)
        os.close(write_end)
        write_end = -1
        with trio.fail_after(5):
            assert await process.wait() == -9
    finally:
        if write_end >= 0:
            os.close(write_end)
        process.kill()
        await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()


async def test_restart_budget_exhausted_leaves_supervise_ranks_bare() -> None:
    policy = RestartPolicy(max_restarts=1, backoff_min_s=0.01, backoff_max_s=0.02)

    def failing(_generation: int, _epoch: int) -> list[str]:
        return [sys.executable, "-c", "import sys; print('failing'); sys.exit(1)"]

    echoed: list[tuple[int, str, str]] = []
    with trio.fail_after(20), pytest.raises(RestartBudgetExhausted) as caught:
        async with supervise_ranks([], policy=policy, command=failing,
                                   echo=lambda *line: echoed.append(line)) as generations:
            async for event in generations:
                assert event.kind == "failed"
    assert caught.value.generations == 2
    assert echoed == [(1, "stdout", "failing"), (2, "stdout", "failing")]


async def test_an_exception_of_the_app_block_leaves_bare() -> None:
    def sleeper(_generation: int, _epoch: int) -> list[str]:
        return [sys.executable, "-c", "import time; time.sleep(30)"]

    with trio.fail_after(20), pytest.raises(KeyError):
        async with supervise_ranks([], command=sleeper, echo=None):
            raise KeyError("the app's own")


async def test_worker_and_command_together_are_refused() -> None:
    with pytest.raises(ValueError, match="not both"):
        async with supervise_ranks([], worker="m:f", command=lambda g, e: ["true"]):
            pass


def test_serve_refuses_a_worker_it_cannot_import(tmp_path: Path) -> None:
    """Bad usage (exit 2): under a supervisor, child_misconfigured, not a restart."""
    from clusterfsm.states.keys import write_key

    key = write_key(tmp_path / "k")
    done = subprocess.run(
        [sys.executable, "-m", "clusterfsm.states.cli", "serve", "--rank", "1",
         "--world-size", "2", "--peer", "127.0.0.1:9", "--key-file", str(key),
         "--worker", "no_such_module_xyz:serve"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("clusterfsm serve: --worker no_such_module_xyz:serve: "
                                  "cannot import no_such_module_xyz")


async def test_a_child_whose_supervisor_is_already_gone_ends_at_its_start() -> None:
    """The prctl race: the lifeline already reads EOF when the child starts."""
    read_end, write_end = open_lifeline()
    os.close(write_end)
    program = "from clusterfsm.states.lifeline import die_with_parent; " \
              "die_with_parent(); print('still here')"
    try:
        done = await trio.run_process(
            [sys.executable, "-c", program], env=dict(os.environ, **lifeline_env(read_end)),
            pass_fds=(read_end,), capture_stdout=True, check=False)
    finally:
        os.close(read_end)
    assert done.returncode == -9 and done.stdout == b""


def test_no_lifeline_no_effect() -> None:
    from clusterfsm.states.lifeline import die_with_parent

    assert die_with_parent({}) is False


@pytest.mark.skipif(not PDEATHSIG_SPAWN, reason="PR_SET_PDEATHSIG is Linux only")
async def test_an_armed_child_outlives_the_supervisors_worker_threads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """PR_SET_PDEATHSIG fires when the *thread* that forked the child exits. trio
    starts processes from worker threads that exit when idle; a child forked there
    died ~10 s after its start. The launcher forks from its own thread instead: the
    child survives every worker thread's exit (their idle time cut short here)."""
    from trio._core import _thread_cache

    # Idle threads stay while the child starts and arms, then go as soon as used.
    monkeypatch.setattr(_thread_cache, "IDLE_TIMEOUT", 60)
    program = ("import time; from clusterfsm.states.lifeline import die_with_parent; "
               "print('armed', die_with_parent(), flush=True); time.sleep(60)")
    armed = trio.Event()

    def echo(_generation: int, _stream: str, line: str) -> None:
        if line == "armed True":
            armed.set()

    launcher = ProcessLauncher(lambda g, e: [sys.executable, "-c", program], echo=echo)
    send, _receive = trio.open_memory_channel[InboxItem](100)
    async with trio.open_nursery() as nursery:
        child = await launcher.launch(1, 1, nursery, send)
        try:
            with trio.fail_after(20):
                await armed.wait()
                monkeypatch.setattr(_thread_cache, "IDLE_TIMEOUT", 0.01)
                await trio.to_thread.run_sync(lambda: None)  # wakes an idle one to exit
                while threading.active_count() > 1:  # noqa: ASYNC110 - no event for it
                    await trio.sleep(0.01)
            assert child.returncode is None
            stat = await trio.Path(f"/proc/{child.pid}/stat").read_text()
            assert stat.rsplit(")", 1)[1].split()[0] != "Z"  # not dead, not yet reaped
        finally:
            child.kill()
            with trio.fail_after(10):
                await child.wait()
            nursery.cancel_scope.cancel()
