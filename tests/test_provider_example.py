"""examples/provider: tensor-parallel greedy tokens over a real 2-rank ring equal one
process's tokens exactly.

The test builds the tiny random-weight llama (nothing is downloaded: the children run
with HF_HUB_OFFLINE=1), then runs the provider three times at once: one process
(``--single``) and two ranks bootstrapped by clusterfsm over loopback. All get the same
requests, which rank 0 broadcasts on the app channel. The second request is the one
the fix in examples/provider/tp_generation.py guards: its generation starts right
after one that stopped at ``max_tokens`` with one step (and its collectives) still in
flight.
Every child is killed and reaped and the temp dir removed, pass or fail.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clusterfsm.states.demo import free_port
from clusterfsm.states.keys import write_key
from tests.processes import kill_and_reap

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "provider"
REQUESTS = [
    {"id": "first", "prompt": "The cluster is ready.", "max_tokens": 64},
    {"id": "second", "prompt": "Tensor parallel, two ranks", "max_tokens": 96},
    "not json but a prompt all the same",
    '{"id": "bad", "prompt": "", "max_tokens": 5}',
    {"id": "last", "prompt": "x", "max_tokens": 64},
]
GOOD_IDS = ["first", "second", "r1", "last"]
TIMEOUT = 60


def _require_mlx_lm() -> None:
    # Found, not imported: importing MLX here would start its threads in the test
    # process (and a later test forks only from a single-threaded one).
    if importlib.util.find_spec("mlx_lm") is None:  # pragma: no cover - no extra
        pytest.fail("mlx-lm is missing: install with `pip install -e '.[dev]'` "
                    "(dev includes the provider extra)")


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="provider-test-") as tmp:
        yield Path(tmp)
    assert not Path(tmp).exists()


def _request_text() -> bytes:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in REQUESTS]
    return ("\n".join(lines) + "\n").encode()


def _tokens_by_id(stdout: str) -> tuple[dict[str, list[int]], dict[str, dict[str, Any]]]:
    tokens: dict[str, list[int]] = {}
    ends: dict[str, dict[str, Any]] = {}
    for line in stdout.splitlines():
        item = json.loads(line)
        if "token" in item:
            tokens.setdefault(item["id"], []).append(item["token"])
        else:
            ends[str(item["id"])] = item
    return tokens, ends


def test_two_rank_tensor_parallel_tokens_equal_one_process(workdir: Path) -> None:
    _require_mlx_lm()
    env = dict(os.environ, TMPDIR=str(workdir), HF_HUB_OFFLINE="1")
    model = workdir / "tiny-llama"
    subprocess.run([sys.executable, str(EXAMPLE / "tiny_llama.py"), str(model)],
                   check=True, capture_output=True, timeout=TIMEOUT, env=env)
    key = write_key(workdir / "cluster.key")
    port = free_port()
    base = [sys.executable, str(EXAMPLE / "provider.py"), "--model", str(model)]
    ring = ["--world-size", "2", "--key-file", str(key)]
    argvs = {
        "single": [*base, "--single"],
        "rank0": [*base, "--rank", "0", *ring, "--listen", f"127.0.0.1:{port}"],
        "rank1": [*base, "--rank", "1", *ring, "--peer", f"127.0.0.1:{port}"],
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, argv in argvs.items():
            with (workdir / f"{name}.out").open("wb") as stdout, \
                    (workdir / f"{name}.err").open("wb") as stderr:
                procs[name] = subprocess.Popen(argv, stdin=subprocess.PIPE, env=env,
                                               stdout=stdout, stderr=stderr)
        for name in ("single", "rank0"):
            stdin = procs[name].stdin
            assert stdin is not None
            stdin.write(_request_text())
            stdin.close()
        for proc in procs.values():
            proc.wait(timeout=TIMEOUT)
    finally:
        kill_and_reap(procs.values(), timeout=None)

    out = {name: (workdir / f"{name}.out").read_text() for name in procs}
    err = {name: (workdir / f"{name}.err").read_text() for name in procs}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}: {err[name]}"

    single_tokens, single_ends = _tokens_by_id(out["single"])
    tp_tokens, tp_ends = _tokens_by_id(out["rank0"])
    for ends in (single_ends, tp_ends):
        assert "must be a string" in ends["bad"]["error"]
        assert [i for i in ends if i != "bad"] == GOOD_IDS
    for request_id in GOOD_IDS:
        expected = single_tokens[request_id]
        assert len(expected) == tp_ends[request_id]["tokens"] >= 64
        assert tp_tokens[request_id] == expected, f"{request_id}: tokens differ"
        digest = tp_ends[request_id]["digest"]
        assert digest == single_ends[request_id]["digest"]
        # rank 1 generated the very same tokens (it prints its digest per request)
        assert f"rank 1: {request_id}: {len(expected)} tokens (length), digest {digest}" \
            in err["rank1"]
    # both ranks closed their clusters: no topology directory left behind (the
    # children's TMPDIR is workdir; MLX also keeps its compiled kernels there, in mlx/)
    leftovers = list(workdir.glob("clusterfsm-*"))
    assert not leftovers, f"topology directories left behind: {leftovers}"
