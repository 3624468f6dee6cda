"""Interface discovery, rank election and the jaccl path, deterministically.

Beacons travel on in-memory links (``MemoryLinks``), the control links on the
in-memory network, under pytest-trio's MockClock: every scenario is exact and costs
no real time. The real UDP/TCP path is in tests/test_netns_discovery.py.
"""

from __future__ import annotations

import functools
import json
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from clusterfsm.fsm import StateTimeout
from clusterfsm.states.config import ClusterConfig
from clusterfsm.states.discovery import (
    AUTO_RANK,
    Beacon,
    BeaconIgnored,
    DiscoveryState,
    Peer,
    decode_beacon,
    elect,
)
from clusterfsm.states.errors import (
    BackendUnavailable,
    DiscoveryTimeout,
    DuplicateNodeId,
    ElectionFailed,
    InterfaceUnavailable,
    LinkLost,
    PrecheckFailed,
)
from clusterfsm.states.groupinit import GroupInitializer, InitPlan, check_plan
from clusterfsm.states.initledger import InitLedger, RecordedAttempt
from clusterfsm.states.nodeid import load_or_create_node_id
from clusterfsm.states.rdma import check_jaccl_plan
from clusterfsm.states.testing import MemoryLinks, MemoryNetwork, fake_initializer
from clusterfsm.states.topology import Topology
from tests.cluster_harness import KEY, RankResult, run_rank
from tests.field_samples import FakeTools, m4pro_mac, sample, with_max_pd


def node(i: int) -> bytes:
    return bytes([i]) * 16


def beacon(i: int, *, claim: int = AUTO_RANK, world: int = 2, version: int = 1,
           instance: bytes | None = None) -> Beacon:
    return Beacon(version, node(i), instance or bytes([i]) * 8, world, claim, 7000 + i)


# -- beacons ------------------------------------------------------------------------


def test_beacon_round_trips_and_is_bound_to_the_key() -> None:
    b = beacon(3)
    assert decode_beacon(b.encode(KEY), KEY) == b
    with pytest.raises(BeaconIgnored, match="another cluster"):
        decode_beacon(b.encode(b"x" * 32), KEY)
    with pytest.raises(BeaconIgnored, match="not a clusterfsm beacon"):
        decode_beacon(b"hello", KEY)
    with pytest.raises(BeaconIgnored, match="protocol version 1"):
        decode_beacon(b"CFB1\x00\x01" + b"\x00" * 44, KEY)  # protocol 1's 50 bytes


def test_own_echo_is_ignored_and_a_peer_heard_twice_is_one_peer() -> None:
    state = DiscoveryState(beacon(1))
    assert not state.observe(beacon(1).encode(KEY), KEY, "10.0.0.1", "en2")
    assert state.observe(beacon(2).encode(KEY), KEY, "10.0.0.2", "en2")
    assert not state.observe(beacon(2).encode(KEY), KEY, "10.0.1.2", "en3")
    assert state.peers[node(2)].interfaces == ("en2", "en3")
    assert state.complete


def test_other_version_world_size_and_key_are_reported_not_joined() -> None:
    state = DiscoveryState(beacon(1))
    state.observe(beacon(2, version=9).encode(KEY), KEY, "h2", "en2")
    state.observe(beacon(3, world=4).encode(KEY), KEY, "h3", "en2")
    state.observe(beacon(4).encode(b"y" * 32), KEY, "h4", "en2")
    assert not state.peers
    text = state.summary()
    assert "protocol version 9" in text and "world size 4" in text
    assert "another cluster" in text


