"""docs/embedding.md's example runs as two real rank processes and reaches ready."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from clusterfsm.states.demo import free_port
from clusterfsm.states.keys import write_key
from tests.processes import kill_and_reap

DOC = Path(__file__).resolve().parents[1] / "docs" / "embedding.md"


@pytest.mark.integration
def test_embedding_example_runs_as_two_ranks(tmp_path: Path) -> None:
    script = tmp_path / "rank.py"
    script.write_text(re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)[-1])
    key = write_key(tmp_path / "k")
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port, str(key)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        kill_and_reap(procs, timeout=None)
    for r, (p, (out, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, err
        assert f"rank {r}: ready, health healthy, all_sum 3" in out
