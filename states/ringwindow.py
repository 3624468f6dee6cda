"""The ring's init window: who may preempt whom, and what MLX's back-off looked like.

MLX's ring (docs/design.md section 3.2) has every rank but the last accept from its
left neighbour and then dial its right one; the last rank dials rank 0 first and only
then listens. So rank N-2's dial races the last rank's ``listen``, and a refused dial
sleeps 1 s. On a busy host the race is lost through the scheduler: the last rank's
dial completes the handshake and wakes the chain of accepting ranks, and a woken rank
preempts the waker on its CPU, so the chain reaches rank N-2's dial before the last
rank has run its next few microseconds (docs/design.md section 3.5 has the
measurements).

This module holds the two things group init does about it, both only for the
duration of the ``init`` call and undone right after:

- :func:`no_wakeup_preemption`: on Linux, the thread that calls ``init`` on every rank
  but the last runs ``SCHED_BATCH``, a policy whose woken threads do not preempt the
  running one (same nice value, same share of CPU; it is unprivileged). Threads MLX
  starts during the call inherit the policy: they are put back afterwards. Elsewhere
  (macOS has no ``SCHED_BATCH``, and its QoS classes change priority, not wake-up
  preemption) it does nothing.
- :func:`ring_log_capture` and :func:`read_backoff`: ``MLX_RING_VERBOSE`` is set for
  the call and the process's fd 2 goes to a private file (never a pipe, which could
  fill and block MLX), so MLX's ``Attempt N waiting W ms`` lines become a
  :class:`ConnectBackoff` that the trace and the ``serve`` output name. Lines that are
  not ours to consume are written back to stderr. Only the ranks that get
  ``SCHED_BATCH`` log: the last rank's log line would sit between its dial and its
  listen, the very window of the race.
- :func:`await_ring_listeners`: the other races, the chain reaching a rank that is not
  listening yet (a fixed stagger loses it when that rank is descheduled for longer).
  For every other rank whose address is local (one host, Linux), the last rank waits
  until /proc/net/tcp shows its listener, at most :data:`LISTENER_WAIT_LIMIT_S`.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import attrs
import trio

#: MLX's ring logs each refused dial as ``[ring] Attempt 0 waiting 1000 ms (error: 111 )``.
_BACKOFF = re.compile(r"^\[ring\] Attempt (\d+) waiting (\d+) ms")
#: The verbose lines we asked for by setting ``MLX_RING_VERBOSE`` (dropped afterwards).
_OURS = re.compile(r"^\[ring\] (Rank \d+ (accepting|connecting to \d+)|Attempt \d+ waiting)")
#: The environment variable that turns MLX's ring logging on (any value).
VERBOSE_ENV = "MLX_RING_VERBOSE"


@attrs.frozen
class ConnectBackoff:
    """MLX's ring dial was refused ``refusals`` times and it slept ``waited_ms`` in all."""

    refusals: int
    waited_ms: int

    def describe(self) -> str:
        return (f"MLX ring connect back-off: {self.waited_ms / 1000:g} s "
                f"({self.refusals} refused connect(s), retried by MLX; not a hang)")


def wants_no_preemption(backend: str, rank: int, world_size: int) -> bool:
    """Every ring rank but the last: these are the ranks woken by an accept."""
    return backend == "ring" and world_size > 1 and rank != world_size - 1


def _tids() -> set[int]:
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:
        return set()


@contextmanager
def no_wakeup_preemption(enabled: bool = True) -> Iterator[None]:
    """Run the block (in the thread that calls ``init``) as ``SCHED_BATCH`` on Linux.

    Does nothing when disabled, off Linux, or when the thread is not ``SCHED_OTHER``
    (someone chose its policy on purpose). Afterwards this thread, and every thread
    started during the block that inherited the policy, are ``SCHED_OTHER`` again.
    """
    with _policy_window(enabled, "SCHED_BATCH", 0):
        yield


@contextmanager
def runs_first(enabled: bool = True) -> Iterator[None]:
    """The last rank, where it is allowed: ``SCHED_RR`` at the lowest real-time priority.

    A real-time thread runs before any normal one when both are runnable, so the last
    rank gets from its dial to its listen before a woken rank 0 (on one host the
    wake-ups can come from a softirq thread, where ``SCHED_BATCH`` alone cannot order
    them). Needs ``CAP_SYS_NICE`` or an ``RLIMIT_RTPRIO`` above 0: without it nothing
    changes. The thread blocks in ``connect``/``accept`` (it does not spin), the window
    is bounded by the init watchdog, and the policy is undone as in
    :func:`no_wakeup_preemption`.
    """
    with _policy_window(enabled, "SCHED_RR", 1):
        yield


@contextmanager
def _policy_window(enabled: bool, name: str, priority: int) -> Iterator[None]:
    if not enabled or not sys.platform.startswith("linux"):
        yield
        return
    policy: int = getattr(os, name)
    if os.sched_getscheduler(0) != os.SCHED_OTHER:
        yield  # someone chose this thread's policy on purpose
        return
    before = _tids()
    try:
        os.sched_setscheduler(0, policy, os.sched_param(priority))
    except PermissionError:
        yield  # not allowed here (real-time needs CAP_SYS_NICE): unchanged
        return
    try:
        yield
    finally:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        for tid in _tids() - before:
            with suppress(OSError):  # the thread ended meanwhile
                if os.sched_getscheduler(tid) == policy:
                    os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))


