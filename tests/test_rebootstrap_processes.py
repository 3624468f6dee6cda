"""A second bootstrap in one real process (MLX keeps its first group) ends at once in
``group_already_initialized``, and the fresh peer is told (``peer_aborted``) instead of
waiting in init for a rank that never comes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clusterfsm.states.demo import free_port
from clusterfsm.states.keys import write_key
from tests.processes import kill_and_reap

pytestmark = pytest.mark.integration
CLI = [sys.executable, "-m", "clusterfsm.states.cli"]

RANK0 = '''
import sys

import trio

from clusterfsm.states.api import bootstrap_cluster
from clusterfsm.states.config import Address, ClusterConfig
from clusterfsm.states.errors import ClusterError
from clusterfsm.states.keys import load_key


async def main(port: int, key_file: str) -> None:
    config = ClusterConfig(rank=0, world_size=2, key=load_key(key_file),
                           listen=Address("127.0.0.1", port))
    async with bootstrap_cluster(config) as cluster:
        await cluster.wait_lost()
    print("first ended in", cluster.state, flush=True)
    try:
        async with bootstrap_cluster(config):
            print("second reached ready", flush=True)
    except ClusterError as exc:
        print("second", exc.state, type(exc).__name__, exc.retryable, flush=True)


trio.run(main, int(sys.argv[1]), sys.argv[2])
'''


def test_second_bootstrap_in_one_process_is_refused_and_the_peer_told(tmp_path: Path) -> None:
    key, port = write_key(tmp_path / "k"), str(free_port())
    script = tmp_path / "rank0.py"
    script.write_text(RANK0)
    env = dict(os.environ, TMPDIR=str(tmp_path))
    joiner = [*CLI, "serve", "--rank", "1", "--world-size", "2", "--key-file", str(key),
              "--peer", f"127.0.0.1:{port}", "--once"]
    procs: list[subprocess.Popen[str]] = []

    def start(argv: list[str]) -> subprocess.Popen[str]:
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env))
        return procs[-1]

    try:
        rank0 = start([sys.executable, str(script), port, str(key)])
        first = start(joiner)
        assert first.wait(timeout=60) == 0  # ready, then a clean close
        second = start(joiner)  # a new process: it really calls init
        _out1, err1 = second.communicate(timeout=60)
        out0, err0 = rank0.communicate(timeout=60)
    finally:
        kill_and_reap(procs, timeout=None)
    assert rank0.returncode == 0, err0
    assert "first ended in peer_left" in out0
    assert "second group_already_initialized GroupAlreadyInitialized True" in out0
    assert second.returncode == 1
    assert "state peer_aborted, error PeerAborted" in err1
    assert "GroupAlreadyInitialized" in err1
