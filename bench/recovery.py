"""Recovery time of supervised ranks doing real work, after SIGKILLs.

Two ranks on loopback, each ``clusterfsm serve --supervise --worker
examples/workers.py:all_sum_loop`` (the app's worker: an ``all_sum`` of 4096 floats
in a loop, checked). Three kinds of loss, ``--kills`` of each, in rotation:

- ``rank 1 child``: SIGKILL rank 1's current child (its supervisor restarts it);
- ``rank 0 child``: SIGKILL rank 0's current child (the coordinator);
- ``rank 1 supervisor``: SIGKILL rank 1's supervisor process; its child dies with it
  (the lifeline, states/lifeline.py); a new supervisor is started from outside at
  once, as systemd or launchd would (examples/service/).

Recovery time: from the SIGKILL to both ranks' ``DistributedGroup ready`` in one new
session (the lines as this process reads them from the supervisors' stdout). Before
the next kill, both workers must have done 20 more ``all_sum`` calls in that session.
Baseline in the same run: the first bring-up (both supervisors started, to the same
ready), which includes two supervisor and two child interpreter starts.

With ``--hog`` one busy-loop process keeps a core busy for the whole run, as a
provider's model does (the condition issue 18's targets are set for).

Run: python bench/recovery.py [--kills 20] [--hog] [--json OUT] [--log OUT.txt]
(``--log``: every supervisor's lines, each stamped with the time this process read it,
to see where a recovery's time went).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trio
from common import ROOT, BusyCore, emit, load_average, median, percentile, row

from clusterfsm.states.demo import free_port
from clusterfsm.states.keys import write_key
from clusterfsm.states.lines import EchoLine, ReadyLine, SupervisorNote, parse_line

WORKER = f"{ROOT / 'examples' / 'workers.py'}:all_sum_loop"
STARTED = re.compile(r"generation (\d+) started \(pid (\d+),")
PROGRESS = re.compile(r"rank \d+: (\d+) all_sums$")
KINDS = ("rank 1 child", "rank 0 child", "rank 1 supervisor")
LIMIT_S = 60.0


class Supervisor:
    """One ``serve --supervise`` process; what its lines say, as they arrive."""

    def __init__(self, rank: int, process: trio.Process, on_line: Callable[[], None]
                 ) -> None:
        self.rank = rank
        self.process = process
        self.on_line = on_line
        self.child_pid = 0
        self.session = ""  # of the newest ready generation
        self.ready_at = 0.0
        self.work = 0  # all_sums reported by the worker in that session
        self.lines: list[str] = []

    def line(self, text: str) -> None:
        self.lines.append(f"{time.monotonic():.3f} {text}")
        parsed = parse_line(text)
        if isinstance(parsed, SupervisorNote) and (m := STARTED.match(parsed.text)):
            self.child_pid = int(m[2])
        elif isinstance(parsed, EchoLine):
            inner = parse_line(parsed.line)
            if isinstance(inner, ReadyLine):
                self.session, self.ready_at, self.work = inner.session, time.monotonic(), 0
            elif m := PROGRESS.match(parsed.line):
                self.work = int(m[1])
        self.on_line()

    async def pump(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        async with self.process.stdout as stream:
            while chunk := await stream.receive_some(65536):
                *done, buffer = (buffer + chunk).split(b"\n")
                for raw in done:
                    self.line(raw.decode(errors="replace"))


class Pair:
    def __init__(self, tmp: Path, nursery: trio.Nursery) -> None:
        self.key = write_key(tmp / "cluster.key")
        self.port = free_port()
        self.env = dict(os.environ, TMPDIR=str(tmp), WORKER_REPORT_EVERY="20")
        self.nursery = nursery
        self.sups: dict[int, Supervisor] = {}
        self.all: list[Supervisor] = []
        self.changed = trio.Event()

    def on_line(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def start(self, rank: int) -> None:
        where = ["--listen", f"127.0.0.1:{self.port}"] if rank == 0 else [
            "--peer", f"127.0.0.1:{self.port}"]
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "clusterfsm.states.cli", "serve", "--rank", str(rank),
             "--world-size", "2", "--key-file", str(self.key), "--quiet", *where,
             "--supervise", "--worker", WORKER, "--restart-backoff", "0.05:0.2",
             # Every kill is a restart in a row (no generation lives the 10 s that
             # resets the count): a budget above all the kills of the run.
             "--max-restarts", "100000", "--stop-grace", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env,
            start_new_session=True)
        sup = Supervisor(rank, process, self.on_line)
        self.sups[rank] = sup
        self.all.append(sup)
        self.nursery.start_soon(sup.pump)

    async def until(self, done: Callable[[], bool]) -> None:
        with trio.move_on_after(LIMIT_S):
            while not done():
                await self.changed.wait()
            return
        for sup in self.all[-2:]:
            print(f"--- supervisor rank {sup.rank}, last lines:", *sup.lines[-30:], sep="\n")
        raise TimeoutError(f"not done within {LIMIT_S:g} s")

    def together(self, old: str) -> bool:
        a, b = self.sups[0], self.sups[1]
        return a.session == b.session != old and bool(a.session)

    def working(self) -> bool:
        return all(s.work >= 20 for s in self.sups.values())

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            for sup in self.all:
                if sup.process.returncode is None:
                    sup.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(5):
                for sup in self.all:
                    await sup.process.wait()
            # A rank's watchdog (same process group) removes the rank's files once the
            # rank is gone: give the groups a moment to empty before the SIGKILL.
            with trio.move_on_after(2):
                while any(  # noqa: ASYNC110 - no event says a process group emptied
                        _group_alive(sup.process.pid) for sup in self.all):
                    await trio.sleep(0.02)
            for sup in self.all:
                with contextlib.suppress(ProcessLookupError):  # the group is gone
                    os.killpg(sup.process.pid, signal.SIGKILL)
                await sup.process.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


async def kill(pair: Pair, kind: str) -> float:
    """One loss of ``kind``; seconds from the SIGKILL to both ranks ready again."""
    old = pair.sups[0].session
    t0 = time.monotonic()
    if kind == "rank 1 supervisor":
        os.kill(pair.sups[1].process.pid, signal.SIGKILL)
        await pair.sups[1].process.wait()
        await pair.start(1)
    else:
        os.kill(pair.sups[0 if kind == "rank 0 child" else 1].child_pid, signal.SIGKILL)
    await pair.until(lambda: pair.together(old))
    ready = max(s.ready_at for s in pair.sups.values()) - t0
    await pair.until(pair.working)
    return ready


async def main(kills: int, log: str | None) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory(prefix="recovery-bench-") as tmp:
        async with trio.open_nursery() as nursery:
            pair = Pair(Path(tmp), nursery)
            try:
                t0 = time.monotonic()
                await pair.start(0)
                await pair.start(1)
                await pair.until(lambda: pair.together(""))
                times["first bring-up"] = [max(s.ready_at for s in pair.sups.values()) - t0]
                await pair.until(pair.working)
                for i in range(kills * len(KINDS)):
                    kind = KINDS[i % len(KINDS)]
                    times[kind].append(await kill(pair, kind))
                    print(f"{i + 1:3d} {kind:18s} {times[kind][-1] * 1000:7.1f} ms",
                          flush=True)
            finally:
                await pair.close()
                if log:
                    await trio.Path(log).write_text("".join(
                        f"--- supervisor rank {s.rank} (pid {s.process.pid})\n"
                        + "".join(line + "\n" for line in s.lines) for s in pair.all))
                nursery.cancel_scope.cancel()
    return times


def report(times: dict[str, list[float]], argv: list[str], load: str) -> None:
    base = times["first bring-up"][0]
    cond = "one core hogged" if "--hog" in argv else "no hog"
    print(f"\nfirst bring-up (baseline): {base * 1000:.0f} ms; {cond}; load {load}")
    rows = []
    for kind in KINDS:
        values = times[kind]
        p50, p99 = median(values), percentile(values, 99)
        print(f"{kind:18s} n={len(values):3d}  p50 {p50 * 1000:6.0f} ms  "
              f"p99 {p99 * 1000:6.0f} ms  max {max(values) * 1000:6.0f} ms  "
              f"p50/bring-up {p50 / base:.2f}")
        rows.append(row(f"Recovery after SIGKILL of {kind} (to ready, new session; {cond})",
                        f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max "
                        f"{max(values) * 1000:.0f} ms (n={len(values)})",
                        f"first bring-up {base * 1000:.0f} ms", f"{p50 / base:.2f}x",
                        "p99 < 1 s", p99 < 1.0))
    emit(rows, argv)


if __name__ == "__main__":
    argv = sys.argv[1:]
    n = int(argv[argv.index("--kills") + 1]) if "--kills" in argv else 20
    log = argv[argv.index("--log") + 1] if "--log" in argv else None
    peak = load_average()
    with BusyCore() if "--hog" in argv else contextlib.nullcontext():
        times = trio.run(main, n, log)
        peak = max(peak, load_average(), key=float)
    report(times, argv, peak)
