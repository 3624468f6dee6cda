"""Stale generations: a rank's older process (older epoch) never joins a newer session.

Three layers, each pinned here:

- the sans-IO handshake: an epoch below the rank's floor is refused ``STALE_SESSION``
  (at the Hello, and again after the Auth), an equal, newer or unsupervised (0) epoch
  is admitted, and an epoch an on-path attacker rewrote never verifies (so it can
  never raise a floor);
- the bootstrap machine (in memory, MockClock): rank 0 refuses a joiner older than the
  floor it was given or than the generation it already admitted in this session, and
  logs every admitted epoch for its supervisor;
- the supervisor: it learns admitted epochs from its child's stdout and hands them to
  the next child (real processes: a restarted rank 0 refuses the old rank 1).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import sys
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from clusterfsm.states.api import bootstrap_cluster
from clusterfsm.states.codec import (
    Auth,
    Challenge,
    FrameDecoder,
    Hello,
    Message,
    Reject,
    decode_message,
    encode_message,
)
from clusterfsm.states.config import ClusterConfig
from clusterfsm.states.epochs import EPOCH_ENV, EPOCH_FLOORS_ENV, format_floors, parse_floors
from clusterfsm.states.errors import HandshakeRejected, RejectReason
from clusterfsm.states.handshake import CoordinatorHandshake, JoinerHandshake
from clusterfsm.states.lines import AdmissionLine
from clusterfsm.states.supervisor_child import InboxItem, ProcessLauncher
from clusterfsm.states.testing import FakePortReservation, MemoryNetwork, fake_initializer
from clusterfsm.states.watchdog import NoWatchdog
from tests.cluster_harness import KEY, RankResult, config
from tests.test_supervisor_processes import Cluster, cluster  # noqa: F401 - fixture

J_ID = bytes(range(0x10, 0x20))
C_ID = bytes(range(0x20, 0x30))
SID = bytes(16)


def parse_admission(line: str) -> tuple[int, int] | None:
    """``(rank, epoch)`` of an admission line, or None."""
    admitted = AdmissionLine.parse(line)
    return None if admitted is None else (admitted.rank, admitted.epoch)


def wire(msg: Message) -> Message:
    [frame] = FrameDecoder().feed(encode_message(msg))
    return decode_message(frame)


def coordinator(floors: dict[int, int], **kw: Any) -> CoordinatorHandshake:
    args: dict[str, Any] = {"taken_ranks": set(), "taken_node_ids": set()}
    args.update(kw)
    return CoordinatorHandshake(KEY, C_ID, 2, SID, epoch_floors=floors, **args)


def joiner(epoch: int) -> JoinerHandshake:
    return JoinerHandshake(KEY, J_ID, 1, 2, 6000, epoch=epoch)


# --------------------------------------------------------------------------- handshake


def test_an_epoch_older_than_the_floor_is_refused_at_the_hello() -> None:
    c = coordinator({1: 200})
    with pytest.raises(HandshakeRejected) as info:
        c.receive(wire(joiner(100).start()))
    assert info.value.reason is RejectReason.STALE_SESSION
    assert not info.value.remote
    [reject] = c.outbox_on_failure
    assert isinstance(reject, Reject) and reject.reason is RejectReason.STALE_SESSION
    # The joiner learns why, typed, and does not try again with this epoch.
    j = joiner(100)
    j.start()
    with pytest.raises(HandshakeRejected) as remote:
        j.receive(wire(reject))
    assert remote.value.reason is RejectReason.STALE_SESSION and remote.value.remote


@pytest.mark.parametrize("epoch", [200, 300, 0], ids=["same-process", "newer", "unsupervised"])
def test_equal_newer_and_unsupervised_epochs_are_admitted(epoch: int) -> None:
    floors = {1: 200}
    j, c = joiner(epoch), coordinator(floors)
    [ch] = c.receive(wire(j.start()))
    [au] = j.receive(wire(ch))
    c.receive(wire(au))
    assert c.done and c.epoch == epoch
    assert floors == {1: 200}  # raising the floor is the caller's job (on admission)


def test_a_floor_raised_during_the_handshake_refuses_at_the_auth() -> None:
    floors: dict[int, int] = {}
    j, c = joiner(100), coordinator(floors)
    [ch] = c.receive(wire(j.start()))
    [au] = j.receive(wire(ch))
    floors[1] = 300  # a newer generation of rank 1 got in meanwhile
    with pytest.raises(HandshakeRejected) as info:
        c.receive(wire(au))
    assert info.value.reason is RejectReason.STALE_SESSION


def test_stale_is_named_before_duplicate_rank() -> None:
    c = coordinator({1: 300}, taken_ranks={1})
    with pytest.raises(HandshakeRejected) as info:
        c.receive(wire(joiner(100).start()))
    assert info.value.reason is RejectReason.STALE_SESSION


@pytest.mark.parametrize("forged", [2**64 - 1, 1])
def test_a_rewritten_epoch_never_verifies(forged: int) -> None:
    """An on-path attacker rewrites the Hello's epoch: raised (to lock the rank's later
    generations out) or lowered. The epoch is in the Noise prologue: neither end
    accepts the other's handshake message."""
    j = joiner(500)
    hello = j.start()
    tampered = Hello(hello.protocol_version, hello.node_id, hello.rank, hello.world_size,
                     hello.nonce, hello.software, forged)
    c = coordinator({})
    [ch] = c.receive(wire(tampered))
    assert isinstance(ch, Challenge)
    with pytest.raises(HandshakeRejected) as at_joiner:  # rank 0 answered `forged`
        j.receive(wire(ch))
    assert at_joiner.value.reason is RejectReason.BAD_KEY
    # Even with a Challenge for the true epoch (same ephemeral key), the joiner's Auth
    # does not open against the tampered Hello, so the coordinator never admits (or
    # records) it.
    j2 = joiner(500)
    j2_hello = j2.start()
    honest = coordinator({}, ephemeral=bytes(range(32)))
    [ch2] = honest.receive(wire(j2_hello))
    [au] = j2.receive(wire(ch2))
    c2 = coordinator({}, ephemeral=bytes(range(32)))
    c2.receive(wire(Hello(j2_hello.protocol_version, j2_hello.node_id, j2_hello.rank,
                          j2_hello.world_size, j2_hello.nonce, j2_hello.software, forged)))
    with pytest.raises(HandshakeRejected) as at_coord:
        c2.receive(wire(au))
    assert isinstance(au, Auth) and at_coord.value.reason is RejectReason.BAD_KEY
    assert not c2.done


