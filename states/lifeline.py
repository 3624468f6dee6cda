"""No orphans: a supervised child dies with its supervisor.

A supervisor (:mod:`clusterfsm.states.supervisor_child`) that is SIGKILLed cannot stop
its child; a child that went on serving would keep a dead generation in the group,
unknown to anyone, until a write to its closed stdout failed. Two mechanisms make the
child follow its supervisor within a fraction of a second:

- **The lifeline pipe** (every platform, macOS included). The supervisor makes a pipe
  per child, keeps the write end and never writes to it; the child inherits the read
  end (its number is in :data:`LIFELINE_ENV`). When the supervisor process ends, for
  whatever reason, the kernel closes the write end and the child reads EOF:
  :func:`watch_lifeline` then SIGKILLs the child (its stdout is gone too, so there is
  no one left to report to). The child's init watchdog sees its rank's pipe close in
  turn and removes the topology directory (:mod:`clusterfsm.states.watchdog`).
- **PR_SET_PDEATHSIG** (Linux only, :func:`die_with_parent`): the kernel itself sends
  SIGKILL when the parent dies (when the parent's *thread* that forked the child
  exits, which is why the supervisor forks it from its own thread:
  :mod:`clusterfsm.states.child_process`), even while the child is frozen in
  ``mx.distributed.init`` holding the GIL, when no task of it can run to read the
  lifeline. Set at the child's start; if the supervisor is already gone by then (the
  race the prctl manual warns about: its lifeline already reads EOF) the child ends at
  once. The kernel's signal follows the *direct* parent: a child started through a
  wrapper that forks (rather than execs) relies on the lifeline alone.

A frozen child on macOS is bounded by its init watchdog's deadline instead.
Both sides are used by ``serve`` (a supervised child reads the variables); a custom
child command (``supervise_ranks(command=...)``) calls :func:`die_with_parent` and
runs :func:`watch_lifeline` the same way.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
from collections.abc import Mapping

import trio

#: The read end of the lifeline pipe, as a decimal file descriptor number.
LIFELINE_ENV = "CLUSTERFSM_LIFELINE_FD"
#: ``1`` if the supervisor forked this child from its own long-lived thread, so that a
#: parent-death signal means the supervisor died (clusterfsm.states.child_process).
PDEATHSIG_ENV = "CLUSTERFSM_PDEATHSIG"
#: From ``<linux/prctl.h>``.
PR_SET_PDEATHSIG = 1


def _exit_now() -> None:
    """SIGKILL ourselves: the same end as PR_SET_PDEATHSIG, on every platform."""
    os.kill(os.getpid(), signal.SIGKILL)


def _fd(environ: Mapping[str, str]) -> int | None:
    text = environ.get(LIFELINE_ENV, "")
    return int(text) if text.isdigit() else None


def _closed(fd: int) -> bool:
    """The lifeline reads EOF now (the supervisor never writes: readable means EOF)."""
    try:
        readable, _, _ = select.select([fd], [], [], 0)
    except (OSError, ValueError):
        return False  # not an open descriptor: no lifeline to judge by
    return bool(readable)


def die_with_parent(environ: Mapping[str, str] | None = None) -> bool:
    """Linux: have the kernel SIGKILL this process when its parent dies.

    Does nothing (False) unless this process is a supervised child (a lifeline in
    :data:`LIFELINE_ENV`) whose supervisor asked for it (:data:`PDEATHSIG_ENV`: the
    signal follows the thread that forked us, which must outlive us), or off Linux, or
    if prctl is unavailable. If the supervisor has already died before the call, this
    process ends at once.
    """
    env = os.environ if environ is None else environ
    fd = _fd(env)
    if fd is None:
        return False
    armed = False
    if sys.platform == "linux" and env.get(PDEATHSIG_ENV) == "1":
        try:
            libc = ctypes.CDLL(None, use_errno=True)  # the process's own libc
            armed = libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False  # no libc prctl: the lifeline pipe still works
    if _closed(fd):
        _exit_now()  # the supervisor died before prctl took effect
    return armed


async def watch_lifeline(environ: Mapping[str, str] | None = None) -> None:
    """Wait for EOF on the lifeline pipe, then end this process (SIGKILL).

    Returns at once if there is no lifeline (not a supervised child). Run it in the
    child's nursery for as long as the child lives.
    """
    fd = _fd(os.environ if environ is None else environ)
    if fd is None:
        return
    try:
        os.set_blocking(fd, False)
    except OSError:
        return  # not an open descriptor: nothing to watch
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            continue
        if not data:
            _exit_now()


def open_lifeline() -> tuple[int, int]:
    """The supervisor's side: a pipe ``(read_end, write_end)``; both non-inheritable.

    Pass ``read_end`` to exactly one child (``pass_fds``) and close it after the
    spawn; keep ``write_end`` open (and unwritten) until the child has been reaped.
    """
    return os.pipe()


def lifeline_env(read_end: int, *, pdeathsig: bool = False) -> dict[str, str]:
    """The child's environment entries for a lifeline ``read_end``; ``pdeathsig`` if the
    child is forked from a thread that lives as long as its supervisor."""
    return {LIFELINE_ENV: str(read_end), PDEATHSIG_ENV: "1" if pdeathsig else "0"}


__all__ = [
    "LIFELINE_ENV",
    "PDEATHSIG_ENV",
    "die_with_parent",
    "lifeline_env",
    "open_lifeline",
    "watch_lifeline",
]
