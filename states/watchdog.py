"""A hard deadline on ``mx.distributed.init`` that does not need the GIL.

``init`` holds the GIL for its whole duration: while it blocks (a peer that never
calls init, a connect back-off, an RDMA hang) no Python code of this process runs,
trio deadlines included. The only clocks that still tick are outside the interpreter.

So each rank starts a tiny watchdog *process* early in the run; its program is
:mod:`clusterfsm.states.watchdog_main` (standard library only). On Linux, while the
rank is still single-threaded, it is a fork of the rank that calls that program's
``main`` (~1 ms, and no ~20 ms of interpreter start-up competing for the CPUs with
the ranks' group init, where a descheduled ring rank costs MLX's 1 s connect
back-off); elsewhere it is ``python -I -S PATH/watchdog_main.py``. Just before init the rank
*arms* it with the deadline and the exact trace lines that describe a
``GroupInitTimeout``; just after, it *disarms* it. If the deadline passes while
armed, the watchdog appends those lines to the trace, prints the error state and
type on stderr, and SIGKILLs the rank (SIGTERM handlers would need the GIL too). A
hung init cannot be recovered inside the process anyway (docs/design.md section
3.1): a new process and session is the only way back.

It also removes the rank's private topology directory, which a killed rank cannot:
the rank registers the directory (:meth:`InitWatchdog.remove_on_exit`) as soon as it
creates it, and it stays registered until the cluster closes (disarming keeps it).
When the rank exits, however it exits, the watchdog sees EOF on its stdin, removes
what is still registered and exits; a rank that closes cleanly has removed the
directory itself by then, and missing paths are ignored.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from clusterfsm.states import watchdog_main
from clusterfsm.states.errors import PrecheckFailed

#: The watchdog's program, run by path in its own isolated interpreter where it cannot
#: be forked: ``-I`` ignores the rank's environment and user site, ``-S`` skips
#: site-packages (a fast start; the program needs only the standard library).
WATCHDOG_PROGRAM = Path(watchdog_main.__file__)


def _single_threaded_linux() -> bool:
    """Forking is only safe while no other thread could hold a lock the child needs."""
    return sys.platform == "linux" and len(os.listdir("/proc/self/task")) == 1


class ForkedWatchdog:
    """The watchdog as a fork of this process: the same program, no interpreter start.

    The child keeps only the pipe (as stdin) and stdout/stderr, restores default
    signal handling, runs :func:`clusterfsm.states.watchdog_main.main` and leaves with
    ``os._exit`` (none of the rank's cleanup or buffers run twice). The parent waits on a pidfd, so
    reaping it needs no polling and no thread.
    """

    def __init__(self, pid: int, pidfd: int, stdin: trio.lowlevel.FdStream) -> None:
        self.pid = pid
        self.stdin = stdin
        self.returncode: int | None = None
        self._pidfd = pidfd

    @classmethod
    def start(cls) -> ForkedWatchdog:
        read_end, write_end = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _run_forked_watchdog(read_end)  # never returns
        os.close(read_end)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(write_end)
            raise
        return cls(pid, pidfd, trio.lowlevel.FdStream(write_end))

    async def wait(self) -> int:
        if self.returncode is None:
            await trio.lowlevel.wait_readable(self._pidfd)
            # The pidfd is readable once it has exited: this returns at once.
            _, status = os.waitpid(self.pid, os.WNOHANG)  # noqa: ASYNC222
            self.returncode = os.waitstatus_to_exitcode(status)
            os.close(self._pidfd)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)


def _run_forked_watchdog(read_end: int) -> None:
    code = 1
    try:
        gc.disable()
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        os.dup2(read_end, 0)
        keep = {0, 1, 2}
        for name in os.listdir("/proc/self/fd"):
            if int(name) not in keep:
                try:
                    os.close(int(name))
                except OSError:  # the directory's own fd, already gone
                    continue
        code = watchdog_main.main(0)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os._exit(code)


class InitWatchdog:
    """Handle on the watchdog process of one run (start, arm, disarm, stop)."""

    def __init__(self) -> None:
        self._process: trio.Process | ForkedWatchdog | None = None
        self._start_done = trio.Event()
        self._start_error: OSError | None = None

    async def start(self) -> None:
        """Start the process; never raises (it runs as a background task): a failure
        is kept and reported by :meth:`ready`, in the state that needs the watchdog."""
        self._start_done = trio.Event()
        self._start_error = None
        try:
            if _single_threaded_linux():
                self._process = ForkedWatchdog.start()
            else:
                self._process = await trio.lowlevel.open_process(
                    [sys.executable, "-I", "-S", str(WATCHDOG_PROGRAM)],
                    stdin=subprocess.PIPE,
                )
        except OSError as exc:  # fork/exec failed: out of processes or memory
            self._start_error = exc
        finally:
            self._start_done.set()

    async def ready(self) -> None:
        """Wait for :meth:`start`; no watchdog means no hard init deadline: a typed
        :class:`~states.errors.PrecheckFailed`, never an init without one."""
        await self._start_done.wait()
        if self._start_error is not None:
            raise PrecheckFailed("watchdog", f"cannot start the init watchdog process "
                                 f"(the hard deadline on init): {self._start_error}")

    @property
    def started(self) -> bool:
        return self._process is not None

    async def arm(
        self,
        seconds: float,
        *,
        message: str,
        trace: str | None,
        record: dict[str, Any],
        end: dict[str, Any],
        t_armed: float,
        elapsed_before_ms: float,
        cleanup: list[str] | None = None,
    ) -> None:
        """Arm; on expiry: trace lines, stderr message, SIGKILL, remove ``cleanup`` dirs."""
        payload = {
            "seconds": seconds, "message": message, "trace": trace, "record": record,
            "end": end, "t_armed": t_armed, "elapsed_before_ms": elapsed_before_ms,
            "cleanup": cleanup or [],
        }
        await self._write(b"ARM " + json.dumps(payload).encode() + b"\n")

    async def disarm(self) -> None:
        """Stop the deadline; registered cleanup paths stay registered. A watchdog that
        is gone has nothing left to disarm (it can no longer kill this rank)."""
        try:
            await self._write(b"DISARM\n")
        except PrecheckFailed:
            return

    async def remove_on_exit(self, paths: list[str]) -> None:
        """Register ``paths`` (directories) for removal when this process is gone.

        A SIGKILLed rank (inside init, or after ready) cannot remove its topology
        directory; its watchdog sees EOF on the pipe and does.
        """
        await self._write(b"CLEANUP " + json.dumps(paths).encode() + b"\n")

    async def _write(self, data: bytes) -> None:
        """One command; a watchdog that is not there (never started, or gone: killed
        by someone, out of memory) is :class:`PrecheckFailed`, typed, in the state that
        needs it, never a bare pipe error that would end the run in ``unexpected``."""
        if self._process is None or self._process.stdin is None:
            raise PrecheckFailed("watchdog", "the init watchdog process was not started")
        try:
            await self._process.stdin.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise PrecheckFailed("watchdog", "the init watchdog process is gone (the "
                                 f"hard deadline on init): {exc or type(exc).__name__}"
                                 ) from exc

    async def aclose(self) -> None:
        """Close its stdin (it exits on EOF) and reap it; kill it if it lingers."""
        process, self._process = self._process, None
        if process is None:
            return
        with trio.CancelScope(shield=True):
            if process.stdin is not None:
                await process.stdin.aclose()
            with trio.move_on_after(2.0):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


class NoWatchdog:
    """For tests under a MockClock and for callers that supervise init themselves."""

    started = True

    async def start(self) -> None:
        return None

    async def ready(self) -> None:
        return None

    async def arm(self, seconds: float, **_: Any) -> None:
        return None

    async def disarm(self) -> None:
        return None

    async def remove_on_exit(self, paths: list[str]) -> None:
        return None

    async def aclose(self) -> None:
        return None