# --------------------------------------------------------------------------- machine


async def run_rank(network: MemoryNetwork, cfg: ClusterConfig, result: RankResult,
                   *, on_state: Callable[[str], None] = lambda _s: None,
                   hold: trio.Event | None = None) -> None:
    """Bootstrap one in-memory rank; ``hold`` keeps it in ready until set."""
    host = "node0" if cfg.rank == 0 else f"node{cfg.rank}-{cfg.epoch}"

    def observe(rec: Any) -> None:
        result.path.append(rec.dest)
        result.state = rec.dest
        on_state(rec.dest)

    try:
        async with bootstrap_cluster(
            cfg, transport=network.transport(host),
            initializer=fake_initializer(), watchdog=NoWatchdog(),
            allocate_port=FakePortReservation, observers=[observe],
        ) as cl:
            result.group_size = cl.group.size()
            if hold is not None:
                with trio.move_on_after(5):
                    await hold.wait()
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        result.error = exc


def assert_stale(result: RankResult) -> None:
    assert result.state == "handshake_rejected", result.path
    assert isinstance(result.error, HandshakeRejected)
    assert result.error.reason is RejectReason.STALE_SESSION and result.error.remote


async def test_rank_0_refuses_a_joiner_older_than_its_remembered_floor(
        autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="clusterfsm.states.epochs")
    network = MemoryNetwork()
    rank0, stale, fresh = RankResult(0), RankResult(1), RankResult(1)
    both_ready = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: run_rank(network, config(0, epoch_floors={1: 200}),
                                            rank0, hold=both_ready))
        await run_rank(network, config(1, epoch=100), stale)
        assert_stale(stale)
        assert rank0.state == "handshaking"  # rank 0 keeps waiting for the real rank 1
        await run_rank(network, config(1, epoch=300), fresh,
                       on_state=lambda s: both_ready.set() if s == "ready" else None)
    assert rank0.error is None and rank0.group_size == 2
    assert fresh.error is None and fresh.group_size == 2
    admitted = [r.getMessage() for r in caplog.records if r.name == "clusterfsm.states.epochs"]
    assert len(admitted) == 1
    assert admitted[0].startswith("admitted rank 1 epoch 300 from node1-300:")
    assert [parse_admission(line) for line in admitted] == [(1, 300)]


