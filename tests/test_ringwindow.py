"""The ring's init window: scheduling undone afterwards, MLX's back-off read and named,
the last rank's wait for rank 0's listener (docs/design.md section 3.5)."""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from clusterfsm.states.groupinit import (
    GroupInitializer,
    InitializedGroups,
    InitPlan,
    TopologyDir,
)
from clusterfsm.states.ringwindow import (
    VERBOSE_ENV,
    ConnectBackoff,
    await_local_listeners,
    capture_active,
    listener_state,
    listeners_before_dial,
    no_wakeup_preemption,
    read_backoff,
    ring_log_capture,
    runs_first,
    wants_no_preemption,
)

linux_only = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux")

MLX_LOG = ("[ring] Rank 0 accepting\n"
           "[ring] Rank 0 connecting to 1\n"
           "[ring] Attempt 0 waiting 1000 ms (error: 111 )\n"
           "[ring] Attempt 1 waiting 2000 ms (error: 111 )\n"
           "something else MLX printed\n")


def _echoed(tmp_path: Path, text: str, keep_verbose: bool) -> tuple[ConnectBackoff | None, str]:
    log = tmp_path / "mlx.log"
    log.write_text(text)
    out = tmp_path / "echo"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        backoff = read_backoff(log, keep_verbose, echo_fd=fd)
    finally:
        os.close(fd)
    return backoff, out.read_text()


def test_backoff_lines_become_one_named_backoff_and_our_verbose_lines_are_dropped(
    tmp_path: Path,
) -> None:
    backoff, echoed = _echoed(tmp_path, MLX_LOG, keep_verbose=False)
    assert backoff == ConnectBackoff(2, 3000)
    assert backoff.describe().startswith("MLX ring connect back-off: 3 s (2 refused")
    assert echoed == "something else MLX printed\n"


def test_a_user_who_asked_for_mlx_logging_gets_every_line(tmp_path: Path) -> None:
    backoff, echoed = _echoed(tmp_path, MLX_LOG, keep_verbose=True)
    assert backoff == ConnectBackoff(2, 3000) and echoed == MLX_LOG


def test_no_refused_dial_is_no_backoff(tmp_path: Path) -> None:
    assert _echoed(tmp_path, "[ring] Rank 1 accepting\n", keep_verbose=False) == (None, "")
    assert read_backoff(tmp_path / "missing.log", keep_verbose=False) is None


def test_only_the_ranks_an_accept_wakes_are_calmed() -> None:
    assert [wants_no_preemption("ring", r, 3) for r in range(3)] == [True, True, False]
    assert not wants_no_preemption("ring", 0, 1)
    assert not wants_no_preemption("jaccl", 0, 2)


@linux_only
def test_batch_policy_is_undone_for_this_thread_and_threads_started_in_the_window() -> None:
    started = threading.Event()
    release = threading.Event()
    seen: dict[str, int] = {}

    def mlx_like_thread() -> None:
        seen["inherited"] = os.sched_getscheduler(0)
        started.set()
        release.wait(10)
        seen["after"] = os.sched_getscheduler(0)

    child = threading.Thread(target=mlx_like_thread)
    try:
        with no_wakeup_preemption():
            seen["inside"] = os.sched_getscheduler(0)
            child.start()
            assert started.wait(10)
        seen["caller_after"] = os.sched_getscheduler(0)
    finally:
        release.set()
        child.join(10)
    assert seen == {"inside": os.SCHED_BATCH, "inherited": os.SCHED_BATCH,
                    "caller_after": os.SCHED_OTHER, "after": os.SCHED_OTHER}


@linux_only
def test_a_chosen_policy_and_a_disabled_window_are_left_alone() -> None:
    with no_wakeup_preemption(enabled=False):
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    try:
        with no_wakeup_preemption():
            assert os.sched_getscheduler(0) == os.SCHED_IDLE
        assert os.sched_getscheduler(0) == os.SCHED_IDLE
    finally:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


@linux_only
def test_the_last_rank_runs_first_where_allowed_and_is_normal_afterwards() -> None:
    with runs_first():
        inside = os.sched_getscheduler(0)
    # real-time needs CAP_SYS_NICE (or RLIMIT_RTPRIO): without it nothing changes
    assert inside in (os.SCHED_RR, os.SCHED_OTHER)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


@pytest.fixture
def bound_port() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield sock
    finally:
        sock.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/net/tcp is Linux")
