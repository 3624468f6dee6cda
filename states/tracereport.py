"""``clusterfsm trace``: a run's latency decomposition and its path on the diagram.

A trace (``clusterfsm.fsm.trace``, one JSON line per transition) says how long each state took
on one rank. Reviewing a cluster run means reading several of them at once, so this
module turns N traces into:

- per rank, one row per visit: state, when it was entered (ms since that rank's
  first state began), time spent, the event that left it and where it went;
- side by side, ms per state for every rank (states in order of first visit);
- the declared machine (:data:`states.machine.BOOTSTRAP`) with the path overlaid:
  visited states and taken edges, the state each rank ended in, time per state.

Each rank's ``t`` is its own process's trio clock (monotonic, arbitrary origin), so
the ranks' rows are aligned by state, never by absolute time.

Layout is Graphviz's job (``dot -Tsvg``); a missing ``dot`` is a
:class:`RendererMissing` with the install line, not a crash.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import attrs

from clusterfsm.fsm import MachineSpec
from clusterfsm.fsm.diagram import to_dot, to_mermaid
from clusterfsm.fsm.trace import Trace, TraceEnd, read_trace
from clusterfsm.states.errors import printable
from clusterfsm.states.exitcodes import EXIT_OK, EXIT_USAGE
from clusterfsm.states.machine import BOOTSTRAP

DOT_TIMEOUT_S = 30.0
INSTALL_HINT = "install Graphviz: apt-get install -y graphviz (macOS: brew install graphviz)"


class ReportError(Exception):
    """A report could not be made (unreadable trace, missing renderer); the CLI prints it."""


class RendererMissing(ReportError):
    """Graphviz ``dot`` is not on PATH."""


@attrs.frozen
class Visit:
    """One stay in a state: entered at ``entered_ms`` for ``spent_ms``, left by ``event``.

    The last visit of a run has no event: ``spent_ms`` is None, ``dest`` is empty.
    """

    state: str
    entered_ms: float
    spent_ms: float | None
    event: str
    dest: str
    error: str | None = None
    #: The step's trace note (e.g. MLX's connect back-off during group init).
    note: str | None = None


@attrs.frozen
class RankRun:
    """One rank's trace, read and decomposed."""

    label: str
    source: Path
    trace: Trace
    visits: tuple[Visit, ...]

    @property
    def end(self) -> TraceEnd | None:
        return self.trace.end

    @property
    def final_state(self) -> str:
        if self.trace.end is not None:
            return self.trace.end.state
        return self.visits[-1].state if self.visits else "(no transitions)"

    @property
    def failed(self) -> bool:
        """An error end line, or no end line at all (the rank was killed or hung)."""
        return self.trace.end is None or self.trace.end.error is not None

    @property
    def total_ms(self) -> float:
        """Time spent in states (the sum of ``elapsed_ms``)."""
        return sum(v.spent_ms for v in self.visits if v.spent_ms is not None)

    @property
    def ended_after_ms(self) -> float:
        """When the last state was entered, on the rank's clock (0 = run start)."""
        return self.visits[-1].entered_ms if self.visits else 0.0

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for v in self.visits:
            if v.spent_ms is not None:
                out[v.state] = out.get(v.state, 0.0) + v.spent_ms
        return out

    @property
    def reached(self) -> str | None:
        """The last steady state (``ready``) this rank got to before it ended, if any."""
        steady = [v.state for v in self.visits if v.state in BOOTSTRAP.state_names
                  and not BOOTSTRAP.is_error_state(v.state)
                  and BOOTSTRAP.state(v.state).steady]
        return steady[-1] if steady else None

    def verdict(self) -> str:
        end = self.trace.end
        # A rank that got to ready and failed after (peer lost while closing) did bring
        # the group up: say so, or the reviewer hunts for a bootstrap bug that is not there.
        then = f"reached {self.reached}, then " if self.reached else ""
        if end is None:
            return f"{then}stopped in {self.final_state} (no end line: killed or still running)"
        if end.error:
            return f"{then}FAILED in {end.state} ({end.error})"
        return f"ended in {end.state}"