async def test_an_older_generation_is_refused_once_a_newer_one_is_admitted(
        autojump_clock: trio.testing.MockClock) -> None:
    """Same session (world size 3): rank 1's epoch 300 is in, rank 2 not yet; rank 1's
    epoch 100 is refused as stale (not merely as a duplicate rank)."""
    network = MemoryNetwork()
    results = {name: RankResult(rank) for name, rank in
               (("r0", 0), ("new1", 1), ("old1", 1), ("r2", 2))}
    new1_in = trio.Event()
    all_ready = trio.Event()
    ready: list[str] = []

    class Admitted(logging.Handler):
        """new1 is in once rank 0 has admitted rank 1's epoch 300 (an admitted joiner
        waits in handshaking until the session is full, so no state says it)."""

        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("admitted rank 1 epoch 300 "):
                new1_in.set()

    epochs_log = logging.getLogger("clusterfsm.states.epochs")
    handler = Admitted()
    epochs_log.addHandler(handler)
    epochs_log.setLevel(logging.INFO)

    def on_ready(name: str) -> Callable[[str], None]:
        def note(state: str) -> None:
            if state == "ready":
                ready.append(name)
                if len(ready) == 3:
                    all_ready.set()
        return note

    try:
        async with trio.open_nursery() as nursery:
            for name, cfg in (("r0", config(0, 3)), ("new1", config(1, 3, epoch=300))):
                nursery.start_soon(lambda n=name, c=cfg: run_rank(
                    network, c, results[n], on_state=on_ready(n), hold=all_ready))
            await new1_in.wait()
            await run_rank(network, config(1, 3, epoch=100), results["old1"])
            assert_stale(results["old1"])
            nursery.start_soon(lambda: run_rank(network, config(2, 3, epoch=7), results["r2"],
                                                on_state=on_ready("r2"), hold=all_ready))
    finally:
        epochs_log.removeHandler(handler)
        epochs_log.setLevel(logging.NOTSET)
    assert sorted(ready) == ["new1", "r0", "r2"]
    assert all(results[n].error is None for n in ("r0", "new1", "r2"))


# --------------------------------------------------------------------------- supervisor


def test_floors_env_round_trip_and_admission_lines() -> None:
    assert format_floors({2: 7, 1: 5}) == "1=5,2=7"
    assert parse_floors("1=5,2=7,1=3") == {1: 5, 2: 7}
    assert parse_floors("") == {}
    for bad in ("1", "x=1", "1=-2", "1=5;2=7"):
        with pytest.raises(ValueError, match=EPOCH_FLOORS_ENV):
            parse_floors(bad)
    assert parse_admission("admitted rank 1 epoch 5 from 10.0.0.2:40000") == (1, 5)
    for line in ("x admitted rank 1 epoch 5 from h", "admitted rank 1 epoch 5 from h extra",
                 "admitted rank 0 epoch 5 from h", f"admitted rank 1 epoch {2**64} from h",
                 "admitted rank 1 epoch 0 from h"):
        assert parse_admission(line) is None, line


