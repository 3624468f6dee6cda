"""Compatibility across ranks: every difference named, hostile objects refused."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from clusterfsm.states.codec import Compat
from clusterfsm.states.compat import Compatibility, differences, resolve_any
from clusterfsm.states.errors import (
    BackendUnavailable,
    BootstrapRejected,
    FrameError,
    IncompatiblePeer,
    PeerAborted,
)
from clusterfsm.states.testing import MemoryNetwork, fake_initializer
from tests.cluster_harness import KEY, RankResult, config, handshaken_joiner, run_rank, run_ranks

RANK0 = Compatibility("0.32.4", 3, ("jaccl", "ring"), 2, {"model": "llama-70b"})


def test_a_matching_rank_has_no_difference() -> None:
    same = Compatibility.from_json(RANK0.to_json())
    assert same == RANK0 and differences(RANK0, same, 1, "jaccl") == []


def test_every_difference_is_named() -> None:
    other = Compatibility("0.31.2", 2, ("ring",), 3, {"model": "qwen", "plan": "tp2"})
    found = differences(RANK0, other, 1, "jaccl")
    assert found == [
        "rank 1 has mlx 0.31.2, rank 0 has 0.32.4",
        "rank 1 speaks wire version 2, rank 0 3",
        "rank 1 expects world size 3, rank 0 2",
        "rank 1 cannot run jaccl (it has ring)",
        "rank 1 has model='qwen', rank 0 has 'llama-70b'",
        "rank 1 has plan='tp2', rank 0 has '(unset)'",
    ]


def test_any_is_jaccl_only_if_every_rank_has_it() -> None:
    ring_only = Compatibility("0.32.4", 3, ("ring",), 2, {"model": "llama-70b"})
    assert resolve_any(RANK0, [RANK0]) == "jaccl"
    assert resolve_any(RANK0, [ring_only]) == "ring"
    assert differences(RANK0, ring_only, 1, "any") == []


@pytest.mark.parametrize("text", [
    "", "[]", "{}", '{"mlx":1,"wire":1,"backends":[],"world":2,"extra":{}}',
    '{"mlx":"x","wire":-1,"backends":[],"world":2,"extra":{}}',
    '{"mlx":"x","wire":1,"backends":["nccl"],"world":2,"extra":{}}',
    '{"mlx":"x","wire":true,"backends":[],"world":2,"extra":{}}',
    '{"mlx":"x","wire":1,"backends":[],"world":2,"extra":{"a":1}}',
    '{"mlx":"' + "x" * 200 + '","wire":1,"backends":[],"world":2,"extra":{}}',
    '{"mlx":"x","wire":1,"backends":[],"world":2,"extra":{' + ",".join(
        f'"k{i}":"v"' for i in range(17)) + "}}",
])
def test_a_malformed_object_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        Compatibility.from_json(text)


# -- in the machine: rank 0 refuses a rank that does not fit, before init ------------


async def test_another_mlx_version_is_a_typed_refusal_naming_it(autojump_clock: Any) -> None:
    inits = {0: fake_initializer(mlx_version="0.32.4"), 1: fake_initializer(mlx_version="0.31.2")}
    r0, r1 = await run_ranks([config(0), config(1)], initializers=inits)
    assert r0.state == "incompatible_peers" and isinstance(r0.error, IncompatiblePeer)
    assert r0.error.differences == ("rank 1 has mlx 0.31.2, rank 0 has 0.32.4",)
    assert "initializing_group" not in r0.path + r1.path  # nobody reached init
    assert r1.state == "peer_aborted" and isinstance(r1.error, PeerAborted)
    assert r1.error.error == "IncompatiblePeer" and "mlx 0.31.2" in r1.error.detail


async def test_an_app_defined_field_must_match(autojump_clock: Any) -> None:
    r0, _r1 = await run_ranks([config(0, compat={"model": "llama-70b"}),
                               config(1, compat={"model": "qwen-72b"})])
    assert isinstance(r0.error, IncompatiblePeer)
    assert r0.error.differences == ("rank 1 has model='qwen-72b', rank 0 has 'llama-70b'",)


async def test_any_runs_jaccl_only_if_every_rank_has_it(autojump_clock: Any) -> None:
    no_jaccl = fake_initializer()

    def ring_only(backend: str) -> None:
        if backend == "jaccl":
            raise BackendUnavailable("jaccl", "librdma.dylib")

    no_jaccl.precheck = ring_only
    used: list[str] = []

    async def note(cluster: Any) -> None:
        used.append(cluster.backend)

    results = await run_ranks([config(0, backend="any"), config(1, backend="any")],
                              initializers={1: no_jaccl}, in_ready=note)
    assert [r.state for r in results] == ["closed", "closed"], [r.error for r in results]
    assert used == ["ring", "ring"]  # what the ready line prints, not "any"


# -- hostile COMPAT: a typed error and a closed connection, never a crash ------------


async def _joiner_sending(network: MemoryNetwork, info: str, *, other_session: bool) -> None:
    link, hs = await handshaken_joiner(network, KEY)
    assert hs.session_id is not None
    async with trio.open_nursery() as nursery:
        link.start(nursery, heartbeat_interval=0.1)
        session = b"OLD-SESSION-0000" if other_session else hs.session_id
        await link.send(Compat(session, info))
        await trio.sleep_forever()


@pytest.mark.parametrize(("info", "other_session", "state", "error"), [
    ("not json", False, "protocol_error", FrameError),
    ('{"mlx":"x","wire":1,"backends":["nccl"],"world":2,"extra":{}}', False,
     "protocol_error", FrameError),
    (RANK0.to_json(), True, "bootstrap_rejected", BootstrapRejected),
])
async def test_a_hostile_compat_report_is_a_typed_error(
        autojump_clock: Any, info: str, other_session: bool, state: str,
        error: type[BaseException]) -> None:
    network = MemoryNetwork()
    r0 = RankResult(0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _joiner_sending(network, info, other_session=other_session))
        await run_rank(network, config(0), r0)
        nursery.cancel_scope.cancel()
    assert r0.state == state and isinstance(r0.error, error), (r0.path, r0.error)


@pytest.mark.integration
def test_serve_compat_flags_that_differ_refuse_before_init(tmp_path: Any) -> None:
    import subprocess
    import sys

    from clusterfsm.states.demo import free_port
    from clusterfsm.states.keys import write_key
    from tests.processes import kill_and_reap

    key = write_key(tmp_path / "k", b"k" * 32)
    port = free_port()
    common = [sys.executable, "-m", "clusterfsm.states.cli", "serve", "--world-size", "2",
              "--key-file", str(key), "--once", "--quiet"]
    procs = [subprocess.Popen([*common, "--rank", "0", "--listen", f"127.0.0.1:{port}",
                               "--compat", "model=llama-70b"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
             subprocess.Popen([*common, "--rank", "1", "--peer", f"127.0.0.1:{port}",
                               "--compat", "model=qwen-72b"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    try:
        errs = [p.communicate(timeout=60)[1] for p in procs]
    finally:
        kill_and_reap(procs)
    assert [p.returncode for p in procs] == [1, 1]
    assert ("state incompatible_peers, error IncompatiblePeer: incompatible ranks: rank 1 "
            "has model='qwen-72b', rank 0 has 'llama-70b'") in errs[0]
    assert "state peer_aborted" in errs[1] and "IncompatiblePeer" in errs[1]
