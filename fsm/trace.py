"""The trace: one record per transition, JSON lines on disk, latency decomposition.

The trace is what an operator reads after a run and what a reviewer overlays on the
diagram, so it is deliberately boring: one flat record per transition, written and
flushed as it happens (a process killed mid-run leaves every line up to the kill), and
one final line with the state the run ended in and the error type, if any.

File format (one JSON object per line)::

    {"t": 12.3456, "source": "idle", "event": "start", "dest": "discovering", "elapsed_ms": 0.01}
    ...
    {"state": "ready"}                                  # or
    {"state": "handshake_rejected", "error": "HandshakeRejected", "message": "..."}

``t`` is the trio clock (monotonic, seconds) at the transition; ``elapsed_ms`` is the
time spent in ``source``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import attrs

from clusterfsm.fsm.spec import DEADLINE, MachineSpec

#: A trace that cannot be written is reported here, once (see TraceWriter).
_log = logging.getLogger("clusterfsm.fsm.trace")


@attrs.frozen
class TraceRecord:
    """One transition: at ``t``, ``event`` moved the run from ``source`` to ``dest``."""

    t: float
    source: str
    event: str
    dest: str
    elapsed_ms: float
    error: str | None = None
    #: What the activity noted about how this step went (:func:`note_outcome`), e.g.
    #: that a library call paid a retry back-off; absent for most records.
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "t": round(self.t, 6),
            "source": self.source,
            "event": self.event,
            "dest": self.dest,
            "elapsed_ms": round(self.elapsed_ms, 3),
        }
        if self.error is not None:
            out["error"] = self.error
        if self.note is not None:
            out["note"] = self.note
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> TraceRecord:
        return cls(
            t=float(obj["t"]),
            source=str(obj["source"]),
            event=str(obj["event"]),
            dest=str(obj["dest"]),
            elapsed_ms=float(obj["elapsed_ms"]),
            error=None if obj.get("error") is None else str(obj["error"]),
            note=None if obj.get("note") is None else str(obj["note"]),
        )


@attrs.frozen
class TraceEnd:
    """The final line of a trace: where the run ended and, on failure, why."""

    state: str
    error: str | None = None
    message: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state}
        if self.error is not None:
            out["error"] = self.error
        if self.message is not None:
            out["message"] = self.message
        return out


def deadline_trace(
    spec: MachineSpec, state: str, *, t: float, elapsed_ms: float, message: str
) -> tuple[TraceRecord, TraceEnd]:
    """The two lines a run writes when ``state``'s deadline passes: the ``deadline``
    transition to the error state bound to its ``on_timeout`` type, and the end line.

    For code that must write them for a run that cannot (a process killed while frozen,
    by a watchdog that wrote them ahead of time): the names come from the declaration,
    so the lines are exactly what the runner itself would have written.
    """
    declared = spec.state(state).on_timeout
    bound = None if declared is None else spec.error_state_for(declared)
    if declared is None or bound is None:
        raise ValueError(f"state {state!r} of {spec.name!r} has no deadline error state")
    error = declared.__name__
    record = TraceRecord(t=t, source=state, event=DEADLINE, dest=bound.name,
                         elapsed_ms=elapsed_ms, error=error)
    return record, TraceEnd(bound.name, error, message)


@attrs.frozen
class Trace:
    """A parsed trace file: its records and, if the run finished, its end line."""

    records: tuple[TraceRecord, ...]
    end: TraceEnd | None

    @property
    def path(self) -> list[str]:
        """States visited, in order, including the last one."""
        if not self.records:
            return []
        return [r.source for r in self.records] + [self.records[-1].dest]


class TraceWriter:
    """Appends records to a JSON-lines file, one flushed line each.

    Use it as an observer (``writer.record``) and call :meth:`finish` at the end.
    Opening the file is the caller's choice of mode; the default truncates.

    The trace describes the run; it never changes how the run ends. A file that cannot
    be opened or written (a directory, an immutable file, a full disk, ``/dev/full``)
    stops the writing: the first such error is kept in :attr:`failure` and logged
    once, as one line, on the ``clusterfsm.fsm.trace`` logger; no method raises it,
    so the machine's own outcome (and a CLI's exit code) stands.
    """

    def __init__(self, path: str | os.PathLike[str], *, append: bool = False) -> None:
        self.path = Path(path)
        #: Why the trace is incomplete (the first open or write error), or None.
        self.failure: OSError | None = None
        self._file: IO[str] | None = None
        try:
            self._file = open(  # noqa: SIM115 - closed in finish()/close()
                self.path, "a" if append else "w", encoding="utf-8"
            )
        except OSError as exc:
            self._fail(exc)

    def record(self, rec: TraceRecord) -> None:
        self._write(rec.to_json())

    def finish(self, end: TraceEnd) -> None:
        self._write(end.to_json())
        self.close()

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError as exc:
                self._fail(exc)

    def _write(self, obj: dict[str, Any]) -> None:
        if self._file is None:
            if self.failure is not None:
                return  # already reported once; the rest of the trace is lost with it
            raise ValueError(f"trace {self.path} is already closed")
        try:
            self._file.write(json.dumps(obj, separators=(",", ":")) + "\n")
            self._file.flush()
        except OSError as exc:
            self._fail(exc)
            self.close()

    def _fail(self, exc: OSError) -> None:
        if self.failure is None:
            self.failure = exc
            _log.warning("%s", self.failure_text())

    def failure_text(self) -> str:
        """One line: which trace is incomplete and why ("" if none is)."""
        if self.failure is None:
            return ""
        why = self.failure.strerror or str(self.failure)
        return (f"trace {self.path}: not written ({why}); the run's outcome is not "
                "affected")


def parse_trace(lines: Iterable[str]) -> Trace:
    """Parse trace lines; raises ValueError naming the line on malformed input."""
    records: list[TraceRecord] = []
    end: TraceEnd | None = None
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
            if "source" in obj:
                records.append(TraceRecord.from_json(obj))
            else:
                end = TraceEnd(
                    state=str(obj["state"]),
                    error=obj.get("error"),
                    message=obj.get("message"),
                )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"trace line {lineno} is malformed: {exc}") from exc
    return Trace(tuple(records), end)


def read_trace(path: str | os.PathLike[str]) -> Trace:
    with open(path, encoding="utf-8") as f:
        return parse_trace(f)


def state_totals(records: Iterable[TraceRecord]) -> dict[str, float]:
    """Milliseconds spent in each state, in order of first visit (latency decomposition)."""
    totals: dict[str, float] = {}
    for r in records:
        totals[r.source] = totals.get(r.source, 0.0) + r.elapsed_ms
    return totals


def format_decomposition(records: Iterable[TraceRecord]) -> Iterator[str]:
    """Human-readable lines: state, time spent, event that left it."""
    for r in records:
        yield f"  {r.source:<24} {r.elapsed_ms:>10.2f} ms  --{r.event}--> {r.dest}"
