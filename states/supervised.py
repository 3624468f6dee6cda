"""Supervised clusters for embedding apps: an async iterator of cluster generations.

::

    async def all_sum_loop(cluster: Cluster) -> None:   # module level: the child imports it
        ...                                            # the app's work on cluster.group

    async with supervise_ranks(["--rank", "0", "--world-size", "2", "--listen",
                                "10.0.0.1:7700", "--key-file", "cluster.key"],
                               worker=all_sum_loop) as gens:
        async for event in gens:       # ready, lost, ready again, ...
            print(event.kind, event.generation, event.detail)
    # leaving the block stops the rank (SIGTERM, grace, SIGKILL) and reaps it

What in-process supervision can and cannot do, honestly:

- ``mx.distributed.init`` holds the GIL and cannot be interrupted: a hung init
  freezes every thread of its process, the supervisor's included. So the supervisor
  cannot live in the process whose init may hang.
- MLX caches a successful group per process: after a peer is lost, a new init in the
  same process returns the dead group. So a process cannot be "re-bootstrapped" after
  ``ready`` either.
- Hence the group lives in a *child* process per generation, and this iterator tells
  the app (in the parent, which never imports MLX) when a generation is ready, lost or
  failed, with its session id. Work that needs the group runs in the child: the
  ``worker`` (an async function of the ready cluster, :mod:`clusterfsm.states.worker`),
  which each generation's child (``python -m clusterfsm.states.cli serve ... --worker
  MODULE:FUNCTION``) imports and runs. A worker that raises ends its generation (the
  child's error line names ``worker_failed`` and the error type; the supervisor starts a
  new one). Without a worker the child only holds the group. ``command`` replaces the
  child entirely: any program that keeps the ``serve`` line protocol
  (:mod:`clusterfsm.states.lines`), reads its epoch with
  :func:`clusterfsm.states.epochs.supervised_config` and follows its lifeline
  (:mod:`clusterfsm.states.lifeline`).
- The child's stdout and stderr reach this process's, each line prefixed with its
  generation (``[gen 2] rank 0: ...``), unless ``echo=None`` (or another function).
- The child dies with this process, even if it is SIGKILLed (the lifeline).
- What *can* be retried in one process is a failure before init (a handshake timeout,
  a peer that disconnected before the barrier): ``bootstrap_cluster`` raised, nothing
  is cached, a new call makes a new session. That needs no supervisor: call
  ``bootstrap_cluster`` again.

The iterator ends when the supervisor stops; if it ended in an error state, iterating
raises that typed error (e.g. :class:`~clusterfsm.states.supervisor.RestartBudgetExhausted`),
bare: it leaves the ``async with`` as itself, not inside an ExceptionGroup (and so does
an exception of the app's own block).
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Literal

import attrs
import trio

from clusterfsm.fsm import Outcome
from clusterfsm.states.supervisor import RestartPolicy, SupervisorContext, run_supervisor
from clusterfsm.states.supervisor_child import ProcessLauncher, echo_line
from clusterfsm.states.supervisor_cli import child_command
from clusterfsm.states.worker import Worker, worker_spec

GenerationKind = Literal["ready", "lost", "failed"]


@attrs.frozen
class GenerationEvent:
    """One step of the supervised rank's story.

    ``ready``: generation ``generation`` has its group (``detail`` is the session id);
    ``lost``: a ready generation lost a peer or died; ``failed``: a generation ended
    before ready. ``detail`` of the last two says how (state, error type, exit code).
    """

    kind: GenerationKind
    generation: int
    detail: str


class Generations:
    """The async iterator of :class:`GenerationEvent` (see :func:`supervise_ranks`)."""

    def __init__(self, receive: trio.MemoryReceiveChannel[GenerationEvent]) -> None:
        self._receive = receive
        self.outcome: Outcome | None = None
        self.context: SupervisorContext | None = None

    def __aiter__(self) -> Generations:
        return self

    async def __anext__(self) -> GenerationEvent:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            if self.outcome is not None and self.outcome.error is not None:
                raise self.outcome.error from None
            raise StopAsyncIteration from None

    def stop(self) -> None:
        """Ask the supervisor to stop the current generation and end the iteration."""
        if self.context is not None:
            self.context.request_stop()


@asynccontextmanager
async def supervise_ranks(
    serve_args: Sequence[str],
    *,
    policy: RestartPolicy | None = None,
    worker: Worker | str | None = None,
    command: Callable[[int, int], Sequence[str]] | None = None,
    rng: random.Random | None = None,
    log: Callable[[str], None] = lambda _text: None,
    echo: Callable[[int, str, str], None] | None = echo_line,
) -> AsyncIterator[Generations]:
    """Supervise one rank (``serve`` flags in ``serve_args``) in child processes.

    ``worker`` (an importable async function, or its ``MODULE:FUNCTION`` name) runs
    with the ready cluster in every generation's child. ``echo(generation, stream,
    line)`` gets each child line (default: printed on this process's stream, prefixed).
    Leaving the block stops the current child (SIGTERM, grace, SIGKILL) and reaps it,
    also when the block raises or is cancelled. Raises ``ValueError`` (a
    :class:`~clusterfsm.states.worker.WorkerSpecError`) for a worker a child cannot
    import by name, or a worker together with ``command``.
    """
    if worker is not None and command is not None:
        raise ValueError("give a worker or a child command, not both")
    args = ["serve", *serve_args]
    if worker is not None:
        args += ["--worker", worker_spec(worker)]
    send, receive = trio.open_memory_channel[GenerationEvent](math.inf)
    generations = Generations(receive)
    launcher = ProcessLauncher(command or child_command(args, None),
                               echo=echo or (lambda _g, _s, _line: None))

    def on_generation(kind: str, generation: int, detail: str) -> None:
        assert kind in ("ready", "lost", "failed")
        send.send_nowait(GenerationEvent(kind, generation, detail))  # type: ignore[arg-type]

    def started(ctx: SupervisorContext) -> None:
        generations.context = ctx

    try:
        async with trio.open_nursery() as nursery:
            async def supervise() -> None:
                async with send:
                    generations.outcome = await run_supervisor(
                        launcher, policy or RestartPolicy(), rng=rng, log=log,
                        on_generation=on_generation, started=started)

            nursery.start_soon(supervise)
            try:
                yield generations
            finally:
                generations.stop()
                if generations.context is None:
                    nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The supervisor task does not raise (its errors are its outcome); a group
        # here carries the one exception of the app's block, e.g. the typed error
        # iterating raised. Hand it back as itself.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


__all__ = ["GenerationEvent", "Generations", "supervise_ranks"]
