"""``clusterfsm report --html``: one self-contained page a reviewer reads in ten seconds.

Top to bottom, in the order a reviewer asks the questions:

1. the verdict banner: did every rank get there, and if not, where each one stopped;
2. for a failed run, one box per failing rank: error type, error state, the state it
   failed from and after how long, and the error's message;
3. the timeline: one bar per rank, a segment per state, widths proportional to time
   (one scale for all ranks), the end state as a badge after the bar;
4. the side-by-side table of ms per state (the same numbers as ``clusterfsm trace``);
5. the declared machine with the path overlaid, laid out by Graphviz and inlined as
   SVG.

The file needs nothing else: no script, no stylesheet, font or image is fetched, so it
can be attached to an issue or opened offline. Every piece of trace text is escaped.
"""

from __future__ import annotations

import html
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from clusterfsm.states.exitcodes import EXIT_OK, EXIT_USAGE
from clusterfsm.states.machine import BOOTSTRAP
from clusterfsm.states.tracereport import (
    RankRun,
    ReportError,
    diagram_source,
    load_runs,
    render_svg,
    state_order,
)

# Happy-path states cycle through these; error states are always red, so an error
# segment never looks like progress.
_PALETTE = ("#4e79a7", "#59a14f", "#9c755f", "#76b7b2", "#edc948", "#b07aa1",
            "#ff9da7", "#bab0ac", "#86bcb6", "#f28e2b")
_ERROR_COLOUR = "#d62728"

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;
 color:#222;background:#fafafa}
main{max-width:1200px;margin:0 auto;padding:0 16px 32px}
h1{font-size:20px;margin:0}h2{font-size:16px;margin:24px 0 8px}
#verdict{padding:14px 16px;color:#fff}
#verdict.ok{background:#2e7d32}#verdict.failed{background:#c62828}
#verdict p{margin:4px 0 0}
.error{border-left:6px solid #c62828;background:#fff;padding:8px 12px;margin:8px 0;
 box-shadow:0 1px 2px rgba(0,0,0,.1)}
