"""``clusterfsm demo``: a real N-rank bootstrap on this machine.

It makes a throwaway key (0600, in a private temp directory), picks a free loopback
port for rank 0, forks N ranks that each run :func:`clusterfsm.states.serve.serve`
(what ``clusterfsm serve --once --verify --quiet`` runs) with a typed config, and
prints for every rank the path it took, the time spent in each state and its
``all_sum`` (read from the rank's output with :mod:`clusterfsm.states.lines`).
Exit 0 only if every rank reached ``ready`` and every sum was right. Child processes
are killed and reaped if the demo times out or is interrupted, and the temp directory
is removed.
"""

from __future__ import annotations

import importlib
import math
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs

from clusterfsm.fsm import read_trace, state_totals
from clusterfsm.states.config import MAX_WORLD_SIZE, Address, BackendChoice, ClusterConfig
from clusterfsm.states.errors import printable
from clusterfsm.states.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from clusterfsm.states.keys import load_key, write_key
from clusterfsm.states.lines import AllSumLine, ReadyLine
from clusterfsm.states.serve import ServeOptions, check_config, check_output_path, serve

#: After a timeout or an interrupt, how long ranks get to exit on SIGTERM before SIGKILL.
STOP_GRACE = 1.0


def free_port() -> int:
    """A port the kernel just handed out on 127.0.0.1 (fresh per demo run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_trace_path(base: str | Path, rank: int) -> Path:
    base = Path(base)
    return base.with_name(f"{base.stem}.rank{rank}{base.suffix or '.jsonl'}")


def rank_config(rank: int, ranks: int, port: int, key: bytes, backend: BackendChoice,
                deadlines: dict[str, float]) -> ClusterConfig:
    """One rank's config: rank 0 listens on loopback ``port``, the others dial it."""
    where = Address("127.0.0.1", port)
    peers: Iterable[Any] = () if rank == 0 else (where,)  # attrs converter: tuple
    return ClusterConfig(rank=rank, world_size=ranks, key=key, backend=backend,
                         listen=where if rank == 0 else None, peers=peers,
                         deadlines=dict(deadlines), verify=True)


def demo_problem(ranks: int, timeout: float) -> str | None:
    """Why ``--ranks``/``--timeout`` are refused, or None: 1 to ``MAX_WORLD_SIZE``
    ranks (world size 1 is one rank with MLX's single-process group), and a finite,
    positive timeout (a NaN or negative one would end the run as "timed out")."""
    if not 1 <= ranks <= MAX_WORLD_SIZE:
        return f"--ranks must be 1..{MAX_WORLD_SIZE} (the world size limit), got {ranks}"
    if not (math.isfinite(timeout) and timeout > 0):
        return f"--timeout must be a positive number of seconds, got {timeout}"
    return None


@attrs.frozen
class DemoRun:
    """How a demo ended: its exit code and the trace file each rank was given (in a
    private temporary directory, already removed, unless ``trace_json`` was given)."""

    code: int
    traces: tuple[Path, ...]


def run_demo(*, ranks: int, backend: BackendChoice, trace_json: str | None,
             deadlines: dict[str, float], timeout: float) -> DemoRun:
    problem = demo_problem(ranks, timeout)
    if problem is not None:
        print(f"clusterfsm demo: {problem}", file=sys.stderr)
        return DemoRun(EXIT_USAGE, ())
    with tempfile.TemporaryDirectory(prefix="clusterfsm-demo-") as tmp:
        key = load_key(write_key(Path(tmp) / "cluster.key"))
        traces = tuple(rank_trace_path(trace_json or Path(tmp) / "trace.jsonl", r)
                       for r in range(ranks))
        port = free_port()
        try:
            configs = [rank_config(r, ranks, port, key, backend, deadlines)
                       for r in range(ranks)]
            check_config(configs[0])
            if trace_json:
                for trace in traces:
                    check_output_path(str(trace))
        except ValueError as exc:
            print(f"clusterfsm demo: {exc}", file=sys.stderr)
            return DemoRun(EXIT_USAGE, traces)
        runs = [(config, ServeOptions(str(trace), once=True, quiet=True))
                for config, trace in zip(configs, traces, strict=True)]
        started = time.monotonic()
        results = run_ranks(runs, timeout)
        wall = time.monotonic() - started
        return DemoRun(_report(results, traces, ranks, wall), traces)


# -- rank processes forked from this (warm) interpreter -------------------------------


def preload() -> None:
    """Import what every rank needs once, here, so forked ranks start warm.

    Starting ``python -m clusterfsm.states.cli serve`` per rank would cost each rank an
    interpreter and ~200 ms of imports (trio, attrs, the machine), on top of this
    process's own; a fork of this process costs ~1 ms. MLX is preloaded only on Linux: on macOS a
    forked child must not inherit Metal/Objective-C state, so ranks import it there.
    """
    modules = [f"clusterfsm.states.{name}" for name in ("api", "serve", "machine", "errors")]
    if sys.platform == "linux":
        modules.append("mlx.core")
    for name in modules:
        importlib.import_module(name)
    from clusterfsm.states.seal import warm_up

    warm_up()  # the handshake's cryptography, once here rather than in every rank


