"""Ending the child processes a test started, whatever happened in the test."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from typing import Any


def kill_and_reap(procs: Iterable[subprocess.Popen[Any]], timeout: float | None = 10) -> None:
    """SIGKILL every process still running, reap each one and close its pipes."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=timeout)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
