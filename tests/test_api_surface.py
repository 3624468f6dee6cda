"""The embedding API for app authors (issue 16): one error base with ``state`` and
``retryable``, the backend actually chosen, health readable from any thread and as
changes, one log record per transition, and a second bootstrap in one process
refused at once (MLX keeps one group per process)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
import trio.testing

from clusterfsm.fsm.compiled import CompiledMachine
from clusterfsm.fsm.errors import UnexpectedError
from clusterfsm.states.errors import (
    ClusterError,
    GroupAlreadyInitialized,
    HandshakeRejected,
    HandshakeTimeout,
    InternalError,
    PeerAborted,
)
from clusterfsm.states.groupinit import InitializedGroups
from clusterfsm.states.health import Health, HealthPublisher
from clusterfsm.states.machine import BOOTSTRAP
from clusterfsm.states.testing import fake_initializer
from tests.cluster_harness import config, run_ranks
from tests.toy_machine import TOY


def test_every_bootstrap_error_is_a_cluster_error_with_its_state_and_retryable() -> None:
    for err in BOOTSTRAP.errors:
        if err.name in ("cancelled", "unexpected"):
            continue  # the framework's own: cancellation propagates; see InternalError
        assert issubclass(err.error, ClusterError), err.error
        value = err.error.__new__(err.error)  # .state needs only the type
        assert value.state == err.name
        assert isinstance(err.error.retryable, bool)
    assert InternalError("idle", "KeyError").state == "unexpected"
    assert not InternalError("idle", "KeyError").retryable


async def test_a_failed_bootstrap_raises_the_bare_typed_error(autojump_clock: Any) -> None:
    r0, r1 = await run_ranks([config(0), config(1, key=b"x" * 32)])
    assert type(r1.error) is HandshakeRejected  # bare: not inside an ExceptionGroup
    assert r1.error.state == "handshake_rejected" and not r1.error.retryable
    assert type(r0.error) is HandshakeTimeout
    assert r0.error.state == "handshake_timeout" and r0.error.retryable
    assert r0.error.in_state == "handshaking"  # where the deadline passed


async def test_an_undeclared_error_is_raised_as_internal_error(autojump_clock: Any) -> None:
    def broken_precheck(backend: str) -> None:
        raise KeyError(backend)

    broken = fake_initializer()
    broken.precheck = broken_precheck
    r0, _r1 = await run_ranks([config(0), config(1)], initializers={0: broken})
    assert isinstance(r0.error, InternalError) and r0.error.state == "unexpected"
    assert isinstance(r0.error.__cause__, UnexpectedError)
    assert r0.error.error == "KeyError"


async def test_backend_any_reports_the_backend_chosen(autojump_clock: Any) -> None:
    seen: dict[int, str] = {}

    async def in_ready(cluster: Any) -> None:
        seen[cluster.rank] = cluster.backend
        await trio.sleep(0.5)

    # An MLX without jaccl (as on Linux): ``any`` resolves to ring on rank 0 and the
    # bootstrap frame carries that to rank 1.
    ring_only = {rank: fake_initializer(backends=("ring",)) for rank in (0, 1)}
    await run_ranks([config(0, backend="any"), config(1, backend="any")],
                    initializers=ring_only, in_ready=in_ready)
    assert seen == {0: "ring", 1: "ring"}


async def test_health_from_a_foreign_thread_and_as_changes(autojump_clock: Any) -> None:
    changes: list[str] = []
    from_thread: list[str] = []
    # The mock clock jumps whenever every task waits, also while rank 0 waits for its
    # worker thread: rank 1's crash must not depend on how long that thread takes.
    first_read = trio.Event()

    async def in_ready(cluster: Any) -> None:
        if cluster.rank == 1:
            await first_read.wait()
            await trio.sleep(1.0)
            raise RuntimeError("the app on rank 1 crashed")  # no GOODBYE: a loss
        from_thread.append(await trio.to_thread.run_sync(cluster.health))
        first_read.set()
        async for health in cluster.health_changes():
            changes.append(health)
        assert cluster.state == "peer_lost"
        from_thread.append(await trio.to_thread.run_sync(cluster.health))

    r0, r1 = await run_ranks([config(0), config(1)], in_ready=in_ready)
    assert isinstance(r0.error, Exception) and r0.error.state == "peer_lost"
    assert from_thread == ["healthy", "unavailable"]
    assert changes[0] == "healthy" and changes[-1] == "unavailable"
    assert isinstance(r1.error, RuntimeError)


async def test_one_log_record_per_transition_and_transitions_quiet(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    library = logging.getLogger("transitions")
    monkeypatch.setattr(library, "level", logging.NOTSET)
    CompiledMachine(TOY)  # building a machine quiets the library's own INFO lines
    assert library.level == logging.WARNING
    caplog.set_level(logging.INFO)
    r0, r1 = await run_ranks([config(0), config(1)])
    ours = [r for r in caplog.records if r.name == "clusterfsm.transitions"]
    assert len(ours) == len(r0.path) + len(r1.path)
    assert not [r for r in caplog.records if r.name.startswith("transitions")]
    first: Any = ours[0]
    assert (first.machine, first.source, first.event, first.dest) == (
        "bootstrap", "idle", "start", "discovering")
    assert first.elapsed_ms >= 0 and first.levelno == logging.INFO


def test_an_app_set_level_of_the_transitions_logger_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    library = logging.getLogger("transitions")
    monkeypatch.setattr(library, "level", logging.DEBUG)
    CompiledMachine(TOY)
    assert library.level == logging.DEBUG


async def test_second_bootstrap_in_one_process_fails_at_once_and_the_peer_is_told(
    autojump_clock: Any,
) -> None:
    process0 = InitializedGroups()  # rank 0's process: one record for both bootstraps
    first = await run_ranks([config(0), config(1)],
                            initializers={0: fake_initializer(groups=process0)})
    assert [r.state for r in first] == ["closed", "closed"]
    began = trio.current_time()
    r0, r1 = await run_ranks([config(0), config(1)],  # rank 1: a new process
                             initializers={0: fake_initializer(groups=process0)})
    assert type(r0.error) is GroupAlreadyInitialized
    assert r0.path[-2:] == ["initializing_group", "group_already_initialized"]
    assert r0.error.state == "group_already_initialized" and r0.error.retryable
    assert "new process" in str(r0.error) and "--supervise" in str(r0.error)
    # Told by ABORT before the barrier: it never entered init, nor waited for a deadline.
    assert type(r1.error) is PeerAborted and r1.path[-1] == "peer_aborted"
    assert r1.path[-2] == "initializing_group"
    # (virtual time, MockClock: the whole second run ended before init's own deadline)
    assert trio.current_time() - began < BOOTSTRAP.state("initializing_group").deadline


async def test_second_bootstrap_on_a_joiner_is_refused_too(autojump_clock: Any) -> None:
    process1 = InitializedGroups()
    process1.record("ring")
    r0, r1 = await run_ranks([config(0), config(1)],
                             initializers={1: fake_initializer(groups=process1)})
    assert type(r1.error) is GroupAlreadyInitialized
    assert type(r0.error) is PeerAborted and r0.path[-1] == "peer_aborted"


async def test_health_changes_drop_repeats_and_end_after_the_cluster_ends() -> None:
    values: list[Health] = ["healthy", "healthy", "degraded", "degraded", "healthy"]
    publisher = HealthPublisher(lambda: values.pop(0))
    seen: list[str] = []

    async def read() -> None:
        async for health in publisher.changes():
            seen.append(health)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(4):
            publisher.refresh()
            await trio.testing.wait_all_tasks_blocked()
        publisher.finish()
    assert seen == ["healthy", "degraded", "healthy", "unavailable"]
    assert publisher.value == "unavailable"
