"""The real bootstrap machine, both roles, under a MockClock on an in-memory network."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio

from clusterfsm.fsm.errors import MachineCancelled, StateTimeout
from clusterfsm.states.codec import BootstrapPayload, WireBackend
from clusterfsm.states.errors import (
    BackendUnavailable,
    BootstrapRejected,
    FrameError,
    GroupInitFailed,
    GroupSizeMismatch,
    HandshakeRejected,
    HandshakeTimeout,
    PeerAborted,
    PeerLost,
    RejectReason,
)
from clusterfsm.states.testing import MemoryNetwork, fake_initializer
from clusterfsm.states.transport import BindFailed
from tests.cluster_harness import (
    COORD,
    RankResult,
    config,
    handshaken_joiner,
    run_rank,
    run_ranks,
)

HAPPY = ["discovering", "handshaking", "awaiting_session", "exchanging_bootstrap",
         "initializing_group", "confirming_group", "ready", "closed"]


async def test_two_ranks_reach_ready_then_close(autojump_clock: Any) -> None:
    r0, r1 = await run_ranks([config(0), config(1)])
    assert r0.path == HAPPY and r1.path == HAPPY
    assert r0.group_size == r1.group_size == 2
    assert r0.error is None and r1.error is None


async def test_four_ranks_reach_ready(autojump_clock: Any) -> None:
    results = await run_ranks([config(r, 4) for r in range(4)])
    assert [r.path for r in results] == [HAPPY] * 4, [(r.path, r.error) for r in results]


async def test_joiner_started_before_coordinator_retries_until_it_listens(
    autojump_clock: Any,
) -> None:
    network = MemoryNetwork()
    r0, r1 = RankResult(0), RankResult(1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_rank, network, config(1), r1)
        await trio.sleep(2.0)
        nursery.start_soon(run_rank, network, config(0), r0)
    assert r0.path == HAPPY and r1.path == HAPPY


async def test_wrong_key_is_rejected_and_coordinator_names_it_at_its_deadline(
    autojump_clock: Any,
) -> None:
    r0, r1 = await run_ranks([config(0, deadlines={"handshaking": 3}),
                              config(1, key=b"x" * 32)])
    assert r1.state == "handshake_rejected"
    assert isinstance(r1.error, HandshakeRejected)
    assert r1.error.reason is RejectReason.BAD_KEY
    assert r0.state == "handshake_timeout"
    assert isinstance(r0.error, HandshakeTimeout)
    assert "bad_key" in r0.error.detail and "waiting for ranks [1]" in r0.error.detail


async def test_world_size_mismatch_is_rejected_remotely(autojump_clock: Any) -> None:
    r0, r1 = await run_ranks([config(0, 2, deadlines={"handshaking": 2}), config(1, 3)])
    assert isinstance(r1.error, HandshakeRejected)
    assert r1.error.reason is RejectReason.WORLD_SIZE_MISMATCH and r1.error.remote
    assert r0.state == "handshake_timeout"


async def test_duplicate_rank_is_refused_and_the_rest_goes_on(autojump_clock: Any) -> None:
    results = await run_ranks([config(0, 3, deadlines={"handshaking": 2}),
                               config(1, 3), config(1, 3)])
    rejected = [r for r in results[1:] if isinstance(r.error, HandshakeRejected)]
    assert len(rejected) == 1 and rejected[0].error.reason is RejectReason.DUPLICATE_RANK  # type: ignore[union-attr]
    assert results[0].state == "handshake_timeout"


async def test_no_coordinator_ends_in_handshake_timeout(autojump_clock: Any) -> None:
    (r1,) = await run_ranks([config(1, deadlines={"handshaking": 1.5})])
    assert r1.state == "handshake_timeout"
    assert isinstance(r1.error, HandshakeTimeout)
    assert "refused" in r1.error.detail


async def test_port_in_use_is_listen_failed(autojump_clock: Any) -> None:
    network = MemoryNetwork()
    async with network.transport("other").listen(COORD):
        (r0,) = await run_ranks([config(0)], network=network)
    assert r0.state == "listen_failed" and isinstance(r0.error, BindFailed)


async def test_backend_unavailable_is_typed_and_the_peer_is_told(autojump_clock: Any) -> None:
    bad = fake_initializer(unavailable="librdma.dylib")
    r0, r1 = await run_ranks([config(0), config(1)], initializers={0: bad})
    assert r0.state == "backend_unavailable" and isinstance(r0.error, BackendUnavailable)
    assert r1.state == "peer_aborted" and isinstance(r1.error, PeerAborted)
    assert r1.error.error == "BackendUnavailable"


async def test_init_failure_and_size_mismatch_are_typed(autojump_clock: Any) -> None:
    r0, r1 = await run_ranks([config(0), config(1)],
                             initializers={1: fake_initializer(error="connection refused")})
    assert r1.state == "group_init_failed" and isinstance(r1.error, GroupInitFailed)
    assert r0.state == "peer_aborted"
    r0, r1 = await run_ranks([config(0), config(1)],
                             initializers={0: fake_initializer(size=1)})
    assert r0.state == "group_size_mismatch"
    assert isinstance(r0.error, GroupSizeMismatch) and r0.error.got == 1
    assert r1.state == "peer_aborted"


async def test_peer_lost_after_ready(autojump_clock: Any) -> None:
    async def leave_soon(cluster: Any) -> None:
        if cluster.rank == 1:
            await trio.sleep(1.0)
            # The app fails: its links close without a GOODBYE (a clean close would
            # be peer_left, see test_peer_that_closes_on_purpose_has_left_not_lost).
            raise RuntimeError("app crashed")
        else:
            await cluster.wait_lost()

    r0, r1 = await run_ranks([config(0), config(1)], in_ready=leave_soon)
    assert r1.state == "closed"
    assert r0.state == "peer_lost" and isinstance(r0.error, PeerLost)
    assert r0.error.rank == 1


@pytest.mark.parametrize("state", HAPPY[:-2])
async def test_cancellation_in_every_state_ends_in_cancelled(
    autojump_clock: Any, state: str,
) -> None:
    network = MemoryNetwork()
    r0, r1 = RankResult(0), RankResult(1)
    hang = fake_initializer()

    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as scope:
            def observe(rec: Any) -> None:
                if rec.dest == state:
                    scope.cancel()

            async def rank0() -> None:
                from clusterfsm.states.api import bootstrap_cluster
                from clusterfsm.states.testing import FakePortReservation
                from clusterfsm.states.watchdog import NoWatchdog

                try:
                    async with bootstrap_cluster(
                        config(0), transport=network.transport("node0"), initializer=hang,
                        watchdog=NoWatchdog(), allocate_port=FakePortReservation,
                        observers=[observe, lambda rec: r0.path.append(rec.dest)],
                    ):
                        await trio.sleep_forever()
                except MachineCancelled as exc:  # pragma: no cover - not raised
                    r0.error = exc

            nursery.start_soon(run_rank, network, config(1), r1)
            await rank0()
        nursery.cancel_scope.cancel()
    assert r0.path[-1] == "cancelled"
    assert r0.path[-2] == state


async def test_env_restored_and_topology_files_removed(autojump_clock: Any) -> None:
    os.environ["MLX_RANK"] = "sentinel"
    os.environ.pop("MLX_HOSTFILE", None)
    seen: list[Path] = []

    async def remember(cluster: Any) -> None:
        files = cluster._ctx.files
        seen.append(files.path)
        assert files.path.stat().st_mode & 0o777 == 0o700
        for f in files.path.iterdir():
            assert f.stat().st_mode & 0o777 == 0o600

    try:
        await run_ranks([config(0), config(1)], in_ready=remember)
        assert os.environ["MLX_RANK"] == "sentinel"
        assert "MLX_HOSTFILE" not in os.environ
        assert seen and not any(p.exists() for p in seen)
    finally:
        del os.environ["MLX_RANK"]


class ScriptedCoordinator:
    """A rank 0 that does a real handshake, then misbehaves as told."""

    def __init__(self, network: MemoryNetwork, after_handshake: str) -> None:
        self.network = network
        self.after = after_handshake

    async def run(self) -> None:
        from clusterfsm.states.admission import drive_handshake
        from clusterfsm.states.codec import Ping, Pong
        from clusterfsm.states.handshake import CoordinatorHandshake
        from clusterfsm.states.link import ControlLink

        async with self.network.transport("node0").listen(COORD) as listener:
            conn = await listener.accept()
            link = ControlLink(conn)
            hs = CoordinatorHandshake(b"k" * 32, b"\x01" * 16, 2, b"S" * 16, set(), set())
            await drive_handshake(link, hs)
            if self.after == "never_full":
                await trio.sleep_forever()  # the session never fills: no first ping
            if self.after == "garbage":
                await conn.stream.send_all(b"\x00" * 64)
                await trio.sleep_forever()
            # The session is full (rank 0's first ping says so) ...
            await link.send(Ping(1))
            if self.after == "silent":
                await trio.sleep_forever()  # ... but rank 0 answers nothing
            # answer pings until the joiner is in the bootstrap exchange
            while not isinstance(msg := await link.receive(), Ping):
                assert isinstance(msg, Pong)
            await link.send(Pong(msg.seq))
            if self.after == "stale_bootstrap":
                await link.send(BootstrapPayload(
                    coordinator_port=0, session_id=b"OLD-SESSION-0000", backend=WireBackend.RING,
                    world_size=2, topology=(("1.2.3.4:1",), ("1.2.3.4:2",))))
            await trio.sleep_forever()


@pytest.mark.parametrize(
    ("behaviour", "state", "error"),
    [("never_full", "handshake_timeout", StateTimeout),
     ("silent", "session_unavailable", StateTimeout),
     ("garbage", "protocol_error", FrameError),
     ("stale_bootstrap", "bootstrap_rejected", BootstrapRejected),
     ("no_bootstrap", "bootstrap_timeout", StateTimeout)],
)
async def test_misbehaving_coordinator_ends_the_joiner_in_a_typed_state(
    autojump_clock: Any, behaviour: str, state: str, error: type[BaseException],
) -> None:
    network = MemoryNetwork()
    r1 = RankResult(1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ScriptedCoordinator(network, behaviour).run)
        await run_rank(network, config(1), r1)
        nursery.cancel_scope.cancel()
    assert r1.state == state, r1.path
    assert isinstance(r1.error, error)


class ScriptedJoiner:
    """A rank 1 that does a real handshake and bootstrap exchange, then arrives at the
    init barrier with another session's id."""

    def __init__(self, network: MemoryNetwork) -> None:
        self.network = network

    async def run(self) -> None:
        from clusterfsm.states.codec import BootstrapAck, Compat, InitReady, LinkReport
        from clusterfsm.states.compat import Compatibility
        from clusterfsm.states.handshake import PROTOCOL_VERSION

        link, hs = await handshaken_joiner(self.network)
        assert hs.session_id is not None
        async with trio.open_nursery() as nursery:
            link.start(nursery, heartbeat_interval=0.1)
            from clusterfsm.states.groupinit import installed_mlx_version

            # as rank 0 has it
            fits = Compatibility(installed_mlx_version(), PROTOCOL_VERSION, ("ring",), 2)
            await link.send(Compat(hs.session_id, fits.to_json()))
            await link.send(LinkReport(hs.session_id, ()))
            frame = await link.next_message()
            assert isinstance(frame, BootstrapPayload)
            await link.send(BootstrapAck(hs.session_id))
            await link.send(InitReady(b"OLD-SESSION-0000"))
            await trio.sleep_forever()


