"""`clusterfsm trace` and `report`: the latency decomposition, the path on the diagram and
the self-contained HTML page, from hand-written traces (no processes, no clocks)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from clusterfsm.fsm.diagram import to_dot, to_mermaid
from clusterfsm.states.cli import main
from clusterfsm.states.htmlreport import build_html, run_demo_with_report
from clusterfsm.states.tracereport import decompose, diagram_source, load_runs, overlay
from tests.toy_machine import TOY

ROOT = Path(__file__).resolve().parent.parent
REQUIRE = os.environ.get("CLUSTERFSM_REQUIRE_BROWSER") == "1"

HAPPY = ["idle", "discovering", "handshaking", "awaiting_session", "exchanging_bootstrap",
         "initializing_group", "confirming_group", "ready", "closed"]
EVENTS = ["start", "peers_found", "authenticated", "session_ready", "bootstrap_agreed",
          "group_initialized", "group_confirmed", "close"]


def write_trace(path: Path, steps: list[tuple[str, str, str, float, str | None]],
                end: dict[str, str] | None, t0: float = 1000.0) -> Path:
    """Trace lines as `serve --trace-json` writes them; ``t0`` is the rank's own clock."""
    lines, t = [], t0
    for source, event, dest, ms, error in steps:
        t += ms / 1000
        rec = {"t": round(t, 6), "source": source, "event": event, "dest": dest,
               "elapsed_ms": ms}
        if error:
            rec["error"] = error
        lines.append(json.dumps(rec))
    if end is not None:
        lines.append(json.dumps(end))
    path.write_text("\n".join(lines) + "\n")
    return path


def good_rank(tmp: Path, rank: int, slow_ms: float) -> Path:
    steps = [(s, e, d, slow_ms if s == "initializing_group" else 1.0, None)
             for s, e, d in zip(HAPPY, EVENTS, HAPPY[1:], strict=False)]
    return write_trace(tmp / f"good.rank{rank}.jsonl", steps, {"state": "closed"},
                       t0=500.0 * (rank + 1))


WRONG_KEY_MSG = "handshake rejected (bad_key, we refused the peer 127.0.0.1:1): <MAC> & co"


def wrong_key(tmp: Path) -> list[Path]:
    """Two ranks with different keys: rank 1 is rejected, rank 0 waits out its deadline."""
    r0 = write_trace(tmp / "bad.rank0.jsonl", [
        ("idle", "start", "discovering", 7.5, None),
        ("discovering", "peers_found", "handshaking", 0.1, None),
        ("handshaking", "deadline", "handshake_timeout", 15016.2, "HandshakeTimeout"),
    ], {"state": "handshake_timeout", "error": "HandshakeTimeout",
        "message": "handshaking did not finish within 15 s"})
    r1 = write_trace(tmp / "bad.rank1.jsonl", [
        ("idle", "start", "discovering", 7.9, None),
        ("discovering", "peers_found", "handshaking", 0.3, None),
        ("handshaking", "HandshakeRejected", "handshake_rejected", 11.3, "HandshakeRejected"),
    ], {"state": "handshake_rejected", "error": "HandshakeRejected",
        "message": WRONG_KEY_MSG}, t0=77.0)
    return [r0, r1]


def need_dot() -> None:
    if shutil.which("dot") is None:
        if REQUIRE:
            pytest.fail("Graphviz `dot` is required (CLUSTERFSM_REQUIRE_BROWSER=1)")
        pytest.skip("Graphviz `dot` not installed (apt-get install -y graphviz)")


def test_decomposition_gives_entry_time_time_spent_and_the_leaving_event(
        tmp_path: Path) -> None:
    (run,) = load_runs([good_rank(tmp_path, 0, slow_ms=50.0)])
    assert run.label == "rank 0"
    assert [v.state for v in run.visits] == HAPPY
    init = run.visits[HAPPY.index("initializing_group")]
    assert init.entered_ms == pytest.approx(5.0)
    assert init.spent_ms == 50.0
    assert (init.event, init.dest) == ("group_initialized", "confirming_group")
    last = run.visits[-1]
    assert (last.state, last.spent_ms, last.entered_ms) == ("closed", None, pytest.approx(57.0))
    assert not run.failed
    assert decompose(run.trace) == run.visits


