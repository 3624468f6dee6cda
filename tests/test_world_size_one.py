"""World size 1: a session of one is ready at once, with MLX's single-process group.

The machine takes its ordinary path (every state has nothing to wait for); group init
clears every backend variable, so MLX's non-strict init hands back its own
single-process group. That size-1 group is right only for world size 1: any other
world size still refuses a size-1 group (``GroupSizeMismatch``, MLX's silent answer to
a broken configuration).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from clusterfsm.states.config import ClusterConfig
from clusterfsm.states.errors import GroupSizeMismatch
from clusterfsm.states.groupinit import BACKEND_VARS, InitPlan, TopologyDir, backend_env
from clusterfsm.states.testing import MemoryNetwork
from tests.cluster_harness import COORD, KEY, RankResult, config, run_rank, run_ranks

CLI = [sys.executable, "-m", "clusterfsm.states.cli"]
HAPPY = ["discovering", "handshaking", "awaiting_session", "exchanging_bootstrap",
         "initializing_group", "confirming_group", "ready", "closed"]


@pytest.mark.parametrize("listen", [COORD, None], ids=["with-listen", "without-listen"])
async def test_world_size_one_is_ready_through_every_state(
    autojump_clock: Any, listen: Any,
) -> None:
    network = MemoryNetwork()
    started = trio.current_time()
    (r0,) = await run_ranks([config(0, 1, listen=listen)], network=network)
    assert r0.path == HAPPY, (r0.path, r0.error)
    assert r0.group_size == 1 and r0.error is None
    # Ready at once: no deadline was waited out (virtual time barely moved).
    assert trio.current_time() - started < 1.0
    assert not network._listeners, "a group of one listens for no one"


async def test_world_size_one_with_interfaces_and_rank_auto_needs_no_discovery(
    autojump_clock: Any,
) -> None:
    # No beacon socket is ever opened: the discovery net is never used.
    cfg = ClusterConfig(rank=None, world_size=1, key=KEY, interfaces=("en9",))
    result = RankResult(0)
    await run_rank(MemoryNetwork(), cfg, result, discovery_net=_NoNet())
    assert result.path == HAPPY, (result.path, result.error)
    assert result.group_size == 1


class _NoNet:
    def probe(self, name: str) -> Any:
        raise AssertionError(f"probed {name}")

    def beacon_socket(self, name: str, port: int) -> Any:
        raise AssertionError(f"beacon socket on {name}")


async def test_a_size_one_group_is_still_refused_for_two_ranks(autojump_clock: Any) -> None:
    from clusterfsm.states.testing import fake_initializer

    r0, _r1 = await run_ranks([config(0), config(1)],
                              initializers={0: fake_initializer(size=1)})
    assert isinstance(r0.error, GroupSizeMismatch) and r0.error.got == 1


def test_group_init_for_one_rank_clears_every_backend_variable_and_writes_no_file() -> None:
    files = TopologyDir()
    try:
        one = InitPlan("ring", 0, 1, (), b"s" * 16)
        env, clear = backend_env(one, files)
        assert env == {} and set(clear) == set(BACKEND_VARS)
        assert {"MLX_RANK", "MLX_HOSTFILE", "MLX_IBV_DEVICES"} <= set(clear)
        assert list(files.path.iterdir()) == []
        two = InitPlan("ring", 0, 2, (("127.0.0.1:1",), ("127.0.0.1:2",)), b"s" * 16)
        env, _ = backend_env(two, files)
        assert env["MLX_RANK"] == "0" and Path(env["MLX_HOSTFILE"]).exists()
    finally:
        files.close()


# -- real processes, real MLX -----------------------------------------------------------


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.key"
    subprocess.run([*CLI, "keygen", str(path)], check=True, capture_output=True)
    return path


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **(env or {})))


@pytest.mark.integration
@pytest.mark.parametrize("listen", [[], ["--listen", "127.0.0.1:0"]],
                         ids=["without-listen", "with-listen"])
def test_serve_world_size_one_is_ready_with_mlx_single_process_group(
    key: Path, tmp_path: Path, listen: list[str],
) -> None:
    # A stale ring configuration in the environment must not be joined.
    stale = {"MLX_RANK": "3", "MLX_HOSTFILE": str(tmp_path / "missing.json")}
    trace = tmp_path / "t.jsonl"
    done = _run(["serve", "--rank", "0", "--world-size", "1", *listen, "--key-file",
                 str(key), "--once", "--verify", "--trace-json", str(trace)], env=stale)
    assert done.returncode == 0, done.stderr
    assert "all_sum = 1 (expected 1)" in done.stdout
    assert "DistributedGroup ready rank=0 size=1 backend=ring" in done.stdout
    assert json.loads(trace.read_text().splitlines()[-1]) == {"state": "closed"}


@pytest.mark.integration
def test_demo_with_one_rank() -> None:
    done = _run(["demo", "--ranks", "1"])
    assert done.returncode == 0, done.stderr
    assert "demo OK: 1 rank," in done.stdout


@pytest.mark.integration
def test_bootstrap_cluster_world_size_one_in_a_fresh_process() -> None:
    # In its own process: MLX caches its first group per backend for the process.
    script = (
        "import trio\n"
        "from clusterfsm.states.api import bootstrap_cluster\n"
        "from clusterfsm.states.config import ClusterConfig\n"
        "async def main():\n"
        "    async with bootstrap_cluster(ClusterConfig(rank=0, world_size=1, "
        "key=b'k' * 32)) as c:\n"
        "        print(c.state, c.rank, c.group.size(), c.group.rank())\n"
        "trio.run(main)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ready", "0", "1", "0"]