def test_a_replayed_beacon_is_reported_never_heard() -> None:
    """Replayed from another address, a recorded beacon would win the "first heard"
    race for its node's address (docs/security.md): each beacon counts once."""
    now = 1_800_000_000.0
    state = DiscoveryState(beacon(1))
    recorded = beacon(2).encode(KEY, sent_at=now)
    assert state.observe(recorded, KEY, "10.0.0.2", "en2", now=now + 0.01)
    assert not state.observe(recorded, KEY, "10.0.0.66", "en2", now=now + 0.02)
    assert state.peers[node(2)].host == "10.0.0.2"
    assert "replayed beacon" in state.summary()
    # A recording older than the window, heard by a node that never saw it, is stale;
    # so is one from a clock far ahead.
    fresh = DiscoveryState(beacon(1))
    assert not fresh.observe(recorded, KEY, "10.0.0.66", "en2", now=now + 31)
    assert not fresh.observe(beacon(3).encode(KEY, sent_at=now + 40), KEY, "h3", "en2",
                             now=now)
    assert not fresh.peers
    assert "stale beacon" in fresh.summary() and "future beacon" in fresh.summary()
    # The same node's next beacon (new nonce) is heard as usual.
    assert fresh.observe(beacon(2).encode(KEY, sent_at=now + 31), KEY, "10.0.0.2", "en2",
                         now=now + 31)


def test_the_stamp_and_nonce_are_under_the_tag() -> None:
    data = bytearray(beacon(2).encode(KEY, sent_at=1_800_000_000.0, nonce=b"N" * 8))
    for index in (36, 44):  # in the timestamp, in the nonce
        altered = bytearray(data)
        altered[index] ^= 0x01
        with pytest.raises(BeaconIgnored, match="another cluster"):
            decode_beacon(bytes(altered), KEY)


def test_reports_are_bounded_under_a_flood() -> None:
    state = DiscoveryState(beacon(1))
    for i in range(1000):
        state.observe(os.urandom(60), KEY, f"10.0.{i // 250}.{i % 250}", "en2")
    assert len(state.reports) <= 16


def test_copied_node_id_is_a_duplicate_not_a_split() -> None:
    state = DiscoveryState(beacon(1))
    with pytest.raises(DuplicateNodeId):
        state.observe(beacon(1, instance=b"OTHER-PR").encode(KEY), KEY, "h9", "en2")
    state = DiscoveryState(beacon(1, world=3))
    state.observe(beacon(2, world=3).encode(KEY), KEY, "h2", "en2")
    with pytest.raises(DuplicateNodeId, match="h2 on en2 and h5 on en3"):
        state.observe(beacon(2, world=3, instance=b"CLONED!!").encode(KEY), KEY, "h5", "en3")


# -- election -----------------------------------------------------------------------


def peers_of(*beacons: Beacon) -> list[Peer]:
    return [Peer(b.node_id, "h", b.control_port, b.rank_claim, ("en2",)) for b in beacons]


def test_auto_election_is_the_same_on_every_node_whatever_the_order() -> None:
    rng = random.Random(7)
    ids = [rng.randbytes(16) for _ in range(5)]
    bs = [Beacon(1, i, bytes(8), 5, AUTO_RANK, 1) for i in ids]
    expected = {n: r for r, n in enumerate(sorted(ids))}
    for me in bs:
        others = [b for b in bs if b is not me]
        rng.shuffle(others)
        result = elect(me, peers_of(*others))
        assert result.ranks == expected
        assert result.my_rank == expected[me.node_id]


def test_explicit_ranks_are_kept_and_checked() -> None:
    assert elect(beacon(1, claim=1), peers_of(beacon(2, claim=0))).my_rank == 1
    with pytest.raises(ElectionFailed, match="both claim rank 0"):
        elect(beacon(1, claim=0), peers_of(beacon(2, claim=0)))
    with pytest.raises(ElectionFailed, match="auto"):
        elect(beacon(1, claim=0), peers_of(beacon(2)))
    with pytest.raises(ElectionFailed, match="3 nodes for a world size of 2"):
        elect(beacon(1), peers_of(beacon(2), beacon(3)))


def test_node_id_file_is_created_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "node-id"
    first = load_or_create_node_id(path)
    assert load_or_create_node_id(path) == first
    assert path.stat().st_mode & 0o777 == 0o600
    path.write_text("not hex")
    with pytest.raises(ValueError, match="32 hex digits"):
        load_or_create_node_id(path)