def decompose(trace: Trace) -> tuple[Visit, ...]:
    """Visits in order; entry times from the rank's own clock, 0 = first state entered."""
    if not trace.records:
        return ()
    first = trace.records[0]
    origin = first.t - first.elapsed_ms / 1000.0
    visits = [
        Visit(state=r.source, entered_ms=max(0.0, (r.t - origin) * 1000.0 - r.elapsed_ms),
              spent_ms=r.elapsed_ms, event=r.event, dest=r.dest, error=r.error,
              note=r.note)
        for r in trace.records
    ]
    last = trace.records[-1]
    visits.append(Visit(state=last.dest, entered_ms=max(0.0, (last.t - origin) * 1000.0),
                        spent_ms=None, event="", dest=""))
    return tuple(visits)


_RANK_IN_NAME = re.compile(r"rank[_-]?(\d+)", re.I)


def load_runs(paths: Sequence[str | Path]) -> list[RankRun]:
    """Read every trace; ranks are named from ``rankN`` in the file name, else by position."""
    runs: list[RankRun] = []
    for i, raw in enumerate(paths):
        path = Path(raw)
        try:
            trace = read_trace(path)
        except OSError as exc:
            raise ReportError(f"cannot read trace {path}: {exc.strerror or exc}") from exc
        except ValueError as exc:
            raise ReportError(f"{path}: {exc}") from exc
        match = _RANK_IN_NAME.search(path.name)
        label = f"rank {match.group(1)}" if match else f"trace {i}"
        runs.append(RankRun(label=label, source=path, trace=trace, visits=decompose(trace)))
    return runs


def state_order(runs: Sequence[RankRun]) -> list[str]:
    """Every state any rank visited, in order of first visit (rank by rank)."""
    order: list[str] = []
    for run in runs:
        for v in run.visits:
            if v.state not in order:
                order.append(v.state)
    return order


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_rank(run: RankRun) -> list[str]:
    lines = [f"{run.label} ({run.source.name}): {run.verdict()} "
             f"after {run.ended_after_ms:.2f} ms"]
    lines.append(f"  {'state':<24} {'entered ms':>11} {'spent ms':>11}  left by")
    for v in run.visits:
        if v.spent_ms is None:
            left = "(end)" if run.end is not None else "(no end line)"
        else:
            left = f"{v.event} -> {v.dest}"
        lines.append(f"  {v.state:<24} {v.entered_ms:>11.2f} {_ms(v.spent_ms):>11}  {left}")
        if v.note is not None:
            lines.append(f"  {'':<24} note: {printable(v.note)}")
    if run.end is not None and run.end.error:
        lines.append(f"  error: {run.end.error} in {run.end.state}: {run.end.message or ''}")
    return lines


def format_side_by_side(runs: Sequence[RankRun]) -> list[str]:
    width = max(12, *(len(r.label) for r in runs))
    head = f"  {'ms in state':<24}" + "".join(f" {r.label:>{width}}" for r in runs)
    lines = ["side by side (each rank on its own clock: aligned by state, not by time)", head]
    totals = [r.totals() for r in runs]
    finals = [r.final_state for r in runs]
    for state in state_order(runs):
        cells = []
        for tot, final in zip(totals, finals, strict=True):
            if state in tot:
                cells.append(f"{tot[state]:.2f}")
            elif state == final:
                cells.append("(end)")
            else:
                cells.append("")
        lines.append((f"  {state:<24}" + "".join(f" {c:>{width}}" for c in cells)).rstrip())
    lines.append(f"  {'total':<24}" + "".join(f" {r.total_ms:>{width}.2f}" for r in runs))
    return lines


def format_report(runs: Sequence[RankRun]) -> str:
    out: list[str] = []
    for run in runs:
        out += [*format_rank(run), ""]
    if len(runs) > 1:
        out += format_side_by_side(runs)
    return "\n".join(out).rstrip("\n") + "\n"


