"""Real OS processes on loopback, the real MLX ring backend, real all_sum.

Each test uses fresh ports and its own temp dir (TMPDIR for the children, so their
topology directories can be checked for), and kills and reaps every child even if
the test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusterfsm.fsm import read_trace
from clusterfsm.states.demo import free_port
from tests.processes import kill_and_reap

pytestmark = pytest.mark.integration
CLI = [sys.executable, "-m", "clusterfsm.states.cli"]


class Ranks:
    """Start serve processes; always killed and reaped at the end of the test."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[str]] = []
        self.env = dict(os.environ, TMPDIR=str(tmp))

    def key(self, name: str = "cluster.key") -> Path:
        path = self.tmp / name
        subprocess.run([*CLI, "keygen", str(path)], check=True, capture_output=True)
        return path

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        proc = subprocess.Popen([*CLI, "serve", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                env=dict(self.env, **(env or {})))
        self.procs.append(proc)
        return proc

    def finish(self, timeout: float = 60) -> list[tuple[int, str, str]]:
        out = []
        for p in self.procs:
            stdout, stderr = p.communicate(timeout=timeout)
            out.append((p.returncode, stdout, stderr))
        return out

    def close(self) -> None:
        kill_and_reap(self.procs, timeout=None)


@pytest.fixture
def ranks(tmp_path: Path) -> Iterator[Ranks]:
    r = Ranks(tmp_path)
    try:
        yield r
    finally:
        r.close()
        leftovers = list(tmp_path.glob("clusterfsm-*"))
        assert not leftovers, f"topology directories left behind: {leftovers}"


def trace_end(path: Path) -> dict[str, object]:
    return json.loads(path.read_text().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.parametrize("world", [2, 3])
def test_serve_processes_reach_ready_and_all_sum(ranks: Ranks, world: int) -> None:
    key, port = ranks.key(), free_port()
    for r in range(world):
        where = ["--listen", f"127.0.0.1:{port}"] if r == 0 else ["--peer", f"127.0.0.1:{port}"]
        ranks.start("--rank", str(r), "--world-size", str(world), "--key-file", str(key),
                    "--once", "--verify", "--trace-json", str(ranks.tmp / f"r{r}.jsonl"), *where)
    results = ranks.finish()
    expected = world * (world + 1) // 2
    for r, (code, out, err) in enumerate(results):
        assert code == 0, err
        assert f"DistributedGroup ready rank={r} size={world}" in out
        assert f"all_sum = {expected} (expected {expected})" in out
        lines = (ranks.tmp / f"r{r}.jsonl").read_text().splitlines()
        assert any('"dest":"ready"' in line for line in lines)
        # --once exits right after ready; a faster rank's GOODBYE lets a slower one
        # (still in ready for a moment) close cleanly too: no peer_lost, no peer_left.
        assert trace_end(ranks.tmp / f"r{r}.jsonl") == {"state": "closed"}


def test_demo_runs_three_ranks() -> None:
    done = subprocess.run([*CLI, "demo", "--ranks", "3"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "demo OK: 3 ranks" in done.stdout
    assert done.stdout.count("all_sum = 6 (expected 6)") == 3


def test_wrong_key_fails_typed_on_both_sides(ranks: Ranks) -> None:
    port = free_port()
    ranks.start("--rank", "0", "--world-size", "2", "--key-file", str(ranks.key("a.key")),
                "--listen", f"127.0.0.1:{port}", "--deadline", "handshaking=2", "--once")
    ranks.start("--rank", "1", "--world-size", "2", "--key-file", str(ranks.key("b.key")),
                "--peer", f"127.0.0.1:{port}", "--once")
    (c0, _, e0), (c1, _, e1) = ranks.finish()
    assert c1 == 1 and "state handshake_rejected, error HandshakeRejected" in e1
    assert "bad_key" in e1
    assert c0 == 1 and "state handshake_timeout, error HandshakeTimeout" in e0
    assert "bad_key" in e0


def test_jaccl_on_linux_is_backend_unavailable_never_a_size_1_group(ranks: Ranks) -> None:
    if sys.platform == "darwin":
        pytest.skip("jaccl may exist on macOS")
    key, port = ranks.key(), free_port()
    started = time.monotonic()
    ranks.start("--rank", "0", "--world-size", "2", "--key-file", str(key), "--backend",
                "jaccl", "--listen", f"127.0.0.1:{port}", "--once")
    ranks.start("--rank", "1", "--world-size", "2", "--key-file", str(key), "--backend",
                "jaccl", "--peer", f"127.0.0.1:{port}", "--once")
    (c0, o0, e0), (c1, o1, e1) = ranks.finish()
    assert time.monotonic() - started < 20
    assert c0 == 1 and "state backend_unavailable, error BackendUnavailable" in e0
    assert "jaccl" in e0
    assert c1 == 1 and ("backend_unavailable" in e1 or "peer_aborted" in e1)
    assert "DistributedGroup ready" not in o0 + o1


def test_hung_init_is_ended_by_the_hard_deadline_and_reported(ranks: Ranks) -> None:
    key, port = ranks.key(), free_port()
    t0 = ranks.tmp / "r0.jsonl"
    started = time.monotonic()
    ranks.start("--rank", "0", "--world-size", "2", "--key-file", str(key),
                "--listen", f"127.0.0.1:{port}", "--once", "--trace-json", str(t0),
                "--deadline", "initializing_group=2")
    ranks.start("--rank", "1", "--world-size", "2", "--key-file", str(key),
                "--peer", f"127.0.0.1:{port}", "--once", "--trace-json",
                str(ranks.tmp / "r1.jsonl"), "--deadline", "initializing_group=3",
                env={"CLUSTERFSM_FAULT": "never-init"})
    (c0, _, e0), (c1, _, e1) = ranks.finish()
    elapsed = time.monotonic() - started
    # rank 0 was frozen inside mx.distributed.init: its watchdog killed it.
    assert c0 == -signal.SIGKILL
    assert "state group_init_timeout, error GroupInitTimeout" in e0
    assert trace_end(t0)["state"] == "group_init_timeout"
    # The watchdog wrote the deadline transition the runner would have written.
    last = read_trace(t0).records[-1]
    assert (last.source, last.event, last.dest, last.error) == (
        "initializing_group", "deadline", "group_init_timeout", "GroupInitTimeout")
    # rank 1 (alive, never called init) hit its own deadline or heard rank 0 die.
    assert c1 == 1
    assert "group_init_timeout" in e1 or "peer_disconnected" in e1
    assert elapsed < 15


def test_rank_killed_after_ready_leaves_no_topology_directory(ranks: Ranks) -> None:
    """The directory stays registered with the rank's watchdog until the cluster
    closes, so a rank SIGKILLed in ready (which cannot clean up) leaves nothing."""
    key, port = ranks.key(), free_port()
    r0 = ranks.start("--rank", "0", "--world-size", "2", "--key-file", str(key),
                     "--listen", f"127.0.0.1:{port}")
    r1 = ranks.start("--rank", "1", "--world-size", "2", "--key-file", str(key),
                     "--peer", f"127.0.0.1:{port}")
    for proc in (r0, r1):
        assert proc.stdout is not None
        line = proc.stdout.readline()
        while line and "DistributedGroup ready" not in line:
            line = proc.stdout.readline()
        assert "DistributedGroup ready" in line
    assert list(ranks.tmp.glob("clusterfsm-*")), "the ranks' topology directories exist"
    r1.kill()
    r1.communicate(timeout=10)  # EOF once its watchdog (which inherited stderr) is gone too
    _, err = r0.communicate(timeout=10)
    assert r0.returncode == 1 and "state peer_lost, error PeerLost" in err
    assert not list(ranks.tmp.glob("clusterfsm-*"))