async def test_barrier_arrival_for_another_session_is_rejected_by_rank_0(
    autojump_clock: Any,
) -> None:
    network = MemoryNetwork()
    r0 = RankResult(0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ScriptedJoiner(network).run)
        await run_rank(network, config(0), r0)
        nursery.cancel_scope.cancel()
    assert r0.state == "bootstrap_rejected", r0.path
    assert isinstance(r0.error, BootstrapRejected)
    assert "InitReady" in str(r0.error)


def test_importing_the_library_does_not_import_pytest() -> None:
    """trio.testing (which pulls in pytest) is for the in-memory network only."""
    import subprocess
    import sys

    code = ("import sys, clusterfsm.states.api, clusterfsm.states.serve, "
            "clusterfsm.states.transport; "
            "bad = sorted(m for m in ('pytest', 'trio.testing') if m in sys.modules); "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


async def test_peer_that_closes_on_purpose_has_left_not_lost(autojump_clock: Any) -> None:
    """A GOODBYE then EOF while this rank's app still uses the cluster: ``peer_left``,
    a clean end the app sees (``wait_lost`` returns, no error)."""
    seen: dict[int, object] = {}

    async def leave_soon(cluster: Any) -> None:
        if cluster.rank == 1:
            await trio.sleep(1.0)
        else:
            seen[0] = await cluster.wait_lost()
            seen[1] = cluster.state

    r0, r1 = await run_ranks([config(0), config(1)], in_ready=leave_soon)
    assert r1.state == "closed" and r1.error is None
    assert r0.path == [*HAPPY[:-1], "peer_left"] and r0.error is None
    assert seen == {0: None, 1: "peer_left"}


@pytest.mark.parametrize("first", [0, 1, 2])
async def test_ranks_closing_one_after_another_all_end_closed(
    autojump_clock: Any, first: int,
) -> None:
    """``serve --once``: the first rank to close must not leave a slower one (still in
    ready for a moment) with ``peer_lost`` or ``peer_left``: GOODBYEs, then ``closed``."""
    async def close_in_turn(cluster: Any) -> None:
        await trio.sleep(1.0 + 0.05 * ((cluster.rank - first) % 3))

    results = await run_ranks([config(r, 3) for r in range(3)], in_ready=close_in_turn)
    assert [r.path for r in results] == [HAPPY] * 3, [(r.path, r.error) for r in results]
    assert [r.error for r in results] == [None] * 3
