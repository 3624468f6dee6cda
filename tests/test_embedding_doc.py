"""docs/embedding.md's examples run: the trio rank and the asyncio-hosted rank form one
real two-process cluster, and the TOML example loads."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from clusterfsm.states.config import Address
from clusterfsm.states.configsource import config_from_toml
from clusterfsm.states.demo import free_port
from clusterfsm.states.keys import write_key
from tests.processes import kill_and_reap

DOC = Path(__file__).resolve().parents[1] / "docs" / "embedding.md"


def _block(language: str, first_line: str) -> str:
    """The doc's ``language`` code block whose first line starts with ``first_line``."""
    blocks = re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)
    found = [b for b in blocks if b.startswith(first_line)]
    assert len(found) == 1, f"expected one {language} block starting {first_line!r}"
    return found[0]


@pytest.mark.integration
def test_trio_and_asyncio_examples_run_as_two_ranks(tmp_path: Path) -> None:
    scripts = [tmp_path / "rank.py", tmp_path / "rank_asyncio.py"]
    scripts[0].write_text(_block("python", '"""One rank: python rank.py'))
    scripts[1].write_text(_block("python", '"""One rank hosted by an asyncio app'))
    key = write_key(tmp_path / "k")
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port, str(key)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r, script in enumerate(scripts)]
    try:
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        kill_and_reap(procs, timeout=None)
    for r, (p, (out, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, err
        assert f"rank {r}: ready, health healthy, all_sum 3, backend ring" in out
    assert "hosted by asyncio" in outs[1][0]
    assert "rank 1: got b'hello from 0' from rank 0" in outs[1][0]


def test_toml_example_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_key(tmp_path / "cluster.key")
    (tmp_path / "rank1.toml").write_text(_block("toml", "# rank1.toml"))
    config = config_from_toml("rank1.toml", environ={})
    assert config.rank == 1 and config.peers == (Address("10.0.0.1", 7700),)
    assert config.peer_lost_after == 5.0 and config.deadlines == {"handshaking": 30.0}
