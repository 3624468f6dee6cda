"""``clusterfsm demo``: a real N-rank bootstrap on this machine.

It makes a throwaway key (0600, in a private temp directory), picks a free loopback
port for rank 0, starts N ``clusterfsm serve --once --verify`` processes, and prints
for every rank the path it took, the time spent in each state and its ``all_sum``.
Exit 0 only if every rank reached ``ready`` and every sum was right. Child processes
are killed and reaped if the demo times out or is interrupted, and the temp directory
is removed.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from fsm import read_trace, state_totals
from states.keys import write_key


def free_port() -> int:
    """A port the kernel just handed out on 127.0.0.1 (fresh per demo run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_trace_path(base: str | Path, rank: int) -> Path:
    base = Path(base)
    return base.with_name(f"{base.stem}.rank{rank}{base.suffix or '.jsonl'}")


def serve_command(rank: int, ranks: int, port: int, key: Path, trace: Path, backend: str,
                  deadlines: dict[str, float]) -> list[str]:
    cmd = [sys.executable, "-m", "states.cli", "serve", "--rank", str(rank),
           "--world-size", str(ranks), "--key-file", str(key), "--backend", backend,
           "--trace-json", str(trace), "--once", "--verify", "--quiet"]
    cmd += ["--listen", f"127.0.0.1:{port}"] if rank == 0 else ["--peer", f"127.0.0.1:{port}"]
    for state, seconds in deadlines.items():
        cmd += ["--deadline", f"{state}={seconds:g}"]
    return cmd


def run_demo(*, ranks: int, backend: str, trace_json: str | None,
             deadlines: dict[str, float], timeout: float) -> int:
    if ranks < 2:
        print("clusterfsm demo: --ranks must be at least 2", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="clusterfsm-demo-") as tmp:
        key = write_key(Path(tmp) / "cluster.key")
        traces = [rank_trace_path(trace_json or Path(tmp) / "trace.jsonl", r)
                  for r in range(ranks)]
        port = free_port()
        commands = [serve_command(r, ranks, port, key, traces[r], backend, deadlines)
                    for r in range(ranks)]
        started = time.monotonic()
        results = trio.run(_run_all, commands, timeout)
        wall = time.monotonic() - started
        return _report(results, traces, ranks, wall)


async def _run_all(commands: list[list[str]], limit_s: float
                   ) -> list[subprocess.CompletedProcess[bytes] | None]:
    results: list[subprocess.CompletedProcess[bytes] | None] = [None] * len(commands)

    async def one(i: int) -> None:
        results[i] = await trio.run_process(commands[i], check=False,
                                            capture_stdout=True, capture_stderr=True)

    with trio.move_on_after(limit_s):
        async with trio.open_nursery() as nursery:
            for i in range(len(commands)):
                nursery.start_soon(one, i)
    return results  # a None entry was killed at the timeout (run_process reaps it)


def read_summary(trace: Path) -> tuple[list[str], dict[str, float], str]:
    """Path, per-state totals and end state of a rank's trace ('' if it has none)."""
    try:
        parsed = read_trace(trace)
    except (OSError, ValueError) as exc:
        return [], {}, f"no trace ({exc})"
    end = "" if parsed.end is None else parsed.end.state
    if parsed.end is not None and parsed.end.error:
        end += f" ({parsed.end.error})"
    return parsed.path, state_totals(parsed.records), end


def _report(results: list[subprocess.CompletedProcess[bytes] | None], traces: list[Path],
            ranks: int, wall: float) -> int:
    expected = ranks * (ranks + 1) / 2
    ok = True
    for rank, (result, trace) in enumerate(zip(results, traces, strict=True)):
        print(f"rank {rank}:")
        path, totals, end = read_summary(trace)
        if path:
            print(f"  path: {' -> '.join(path)}")
        for state, ms in totals.items():
            print(f"  {state:<22} {ms:9.2f} ms")
        if result is None:
            print("  killed: the demo timed out")
            ok = False
            continue
        out = result.stdout.decode(errors="replace")
        sums = [line for line in out.splitlines() if "all_sum" in line]
        print(f"  {sums[-1].split(': ', 1)[-1] if sums else 'no all_sum result'}")
        if result.returncode != 0 or "DistributedGroup ready" not in out:
            ok = False
            err = result.stderr.decode(errors="replace").strip().splitlines()
            print(f"  FAILED (exit {result.returncode}): {err[-1] if err else end}")
    verdict = "OK" if ok else "FAILED"
    print(f"demo {verdict}: {ranks} ranks, expected all_sum {expected:g}, "
          f"wall time {wall * 1000:.0f} ms (process start included)")
    return 0 if ok else 1
