"""Bad local input: one clear line naming the problem and exit 2, never a traceback,
a hang or a restart loop; a trace that cannot be written never changes the outcome."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from clusterfsm.fsm import TraceEnd, TraceRecord
from clusterfsm.fsm.trace import TraceWriter
from clusterfsm.states.cli import main
from clusterfsm.states.keys import MAX_KEY_FILE_BYTES, KeyFileError, load_key, write_key
from clusterfsm.states.localfiles import LocalFileError, read_small_text
from clusterfsm.states.nodeid import load_or_create_node_id

CLI = [sys.executable, "-m", "clusterfsm.states.cli"]


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, Path]:
    """A FIFO, an endless device, a non-UTF-8 file, a huge file, a directory."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    latin = tmp_path / "latin"
    latin.write_bytes(b"\xff\xfe caf\xe9")
    huge = tmp_path / "huge"
    huge.write_bytes(b"a" * (MAX_KEY_FILE_BYTES + 1))
    folder = tmp_path / "folder"
    folder.mkdir(mode=0o700)
    for path in (latin, huge):
        path.chmod(0o600)
    return {"fifo": fifo, "zero": Path("/dev/zero"), "latin": latin, "huge": huge,
            "folder": folder}


EXPECTED = {"fifo": "is not a regular file (a FIFO)",
            "zero": "is not a regular file (a character device)",
            "latin": "is not UTF-8 text (byte 0)",
            "huge": f"is larger than {MAX_KEY_FILE_BYTES} bytes",
            "folder": "is not a regular file (a directory)"}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_the_reader_refuses_what_is_not_a_small_regular_utf8_file(
    bad_files: dict[str, Path], kind: str,
) -> None:
    with pytest.raises(LocalFileError) as caught:
        read_small_text(bad_files[kind], limit=MAX_KEY_FILE_BYTES)
    assert str(caught.value) == f"{bad_files[kind]}: {EXPECTED[kind]}"
    assert not caught.value.missing


def test_the_reader_says_when_the_file_is_missing(tmp_path: Path) -> None:
    with pytest.raises(LocalFileError) as caught:
        read_small_text(tmp_path / "nope", limit=10)
    assert caught.value.missing and str(tmp_path / "nope") in str(caught.value)


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_key_and_node_id_errors_name_the_file(bad_files: dict[str, Path], kind: str) -> None:
    path = bad_files[kind]
    with pytest.raises(KeyFileError) as key_error:
        load_key(path)
    assert str(key_error.value) == f"key file {path}: {EXPECTED[kind]}"
    with pytest.raises(ValueError) as node_error:
        load_or_create_node_id(path)
    assert str(node_error.value) == f"node-id file {path}: {EXPECTED[kind]}"


def test_a_good_key_and_a_new_node_id_still_load(tmp_path: Path) -> None:
    assert len(load_key(write_key(tmp_path / "k"))) == 32
    created = load_or_create_node_id(tmp_path / "sub" / "node-id")
    assert load_or_create_node_id(tmp_path / "sub" / "node-id") == created


def _serve_line(capsys: Any, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize("kind", ["zero", "latin", "folder"])
def test_serve_exits_2_with_one_line_for_a_bad_key_or_node_id_file(
    bad_files: dict[str, Path], kind: str, capsys: Any, tmp_path: Path,
) -> None:
    path = str(bad_files[kind])
    code, err = _serve_line(capsys, ["serve", "--rank", "0", "--world-size", "1",
                                     "--key-file", path, "--once", "--quiet"])
    assert (code, err) == (2, f"clusterfsm serve: key file {path}: {EXPECTED[kind]}\n")
    key = str(write_key(tmp_path / "good.key"))
    code, err = _serve_line(capsys, ["serve", "--rank", "auto", "--world-size", "2",
                                     "--interface", "lo", "--node-id-file", path,
                                     "--key-file", key, "--once", "--quiet"])
    assert (code, err) == (2, f"clusterfsm serve: node-id file {path}: {EXPECTED[kind]}\n")


def test_serve_with_a_fifo_key_file_exits_2_at_once(bad_files: dict[str, Path]) -> None:
    # A subprocess: a regression here would hang (open() of a FIFO waits for a writer).
    done = subprocess.run([*CLI, "serve", "--rank", "0", "--world-size", "1", "--key-file",
                           str(bad_files["fifo"]), "--once"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr == f"clusterfsm serve: key file {bad_files['fifo']}: is not a " \
                          "regular file (a FIFO)\n"


# -- demo arguments ---------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--timeout", "nan"], "--timeout must be a positive number of seconds, got nan"),
    (["--timeout", "-1"], "--timeout must be a positive number of seconds, got -1.0"),
    (["--timeout", "0"], "--timeout must be a positive number of seconds, got 0.0"),
    (["--timeout", "inf"], "--timeout must be a positive number of seconds, got inf"),
    (["--timeout", "soon"], "expected seconds, got 'soon'"),
    (["--ranks", "300"], "--ranks must be 1..255 (the world size limit), got 300"),
    (["--ranks", "0"], "--ranks must be 1..255 (the world size limit), got 0"),
    (["--ranks", "two"], "expected a number of ranks, got 'two'"),
])
def test_demo_arguments_are_checked_at_parse_time(args: list[str], message: str,
                                                  capsys: Any) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["demo", *args])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].endswith(message)
    assert "Traceback" not in err


# -- traces that cannot be written --------------------------------------------------------


RECORD = TraceRecord(t=1.0, source="idle", event="start", dest="discovering", elapsed_ms=1.0)


