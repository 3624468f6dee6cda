"""How soon a lost peer is noticed: two real ``serve`` ranks, rank 1 stopped or killed.

Two ``clusterfsm serve`` processes on loopback reach ``ready``; then rank 1 is sent
SIGSTOP (a frozen process: only the heartbeats can tell) or SIGKILL (the kernel closes
its sockets: the link's EOF tells at once). The time from the signal to rank 0's
``peer_lost`` line is compared with the heartbeat deadline (``--peer-lost-after``),
the baseline of the same run: the target is "the deadline plus at most 100 ms".

A pulled cable is the SIGSTOP case for the far side (its heartbeats stop); the near
side's ``link_lost`` comes from rtnetlink in a few ms (``bench/linkwatch.py``).

Run: python bench/detection.py [--runs 5] [--peer-lost-after 1.0] [--json OUT]
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, emit, load_average, median, row

CLI = [sys.executable, "-m", "clusterfsm.states.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Lines:
    """A process's stdout read line by line with a time limit (raw reads and our own
    buffer: a buffered text reader would hold lines that ``select`` no longer sees)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self._fd = proc.stdout.fileno()
        self._buffer = b""

    def wait_for(self, text: str, limit: float) -> float:
        """The time the first line containing ``text`` arrived (or RuntimeError)."""
        end = time.monotonic() + limit
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                if text.encode() in line:
                    return time.monotonic()
            left = end - time.monotonic()
            if left <= 0 or not select.select([self._fd], [], [], left)[0]:
                raise RuntimeError(f"no line with {text!r} within {limit} s")
            chunk = os.read(self._fd, 65536)
            if not chunk:
                raise RuntimeError(f"output ended before a line with {text!r}")
            self._buffer += chunk


def one_trial(sig: signal.Signals, lost_after: float, tmp: Path) -> float:
    """Seconds from ``sig`` to rank 0's peer_lost transition."""
    key = tmp / "key"
    if not key.exists():
        subprocess.run([*CLI, "keygen", str(key)], check=True, capture_output=True)
    port = free_port()
    common = ["--world-size", "2", "--key-file", str(key),
              "--peer-lost-after", str(lost_after)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r0 = subprocess.Popen([*CLI, "serve", "--rank", "0", "--listen", f"127.0.0.1:{port}",
                           *common], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          env=env, start_new_session=True)
    r1 = subprocess.Popen([*CLI, "serve", "--rank", "1", "--peer", f"127.0.0.1:{port}",
                           *common], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          env=env, start_new_session=True)
    try:
        out0, out1 = Lines(r0), Lines(r1)
        out0.wait_for("DistributedGroup ready", 60)
        out1.wait_for("DistributedGroup ready", 60)
        time.sleep(0.5)  # a few heartbeats in ready, as a rank that lives for a while
        sent = time.monotonic()
        r1.send_signal(sig)
        noticed = out0.wait_for("--> peer_lost", lost_after + 30)
        return noticed - sent
    finally:
        for proc in (r0, r1):
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--peer-lost-after", type=float, default=1.0)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    lost_after = args.peer_lost_after
    results: dict[str, list[float]] = {"SIGSTOP": [], "SIGKILL": []}
    with tempfile.TemporaryDirectory(prefix="bench-detect-") as tmp:
        for _ in range(args.runs):  # interleaved, so load affects both alike
            for sig in (signal.SIGSTOP, signal.SIGKILL):
                results[sig.name].append(one_trial(sig, lost_after, Path(tmp)))
    load = load_average()
    rows = []
    for name, times in results.items():
        over = [t - lost_after for t in times]
        ms = " ".join(f"{t * 1000:.0f}" for t in sorted(times))
        print(f"{name}: detected after (ms) {ms}; deadline {lost_after * 1000:.0f} ms; "
              f"worst over the deadline {max(over) * 1000:+.0f} ms; load {load}")
        rows.append(row(
            f"Detecting a lost peer, {name} of rank 1 ({args.runs} runs, real serve "
            f"ranks, load {load})",
            f"median {median(times) * 1000:.0f} ms, worst {max(times) * 1000:.0f} ms",
            f"heartbeat deadline {lost_after * 1000:.0f} ms",
            f"{max(over) * 1000:+.0f} ms worst vs deadline",
            "deadline + <= 100 ms", max(over) <= 0.1))
    emit(rows, argv)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main(sys.argv[1:])