# -- the machine, with beacons on in-memory links -----------------------------------


def iface_config(i: int, *, world: int = 2, rank: int | None = None,
                 interfaces: tuple[str, ...] = ("en2",), **kw: Any) -> ClusterConfig:
    return ClusterConfig(rank=rank, world_size=world, key=KEY, interfaces=interfaces,
                         node_id=node(i), **kw)


async def run_nodes(links: MemoryLinks, specs: list[tuple[ClusterConfig, dict[str, str]]],
                    initializers: dict[int, GroupInitializer] | None = None,
                    hosts: list[str] | None = None) -> list[RankResult]:
    """Run each (config, interface -> link) as host ``hN`` (or ``hosts[N]``, the
    address its beacons come from); hold all in ready."""
    network = MemoryNetwork()
    results = [RankResult(-1) for _ in specs]
    everyone, arrived = trio.Event(), []

    async def hold(cluster: Any) -> None:
        arrived.append(cluster.rank)
        results[len(arrived) - 1].group_size = cluster.group.size()
        if len(arrived) == len(specs):
            everyone.set()
        with trio.move_on_after(5):
            await everyone.wait()

    async with trio.open_nursery() as nursery:
        for i, ((cfg, attached), res) in enumerate(zip(specs, results, strict=True)):
            host = hosts[i] if hosts else f"h{i}"
            nursery.start_soon(lambda c=cfg, r=res, h=host, a=attached, i=i: run_rank(
                network, c, r, host=h, discovery_net=links.node(h, a), in_ready=hold,
                initializer=(initializers or {}).get(i)))
    return results


async def test_two_nodes_given_only_their_interface_elect_and_reach_ready(
        autojump_clock: Any) -> None:
    links = MemoryLinks()
    results = await run_nodes(links, [(iface_config(2), {"en2": "tb"}),
                                      (iface_config(1), {"en2": "tb"})])
    assert [r.state for r in results] == ["closed", "closed"], [r.error for r in results]
    assert all(r.path[:3] == ["waiting_for_link", "discovering", "handshaking"]
               for r in results)


async def test_discovery_survives_a_lossy_link(autojump_clock: Any) -> None:
    """Most beacons lost (seeded): repetition still gets everyone found in time."""
    links = MemoryLinks(loss=0.8, seed=3)
    specs = [(iface_config(i, world=3), {"en2": "bridge"}) for i in (1, 2, 3)]
    results = await run_nodes(links, specs)
    assert [r.state for r in results] == ["closed"] * 3, [r.error for r in results]


async def test_jaccl_matrix_is_built_from_what_each_rank_heard(autojump_clock: Any) -> None:
    """Three Macs in a full mesh, one cable per pair, distinct interface names."""
    links = MemoryLinks()
    wiring = [{"en2": "ab", "en3": "ac"}, {"en4": "ab", "en5": "bc"},
              {"en6": "ac", "en7": "bc"}]
    seen: list[InitPlan] = []

    async def capture(plan: InitPlan) -> None:
        seen.append(plan)
        await trio.lowlevel.checkpoint()

    specs = [(iface_config(i + 1, world=3, backend="jaccl",
                           interfaces=tuple(wiring[i])), wiring[i]) for i in range(3)]
    inits = {i: fake_initializer(plan_check=capture) for i in range(3)}
    results = await run_nodes(links, specs, inits)
    assert [r.state for r in results] == ["closed"] * 3, [r.error for r in results]
    expected: Topology = ((None, "rdma_en2", "rdma_en3"),
                          ("rdma_en4", None, "rdma_en5"),
                          ("rdma_en6", "rdma_en7", None))
    assert {p.topology for p in seen} == {expected}
    assert sorted(p.rank for p in seen) == [0, 1, 2]
    assert all(p.coordinator is None for p in seen)  # side channel, no jaccl port


