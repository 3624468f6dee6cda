"""TopologyDir: private modes, exclusive files, and a close that removes everything.

Close takes a short path (unlink what it wrote, rmdir); these pin that the short path
keeps the guarantees: a foreign file still goes, and a second close is harmless.
"""

from __future__ import annotations

import json

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
