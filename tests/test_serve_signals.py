"""How `clusterfsm serve` answers SIGTERM and SIGINT (real processes, loopback).

In ready, a signal is a deliberate close: GOODBYE to the peers, exit 0, trace ends in
``closed``, and the peer ends in ``peer_left`` (not an error). Before ready, a signal
cancels the machine: exit 130 and a trace ending in ``cancelled``.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from clusterfsm.states.demo import free_port
from tests.test_integration_ring import Ranks, ranks, trace_end  # noqa: F401 - fixture

pytestmark = pytest.mark.integration


def wait_for_line(proc: object, needle: str, limit: float = 30.0) -> str:
    stdout = proc.stdout  # type: ignore[attr-defined]
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        line = stdout.readline()
        if not line:
            break
        if needle in line:
            return str(line)
    raise AssertionError(f"{needle!r} never printed")


def test_sigterm_in_ready_closes_cleanly_and_the_peer_sees_it_left(
    ranks: Ranks, tmp_path: Path,  # noqa: F811 - fixture
) -> None:
    key, port = ranks.key(), free_port()
    t0, t1 = tmp_path / "r0.jsonl", tmp_path / "r1.jsonl"
    r0 = ranks.start("--rank", "0", "--world-size", "2", "--listen", f"127.0.0.1:{port}",
                     "--key-file", str(key), "--trace-json", str(t0), "--quiet")
    r1 = ranks.start("--rank", "1", "--world-size", "2", "--peer", f"127.0.0.1:{port}",
                     "--key-file", str(key), "--trace-json", str(t1), "--quiet")
    for proc in (r0, r1):
        wait_for_line(proc, "DistributedGroup ready")
    r1.send_signal(signal.SIGTERM)
    (c0, out0, err0), (c1, _, err1) = ranks.finish(timeout=30)
    assert c1 == 0, err1
    assert trace_end(t1)["state"] == "closed"
    assert c0 == 0, err0  # rank 0 was not stopped: its peer left, which is no error
    assert "state peer_left" in out0
    assert trace_end(t0)["state"] == "peer_left"


def test_sigint_before_ready_cancels_with_exit_130(
    ranks: Ranks, tmp_path: Path,  # noqa: F811 - fixture
) -> None:
    trace = tmp_path / "r0.jsonl"
    r0 = ranks.start("--rank", "0", "--world-size", "2", "--listen",
                     f"127.0.0.1:{free_port()}", "--key-file", str(ranks.key()),
                     "--trace-json", str(trace), "--once")
    wait_for_line(r0, "--peers_found--> handshaking")  # waiting for a peer that never comes
    r0.send_signal(signal.SIGINT)
    ((code, _, err),) = ranks.finish(timeout=30)
    assert code == 130, err
    assert "stopped by signal" in err
    assert trace_end(trace)["state"] == "cancelled"


def test_sigterm_before_ready_without_once_also_exits_130(
    ranks: Ranks, tmp_path: Path,  # noqa: F811 - fixture
) -> None:
    """A long-running serve (no --once) stopped before ready was interrupted too: exit
    130 as documented (exitcodes, lines, design.md), not 0 as if it had served."""
    trace = tmp_path / "r0.jsonl"
    r0 = ranks.start("--rank", "0", "--world-size", "2", "--listen",
                     f"127.0.0.1:{free_port()}", "--key-file", str(ranks.key()),
                     "--trace-json", str(trace))
    wait_for_line(r0, "--peers_found--> handshaking")
    r0.send_signal(signal.SIGTERM)
    ((code, _, err),) = ranks.finish(timeout=30)
    assert code == 130, err
    assert "stopped by signal" in err
    assert trace_end(trace)["state"] == "cancelled"