async def test_jaccl_without_all_gather_factory_falls_back_to_a_coordinator(
        autojump_clock: Any) -> None:
    links = MemoryLinks()
    seen: list[InitPlan] = []

    async def capture(plan: InitPlan) -> None:
        seen.append(plan)
        await trio.lowlevel.checkpoint()

    specs = [(iface_config(i, backend="jaccl"), {"en2": "tb"}) for i in (1, 2)]
    inits = {i: fake_initializer(plan_check=capture, side_channel_supported=False)
             for i in range(2)}
    results = await run_nodes(links, specs, inits)
    assert [r.state for r in results] == ["closed"] * 2, [r.error for r in results]
    coordinators = {p.coordinator for p in seen}
    assert len(coordinators) == 1 and None not in coordinators


async def test_duplicate_node_ids_stop_both_nodes(autojump_clock: Any) -> None:
    links = MemoryLinks()
    results = await run_nodes(links, [(iface_config(1), {"en2": "tb"}),
                                      (iface_config(1), {"en2": "tb"})])
    assert [r.state for r in results] == ["duplicate_node_id"] * 2
    assert all(isinstance(r.error, DuplicateNodeId) for r in results)


async def test_mixed_auto_and_explicit_ranks_fail_the_election(autojump_clock: Any) -> None:
    links = MemoryLinks()
    results = await run_nodes(links, [(iface_config(1, rank=0), {"en2": "tb"}),
                                      (iface_config(2), {"en2": "tb"})])
    assert [r.state for r in results] == ["election_failed"] * 2


async def test_a_lone_node_times_out_naming_what_it_heard(autojump_clock: Any) -> None:
    links = MemoryLinks()
    network = MemoryNetwork()
    result = RankResult(-1)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        async def foreign() -> None:  # a node of another cluster on the same link
            async with links.node("x", {"en2": "tb"}).beacon_socket("en2", 52417) as s:
                while True:
                    await s.broadcast(beacon(9).encode(b"z" * 32))
                    await trio.sleep(0.1)

        nursery.start_soon(foreign)
        await run_rank(network, iface_config(1, deadlines={"discovering": 2.0}), result,
                       host="h0", discovery_net=links.node("h0", {"en2": "tb"}))
        nursery.cancel_scope.cancel()
    assert result.state == "discovery_timeout"
    assert isinstance(result.error, DiscoveryTimeout)
    assert "heard 0 of 1" in str(result.error) and "another cluster" in str(result.error)
    assert trio.current_time() - start == pytest.approx(2.0, abs=0.2)


async def test_a_rank_waits_for_its_cable_then_discovers_at_once(autojump_clock: Any) -> None:
    links = MemoryLinks()
    links.pull("tb")
    plugged: list[float] = []

    async def plug_later() -> None:
        await trio.sleep(600)  # ten minutes without a cable is not a failure
        plugged.append(trio.current_time())
        links.plug("tb")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(plug_later)
        results = await run_nodes(links, [(iface_config(2), {"en2": "tb"}),
                                          (iface_config(1), {"en2": "tb"})])
    assert [r.state for r in results] == ["closed", "closed"], [r.error for r in results]
    for r in results:
        assert r.path[:2] == ["waiting_for_link", "discovering"]
        assert r.entered["discovering"] == plugged[0]  # woken by the plug-in, not a poll


async def test_the_wait_for_a_cable_can_be_bounded(autojump_clock: Any) -> None:
    links = MemoryLinks()
    links.pull("tb")
    result = RankResult(-1)
    await run_rank(MemoryNetwork(), iface_config(1, deadlines={"waiting_for_link": 2.0}),
                   result, host="h0", discovery_net=links.node("h0", {"en2": "tb"}))
    assert result.state == "link_wait_timeout" and isinstance(result.error, StateTimeout)
    assert "waiting for en2: no carrier" in str(result.error)


