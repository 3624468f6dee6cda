"""A supervised rank's child process: starting it, and what its output lines report.

The supervisor machine (:mod:`clusterfsm.states.supervisor`) sees a generation only
through a :class:`Launcher` that starts it and a :class:`Child` handle, and learns
what happens to it through events in its inbox (:data:`InboxItem`). This module is the
real thing: :class:`ProcessLauncher` runs the rank as a child process, gives it its
epoch and the epoch floors in its environment (:mod:`clusterfsm.states.epochs`), and
reads its stdout and stderr line by line, turning each line of the ``serve`` line
protocol (:mod:`clusterfsm.states.lines`) into an event (:func:`child_event`). A
child's exit is seen by ``wait()``, not by the pipes' EOF (the watchdog grandchild
may hold them open), and is sent as :class:`ChildExited` once it has been reaped.
Each child also gets a lifeline pipe (:mod:`clusterfsm.states.lifeline`): if this
process dies, even by SIGKILL, the child follows it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import attrs
import trio

from clusterfsm.states.child_process import PDEATHSIG_SPAWN, PidfdProcess, spawn_here
from clusterfsm.states.epochs import EPOCH_ENV, EPOCH_FLOORS_ENV, format_floors
from clusterfsm.states.lifeline import lifeline_env, open_lifeline
from clusterfsm.states.lines import (
    AdmissionLine,
    EchoLine,
    ErrorLine,
    ReadyLine,
    TransitionLine,
    parse_line,
)
from clusterfsm.states.watchdog_main import GENERATION_DIR_ENV

# -- what a child reports -----------------------------------------------------------


@attrs.frozen
class ChildTransition:
    """The child's machine moved to ``dest`` (a transition log line)."""

    generation: int
    source: str
    event: str
    dest: str


@attrs.frozen
class ChildReady:
    """The child printed ``DistributedGroup ready`` (after ``--verify``'s all_sum)."""

    generation: int
    session: str
    line: str


@attrs.frozen
class ChildFailed:
    """The child printed its error state and error type (stderr)."""

    generation: int
    state: str
    error: str
    detail: str


@attrs.frozen
class ChildExited:
    """The child process ended and was reaped."""

    generation: int
    returncode: int


@attrs.frozen
class StopRequested:
    """The operator (a signal) or the embedding app asked the supervisor to stop."""


ChildEvent = ChildTransition | ChildReady | ChildFailed | ChildExited
InboxItem = ChildEvent | StopRequested


def child_event(generation: int, line: str) -> ChildEvent | None:
    """The event a child's output line reports, or None for any other line."""
    parsed = parse_line(line)
    if isinstance(parsed, TransitionLine):
        return ChildTransition(generation, parsed.source, parsed.event, parsed.dest)
    if isinstance(parsed, ReadyLine):
        return ChildReady(generation, parsed.session, line)
    if isinstance(parsed, ErrorLine):
        return ChildFailed(generation, parsed.state, parsed.error, parsed.detail)
    return None


def echo_line(generation: int, stream: str, line: str) -> None:
    """Repeat a child's line on this process's own stream of the same name, prefixed
    with its generation (:class:`clusterfsm.states.lines.EchoLine`)."""
    out = sys.stdout if stream == "stdout" else sys.stderr
    out.write(EchoLine(generation, line).format() + "\n")
    out.flush()


# -- the child process --------------------------------------------------------------


class Child(Protocol):
    """One running generation, as the supervisor sees it."""

    generation: int
    epoch: int

    @property
    def pid(self) -> int | None: ...

    @property
    def returncode(self) -> int | None: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...

    async def wait(self) -> int: ...


class Launcher(Protocol):
    """Starts generation ``generation`` with ``epoch``; events go to ``inbox``.

    The launcher runs the child's reader tasks in ``nursery`` and sends a
    :class:`ChildExited` when the child has been reaped.
    """

    async def launch(self, generation: int, epoch: int, nursery: trio.Nursery,
                     inbox: trio.MemorySendChannel[InboxItem]) -> Child: ...