async def test_the_launcher_hands_admitted_epochs_to_the_next_child() -> None:
    """Child 1 (pretending to be rank 0) admits rank 1 at epochs 5 then 9, and a forged
    line on stderr claims more; child 2 sees only the stdout ones, as its floors."""
    script = (
        "import os, sys\n"
        "if os.environ.get('GEN') == '1':\n"
        "    print('admitted rank 1 epoch 9 from a'); print('admitted rank 1 epoch 5 from b')\n"
        "    print('admitted rank 2 epoch 99 from c', file=sys.stderr)\n"
        f"else: print('floors=' + os.environ.get('{EPOCH_FLOORS_ENV}', '') + "
        f"' epoch=' + os.environ['{EPOCH_ENV}'])\n")
    lines: list[str] = []
    launcher = ProcessLauncher(lambda g, _e: [sys.executable, "-c", script],
                               env=dict(os.environ, **{EPOCH_FLOORS_ENV: "3=1"}),
                               echo=lambda _g, _s, line: lines.append(line))
    send, receive = trio.open_memory_channel[InboxItem](math.inf)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for generation, epoch in ((1, 1000), (2, 2000)):
                launcher.env["GEN"] = str(generation)
                child = await launcher.launch(generation, epoch, nursery, send)
                await child.wait()
                while True:  # the reaper's ChildExited comes after both pipes' lines
                    item = await receive.receive()
                    if type(item).__name__ == "ChildExited":
                        break
    assert launcher.epoch_floors == {1: 9}
    assert "floors=1=9 epoch=2000" in lines


@pytest.mark.integration
async def test_restarted_rank_0_refuses_the_old_rank_1(
        cluster: Cluster) -> None:  # noqa: F811 - the fixture
    """Rank 0 is supervised; rank 1 processes are started by hand with the epoch their
    supervisor would give them. Generation 1 of rank 0 admits rank 1 at epoch 2000;
    that rank 1 is killed, rank 0 loses it and is restarted. A rank 1 process of an
    older generation (epoch 1000, e.g. an orphan whose supervisor died) is refused by
    the new rank 0; a newer one (epoch 3000) gets in and the group works."""
    with trio.fail_after(60):
        sup = await cluster.supervised(0)
        # Its own TMPDIR: SIGKILL leaves its topology directory behind, removed here.
        first_tmp = cluster.tmp / "killed-rank-1"
        first_tmp.mkdir()
        first = await cluster.start("rank 1 epoch 2000", cluster.rank_args(1),
                                    env={EPOCH_ENV: "2000", "TMPDIR": str(first_tmp)})
        await first.wait_for("DistributedGroup ready")
        await sup.wait_for("admitted rank 1 epoch 2000 from 127.0.0.1")
        os.killpg(first.process.pid, signal.SIGKILL)
        await first.process.wait()
        shutil.rmtree(first_tmp)
        await sup.wait_for("generation 2 started")
        old = await cluster.start("rank 1 epoch 1000", cluster.rank_args(1),
                                  env={EPOCH_ENV: "1000"})
        line = await old.wait_for("error HandshakeRejected")
        assert "stale_session" in line
        assert await old.process.wait() == 1
        await sup.wait_for("stale_session")  # rank 0's log names the refusal too
        fresh = await cluster.start("rank 1 epoch 3000", cluster.rank_args(1),
                                    env={EPOCH_ENV: "3000"})
        await fresh.wait_for("DistributedGroup ready")
        await sup.wait_for("DistributedGroup ready", times=2)
        await sup.wait_for("admitted rank 1 epoch 3000 from 127.0.0.1")
