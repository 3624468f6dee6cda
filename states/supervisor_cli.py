"""``clusterfsm serve --supervise``: the supervisor process of one rank.

It runs the rank as ``python -m clusterfsm.states.cli serve ...`` (the same flags,
without the supervisor's own: :func:`child_command`) in a child process, echoes the
child's lines prefixed with its generation (``[gen 2] rank 0: ...``), logs its own
transitions (``supervisor rank 0: running --child_lost--> stopping (...)``) and the
time each recovery took, and restarts the child as :mod:`clusterfsm.states.supervisor`
decides. Every line it writes is a kind of :mod:`clusterfsm.states.lines`.

Exit codes: 0 stopped on request (SIGINT/SIGTERM; the child is stopped first);
1 the supervisor ended in an error state (``restart_budget_exhausted``, ...), printed
as ``supervisor rank R: state STATE, error TYPE: message``; 2 bad usage.
"""

from __future__ import annotations

import argparse
import math
import random
import signal
import sys
from collections.abc import Callable, Mapping, Sequence

import trio

from clusterfsm.fsm import TraceRecord, TraceWriter, effective_deadlines
from clusterfsm.states.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from clusterfsm.states.lines import (
    ErrorLine,
    LineKind,
    SupervisorNote,
    TransitionLine,
    UsageLine,
    supervisor_speaker,
)
from clusterfsm.states.machine import BOOTSTRAP
from clusterfsm.states.supervisor import (
    RestartPolicy,
    SupervisorContext,
    run_supervisor,
)
from clusterfsm.states.supervisor_child import ProcessLauncher, echo_line

# -- the child's command line ------------------------------------------------------

#: Flags of ``serve`` that belong to the supervisor, with whether they take a value.
SUPERVISOR_FLAGS: Mapping[str, bool] = {
    "--supervise": False,
    "--max-restarts": True,
    "--restart-backoff": True,
    "--stop-grace": True,
    "--trace-json": True,
    "--once": False,
}


def strip_flags(argv: Sequence[str], flags: Mapping[str, bool] = SUPERVISOR_FLAGS
                ) -> list[str]:
    """``argv`` without the supervisor's own flags (``--flag V`` and ``--flag=V``)."""
    out: list[str] = []
    skip = False
    for token in argv:
        if skip:
            skip = False
            continue
        name = token.split("=", 1)[0]
        if name in flags:
            skip = flags[name] and "=" not in token
            continue
        out.append(token)
    return out


def generation_trace_path(base: str, generation: int) -> str:
    """``run.jsonl`` -> ``run.gen3.jsonl``: one child trace per generation."""
    root, dot, ext = base.rpartition(".")
    if not dot or "/" in ext:
        return f"{base}.gen{generation}"
    return f"{root}.gen{generation}.{ext}"


def child_command(serve_argv: Sequence[str], trace: str | None
                  ) -> Callable[[int, int], list[str]]:
    """The child's command line per generation: ``serve`` without supervision."""
    base = strip_flags(serve_argv)

    def command(generation: int, _epoch: int) -> list[str]:
        cmd = [sys.executable, "-m", "clusterfsm.states.cli", *base]
        if trace:
            cmd += ["--trace-json", generation_trace_path(trace, generation)]
        return cmd

    return command


def parse_backoff(text: str) -> tuple[float, float]:
    """``MIN:MAX`` seconds, e.g. ``0.2:5``."""
    low, sep, high = text.partition(":")
    try:
        pair = (float(low), float(high if sep else low))
    except ValueError:
        raise ValueError(f"expected MIN:MAX seconds, got {text!r}") from None
    if not all(v > 0 and math.isfinite(v) for v in pair) or pair[0] > pair[1]:
        raise ValueError(f"expected 0 < MIN <= MAX seconds, got {text!r}")
    return pair


# -- running the supervisor ---------------------------------------------------------

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


def _emit(line: LineKind, stream: str) -> None:
    """Write one line of the ``serve`` line protocol (states.lines)."""
    _write(stream, line.format())


def run_supervised(args: argparse.Namespace) -> int:
    if args.once:
        _emit(UsageLine("serve", "--supervise keeps the rank running; it cannot be "
                                 "combined with --once"), UsageLine.stream)
        return EXIT_USAGE
    try:
        policy = policy_from(args)
    except ValueError as exc:
        _emit(UsageLine("serve", str(exc)), UsageLine.stream)
        return EXIT_USAGE
    argv: list[str] = list(getattr(args, "argv", None) or sys.argv[1:])
    return trio.run(_supervise, args, argv, policy)


async def _supervise(args: argparse.Namespace, argv: list[str], policy: RestartPolicy
                     ) -> int:
    speaker = supervisor_speaker(args.rank)
    trace = args.trace_json
    writer = TraceWriter(trace) if trace else None

    def log(text: str) -> None:
        _emit(SupervisorNote(speaker, text), SupervisorNote.stream)

    def on_transition(record: TraceRecord) -> None:
        _emit(TransitionLine(speaker, record.source, record.event, record.dest,
                             record.elapsed_ms), TransitionLine.stream)

    launcher = ProcessLauncher(child_command(argv, trace), echo=echo_line)
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
        _emit(ErrorLine(speaker, outcome.state, type(outcome.error).__name__,
                        str(outcome.error)), ErrorLine.stream)
        return EXIT_FAILED
    ctx = contexts[0]
    if ctx.recoveries:
        log("recoveries: " + ", ".join(f"{s:.3f} s" for s in ctx.recoveries))
    return EXIT_OK
