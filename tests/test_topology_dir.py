"""TopologyDir: private modes, exclusive files, and a close that removes everything.

Close takes a short path (unlink what it wrote, rmdir); these pin that the short path
keeps the guarantees: a foreign file still goes, and a second close is harmless.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clusterfsm.states.groupinit import TopologyDir


def test_private_modes_exclusive_file_and_close_removes_it() -> None:
    files = TopologyDir()
    try:
        path = files.write("hostfile.json", [["a:1"], ["b:2"]])
        assert files.path.stat().st_mode & 0o777 == 0o700
        assert path.stat().st_mode & 0o777 == 0o600
        assert json.loads(path.read_text()) == [["a:1"], ["b:2"]]
        with pytest.raises(FileExistsError):
            files.write("hostfile.json", [])
    finally:
        files.close()
    assert not files.path.exists()
    files.close()  # idempotent


def test_close_removes_files_it_did_not_write_and_a_directory_already_gone() -> None:
    files = TopologyDir()
    files.write("hostfile.json", [])
    (files.path / "left-by-someone-else").write_text("x")
    files.close()
    assert not files.path.exists()

    gone = TopologyDir()
    gone.write("hostfile.json", [])
    (gone.path / "hostfile.json").unlink()
    gone.path.rmdir()  # e.g. the watchdog removed it first
    gone.close()


def _dead_pid() -> int:
    """A PID no process has: a child that was started and reaped."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_dead_process_s_old_topology_dir_is_swept_and_nothing_else(tmp_path: Path) -> None:
    """A process group killed at once (the watchdog with it) left its topology directory;
    the next rank's sweep removes it, and only it: a live process's directory, a recent
    one (another PID namespace may share the temp directory), a supervisor generation
    directory and a file of the same shape all stay."""
    import os
    import time

    from clusterfsm.states.groupinit import STALE_AFTER_S, sweep_stale_topology_dirs

    old = time.time() - STALE_AFTER_S - 60
    dead = _dead_pid()
    stale = tmp_path / f"clusterfsm-{dead}-abcd1234"
    recent = tmp_path / f"clusterfsm-{dead}-efgh5678"
    live = tmp_path / f"clusterfsm-{os.getppid()}-ijkl9012"
    generation = tmp_path / "clusterfsm-gen3-mnop3456"
    for path in (stale, recent, live, generation):
        path.mkdir()
        (path / "hostfile-x.json").write_text("[]")
    shaped_file = tmp_path / f"clusterfsm-{dead}-qrst7890"
    shaped_file.write_text("not a directory")
    for path in (stale, live, generation, shaped_file):
        os.utime(path, (old, old))

    assert sweep_stale_topology_dirs(tmp_path) == [stale]
    assert not stale.exists()
    assert all(p.exists() for p in (recent, live, generation, shaped_file))
    assert sweep_stale_topology_dirs(tmp_path, now=time.time() + 2 * STALE_AFTER_S) == [
        recent]


def test_a_topology_dir_is_named_for_its_creator() -> None:
    import os

    files = TopologyDir()
    try:
        assert files.path.name.startswith(f"clusterfsm-{os.getpid()}-")
    finally:
        files.close()