_capturing = False


def capture_active() -> bool:
    """Whether fd 2 is being captured now (one capture at a time per process)."""
    return _capturing


@contextmanager
def ring_log_capture(log_fd: int) -> Iterator[None]:
    """fd 2 of this process goes to ``log_fd`` for the block, then comes back.

    While ``init`` runs it holds the GIL, so no Python thread writes to stderr in the
    window; C-level writers land in the file and are written back by :func:`read_backoff`.
    If fd 2 cannot be duplicated (no descriptors left), the block runs uncaptured.
    """
    global _capturing
    if _capturing:
        yield
        return
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    _capturing = True
    try:
        os.dup2(log_fd, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        _capturing = False


def read_backoff(path: Path, keep_verbose: bool, echo_fd: int = 2) -> ConnectBackoff | None:
    """The back-off MLX logged in ``path``; other lines are written to ``echo_fd``.

    ``keep_verbose``: the user had set ``MLX_RING_VERBOSE`` already, so every line is
    theirs and all are written back.
    """
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    refusals = waited = 0
    echo: list[str] = []
    for line in text.splitlines(keepends=True):
        m = _BACKOFF.match(line)
        if m is not None:
            refusals += 1
            waited += int(m[2])
        if keep_verbose or not _OURS.match(line):
            echo.append(line)
    if echo:
        data = "".join(echo).encode()
        with suppress(OSError):
            while data:
                data = data[os.write(echo_fd, data):]
    return ConnectBackoff(refusals, waited) if refusals else None


#: How long the last rank waits at most for the other ranks' listeners to appear (then
#: it dials anyway, and MLX's back-off is what it was before).
LISTENER_WAIT_LIMIT_S = 0.25
#: /proc/net/tcp's state code for LISTEN.
_TCP_LISTEN = "0A"


def _proc_key(host: str, port: int) -> str | None:
    """``host:port`` as /proc/net/tcp prints a local address (``0100007F:1F90``)."""
    try:
        packed = socket.inet_aton(host)
    except OSError:
        return None
    return f"{int.from_bytes(packed, sys.byteorder):08X}:{port:04X}"


def _is_local(host: str) -> bool:
    """Whether ``host`` is an address of this network namespace (a bind to it works)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError:
            return False
    return True


def _listening() -> set[str] | None:
    """The local addresses in LISTEN state (/proc/net/tcp's form); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    found: set[str] = set()
    try:
        with open("/proc/net/tcp", encoding="ascii") as table:
            next(table, None)  # header
            for line in table:
                fields = line.split(maxsplit=4)
                if len(fields) > 3 and fields[3] == _TCP_LISTEN:
                    found.add(fields[1])
    except OSError:
        return None
    return found


def _local_key(endpoint: str) -> str | None:
    """``endpoint``'s /proc/net/tcp key if its address is local here, else None."""
    host, _, port_text = endpoint.rpartition(":")
    key = _proc_key(host, int(port_text)) if port_text.isdigit() else None
    return key if key is not None and _is_local(host) else None


def listener_state(endpoint: str) -> bool | None:
    """Whether a TCP listener is up at ``endpoint`` (``"ip:port"``) in this namespace.

    None when it cannot be told from here: not Linux (no /proc/net/tcp), or the address
    is not local (another host: the go signal's network trip is the head start there).
    """
    key = _local_key(endpoint)
    listening = _listening() if key is not None else None
    return None if key is None or listening is None else key in listening


def listeners_before_dial(backend: str, rank: int, world_size: int,
                          topology: tuple[tuple[object, ...], ...]) -> list[str]:
    """What the ring's last rank waits for: every other rank's first address.

    Its dial to rank 0 starts the chain, and each rank in it dials its right neighbour
    the moment its accept returns: a rank released with the others but not yet
    listening when the chain reaches it is refused too.
    """
    if backend != "ring" or world_size < 2 or rank != world_size - 1:
        return []
    out = []
    for entry in topology[:world_size - 1]:
        first = entry[0] if entry else None
        if isinstance(first, str):
            out.append(first)
    return out


async def await_ring_listeners(backend: str, rank: int, world_size: int,
                               topology: tuple[tuple[object, ...], ...]) -> None:
    """The ring's last rank, before init: wait for the other ranks' local listeners."""
    await await_local_listeners(listeners_before_dial(backend, rank, world_size, topology))


async def await_local_listeners(endpoints: list[str],
                                limit: float = LISTENER_WAIT_LIMIT_S) -> None:
    """Wait (polling every ms, at most ``limit``) until every endpoint of ``endpoints``
    that is local (:func:`listener_state`) listens; return at once if none is."""
    keys = {key for key in map(_local_key, endpoints) if key is not None}
    if not keys:
        return
    # Polled: nothing wakes a process when another one starts listening.
    deadline = trio.current_time() + limit
    for _ in range(int(limit / 0.001) + 1):
        listening = _listening()
        if listening is None or keys <= listening or trio.current_time() >= deadline:
            return
        await trio.sleep(0.001)
