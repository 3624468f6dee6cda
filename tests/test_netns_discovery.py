"""Discovery by interface for real: two network namespaces joined by a veth pair.

Each rank is a ``clusterfsm serve`` process in its own namespace, given only its
interface name (``--interface``, ``--rank auto``): UDP beacons bound to the veth, the
election, the handshake over TCP bound to the veth, then a real MLX ``ring`` group
and an ``all_sum``. Then the cable is pulled: before start, and during discovery.
Namespaces and processes are removed by the ``netns_pair`` fixture, on failure too;
the test is skipped (with the reason) where namespaces cannot be made.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from clusterfsm.states.keys import write_key
from tests.netns import NetnsPair, netns_pair  # noqa: F401 - fixture

CLI = [sys.executable, "-m", "clusterfsm.states.cli"]
pytestmark = [pytest.mark.netns, pytest.mark.integration]


def serve(pair: NetnsPair, end: str, tmp: Path, *extra: str) -> subprocess.Popen[str]:
    ns = pair.a if end == "a" else pair.b
    key = tmp / "cluster.key"
    if not key.exists():
        write_key(key, b"k" * 32)
    argv = [*CLI, "serve", "--rank", "auto", "--world-size", "2", "--key-file", str(key),
            "--interface", ns.interface, "--node-id-file", str(tmp / f"node-{end}"),
            "--beacon-port", "52417", "--trace-json", str(tmp / f"{end}.jsonl"),
            "--quiet", *extra]
    return ns.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def end_of(trace: Path) -> dict[str, Any]:
    last: dict[str, Any] = json.loads(trace.read_text().splitlines()[-1])
    return last


def test_two_namespaces_given_only_their_interface_reach_ready_and_all_sum(
    netns_pair: NetnsPair, tmp_path: Path,  # noqa: F811 - fixture
) -> None:
    procs = [serve(netns_pair, end, tmp_path, "--once", "--verify") for end in ("a", "b")]
    outs = [p.communicate(timeout=60) for p in procs]
    for proc, (out, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err
        assert "DistributedGroup ready" in out and "size=2" in out
        assert "all_sum = 3 (expected 3)" in out
    ranks = sorted(line.split("rank=")[1].split()[0] for out, _ in outs
                   for line in out.splitlines() if "DistributedGroup ready" in line)
    assert ranks == ["0", "1"]
    a_trace = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r.get("dest") for r in a_trace[:3]] == ["waiting_for_link", "discovering",
                                                    "handshaking"]


def test_cable_out_at_start_then_plugged_in_both_reach_ready(
    netns_pair: NetnsPair, tmp_path: Path,  # noqa: F811 - fixture
) -> None:
    netns_pair.link_down("b")  # b's end down: a has no carrier, b is down
    procs = [serve(netns_pair, end, tmp_path, "--once", "--verify") for end in ("a", "b")]
    for end in ("a", "b"):
        wait_for_state(tmp_path / f"{end}.jsonl", "waiting_for_link")
    time.sleep(2)  # the operator walks over with the cable
    netns_pair.link_up("b")
    outs = [p.communicate(timeout=60) for p in procs]
    for end, proc, (out, err) in zip(("a", "b"), procs, outs, strict=True):
        assert proc.returncode == 0, err
        assert "DistributedGroup ready" in out and "backend=ring" in out
        trace = [json.loads(line) for line in (tmp_path / f"{end}.jsonl").read_text()
                 .splitlines()]
        assert [r.get("dest") for r in trace[:2]] == ["waiting_for_link", "discovering"]


def wait_for_state(trace: Path, state: str, bound: float = 20.0) -> None:
    """Until ``trace`` shows ``state`` entered (polls the file; a hang guard only)."""
    end = time.monotonic() + bound
    while time.monotonic() < end:
        lines = trace.read_text().splitlines() if trace.exists() else []
        if any(json.loads(line).get("dest") == state for line in lines if line.endswith("}")):
            return
        time.sleep(0.02)
    raise AssertionError(f"{trace.name} never entered {state}")


def test_link_pulled_during_discovery_ends_typed_within_the_deadline(
    netns_pair: NetnsPair, tmp_path: Path,  # noqa: F811 - fixture
) -> None:
    proc = serve(netns_pair, "a", tmp_path, "--once", "--deadline", "discovering=3")
    trace = tmp_path / "a.jsonl"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # poll the trace file for the state (not timing)
        if trace.exists() and "discovering" in trace.read_text():
            break
        time.sleep(0.02)
    pulled = time.monotonic()
    netns_pair.link_down()
    _, err = proc.communicate(timeout=30)
    waited = time.monotonic() - pulled
    assert proc.returncode == 1
    end = end_of(trace)
    assert end["state"] == "link_lost", err
    assert f"link on '{netns_pair.a.interface}' lost" in err
    assert waited < 3 + 2  # the discovering deadline, plus process exit
    print(f"link pulled in discovering: {end['state']} after {waited:.2f} s")


def test_cable_pulled_in_ready_ends_both_ranks_in_link_lost_naming_it(
    netns_pair: NetnsPair, tmp_path: Path,  # noqa: F811 - fixture
) -> None:
    procs = [serve(netns_pair, end, tmp_path) for end in ("a", "b")]
    for end in ("a", "b"):
        wait_for_state(tmp_path / f"{end}.jsonl", "ready")
    netns_pair.link_down("b")  # pulled at b's end; a loses carrier
    errs = [p.communicate(timeout=30)[1] for p in procs]
    for end, proc, err in zip(("a", "b"), procs, errs, strict=True):
        ns = netns_pair.a if end == "a" else netns_pair.b
        assert proc.returncode == 1, err
        assert f"state link_lost, error LinkLost: link on '{ns.interface}' lost" in err
        assert end_of(tmp_path / f"{end}.jsonl")["state"] == "link_lost"
