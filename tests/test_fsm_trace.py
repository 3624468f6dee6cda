"""Traces: JSON lines written as they happen, read back, decomposed per state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clusterfsm.fsm import TraceWriter, deadline_trace, read_trace, state_totals
from clusterfsm.fsm.testing import HANG, After, run_scripted
from clusterfsm.fsm.trace import format_decomposition, parse_trace
from tests.toy_machine import TOY, WorkFailed


def test_writer_and_reader_round_trip_with_end_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    writer = TraceWriter(path)
    out = run_scripted(TOY, {"idle": "start", "warming": After(0.5, "warm"),
                             "working": WorkFailed(2)}, observers=[writer.record])
    writer.finish(out.end_record())
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert set(lines[0]) == {"t", "source", "event", "dest", "elapsed_ms"}
    assert lines[-2]["error"] == "WorkFailed"
    assert lines[-1] == {"state": "work_failed", "error": "WorkFailed",
                         "message": str(out.error)}
    trace = read_trace(path)
    assert trace.records == out.records or [r.dest for r in trace.records] == [
        r.dest for r in out.records]
    assert trace.path == ["idle", "warming", "working", "work_failed"]
    assert trace.end is not None and trace.end.error == "WorkFailed"


def test_every_line_is_flushed_before_the_run_ends(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    writer = TraceWriter(path)
    sizes: list[int] = []
    out = run_scripted(TOY, {"idle": "start", "warming": "warm", "working": "done",
                             "serving": "stop"},
                       observers=[writer.record, lambda _r: sizes.append(len(
                           path.read_text().splitlines()))])
    assert out.ok
    assert sizes == [1, 2, 3, 4]
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.record(out.records[0])


def test_state_totals_are_the_latency_decomposition() -> None:
    out = run_scripted(TOY, {"idle": "start", "warming": [After(1, "warm"), After(1.5, "warm")],
                             "working": ["again", "done"], "serving": "stop"},
                       context={"budget": 5})
    totals = state_totals(out.records)
    assert list(totals) == ["idle", "warming", "working", "serving"]
    assert totals["warming"] == pytest.approx(2500.0)
    assert len(list(format_decomposition(out.records))) == len(out.records)


def test_malformed_trace_lines_are_named() -> None:
    with pytest.raises(ValueError, match="line 2"):
        parse_trace(['{"state": "ready"}', "{not json"])
    with pytest.raises(ValueError, match="line 1"):
        parse_trace(['{"source": "a"}'])
    assert parse_trace(["", '{"state": "x"}']).path == []


def test_deadline_trace_writes_the_lines_the_runner_writes_at_a_deadline() -> None:
    out = run_scripted(TOY, {"idle": "start", "warming": "warm", "working": HANG})
    record, end = deadline_trace(TOY, "working", t=out.records[-1].t,
                                 elapsed_ms=out.records[-1].elapsed_ms,
                                 message=str(out.error))
    assert record == out.records[-1]
    assert end == out.end_record()
    with pytest.raises(ValueError, match="no deadline error state"):
        deadline_trace(TOY, "serving", t=0.0, elapsed_ms=0.0, message="")