def test_trace_command_prints_each_rank_and_the_ranks_side_by_side(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = [good_rank(tmp_path, r, slow_ms=10.0 * (r + 1)) for r in range(2)]
    assert main(["trace", *map(str, files)]) == 0
    out = capsys.readouterr().out
    assert "rank 0 (good.rank0.jsonl): ended in closed after 17.00 ms" in out
    assert re.search(r"initializing_group +5\.00 +20\.00  group_initialized -> "
                     r"confirming_group", out)
    side = out[out.index("side by side"):]
    assert re.search(r"initializing_group +10\.00 +20\.00\n", side)
    assert re.search(r"closed +\(end\) +\(end\)\n", side)
    assert re.search(r"total +17\.00 +27\.00\n", side)


BACKOFF_NOTE = ("MLX ring connect back-off: 1 s (1 refused connect(s), retried by MLX; "
                "not a hang)")


def test_a_noted_backoff_is_named_in_the_text_and_html_reports(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = good_rank(tmp_path, 0, slow_ms=1130.0)
    lines = path.read_text().splitlines()
    noted = [json.loads(line) for line in lines]
    for rec in noted:
        if rec.get("source") == "initializing_group":
            rec["note"] = BACKOFF_NOTE
    path.write_text("\n".join(json.dumps(rec) for rec in noted) + "\n")
    (run,) = load_runs([path])
    assert run.visits[HAPPY.index("initializing_group")].note == BACKOFF_NOTE
    assert main(["trace", str(path)]) == 0
    assert f"note: {BACKOFF_NOTE}" in capsys.readouterr().out
    need_dot()
    page = build_html([run])
    assert 'id="notes"' in page and "MLX ring connect back-off: 1 s" in page


def test_a_failed_run_names_error_type_state_and_message_per_rank(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", *map(str, wrong_key(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "rank 0 (bad.rank0.jsonl): FAILED in handshake_timeout (HandshakeTimeout)" in out
    assert f"error: HandshakeRejected in handshake_rejected: {WRONG_KEY_MSG}" in out
    assert re.search(r"handshake_timeout +\(end\)\n", out)


def test_a_trace_without_end_line_is_a_stopped_run(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "killed.jsonl", [
        ("idle", "start", "discovering", 1.0, None),
        ("discovering", "peers_found", "handshaking", 1.0, None)], end=None)
    (run,) = load_runs([path])
    assert run.label == "trace 0" and run.failed and run.final_state == "handshaking"
    assert "stopped in handshaking" in run.verdict()
    ov = overlay([run])
    assert ov.stopped == {"handshaking"} and not ov.ended
    assert "class handshaking s_stopped" in diagram_source([run], "mermaid")


def test_unreadable_traces_are_usage_errors_not_crashes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"t": 1, "source": "idle"}\n')
    assert main(["trace", str(tmp_path / "missing.jsonl")]) == 2
    assert main(["trace", str(bad)]) == 2
    assert main(["trace", str(good_rank(tmp_path, 0, 1.0)), "--diagram",
                 str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "cannot read trace" in err and "line 1 is malformed" in err and ".mmd, .svg" in err


def test_the_path_overlay_marks_visits_ends_and_steps(tmp_path: Path) -> None:
    runs = load_runs(wrong_key(tmp_path))
    text = diagram_source(runs, "mermaid")
    for line in ("class handshaking s_visited", "class handshake_timeout s_ended_error",
                 "class handshake_rejected s_ended_error", "class ready s_unvisited",
                 "class peer_lost s_unvisited_error",
                 'state "handshaking <br>r0 15016.2 ms<br>r1 11.3 ms" as handshaking',
                 "idle --> discovering: start (1)",
                 "handshaking --> handshake_timeout: deadline 15 s (3)",
                 "handshaking --> protocol_error\n"):
        assert line in text, line
    dot = diagram_source(runs, "dot")
    assert "handshaking [label=\"handshaking \\lr0 15016.2 ms\\lr1 11.3 ms\\l\"" in dot
    assert "handshaking -> handshake_rejected [label=\"HandshakeRejected (3)\" color=navy" \
        in dot


def test_overlay_options_are_generic_and_leave_the_plain_diagram_alone() -> None:
    # Byte-identity of the plain diagrams with diagrams/ is `clusterfsm diagram --check`'s
    # job (tests/test_cli.py); here: the overlay's classes never leak into them.
    plain = to_mermaid(TOY)
    assert plain == to_mermaid(TOY, annotations=None, edge_notes=None, untaken_labels=False)
    assert "s_unvisited_error" not in plain and "s_stopped" not in plain
    assert "penwidth" not in to_dot(TOY)
    text = to_dot(TOY, visited=iter(["idle", "warming", "working"]),
                  taken=iter([("idle", "warming"), ("warming", "working")]),
                  ended=["working"])
    assert "working [label=\"working\\l\" color=darkgreen fillcolor=palegreen" in text
    assert 'idle -> warming [label=start color=navy' in text


def test_html_report_of_a_failed_run_says_what_where_and_how_long(tmp_path: Path) -> None:
    need_dot()
    page = build_html(load_runs(wrong_key(tmp_path)))
    assert '<body data-verdict="failed">' in page
    assert "FAILED: 2 of 2 rank(s) did not get there" in page
    assert ("rank 1: <b>HandshakeRejected</b> in error state <b>handshake_rejected</b>. "
            "It left <b>handshaking</b> by <b>HandshakeRejected</b> after 11.3 ms.") in page
    assert html_escaped(WRONG_KEY_MSG) in page and "<MAC>" not in page
    assert "handshaking 15.02 s" in page  # the long segment of rank 0's bar is labelled
    assert page.count("<svg") == 1 and "<?xml" not in page
    self_contained(page)


def test_html_report_of_a_good_run_and_demo_report_hook(tmp_path: Path) -> None:
    need_dot()

    def fake_demo(base: str) -> tuple[int, list[Path]]:
        traces = [Path(base).with_name(f"{Path(base).stem}.rank{r}.jsonl") for r in range(2)]
        for r, trace in enumerate(traces):
            good_rank(tmp_path, r, 5.0).rename(trace)
        return 0, traces

    out = tmp_path / "demo.html"
    assert run_demo_with_report(fake_demo, trace_json=None, out=str(out)) == 0
    page = out.read_text()
    assert '<body data-verdict="ok">' in page and "OK: all 2 rank(s) ran to the end" in page
    assert 'id="errors"' not in page
    self_contained(page)


def test_report_without_graphviz_is_a_clear_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    files = [str(p) for p in wrong_key(tmp_path)]
    assert main(["report", *files, "--html", str(tmp_path / "r.html")]) == 2
    assert main(["trace", *files, "--diagram", str(tmp_path / "r.svg")]) == 2
    err = capsys.readouterr().err
    assert err.count("Graphviz `dot` was not found on PATH; install Graphviz: "
                     "apt-get install -y graphviz") == 2
    assert not (tmp_path / "r.html").exists()
    assert main(["trace", *files, "--diagram", str(tmp_path / "r.mmd")]) == 0  # no dot needed


def html_escaped(text: str) -> str:
    import html

    return html.escape(text)


def self_contained(page: str) -> None:
    """Nothing is fetched: no script, link, image, import or url(); only XML namespaces."""
    assert not re.search(r"<(script|link|img|iframe)\b|@import|url\(", page, re.I)
    urls = set(re.findall(r"https?://[^\s\"'<>]+", page))
    assert urls <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}, urls


def test_docs_example_is_what_the_command_prints(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    doc = (ROOT / "docs" / "visualizing.md").read_text()
    traces = re.findall(r"`(wrong-key\.rank\d\.jsonl)`:\n```json\n(.*?)```", doc, re.S)
    assert len(traces) == 2
    for name, text in traces:
        (tmp_path / name).write_text(text)
    command, expected = re.search(r"```console\n\$ clusterfsm (.*?)\n(.*?)```", doc,
                                  re.S).groups()
    monkeypatch.chdir(tmp_path)
    assert main(command.split()) == 0
    assert capsys.readouterr().out == expected
    drawn = (tmp_path / "wrong-key.mmd").read_text()
    block = re.search(r"```mermaid\n(.*?)```", doc, re.S)
    assert block is not None
    shown = block.group(1)
    # The doc's picture may predate a new error state; the path on it may not change.
    path_lines = [ln for ln in drawn.splitlines() if "s_visited" in ln or "s_ended" in ln
                  or re.search(r": .*\(\d", ln)]
    assert path_lines and all(ln in shown.splitlines() for ln in path_lines)


def test_a_failed_demo_still_writes_its_report_and_keeps_its_exit_code(
        tmp_path: Path) -> None:
    need_dot()

    def failing_demo(base: str) -> tuple[int, list[Path]]:
        written = wrong_key(tmp_path)
        traces = [Path(base).with_name(path.name.replace("bad", Path(base).stem))
                  for path in written]
        for path, trace in zip(written, traces, strict=True):
            path.rename(trace)
        return 1, traces

    out = tmp_path / "failed.html"
    base = str(tmp_path / "t.jsonl")
    assert run_demo_with_report(failing_demo, trace_json=base, out=str(out)) == 1
    assert '<body data-verdict="failed">' in out.read_text()
    assert (tmp_path / "t.rank0.jsonl").exists()  # --trace-json files are the user's: kept


@pytest.mark.integration
def test_demo_report_end_to_end(tmp_path: Path) -> None:
    """The real thing: `clusterfsm demo --report` over two loopback ranks."""
    import subprocess
    import sys

    need_dot()
    out = tmp_path / "demo.html"
    done = subprocess.run([sys.executable, "-m", "clusterfsm.states.cli", "demo",
                           "--report", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"report: {out} (" in done.stdout
    page = out.read_text()
    # Every rank got to ready and closed cleanly: a rank whose peer closed first got
    # its GOODBYE and closed too (no spurious peer_lost at the end of a good run).
    for rank in (0, 1):
        assert re.search(rf"<p>rank {rank}: ended in closed after ", page)
    assert 'data-verdict="ok"' in page
    self_contained(page)


def test_a_rank_that_failed_after_ready_is_told_apart(tmp_path: Path) -> None:
    steps = [(s, e, d, 1.0, None) for s, e, d in zip(HAPPY[:7], EVENTS[:7], HAPPY[1:8],
                                                      strict=True)]
    steps.append(("ready", "PeerLost", "peer_lost", 3.0, "PeerLost"))
    path = write_trace(tmp_path / "lost.rank0.jsonl", steps,
                       {"state": "peer_lost", "error": "PeerLost", "message": "EOF"})
    (run,) = load_runs([path])
    assert run.failed and run.reached == "ready"
    assert run.verdict() == "reached ready, then FAILED in peer_lost (PeerLost)"


def test_serve_trace_json_in_a_missing_directory_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    key = tmp_path / "k.key"
    assert main(["keygen", str(key)]) == 0
    missing = tmp_path / "no-such-dir" / "x.jsonl"
    assert main(["serve", "--rank", "0", "--world-size", "2", "--key-file", str(key),
                 "--listen", "127.0.0.1:1", "--once", "--trace-json", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "--trace-json" in err and "does not exist" in err
    assert not missing.parent.exists()


def test_a_rank_whose_peer_left_ended_well(tmp_path: Path) -> None:
    """``peer_left`` (a peer closed on purpose, GOODBYE) is a clean end, not a failure."""
    steps = [(s, e, d, 1.0, None) for s, e, d in zip(HAPPY[:7], EVENTS[:7], HAPPY[1:8],
                                                      strict=True)]
    steps.append(("ready", "peer_left", "peer_left", 3.0, None))
    path = write_trace(tmp_path / "left.rank0.jsonl", steps, {"state": "peer_left"})
    runs = load_runs([path, good_rank(tmp_path, 1, 5.0)])
    assert not runs[0].failed and runs[0].verdict() == "ended in peer_left"
    assert overlay(runs).ended == {"peer_left", "closed"}
    mermaid = diagram_source(runs, "mermaid")
    assert "class peer_left s_ended_ok" in mermaid
    assert "class peer_left s_ended_error" not in mermaid
