"""``clusterfsm serve --supervise``: the supervisor process of one rank.

It runs the rank as ``python -m clusterfsm.states.cli serve ...`` (the same flags, without the
supervisor's own) in a child process, echoes the child's lines prefixed with its
generation (``[gen 2] rank 0: ...``), logs its own transitions
(``supervisor rank 0: running --child_lost--> stopping (...)``) and the time each
recovery took, and restarts the child as :mod:`clusterfsm.states.supervisor` decides.

Exit codes: 0 stopped on request (SIGINT/SIGTERM; the child is stopped first);
1 the supervisor ended in an error state (``restart_budget_exhausted``, ...), printed
as ``supervisor rank R: state STATE, error TYPE: message``; 2 bad usage.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys

import trio

from clusterfsm.fsm import TraceRecord, TraceWriter, effective_deadlines
from clusterfsm.states.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from clusterfsm.states.machine import BOOTSTRAP
from clusterfsm.states.supervisor import (
    ProcessLauncher,
    RestartPolicy,
    SupervisorContext,
    child_command,
    parse_backoff,
    run_supervisor,
)

#: Added to the sum of the child's own deadlines to bound one bootstrap.
BOOTSTRAP_MARGIN_S = 10.0


def policy_from(args: argparse.Namespace) -> RestartPolicy:
    """The restart policy from ``--max-restarts``, ``--restart-backoff``, ``--stop-grace``
    and the child's ``--deadline`` values (a generation gets their sum plus a margin)."""
    low, high = parse_backoff(args.restart_backoff)
    deadlines = effective_deadlines(BOOTSTRAP, dict(args.deadline))
    return RestartPolicy(
        max_restarts=args.max_restarts,
        backoff_min_s=low,
        backoff_max_s=high,
        stop_grace_s=args.stop_grace,
        bootstrap_timeout_s=sum(deadlines.values()) + BOOTSTRAP_MARGIN_S,
    )


def _write(stream: str, text: str) -> None:
    out = sys.stdout if stream == "stdout" else sys.stderr
    out.write(text + "\n")
    out.flush()


def run_supervised(args: argparse.Namespace) -> int:
    if args.once:
        _write("stderr", "clusterfsm serve: --supervise keeps the rank running; "
                         "it cannot be combined with --once")
        return EXIT_USAGE
    try:
        policy = policy_from(args)
    except ValueError as exc:
        _write("stderr", f"clusterfsm serve: {exc}")
        return EXIT_USAGE
    argv: list[str] = list(getattr(args, "argv", None) or sys.argv[1:])
    return trio.run(_supervise, args, argv, policy)


async def _supervise(args: argparse.Namespace, argv: list[str], policy: RestartPolicy
                     ) -> int:
    prefix = f"supervisor rank {args.rank}"
    trace = args.trace_json
    writer = TraceWriter(trace) if trace else None

    def log(text: str) -> None:
        _write("stdout", f"{prefix}: {text}")

    def echo(generation: int, stream: str, line: str) -> None:
        _write(stream, f"[gen {generation}] {line}")

    def on_transition(record: TraceRecord) -> None:
        log(f"{record.source} --{record.event}--> {record.dest} ({record.elapsed_ms:.1f} ms)")

    launcher = ProcessLauncher(child_command(argv, trace), echo=echo)
    contexts: list[SupervisorContext] = []
    async with trio.open_nursery() as nursery:
        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    if contexts:
                        contexts[0].request_stop()

        nursery.start_soon(on_signals)
        observers = [on_transition, *([writer.record] if writer else [])]
        outcome = await run_supervisor(
            launcher, policy, rng=random.Random(), log=log, observers=observers,
            started=contexts.append)
        nursery.cancel_scope.cancel()
    if writer is not None:
        writer.finish(outcome.end_record())
    if outcome.error is not None:
        _write("stderr", f"{prefix}: state {outcome.state}, error "
                         f"{type(outcome.error).__name__}: {outcome.error}")
        return EXIT_FAILED
    ctx = contexts[0]
    if ctx.recoveries:
        log("recoveries: " + ", ".join(f"{s:.3f} s" for s in ctx.recoveries))
    return EXIT_OK