class ProcessChild:
    """A real child process with its stdout/stderr watched: a ``trio.Process``, or on
    Linux one forked from the supervisor's thread (:mod:`clusterfsm.states.child_process`).
    """

    def __init__(self, process: trio.Process | PidfdProcess, generation: int,
                 epoch: int) -> None:
        self.process = process
        self.generation = generation
        self.epoch = epoch

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def terminate(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()

    async def wait(self) -> int:
        return await self.process.wait()


class ProcessLauncher:
    """Starts ``command(generation, epoch)`` as a child and relays its lines.

    The epoch is also in the child's environment (:data:`EPOCH_ENV`), and so are the
    epoch floors (:data:`EPOCH_FLOORS_ENV`): the newest epoch per joiner rank that any
    earlier child reported admitting on its stdout (:attr:`epoch_floors`).

    Every line is passed to ``echo(generation, stream, line)`` (the supervisor prints
    them, prefixed, so the operator still sees the rank's own log) and parsed into
    events with :func:`child_event`.
    """

    def __init__(self, command: Callable[[int, int], Sequence[str]], *,
                 env: Mapping[str, str] | None = None,
                 echo: Callable[[int, str, str], None] = lambda g, s, line: None) -> None:
        self.command = command
        self.env = dict(os.environ if env is None else env)
        self.env.pop(EPOCH_FLOORS_ENV, None)  # ours to set, from what our children saw
        self.echo = echo
        #: rank -> newest epoch a child of ours admitted for that rank.
        self.epoch_floors: dict[int, int] = {}

    async def launch(self, generation: int, epoch: int, nursery: trio.Nursery,
                     inbox: trio.MemorySendChannel[InboxItem]) -> Child:
        # A private TMPDIR per generation: a child killed by SIGKILL cannot remove its
        # topology directory; removing this one after the reap leaves nothing behind
        # (and if we are killed too, the child's watchdog removes it: watchdog_main).
        tmpdir = tempfile.mkdtemp(prefix=f"clusterfsm-gen{generation}-",
                                  dir=self.env.get("TMPDIR"))
        env = dict(self.env, **{EPOCH_ENV: str(epoch), "TMPDIR": tmpdir,
                                GENERATION_DIR_ENV: tmpdir})
        if self.epoch_floors:
            env[EPOCH_FLOORS_ENV] = format_floors(self.epoch_floors)
        # Ours stays open, unwritten, until the child is reaped; its EOF tells the
        # child that we are gone (clusterfsm.states.lifeline).
        lifeline, keep = open_lifeline()
        env.update(lifeline_env(lifeline, pdeathsig=PDEATHSIG_SPAWN))
        argv = list(self.command(generation, epoch))
        process: trio.Process | PidfdProcess
        stdout: trio.abc.ReceiveStream
        stderr: trio.abc.ReceiveStream
        try:
            if PDEATHSIG_SPAWN:
                process, stdout, stderr = spawn_here(argv, env, (lifeline,))
                nursery.start_soon(process.reap)
            else:
                process = await trio.lowlevel.open_process(
                    argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                    pass_fds=(lifeline,))
                assert process.stdout is not None and process.stderr is not None
                stdout, stderr = process.stdout, process.stderr
        except OSError:
            shutil.rmtree(tmpdir, ignore_errors=True)
            os.close(keep)
            raise
        finally:
            os.close(lifeline)
        child = ProcessChild(process, generation, epoch)
        for name, stream in (("stdout", stdout), ("stderr", stderr)):
            nursery.start_soon(self._relay, generation, name, stream, inbox.clone())
        nursery.start_soon(self._reap, child, inbox.clone(), tmpdir, keep)
        return child

    async def _relay(self, generation: int, name: str, stream: trio.abc.ReceiveStream,
                     inbox: trio.MemorySendChannel[InboxItem]) -> None:
        buffer = b""
        async with inbox, stream:
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    chunk = b""
                if not chunk:
                    break
                buffer += chunk
                while b"\n" in buffer:
                    raw, buffer = buffer.split(b"\n", 1)
                    self._line(generation, name, raw, inbox)
            if buffer:
                self._line(generation, name, buffer, inbox)

    def _line(self, generation: int, name: str, raw: bytes,
              inbox: trio.MemorySendChannel[InboxItem]) -> None:
        line = raw.decode(errors="replace").rstrip("\r")
        self.echo(generation, name, line)
        admitted = AdmissionLine.parse(line) if name == "stdout" else None
        if admitted is not None:
            floor = self.epoch_floors.get(admitted.rank, 0)
            self.epoch_floors[admitted.rank] = max(floor, admitted.epoch)
        event = child_event(generation, line)
        if event is not None:
            inbox.send_nowait(event)

    async def _reap(self, child: ProcessChild, inbox: trio.MemorySendChannel[InboxItem],
                    tmpdir: str, lifeline: int) -> None:
        async with inbox:
            try:
                code = await child.wait()
            finally:
                os.close(lifeline)
                # Our own directory; a file the watchdog is still removing is no error.
                shutil.rmtree(tmpdir, ignore_errors=True)
            inbox.send_nowait(ChildExited(child.generation, code))



__all__ = [
    "Child",
    "ChildEvent",
    "ChildExited",
    "ChildFailed",
    "ChildReady",
    "ChildTransition",
    "InboxItem",
    "Launcher",
    "ProcessChild",
    "ProcessLauncher",
    "StopRequested",
    "child_event",
    "echo_line",
]