@attrs.define
class RankProcess:
    """A forked rank: its pid and the read ends of its stdout and stderr pipes."""

    rank: int
    pid: int
    fds: dict[int, str]  # open read ends: fd -> "stdout" | "stderr"
    out: dict[str, bytearray] = attrs.field(
        factory=lambda: {"stdout": bytearray(), "stderr": bytearray()})
    returncode: int | None = None
    timed_out: bool = False

    def close_fd(self, fd: int) -> None:
        del self.fds[fd]
        os.close(fd)

    def reap(self, *, block: bool) -> None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)


def fork_rank(config: ClusterConfig, options: ServeOptions,
              close_in_child: list[int]) -> RankProcess:
    """Fork one rank that runs :func:`~clusterfsm.states.serve.serve` in this
    already-warm interpreter.

    Must be called before any ``trio.run`` or thread of this process. The child never
    returns: it exits with the rank's exit code via ``os._exit`` (no atexit handlers,
    so this process's temp directory is not removed by a child).
    """
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the rank
        code = EXIT_FAILED
        try:
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            for fd in (out_r, out_w, err_r, err_w, *close_in_child):
                os.close(fd)
            code = serve(config, options)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else EXIT_FAILED
        except BaseException:  # noqa: BLE001 - a crash is reported on stderr, exit 1
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(out_w)
    os.close(err_w)
    assert config.rank is not None
    return RankProcess(config.rank, pid, {out_r: "stdout", err_r: "stderr"})


def run_ranks(runs: list[tuple[ClusterConfig, ServeOptions]], limit_s: float
              ) -> list[subprocess.CompletedProcess[bytes] | None]:
    """Fork every rank (rank 0 first, so it listens first) and collect their output.

    Every child is reaped before this returns: at ``limit_s`` or on an interrupt the
    ones still running get SIGTERM, then SIGKILL after ``STOP_GRACE``. A ``None``
    entry was still running at the timeout.
    """
    preload()
    children: list[RankProcess] = []
    try:
        for config, options in runs:
            children.append(fork_rank(config, options,
                                      [fd for c in children for fd in c.fds]))
        if not _drain(children, time.monotonic() + limit_s):
            for child in children:
                child.timed_out = child.returncode is None
    finally:
        _stop(children)
    return [None if c.timed_out or c.returncode is None
            else subprocess.CompletedProcess(f"rank {c.rank}", c.returncode,
                                             bytes(c.out["stdout"]), bytes(c.out["stderr"]))
            for c in children]


def _drain(children: list[RankProcess], deadline: float) -> bool:
    """Read the children's pipes until EOF (the rank and its watchdog have exited),
    reaping each child whose pipes are closed. True if all were done by ``deadline``."""
    owners = {fd: c for c in children for fd in c.fds}
    with selectors.DefaultSelector() as sel:
        for fd in owners:
            sel.register(fd, selectors.EVENT_READ)
        while owners:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            for key, _ in sel.select(remaining):
                fd = int(key.fd)
                child = owners[fd]
                chunk = os.read(fd, 65536)
                if chunk:
                    child.out[child.fds[fd]] += chunk
                    continue
                sel.unregister(fd)
                del owners[fd]
                child.close_fd(fd)
                if not child.fds:  # only os._exit or death closes them: it is exiting
                    child.reap(block=True)
    return True


def _stop(children: list[RankProcess]) -> None:
    """SIGTERM what still runs, SIGKILL it after ``STOP_GRACE``; reap every child."""
    running = [c for c in children if c.returncode is None]
    for child in running:
        child.reap(block=False)
        if child.returncode is None:
            os.kill(child.pid, signal.SIGTERM)
    still = [c for c in running if c.returncode is None]
    if still:
        _drain(still, time.monotonic() + STOP_GRACE)
    for child in running:
        child.reap(block=False)
        if child.returncode is None:
            os.kill(child.pid, signal.SIGKILL)
            child.reap(block=True)
        for fd in list(child.fds):
            child.close_fd(fd)


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


def read_notes(trace: Path) -> list[str]:
    """The trace's step notes as ``state: note`` (e.g. MLX's connect back-off)."""
    try:
        records = read_trace(trace).records
    except (OSError, ValueError):
        return []
    return [f"{r.source}: {printable(r.note)}" for r in records if r.note is not None]


def _report(results: list[subprocess.CompletedProcess[bytes] | None],
            traces: Sequence[Path],
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
        for note in read_notes(trace):
            print(f"  note: {note}")
        if result is None:
            print("  killed: the demo timed out")
            ok = False
            continue
        lines = result.stdout.decode(errors="replace").splitlines()
        sums = [s for s in map(AllSumLine.parse, lines) if s is not None]
        print(f"  {sums[-1].result() if sums else 'no all_sum result'}")
        ready = any(ReadyLine.parse(line) for line in lines)
        if result.returncode != EXIT_OK or not ready:
            ok = False
            err = result.stderr.decode(errors="replace").strip().splitlines()
            print(f"  FAILED (exit {result.returncode}): {err[-1] if err else end}")
    verdict = "OK" if ok else "FAILED"
    counted = f"{ranks} rank" if ranks == 1 else f"{ranks} ranks"
    print(f"demo {verdict}: {counted}, expected all_sum {expected:g}, "
          f"wall time {wall * 1000:.0f} ms (process start included)")
    return EXIT_OK if ok else EXIT_FAILED