async def test_a_missing_interface_is_a_typed_error_at_once(autojump_clock: Any) -> None:
    result = RankResult(-1)
    start = trio.current_time()
    await run_rank(MemoryNetwork(), iface_config(1, interfaces=("en9",)), result, host="h0",
                   discovery_net=MemoryLinks().node("h0", {"en2": "tb"}))
    assert result.state == "interface_unavailable"
    assert isinstance(result.error, InterfaceUnavailable)
    assert "no such interface" in str(result.error) and result.error.interface == "en9"
    assert trio.current_time() == start


async def test_a_cable_pulled_in_ready_is_link_lost_naming_the_interface(
        autojump_clock: Any) -> None:
    links = MemoryLinks()
    network = MemoryNetwork()
    results = [RankResult(-1), RankResult(-1)]
    pulled: list[float] = []

    async def pull_when_ready(cluster: Any) -> None:
        if cluster.rank == 0:
            await trio.sleep(1.0)
            pulled.append(trio.current_time())
            links.pull("tb")
        await cluster.wait_lost()

    async with trio.open_nursery() as nursery:
        for i, res in enumerate(results):
            nursery.start_soon(lambda i=i, r=res: run_rank(
                network, iface_config(i + 1), r, host=f"h{i}",
                discovery_net=links.node(f"h{i}", {"en2": "tb"}), in_ready=pull_when_ready))
    for r in results:
        assert r.state == "link_lost", (r.path, r.error)
        assert isinstance(r.error, LinkLost) and r.error.interface == "en2"
        assert "no carrier" in r.error.reason
        assert r.path[-2:] == ["ready", "link_lost"]
        assert r.entered["link_lost"] == pulled[0]  # at once, not after the heartbeats


async def test_a_cable_pulled_while_discovering_is_link_lost(autojump_clock: Any) -> None:
    links = MemoryLinks()
    result = RankResult(-1)

    async def pull_soon() -> None:
        await trio.sleep(1.0)
        links.pull("tb")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pull_soon)
        await run_rank(MemoryNetwork(), iface_config(1), result, host="h0",
                       discovery_net=links.node("h0", {"en2": "tb"}))
    assert result.state == "link_lost" and result.path[-2:] == ["discovering", "link_lost"]
    assert isinstance(result.error, LinkLost) and result.error.interface == "en2"


async def test_jaccl_on_static_peers_has_no_matrix_and_says_so(autojump_clock: Any) -> None:
    from tests.cluster_harness import config, run_ranks

    results = await run_ranks([config(0, backend="jaccl"), config(1, backend="jaccl")])
    assert results[0].state == "precheck_failed"
    assert isinstance(results[0].error, PrecheckFailed)
    assert results[0].error.check == "matrix_incomplete"
    assert results[1].state == "peer_aborted"


async def test_jaccl_absent_from_this_platform_is_backend_unavailable(
        autojump_clock: Any) -> None:
    links = MemoryLinks()
    specs = [(iface_config(i, backend="jaccl"), {"en2": "tb"}) for i in (1, 2)]
    inits = {i: fake_initializer(unavailable="librdma.dylib") for i in range(2)}
    results = await run_nodes(links, specs, inits)
    states = sorted(r.state for r in results)
    assert states == ["backend_unavailable", "peer_aborted"]
    assert any(isinstance(r.error, BackendUnavailable) for r in results)


# -- jaccl pre-init checks (on recorded Mac output: tests/test_field_samples.py) --


async def test_a_failed_precheck_on_a_joiner_reaches_rank_0_as_peer_aborted(
        autojump_clock: Any) -> None:
    links = MemoryLinks()

    async def disabled(plan: InitPlan) -> None:
        await check_jaccl_plan(plan.topology, plan.rank, plan.world_size,
                               run=FakeTools({"rdma_ctl status": sample(
                                   "rdma_ctl--disabled-word-quoted-no-paste.txt")}))

    specs = [(iface_config(i, backend="jaccl"), {"en2": "tb"}) for i in (1, 2)]
    inits = {0: fake_initializer(), 1: fake_initializer(plan_check=disabled)}
    results = await run_nodes(links, specs, inits)
    assert results[1].state == "precheck_failed"
    assert results[0].state in ("peer_aborted", "precheck_failed")


