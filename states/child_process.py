"""Starting a supervised child so that PR_SET_PDEATHSIG means "the supervisor died".

The kernel sends a child its parent-death signal when the *thread* that forked it
exits, not when the parent process does (prctl(2), PR_SET_PDEATHSIG). ``trio``
starts processes from a worker thread of its thread cache, and such a thread exits
after 10 s idle: a child armed with PR_SET_PDEATHSIG would be SIGKILLed 10 s after its
start although its supervisor is well (seen: generations dying ``exit -9`` ~10 s after
their start). So on Linux :func:`spawn_here` forks the child from the calling thread
(the supervisor's trio thread, which lives as long as the supervisor), with
``subprocess.Popen`` (a fork+exec of a small command line: about a millisecond), and
:class:`PidfdProcess` reaps it through a pidfd, without a thread or polling.
Elsewhere (macOS) the child is started with ``trio.lowlevel.open_process`` and relies
on its lifeline pipe alone (:mod:`clusterfsm.states.lifeline`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence

import trio

#: Whether children can be started here with a parent-death signal that follows the
#: supervisor's own thread (Linux with pidfds).
PDEATHSIG_SPAWN = sys.platform == "linux" and hasattr(os, "pidfd_open")


class PidfdProcess:
    """A child process forked from this thread; :meth:`reap` (one task) reaps it."""

    def __init__(self, popen: subprocess.Popen[bytes], pidfd: int) -> None:
        self.popen = popen
        self._pidfd = pidfd
        self._exited = trio.Event()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode if self._exited.is_set() else None

    def terminate(self) -> None:
        if not self._exited.is_set():
            self.popen.terminate()

    def kill(self) -> None:
        if not self._exited.is_set():
            self.popen.kill()

    async def reap(self) -> None:
        """Wait for the exit (the pidfd turns readable), reap, and release waiters."""
        try:
            await trio.lowlevel.wait_readable(self._pidfd)
            self.popen.wait()  # exited already: returns at once
        finally:
            if self.popen.returncode is not None:
                os.close(self._pidfd)
                self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        code = self.popen.returncode
        assert code is not None
        return code


def spawn_here(argv: Sequence[str], env: Mapping[str, str], pass_fds: Sequence[int]
               ) -> tuple[PidfdProcess, trio.lowlevel.FdStream, trio.lowlevel.FdStream]:
    """Fork+exec ``argv`` from this thread; the process and its stdout and stderr.

    Raises OSError if it cannot be started (nothing is left open then).
    """
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    try:
        popen = subprocess.Popen(list(argv), stdout=out_write, stderr=err_write,
                                 env=dict(env), pass_fds=tuple(pass_fds))
    except BaseException:
        os.close(out_read)
        os.close(err_read)
        raise
    finally:
        os.close(out_write)
        os.close(err_write)
    try:
        pidfd = os.pidfd_open(popen.pid)
    except OSError:
        popen.kill()
        popen.wait()
        os.close(out_read)
        os.close(err_read)
        raise
    return (PidfdProcess(popen, pidfd), trio.lowlevel.FdStream(out_read),
            trio.lowlevel.FdStream(err_read))


__all__ = ["PDEATHSIG_SPAWN", "PidfdProcess", "spawn_here"]
