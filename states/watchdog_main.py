"""The init watchdog's own program: what runs in the watchdog process.

:mod:`clusterfsm.states.watchdog` starts it and talks to it; this module is the other
end of the pipe. It imports only the standard library, so it runs the same way in
both of its starts:

- forked from the rank (Linux, while the rank is single-threaded): the child calls
  :func:`main` directly, with no interpreter start;
- elsewhere, as its own isolated interpreter: ``python -I -S PATH/watchdog_main.py``
  (``-I``: no environment variables, user site or script directory on ``sys.path``;
  ``-S``: no site-packages either, which keeps the start fast). Run by path, not
  ``-m``, because without ``site`` the installed package is not importable, and this
  program needs nothing of it.

The protocol on its stdin, one command per line:

- ``ARM {json}``: start the deadline. The JSON object has ``seconds``, ``message``
  (the error line to print, :class:`clusterfsm.states.lines.ErrorLine`), ``trace``
  (the trace file or null), ``record`` and ``end`` (the trace record and end record
  to append), ``t_armed`` and ``elapsed_before_ms`` (to time the record), and
  ``cleanup`` (directories to remove);
- ``CLEANUP [json list]``: directories to remove when the rank is gone;
- ``DISARM``: stop the deadline (cleanup paths stay registered).

If the deadline passes while armed: append the two trace lines, print the message on
stderr, SIGKILL the parent (the rank), remove the cleanup directories and exit 0. On
EOF (the rank exited or was killed): remove the cleanup directories and exit 0.

A supervised rank's private generation directory (:data:`GENERATION_DIR_ENV`, set by
its supervisor, which removes it after reaping the rank) is a cleanup directory from
the start: if the supervisor is gone too (SIGKILLed, and the rank with it), the
watchdog is the last one left to remove it.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time

# Not ``typing.TYPE_CHECKING``: importing typing would add ~8 ms to every start.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


#: The supervised rank's generation directory (its TMPDIR), removed on EOF as well.
GENERATION_DIR_ENV = "CLUSTERFSM_GENERATION_DIR"


def _unless_gone(remove: Callable[[str], None], path: str) -> None:
    """``remove(path)``; a path that is already gone is what we wanted anyway."""
    try:
        remove(path)
    except FileNotFoundError:
        return


def remove_paths(paths: list[str]) -> None:
    """Remove each directory tree; missing entries are fine (the rank removes its own
    directory on a clean close, and may be doing so right now)."""
    for path in paths:
        for root, dirs, files in os.walk(path, topdown=False):
            for name in files:
                _unless_gone(os.unlink, os.path.join(root, name))
            for name in dirs:
                _unless_gone(os.rmdir, os.path.join(root, name))
        _unless_gone(os.rmdir, path)


def _kill(pid: int) -> None:
    """SIGKILL ``pid`` (SIGTERM would need the frozen rank's GIL); gone already is fine."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return


def _expire(payload: dict[str, Any], elapsed: float) -> None:
    """The deadline passed: write the trace lines and the error line."""
    trace = payload.get("trace")
    trace_failure = ""
    if trace:
        record = dict(payload["record"])
        record["t"] = round(payload["t_armed"] + elapsed, 6)
        record["elapsed_ms"] = round(payload["elapsed_before_ms"] + elapsed * 1000, 3)
        try:
            with open(trace, "a") as f:
                f.write(json.dumps(record, separators=(",", ":")) + "\n")
                f.write(json.dumps(payload["end"], separators=(",", ":")) + "\n")
        except OSError as exc:  # the trace never stops the kill nor hides the message
            trace_failure = (f"trace {trace}: not written ({exc.strerror or exc}); the "
                             "run's outcome is not affected")
    sys.stderr.write(payload["message"] + "\n")
    if trace_failure:
        sys.stderr.write(trace_failure + "\n")
    sys.stderr.flush()


#: The longest one ``select`` waits; the loop then looks at the clock again. select's
#: timeout must fit the platform's ``time_t``: an armed ``--deadline
#: initializing_group=1e308`` (positive and finite, so accepted) raised OverflowError
#: here, and the watchdog died, leaving init without its hard deadline.
_MAX_WAIT_S = 3600.0


def main(fd: int = 0) -> int:
    """Serve the commands read from ``fd`` until EOF or expiry; the exit code."""
    parent = os.getppid()
    armed_at = 0.0
    deadline: float | None = None
    payload: dict[str, Any] = {}
    cleanup: list[str] = [os.environ[GENERATION_DIR_ENV]] if os.environ.get(
        GENERATION_DIR_ENV) else []
    buf = b""
    while True:
        timeout = None if deadline is None else min(
            _MAX_WAIT_S, max(0.0, deadline - time.monotonic()))
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            if deadline is not None and time.monotonic() >= deadline:
                _expire(payload, time.monotonic() - armed_at)
                _kill(parent)
                remove_paths(cleanup)
                return 0
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            # The rank is gone (exited, or killed: a SIGKILLed rank cannot clean up).
            remove_paths(cleanup)
            return 0
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.startswith(b"ARM "):
                payload = json.loads(line[4:])
                cleanup.extend(p for p in payload.get("cleanup", []) if p not in cleanup)
                armed_at = time.monotonic()
                deadline = armed_at + float(payload["seconds"])
            elif line.startswith(b"CLEANUP "):
                cleanup.extend(p for p in json.loads(line[8:]) if p not in cleanup)
            elif line == b"DISARM":
                deadline = None
                payload = {}


if __name__ == "__main__":
    sys.exit(main())