# -- the route and protection-domain checks inside the bootstrap (field rows 6, 7) --

MAC_ADDRESSES = ["169.254.0.1", "169.254.0.2"]  # node 1 (rank 0), node 2 (rank 1)
ROUTE_SAMPLE = "route-get--default-route-via-en1-macpro-real-world-systems.txt"


def routed_mac(peer: str, interface: str) -> FakeTools:
    """The M4 Pro Mac of tests/field_samples.py, whose route to ``peer`` is the one
    real ``route get`` recorded (a default route through en1), with the interface
    renamed to ``interface`` when it is not ``en1``."""
    text = sample(ROUTE_SAMPLE).replace("interface: en1", f"interface: {interface}")
    return m4pro_mac(**{f"route -n get {peer}": text})


def jaccl_check(tools: FakeTools, ledger: InitLedger) -> Callable[[InitPlan], Awaitable[None]]:
    """The real pre-init checks of a Mac (recorded output), as on macOS."""
    return functools.partial(check_plan, run=tools, ledger=ledger, platform="darwin")


def fake_boot_ledger(path: Path) -> InitLedger:
    async def boot() -> int:
        await trio.lowlevel.checkpoint()
        return 1_426_005_997

    return InitLedger(path, boot)


async def test_a_route_through_another_interface_stops_the_bootstrap_before_mlx(
        autojump_clock: Any, tmp_path: Path) -> None:
    # Field failure: RTR errno 60, the route to the peer's link address leaves through
    # another interface. Rank 0's kernel routes rank 1's address through en1 (the real
    # sample), not through en4, the port its beacons came in on and the matrix uses.
    links = MemoryLinks()
    ledger = fake_boot_ledger(tmp_path / "ledger")
    specs = [(iface_config(i, backend="jaccl", interfaces=("en4",)), {"en4": "tb"})
             for i in (1, 2)]
    tools = [routed_mac(MAC_ADDRESSES[1], "en1"), routed_mac(MAC_ADDRESSES[0], "en4")]
    inits = {i: fake_initializer(plan_check=jaccl_check(tools[i], ledger), ledger=ledger,
                                 error="MLX init must not be reached") for i in (0, 1)}
    results = await run_nodes(links, specs, inits, hosts=MAC_ADDRESSES)
    assert results[0].state == "precheck_failed", results[0].error
    error = results[0].error
    assert isinstance(error, PrecheckFailed) and error.check == "peer_route"
    assert ("the route to rank 1 at 169.254.0.2 leaves through en1 via 192.168.1.1, not "
            "en4") in error.detail
    assert "route -n change -host 169.254.0.2 -interface en4" in error.detail
    assert results[0].path[-2:] == ["initializing_group", "precheck_failed"]
    assert results[1].state == "peer_aborted"  # its own route was right; told at once
    assert f"route -n get {MAC_ADDRESSES[1]}" in tools[0].calls
    assert not (tmp_path / "ledger").exists()  # no init attempt was recorded: no MLX call


async def test_routes_through_the_cabled_port_pass_and_each_init_is_recorded(
        autojump_clock: Any, tmp_path: Path) -> None:
    links = MemoryLinks()
    ledger = fake_boot_ledger(tmp_path / "ledger")
    specs = [(iface_config(i, backend="jaccl", interfaces=("en4",)), {"en4": "tb"})
             for i in (1, 2)]
    tools = [routed_mac(MAC_ADDRESSES[1], "en4"), routed_mac(MAC_ADDRESSES[0], "en4")]
    inits = {i: fake_initializer(plan_check=jaccl_check(tools[i], ledger), ledger=ledger)
             for i in (0, 1)}
    results = await run_nodes(links, specs, inits, hosts=MAC_ADDRESSES)
    assert [r.state for r in results] == ["closed"] * 2, [r.error for r in results]
    assert all(f"route -n get {MAC_ADDRESSES[1 - i]}" in tools[i].calls for i in (0, 1))
    view = await ledger.view()
    assert view.used("rdma_en4") == 2  # one attempt per rank, both in this process
    for entry in os.listdir(tmp_path / "ledger"):
        os.unlink(tmp_path / "ledger" / entry)


async def test_init_attempts_since_boot_at_max_pd_stop_the_bootstrap_before_mlx(
        autojump_clock: Any, tmp_path: Path) -> None:
    # Field failure: RTR errno 96 the morning after; every retry of init made it worse.
    ledger = fake_boot_ledger(tmp_path / "ledger")
    earlier = [await ledger.record(["rdma_en4"]) for _ in range(11)]
    before = sorted(os.listdir(tmp_path / "ledger"))
    devinfo = with_max_pd(sample("ibv_devinfo-v-grep--tb4-patched-two-down-one-active.txt"),
                          "rdma_en4", 11)
    tools = [routed_mac(MAC_ADDRESSES[1 - i], "en4") for i in (0, 1)]
    for t in tools:
        t.answers["ibv_devinfo -v -d rdma_en4"] = devinfo
    links = MemoryLinks()
    specs = [(iface_config(i, backend="jaccl", interfaces=("en4",)), {"en4": "tb"})
             for i in (1, 2)]
    inits = {i: fake_initializer(plan_check=jaccl_check(tools[i], ledger), ledger=ledger,
                                 error="MLX init must not be reached") for i in (0, 1)}
    results = await run_nodes(links, specs, inits, hosts=MAC_ADDRESSES)
    failed = [r for r in results if r.state == "precheck_failed"]
    assert failed and {r.state for r in results} <= {"precheck_failed", "peer_aborted"}
    for r in failed:
        assert isinstance(r.error, PrecheckFailed) and r.error.check == "pd_budget"
        assert "reboot" in r.error.detail and "errno 96" in r.error.detail
    assert sorted(os.listdir(tmp_path / "ledger")) == before  # no new attempt: no MLX call
    for attempt in earlier:
        assert isinstance(attempt, RecordedAttempt)
        attempt.release()


async def test_a_ledger_that_cannot_be_written_is_noted_and_the_group_comes_up(
        autojump_clock: Any, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a file where the ledger's directory should be")
    ledger = fake_boot_ledger(tmp_path / "file" / "ledger")
    links = MemoryLinks()
    specs = [(iface_config(i, backend="jaccl", interfaces=("en4",)), {"en4": "tb"})
             for i in (1, 2)]
    tools = [routed_mac(MAC_ADDRESSES[1 - i], "en4") for i in (0, 1)]
    inits = {i: fake_initializer(plan_check=jaccl_check(tools[i], ledger), ledger=ledger)
             for i in (0, 1)}
    results = await run_nodes(links, specs, inits, hosts=MAC_ADDRESSES)
    assert [r.state for r in results] == ["closed"] * 2, [r.error for r in results]
    for r in results:
        note = r.notes["initializing_group"]
        assert "jaccl init ledger" in note and "not counted" in note


def test_jaccl_env_is_private_and_twins_are_cleared(tmp_path: Path) -> None:
    from clusterfsm.states.groupinit import TopologyDir, backend_env

    files = TopologyDir()
    try:
        plan = InitPlan("jaccl", 1, 2, ((None, "rdma_en2"), ("rdma_en3", None)), b"s" * 16)
        env, clear = backend_env(plan, files)
        assert env["MLX_RANK"] == "1" and "MLX_JACCL_COORDINATOR" not in env
        assert {"JACCL_RANK", "JACCL_IBV_DEVICES", "JACCL_COORDINATOR", "MLX_JACCL_RING",
                "JACCL_RING"} <= set(clear)
        path = Path(env["MLX_IBV_DEVICES"])
        assert path.stat().st_mode & 0o777 == 0o600
        assert json.loads(path.read_text()) == [[None, "rdma_en2"], ["rdma_en3", None]]
    finally:
        files.close()