.error pre{white-space:pre-wrap;word-break:break-word;margin:6px 0 0;font-size:13px}
.lane{display:flex;align-items:center;margin:6px 0}
.lane .who{width:70px;flex:none;font-weight:600}
.bar{display:flex;height:26px;background:#eee;flex:1 1 auto;min-width:0}
.seg{height:100%;overflow:hidden;white-space:nowrap;color:#fff;font-size:12px;
 line-height:26px;text-indent:4px;min-width:2px;box-sizing:border-box;
 border-right:1px solid #fff}
.end{flex:none;margin-left:8px;padding:2px 8px;border-radius:10px;font-size:12px;
 white-space:nowrap}
.end.ok{background:#c8e6c9}.end.failed{background:#ffcdd2}
.legend span{display:inline-block;margin:2px 10px 2px 0;font-size:12px}
.legend i{display:inline-block;width:10px;height:10px;margin-right:4px}
table{border-collapse:collapse;background:#fff}
td,th{border:1px solid #ddd;padding:3px 10px;text-align:right}
td:first-child,th:first-child{text-align:left}
tr.err td:first-child{color:#c62828}
#diagram{overflow:auto;background:#fff;border:1px solid #ddd;padding:8px}
#diagram svg{max-width:100%;height:auto}
.note{color:#666;font-size:12px}
"""


def _duration(ms: float) -> str:
    return f"{ms / 1000:.2f} s" if ms >= 1000 else f"{ms:.1f} ms"


def _is_error(state: str) -> bool:
    return state in BOOTSTRAP.state_names and BOOTSTRAP.is_error_state(state)


def _colours(runs: Sequence[RankRun]) -> dict[str, str]:
    colours: dict[str, str] = {}
    i = 0
    for state in state_order(runs):
        if _is_error(state):
            colours[state] = _ERROR_COLOUR
        else:
            colours[state] = _PALETTE[i % len(_PALETTE)]
            i += 1
    return colours


def _verdict(runs: Sequence[RankRun]) -> str:
    ok = not any(r.failed for r in runs)
    cls = "ok" if ok else "failed"
    if ok:
        title = f"OK: all {len(runs)} rank(s) ran to the end"
    else:
        bad = sum(r.failed for r in runs)
        if all(r.reached for r in runs):
            title = (f"FAILED after ready: {bad} of {len(runs)} rank(s) ended in an error "
                     "state, but every rank reached ready")
        else:
            title = f"FAILED: {bad} of {len(runs)} rank(s) did not get there"
    lines = "".join(
        f"<p>{html.escape(r.label)}: {html.escape(r.verdict())} after "
        f"{_duration(r.ended_after_ms)}</p>" for r in runs)
    return (f'<header id="verdict" class="{cls}"><h1>{html.escape(title)}</h1>'
            f"{lines}</header>")


def _errors(runs: Sequence[RankRun]) -> str:
    boxes = []
    for r in runs:
        if not r.failed:
            continue
        last = next((v for v in reversed(r.visits) if v.spent_ms is not None), None)
        where = ""
        if last is not None:
            where = (f" It left <b>{html.escape(last.state)}</b> by "
                     f"<b>{html.escape(last.event)}</b> after "
                     f"{_duration(last.spent_ms or 0.0)}.")
        if r.end is None:
            head = (f"{html.escape(r.label)}: no end line, the trace stops in "
                    f"<b>{html.escape(r.final_state)}</b> (killed, or still running).")
            msg = ""
        else:
            head = (f"{html.escape(r.label)}: <b>{html.escape(r.end.error or '')}</b> in "
                    f"error state <b>{html.escape(r.end.state)}</b>.")
            msg = f"<pre>{html.escape(r.end.message or '(no message)')}</pre>"
        boxes.append(f'<div class="error">{head}{where}{msg}</div>')
    if not boxes:
        return ""
    return '<section id="errors"><h2>What went wrong</h2>' + "".join(boxes) + "</section>"


def _notes(runs: Sequence[RankRun]) -> str:
    """Steps that went slowly for a named reason (MLX's connect back-off): not a hang."""
    items = [f"<li>{html.escape(r.label)}, <b>{html.escape(v.state)}</b> "
             f"({_duration(v.spent_ms or 0.0)}): {html.escape(v.note)}</li>"
             for r in runs for v in r.visits if v.note is not None]
    if not items:
        return ""
    return '<section id="notes"><h2>Notes</h2><ul>' + "".join(items) + "</ul></section>"


def _timeline(runs: Sequence[RankRun], colours: dict[str, str]) -> str:
    scale = max((r.total_ms for r in runs), default=0.0) or 1.0
    lanes = []
    for r in runs:
        segs = []
        for v in r.visits:
            if v.spent_ms is None:
                continue
            pct = 100.0 * v.spent_ms / scale
            tip = f"{v.state}: {v.spent_ms:.2f} ms, entered at {v.entered_ms:.2f} ms, " \
                  f"left by {v.event}" + ("" if v.note is None else f"; {v.note}")
            text = f"{v.state} {_duration(v.spent_ms)}" if pct >= 8 else ""
            segs.append(f'<div class="seg" style="width:{pct:.3f}%;'
                        f'background:{colours[v.state]}" title="{html.escape(tip)}">'
                        f"{html.escape(text)}</div>")
        rest = 100.0 * (scale - r.total_ms) / scale
        if rest > 0.001:
            segs.append(f'<div style="width:{rest:.3f}%"></div>')
        cls = "failed" if r.failed else "ok"
        lanes.append(
            f'<div class="lane"><span class="who">{html.escape(r.label)}</span>'
            f'<div class="bar">{"".join(segs)}</div>'
            f'<span class="end {cls}">{html.escape(r.final_state)} · '
            f"{_duration(r.total_ms)}</span></div>")
    legend = "".join(
        f'<span><i style="background:{c}"></i>{html.escape(s)}</span>'
        for s, c in colours.items() if any(s in r.totals() for r in runs))
    return ('<section id="timeline"><h2>Timeline</h2>'
            '<p class="note">One bar per rank, one segment per state, one scale for all; '
            "hover a segment for its numbers. Each rank measures on its own clock.</p>"
            + "".join(lanes) + f'<div class="legend">{legend}</div></section>')


def _table(runs: Sequence[RankRun]) -> str:
    head = "".join(f"<th>{html.escape(r.label)} entered</th><th>{html.escape(r.label)} "
                   f"spent</th>" for r in runs)
    rows = []
    for state in state_order(runs):
        cells = []
        for r in runs:
            visits = [v for v in r.visits if v.state == state]
            if not visits:
                cells.append("<td></td><td></td>")
                continue
            entered = f"{visits[0].entered_ms:.2f}"
            spent = [v.spent_ms for v in visits if v.spent_ms is not None]
            cells.append(f"<td>{entered}</td><td>"
                         f"{f'{sum(spent):.2f}' if spent else '(end)'}</td>")
        rows.append(f'<tr{" class=err" if _is_error(state) else ""}><td>{html.escape(state)}</td>'
                    f'{"".join(cells)}</tr>')
    total = "".join(f"<td></td><td><b>{r.total_ms:.2f}</b></td>" for r in runs)
    return ('<section id="states"><h2>Time per state (ms)</h2><table>'
            f"<tr><th>state</th>{head}</tr>{''.join(rows)}<tr><td><b>total</b></td>{total}"
            "</tr></table></section>")


def _inline_svg(svg: str) -> str:
    """Graphviz's SVG without its XML prolog and DOCTYPE (not allowed inside HTML)."""
    start = svg.find("<svg")
    return svg[start:] if start >= 0 else svg


def build_html(runs: Sequence[RankRun]) -> str:
    """The whole page as one string (renders the diagram with Graphviz)."""
    if not runs:
        raise ReportError("no traces given")
    svg = _inline_svg(render_svg(diagram_source(runs, "dot")))
    colours = _colours(runs)
    ok = not any(r.failed for r in runs)
    title = "clusterfsm run: " + ("OK" if ok else "FAILED")
    sources = ", ".join(html.escape(str(r.source)) for r in runs)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{title}</title><style>{_CSS}</style></head>"
        f'<body data-verdict="{"ok" if ok else "failed"}">{_verdict(runs)}<main>'
        f"{_errors(runs)}{_notes(runs)}{_timeline(runs, colours)}{_table(runs)}"
        '<section><h2>The path on the machine</h2><p class="note">Blue: visited; double '
        "border: where a rank ended (green fine, red error, orange cut off); dashed rose: "
        "error states not reached; (n) on an edge: the step that took it.</p>"
        f'<div id="diagram">{svg}</div></section>'
        f'<p class="note">Traces: {sources}. Made by <code>clusterfsm report</code>.</p>'
        "</main></body></html>\n")


def write_html(runs: Sequence[RankRun], out: Path) -> int:
    """Write the report; returns its size in bytes."""
    page = build_html(runs).encode("utf-8")
    try:
        out.write_bytes(page)
    except OSError as exc:
        raise ReportError(f"cannot write {out}: {exc.strerror or exc}") from exc
    return len(page)


def run_report(files: Sequence[str], out: str) -> int:
    """The ``clusterfsm report FILE ... --html OUT`` command."""
    try:
        size = write_html(load_runs(files), Path(out))
    except ReportError as exc:
        print(f"clusterfsm report: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {out} ({size} bytes)")
    return EXIT_OK


def run_demo_with_report(demo: Callable[[str], tuple[int, Sequence[Path]]], *,
                         trace_json: str | None, out: str) -> int:
    """``clusterfsm demo --report OUT``: run ``demo(trace_base)``, then report its traces.

    ``demo`` returns its exit code and the trace files its ranks were given. Without
    ``--trace-json`` the traces go to a private temporary directory that is removed
    afterwards.
    """
    with tempfile.TemporaryDirectory(prefix="clusterfsm-report-") as tmp:
        code, traces = demo(trace_json or str(Path(tmp) / "trace.jsonl"))
        return write_demo_report(traces, out, code)


def write_demo_report(traces: Sequence[Path], out: str, code: int) -> int:
    """After a demo: the report of its ranks' traces; keeps the demo's exit code.

    A report that cannot be written turns a successful demo's 0 into 2 (the user asked
    for a file that is not there); a failed demo keeps its own code.
    """
    present = [str(t) for t in traces if t.exists()]
    if not present:
        print("clusterfsm demo: no rank left a trace; no report written", file=sys.stderr)
        return code or EXIT_USAGE
    try:
        size = write_html(load_runs(present), Path(out))
    except ReportError as exc:
        print(f"clusterfsm demo: report not written: {exc}", file=sys.stderr)
        return code or EXIT_USAGE
    print(f"report: {out} ({size} bytes)")
    return code