@attrs.frozen
class RunOverlay:
    """What the diagram shows of the runs (the arguments of the diagram's overlay)."""

    visited: tuple[str, ...]
    taken: frozenset[tuple[str, str]]
    ended: frozenset[str]
    stopped: frozenset[str]
    annotations: dict[str, str]
    edge_notes: dict[tuple[str, str], str]


def overlay(runs: Sequence[RankRun]) -> RunOverlay:
    """Union of the ranks' paths; time per state per rank; taken edges numbered by step."""
    taken: set[tuple[str, str]] = set()
    steps: dict[tuple[str, str], set[int]] = {}
    for run in runs:
        for i, r in enumerate(run.trace.records, 1):
            taken.add((r.source, r.dest))
            steps.setdefault((r.source, r.dest), set()).add(i)
    annotations: dict[str, str] = {}
    many = len(runs) > 1
    for state in state_order(runs):
        parts = []
        for run in runs:
            spent = run.totals().get(state)
            if spent is not None:
                short = run.label.replace("rank ", "r")
                parts.append(f"{short} {spent:.1f} ms" if many else f"{spent:.1f} ms")
        if parts:
            annotations[state] = "\n" + "\n".join(parts)
    notes = {edge: "(" + ",".join(str(s) for s in sorted(nums)) + ")"
             for edge, nums in steps.items()}
    return RunOverlay(
        visited=tuple(state_order(runs)),
        taken=frozenset(taken),
        ended=frozenset(r.final_state for r in runs if r.end is not None),
        stopped=frozenset(r.final_state for r in runs if r.end is None and r.visits),
        annotations=annotations,
        edge_notes=notes,
    )


def diagram_source(runs: Sequence[RankRun], engine: str,
                   spec: MachineSpec = BOOTSTRAP) -> str:
    """Mermaid (``engine="mermaid"``) or DOT source of ``spec`` with the runs overlaid."""
    ov = overlay(runs)
    draw = to_mermaid if engine == "mermaid" else to_dot
    return draw(spec, visited=ov.visited, taken=ov.taken, ended=ov.ended,
                stopped=ov.stopped, annotations=ov.annotations, edge_notes=ov.edge_notes,
                untaken_labels=False)


def render_svg(dot_source: str) -> str:
    """Lay out DOT with Graphviz (``dot -Tsvg``), bounded by :data:`DOT_TIMEOUT_S`."""
    exe = shutil.which("dot")
    if exe is None:
        raise RendererMissing(f"Graphviz `dot` was not found on PATH; {INSTALL_HINT}")
    try:
        done = subprocess.run([exe, "-Tsvg"], input=dot_source.encode(), capture_output=True,
                              timeout=DOT_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ReportError(f"`dot -Tsvg` did not finish within {DOT_TIMEOUT_S:g} s") from exc
    if done.returncode != 0:
        raise ReportError(f"`dot -Tsvg` failed (exit {done.returncode}): "
                          f"{done.stderr.decode(errors='replace').strip()}")
    return done.stdout.decode()


def write_diagram(runs: Sequence[RankRun], out: Path) -> None:
    """``.mmd`` gets Mermaid, ``.dot`` DOT, ``.svg`` DOT laid out by Graphviz."""
    suffix = out.suffix.lower()
    if suffix == ".mmd":
        text = diagram_source(runs, "mermaid")
    elif suffix == ".dot":
        text = diagram_source(runs, "dot")
    elif suffix == ".svg":
        text = render_svg(diagram_source(runs, "dot"))
    else:
        raise ReportError(f"--diagram {out}: use a .mmd, .svg or .dot file name")
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ReportError(f"cannot write {out}: {exc.strerror or exc}") from exc


def run_trace(files: Sequence[str], diagram: str | None) -> int:
    """The ``clusterfsm trace`` command: print the decomposition, optionally draw the path."""
    try:
        runs = load_runs(files)
        print(format_report(runs), end="")
        if diagram is not None:
            write_diagram(runs, Path(diagram))
            print(f"wrote {diagram}")
    except ReportError as exc:
        print(f"clusterfsm trace: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK
