"""Cables pulled and replugged under ``serve --supervise``, for real.

Each rank is a supervised ``clusterfsm serve`` in its own network namespace, given only
its interface names. Pulling a cable is setting a veth down; both ends lose carrier, as
both Macs do when a Thunderbolt cable is pulled. The supervisors must restart their
ranks without spending the restart budget (``--max-restarts 1`` would be exceeded by
the second pull otherwise), the new generations wait for the cable, and are ready
again, in a new session, once it is back. Behind a switch only the host whose cable is
pulled loses its carrier: the other rank learns it from the silence (``peer_lost``).
Whatever happens, the fixtures kill and reap every process and delete the namespaces.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clusterfsm.states.keys import write_key
from tests.lines import Lines
from tests.netns import (  # noqa: F401 - fixtures
    Namespace,
    NetnsPair,
    NetnsSwitched,
    netns_pair,
    netns_switched,
)
from tests.netns_ring import NetnsRing, netns_ring  # noqa: F401 - fixture

CLI = [sys.executable, "-m", "clusterfsm.states.cli"]
pytestmark = [pytest.mark.netns, pytest.mark.integration]


def supervised(ns: Namespace, tmp: Path, name: str, world: int,
               interfaces: list[str]) -> Lines:
    key = tmp / "cluster.key"
    if not key.exists():
        write_key(key, b"c" * 32)
    argv = [*CLI, "serve", "--rank", "auto", "--world-size", str(world), "--key-file",
            str(key), "--node-id-file", str(tmp / f"node-{name}"), "--verify",
            "--supervise", "--max-restarts", "1", "--restart-backoff", "0.1:1",
            "--stop-grace", "1"]
    for interface in interfaces:
        argv += ["--interface", interface]
    return Lines(ns.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))


def stop_all(ranks: list[Lines]) -> None:
    """SIGTERM every supervisor; each must stop its child and exit 0."""
    for rank in ranks:
        rank.proc.send_signal(signal.SIGTERM)
    for rank in ranks:
        assert rank.proc.wait(timeout=15) == 0, rank.seen[-20:]


def leftover_ranks(tmp: Path) -> list[str]:
    """Processes still running a rank of this test (their command names our tmp dir)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True,
                         check=True).stdout
    return [line for line in out.splitlines() if str(tmp) in line and "serve" in line]


def test_three_pulls_and_replugs_under_supervise_ready_each_time_budget_untouched(
        netns_pair: NetnsPair, tmp_path: Path) -> None:  # noqa: F811
    pair = netns_pair
    ranks = [supervised(ns, tmp_path, end, 2, [ns.interface])
             for end, ns in (("a", pair.a), ("b", pair.b))]
    for rank in ranks:
        rank.next("DistributedGroup ready", prefix=False)
    back: list[float] = []
    for cycle in range(1, 4):
        pair.link_down("b")
        for rank, ns in zip(ranks, (pair.a, pair.b), strict=True):
            lost = rank.next("state link_lost, error LinkLost", prefix=False)
            assert f"link on '{ns.interface}' lost" in lost
            rank.next("a cable was pulled: restart in", prefix=False)
            rank.next("waiting_for_link", prefix=False)  # the new generation waits
        time.sleep(0.5)  # the cable stays out a moment
        plugged = time.monotonic()
        pair.link_up("b")
        for rank in ranks:
            ready = rank.next("DistributedGroup ready", prefix=False)
            assert f"[gen {cycle + 1}]" in ready and "backend=ring" in ready
        back.append(time.monotonic() - plugged)
    for rank in ranks:
        assert rank.count("not counted; 0/1 used") == 3
        assert rank.count("restart 1/1") == 0
    print("ready again after replug: " + ", ".join(f"{s:.2f} s" for s in back))
    stop_all(ranks)
    assert leftover_ranks(tmp_path) == []


def test_a_ring_of_three_loses_the_group_on_one_pull_and_rebuilds(
        netns_ring: NetnsRing, tmp_path: Path) -> None:  # noqa: F811
    ring = netns_ring
    ranks = [supervised(node.ns, tmp_path, f"n{i}", 3, sorted(node.interfaces.values()))
             for i, node in enumerate(ring.nodes)]
    for rank in ranks:
        rank.next("DistributedGroup ready", prefix=False)
    ring.pull(0)  # the cable between node 0 and node 1
    for i in (0, 1):
        lost = ranks[i].next("state link_lost, error LinkLost", prefix=False)
        assert f"link on '{ring.nodes[i].interfaces[0]}' lost" in lost
    # node 2's cables are in: it loses its peers (typed), not a link
    ranks[2].next("ended in peer_lost (PeerLost)", prefix=False)
    time.sleep(0.5)
    ring.plug(0)
    for rank in ranks:
        assert "[gen 2]" in rank.next("DistributedGroup ready", prefix=False)
    stop_all(ranks)
    assert leftover_ranks(tmp_path) == []


def test_behind_a_switch_the_pulled_side_is_link_lost_the_far_side_peer_lost_then_both_back(
        netns_switched: NetnsSwitched, tmp_path: Path) -> None:  # noqa: F811
    net = netns_switched
    ranks = [supervised(ns, tmp_path, end, 2, [ns.interface])
             for end, ns in (("a", net.a), ("b", net.b))]
    for rank in ranks:
        rank.next("DistributedGroup ready", prefix=False)
    net.pull("a")  # a's cable, at the switch: a loses its carrier, b's link stays up
    lost = ranks[0].next("state link_lost, error LinkLost", prefix=False)
    assert f"link on '{net.a.interface}' lost: no carrier" in lost
    ranks[0].next("a cable was pulled: restart in", prefix=False)
    ranks[1].next("ended in peer_lost (PeerLost)", prefix=False)  # only the silence told it
    assert ranks[1].count("LinkLost") == 0
    net.plug("a")
    for rank in ranks:
        assert "[gen 2]" in rank.next("DistributedGroup ready", prefix=False)
    stop_all(ranks)
    assert leftover_ranks(tmp_path) == []