@pytest.mark.parametrize("where", ["directory", "dev-full"])
def test_a_trace_writer_that_cannot_write_keeps_the_error_and_says_it_once(
    tmp_path: Path, where: str, caplog: Any,
) -> None:
    path = tmp_path if where == "directory" else Path("/dev/full")
    if not path.exists():
        pytest.skip("no /dev/full here")
    with caplog.at_level(logging.WARNING, logger="clusterfsm.fsm.trace"):
        writer = TraceWriter(path)
        writer.record(RECORD)
        writer.record(RECORD)
        writer.finish(TraceEnd("ready"))
    assert isinstance(writer.failure, OSError)
    assert [r.getMessage() for r in caplog.records] == [writer.failure_text()]
    assert writer.failure_text().startswith(f"trace {path}: not written (")


def test_a_trace_writer_that_works_reports_nothing(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path / "t.jsonl")
    writer.record(RECORD)
    writer.finish(TraceEnd("ready"))
    assert writer.failure is None and writer.failure_text() == ""
    with pytest.raises(ValueError, match="already closed"):
        writer.record(RECORD)


def _immutable(path: Path) -> bool:
    if shutil.which("chattr") is None:
        return False
    return subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0


@pytest.mark.parametrize("where", ["dev-full", "immutable"])
def test_an_unwritable_trace_never_replaces_the_outcome(tmp_path: Path, where: str) -> None:
    if where == "dev-full":
        trace = Path("/dev/full")
        if not trace.exists():
            pytest.skip("no /dev/full here")
    else:
        trace = tmp_path / "trace.jsonl"
        trace.write_text("")
        if not _immutable(trace):
            pytest.skip("cannot make an immutable file here (chattr +i needs root)")
    key = str(write_key(tmp_path / "k"))
    base = [*CLI, "serve", "--rank", "0", "--key-file", key, "--once", "--quiet",
            "--trace-json", str(trace)]
    try:
        # A failure keeps its state and exit code 1 ...
        failed = subprocess.run([*base, "--world-size", "2", "--listen", "127.0.0.1:0",
                                 "--deadline", "handshaking=0.3"],
                                capture_output=True, text=True, timeout=60)
        # ... and a success its exit code 0.
        ok = subprocess.run([*base, "--world-size", "1"], capture_output=True, text=True,
                            timeout=60)
    finally:
        if where == "immutable":
            subprocess.run(["chattr", "-i", str(trace)], check=False)
    assert failed.returncode == 1 and ok.returncode == 0, (failed.stderr, ok.stderr)
    for done in (failed, ok):
        assert "Traceback" not in done.stderr
        notes = [line for line in done.stderr.splitlines()
                 if line.startswith(f"trace {trace}: not written")]
        assert len(notes) == 1, done.stderr
    assert "rank 0: state handshake_timeout, error HandshakeTimeout" in failed.stderr
    assert "DistributedGroup ready rank=0 size=1" in ok.stdout


def test_the_watchdog_still_reports_and_kills_when_the_trace_cannot_be_written(
    tmp_path: Path, capsys: Any,
) -> None:
    from clusterfsm.states.watchdog_main import _expire

    _expire({"trace": str(tmp_path), "record": {}, "end": {}, "t_armed": 0.0,
             "elapsed_before_ms": 0.0, "message": "rank 1: state group_init_timeout"}, 1.0)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "rank 1: state group_init_timeout"
    assert err[1].startswith(f"trace {tmp_path}: not written (")


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_doctor_refuses_a_bad_node_id_file_like_serve_without_reading_it(
    bad_files: dict[str, Path], kind: str,
) -> None:
    """doctor's node-id check goes through serve's reader: a FIFO fails at once (it
    hung doctor forever), /dev/zero is never read (it exhausted memory), and the remedy
    never tells the operator to delete what is not a node-id file (a directory)."""
    from clusterfsm.states.doctor import DoctorOptions, node_id_check

    path = bad_files[kind]
    finding = node_id_check(DoctorOptions(node_id_file=str(path)))
    assert finding.failed
    assert finding.detail == f"node-id file {path}: {EXPECTED[kind]}"
    assert "delete" not in finding.remedy


def test_doctor_says_delete_only_for_a_node_id_file_that_holds_no_id(tmp_path: Path) -> None:
    from clusterfsm.states.doctor import DoctorOptions, node_id_check

    path = tmp_path / "node-id"
    path.write_text("not hex\n")
    finding = node_id_check(DoctorOptions(node_id_file=str(path)))
    assert finding.failed and finding.remedy == f"delete {path} to make a new id"
    assert str(path) in finding.detail


def test_the_watchdog_takes_a_huge_finite_deadline(tmp_path: Path) -> None:
    """``--deadline initializing_group=1e308`` is positive and finite, so accepted; the
    watchdog's ``select`` raised OverflowError on it and died, leaving init without its
    hard deadline. Now it stays armed and exits cleanly when the rank goes (EOF)."""
    import json
    import subprocess
    import sys

    arm = {"seconds": 1e308, "message": "x", "trace": str(tmp_path / "t"), "record": {},
           "end": {}, "t_armed": 0.0, "elapsed_before_ms": 0.0}
    done = subprocess.run(
        [sys.executable, "-m", "clusterfsm.states.watchdog_main"],
        input=f"ARM {json.dumps(arm)}\n".encode(), capture_output=True, timeout=60)
    assert done.stderr == b""
    assert done.returncode == 0
