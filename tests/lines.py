"""A child's stdout read line by line, each wait bounded (a hang guard, not a timing
check). Raw reads of the pipe: a buffered reader would hide queued lines from
``select``."""

from __future__ import annotations

import os
import select
import subprocess
import time
from typing import Any


class Lines:
    def __init__(self, proc: subprocess.Popen[Any]) -> None:
        assert proc.stdout is not None
        self.proc, self.fd, self.buffer = proc, proc.stdout.fileno(), b""
        self.seen: list[str] = []

    def next(self, text: str, timeout: float = 20.0, *, prefix: bool = True) -> str:
        """The next line starting with (or, ``prefix=False``, containing) ``text``."""
        end = time.monotonic() + timeout
        while True:
            while b"\n" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\n", 1)
                line = raw.decode(errors="replace").rstrip()
                self.seen.append(line)
                if line.startswith(text) if prefix else text in line:
                    return line
            ready, _, _ = select.select([self.fd], [], [], max(0.0, end - time.monotonic()))
            chunk = os.read(self.fd, 65536) if ready else b""
            if not chunk:
                tail = "\n".join(self.seen[-30:])
                raise AssertionError(f"no line with {text!r}; last lines:\n{tail}")
            self.buffer += chunk

    def count(self, text: str) -> int:
        return sum(text in line for line in self.seen)