def test_listener_state_sees_a_local_listen_and_cannot_see_another_host(
    bound_port: socket.socket,
) -> None:
    endpoint = f"127.0.0.1:{bound_port.getsockname()[1]}"
    assert listener_state(endpoint) is False  # bound, not listening
    bound_port.listen(0)
    assert listener_state(endpoint) is True
    assert listener_state("192.0.2.1:5000") is None  # TEST-NET-1: not ours
    assert listener_state("not-an-ip:5000") is None


def test_only_the_last_ring_rank_waits_and_for_every_other_rank() -> None:
    topo = (("127.0.0.1:1000",), ("127.0.0.1:1001",), ("127.0.0.1:1002",))
    assert listeners_before_dial("ring", 2, 3, topo) == ["127.0.0.1:1000", "127.0.0.1:1001"]
    assert [listeners_before_dial("ring", r, 3, topo) for r in (0, 1)] == [[], []]
    assert listeners_before_dial("jaccl", 1, 2, ((None, "rdma_en3"), ("rdma_en3", None))) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/net/tcp is Linux")
def test_the_wait_ends_when_every_rank_listens_and_is_bounded_if_one_never_does(
    bound_port: socket.socket,
) -> None:
    other = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    other.bind(("127.0.0.1", 0))
    other.listen(0)
    endpoints = [f"127.0.0.1:{bound_port.getsockname()[1]}",
                 f"127.0.0.1:{other.getsockname()[1]}", "192.0.2.1:5000"]  # not ours

    async def main() -> tuple[float, float]:
        start = trio.current_time()
        await await_local_listeners(endpoints, limit=0.25)
        never = trio.current_time() - start
        async with trio.open_nursery() as nursery:
            async def listen_later() -> None:
                await trio.sleep(0.01)
                bound_port.listen(0)
            nursery.start_soon(listen_later)
            start = trio.current_time()
            await await_local_listeners(endpoints, limit=5.0)
            later = trio.current_time() - start
        return never, later

    try:
        never, later = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        other.close()
    assert 0.25 <= never < 0.3
    assert 0.01 <= later < 0.02


def _plan(rank: int) -> InitPlan:
    return InitPlan("ring", rank, 2, (("127.0.0.1:1",), ("127.0.0.1:2",)), b"s" * 16)


@pytest.mark.parametrize(("rank", "named"), [(0, True), (1, False)])
def test_initialize_names_what_mlx_logged_on_the_ranks_it_observes(
    rank: int, named: bool,
) -> None:
    seen: dict[str, str | None] = {}

    class Group:
        def rank(self) -> int:
            return rank

        def size(self) -> int:
            return 2

    def fake_init(backend: str, factory: object) -> Group:
        seen["verbose"] = os.environ.get(VERBOSE_ENV)
        os.write(2, b"[ring] Attempt 0 waiting 1000 ms (error: 111 )\n")
        return Group()

    async def direct(fn: object) -> object:
        return fn()  # type: ignore[operator]

    async def no_wait(_plan: InitPlan) -> None:
        await trio.lowlevel.checkpoint()

    init = GroupInitializer(fake_init, direct, lambda _b: None, prepare=lambda: None,
                            first_listener=no_wait, groups=InitializedGroups())
    files = TopologyDir()
    os.environ.pop(VERBOSE_ENV, None)
    try:
        trio.run(init.initialize, _plan(rank), files)
    finally:
        files.close()
    assert VERBOSE_ENV not in os.environ
    if named:
        assert seen["verbose"] == "1" and init.backoff == ConnectBackoff(1, 1000)
    else:  # the last rank: no log line between its dial and its listen
        assert seen["verbose"] is None and init.backoff is None


def test_a_capture_inside_a_capture_leaves_fd_2_alone(tmp_path: Path) -> None:
    """Several bootstraps in one process (tests, the scale bench) interleave: only the
    first captures, and fd 2 is the process's own again after both."""
    before = os.fstat(2)
    outer = os.open(tmp_path / "outer", os.O_WRONLY | os.O_CREAT, 0o600)
    inner = os.open(tmp_path / "inner", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with ring_log_capture(outer):
            assert capture_active()
            with ring_log_capture(inner):
                os.write(2, b"x\n")
            assert capture_active()
        assert not capture_active()
    finally:
        os.close(outer)
        os.close(inner)
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
    assert (tmp_path / "outer").read_text() == "x\n" and (tmp_path / "inner").read_text() == ""
