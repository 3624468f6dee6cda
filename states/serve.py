"""``clusterfsm serve``: run one rank until ready (``--once``) or until stopped.

Logs each transition, prints ``DistributedGroup ready rank= size=`` when the group is
up (after an ``all_sum`` with ``--verify``), and on failure prints the error state and
the error type and exits 1. SIGINT/SIGTERM before ready cancel the machine (exit 130);
in ready they close the cluster cleanly. Every line it prints is a kind of the
``serve`` line protocol (:mod:`clusterfsm.states.lines`), which supervisors and the
demo read.

:func:`run_serve` is the command line (flags to a :class:`ClusterConfig`);
:func:`serve` runs one rank from a config and is what the demo's forked ranks call.
``serve --supervise`` is not here: the CLI hands it to
:mod:`clusterfsm.states.supervisor_cli`, so a rank never imports the supervisor.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, TextIO

import attrs
import trio

from clusterfsm.fsm import TraceRecord
from clusterfsm.fsm.spec import UNEXPECTED_STATE
from clusterfsm.states.config import ClusterConfig
from clusterfsm.states.epochs import report_admissions, supervised_config
from clusterfsm.states.exitcodes import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from clusterfsm.states.keys import KeyFileError, load_key
from clusterfsm.states.lifeline import die_with_parent, watch_lifeline
from clusterfsm.states.lines import (
    AllSumLine,
    ErrorLine,
    PeerLeftLine,
    RankLine,
    ReadyLine,
    StoppedLine,
    TransitionLine,
    UsageLine,
    VerifyFailedLine,
    rank_speaker,
)
from clusterfsm.states.nodeid import load_or_create_node_id
from clusterfsm.states.worker import WORKER_FAILED, Worker, hold_group, load_worker


@attrs.frozen
class ServeOptions:
    """How :func:`serve` runs a rank, besides its :class:`ClusterConfig`.

    ``trace_json``: write the trace there; ``once``: exit 0 once ready instead of
    staying in ready until a signal or a lost peer; ``quiet``: no transition lines;
    ``worker``: the app's code, run with the ready cluster (:mod:`clusterfsm.states.worker`).
    """

    trace_json: str | None = None
    once: bool = False
    quiet: bool = False
    worker: Worker | None = None


def _config_from(args: argparse.Namespace) -> ClusterConfig:
    rank: int | None = None
    if args.rank != "auto":
        try:
            rank = int(args.rank)
        except ValueError as exc:
            raise ValueError(f"--rank must be an integer or 'auto', got {args.rank!r}") from exc
    extra: dict[str, object] = {}
    if args.interface:
        # Elections need a stable id per machine; static peers get one per run.
        try:
            extra["node_id"] = load_or_create_node_id(args.node_id_file)
        except OSError as exc:
            raise ValueError(f"cannot read or create the node-id file: {exc}") from exc
        extra["beacon_port"] = args.beacon_port
    elif args.rank == "auto":
        raise ValueError("--rank auto elects ranks among the nodes heard on --interface; "
                         "give --interface IF, or an explicit --rank N")
    # A supervisor (serve --supervise) sets this process's generation and the newest
    # generation per rank its earlier coordinators admitted (stale refusal).
    return supervised_config(ClusterConfig(
        rank=rank,
        world_size=args.world_size,
        key=load_key(args.key_file),
        listen=args.listen,
        peers=tuple(args.peer),
        backend=args.backend,
        deadlines=dict(args.deadline),
        verify=args.verify,
        peer_lost_after=args.peer_lost_after,
        interfaces=tuple(args.interface),
        compat=dict(getattr(args, "compat", [])),
        **extra,  # type: ignore[arg-type]
    ))


def run_serve(args: argparse.Namespace) -> int:
    """``clusterfsm serve`` without ``--supervise``: flags to a config, then :func:`serve`."""
    try:
        config = _config_from(args)
        check_config(config)
        if args.trace_json:
            check_output_path(args.trace_json)
        worker = load_worker(args.worker) if args.worker else None
    except (ValueError, KeyFileError) as exc:
        _emit(UsageLine("serve", str(exc)))
        return EXIT_USAGE
    return serve(config, ServeOptions(args.trace_json, args.once, args.quiet, worker))


def check_config(config: ClusterConfig) -> None:
    """The runner's own deadline rule, applied before anything runs.

    Raises :class:`clusterfsm.fsm.DeadlineOverrideError` (a ``ValueError``) naming the
    state and the states that take a deadline, so a bad override is a usage error and
    never an ``unexpected`` end of the machine.
    """
    from clusterfsm.fsm import effective_deadlines
    from clusterfsm.states.machine import BOOTSTRAP

    effective_deadlines(BOOTSTRAP, dict(config.deadlines))


def serve(config: ClusterConfig, options: ServeOptions) -> int:
    """Run one rank in this process until ready (``once``) or stopped; its exit code.

    Blocks (it runs its own ``trio.run``); prints the ``serve`` line protocol on this
    process's stdout and stderr. A supervised child dies with its supervisor
    (:mod:`clusterfsm.states.lifeline`).
    """
    die_with_parent()
    if config.epoch:
        # Supervised: the supervisor learns admitted epochs from these stdout lines.
        report_admissions(sys.stdout)
    return trio.run(_serve_async, config, options)


def check_output_path(path: str, flag: str = "--trace-json") -> None:
    """Refuse an output path (``--trace-json``, ``demo --report``) that cannot be
    created, before anything runs.

    The trace file is opened when the machine starts; a missing directory found there
    would end the run in ``unexpected`` (a FileNotFoundError) instead of a usage error,
    or, in the demo's ranks, leave no trace and no word of it.
    """
    target = Path(path)
    parent = target.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: directory {str(parent)!r} does not exist")
    if target.is_dir():
        raise ValueError(f"{flag} {path}: is a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: directory {str(parent)!r} is not writable")


def _emit(line: RankLine) -> None:
    """Print one line of the ``serve`` line protocol on its own stream."""
    stream: TextIO = sys.stdout if line.stream == "stdout" else sys.stderr
    print(line.format(), file=stream, flush=True)


def error_state_of(exc: BaseException) -> str:
    """The bootstrap machine's error state for ``exc`` (``unexpected`` if none is bound)."""
    from clusterfsm.states.machine import BOOTSTRAP

    bound = BOOTSTRAP.error_state_for(type(exc))
    return UNEXPECTED_STATE if bound is None else bound.name


async def _serve_async(config: ClusterConfig, options: ServeOptions) -> int:
    from clusterfsm.states.api import bootstrap_cluster
    from clusterfsm.states.errors import LinkLost, PeerLost

    # --rank auto: the rank is elected in discovering; the node's name is the speaker
    # for the whole run (the ready line gives the rank).
    speaker = rank_speaker(config.rank, config.node_id)

    def log(record: TraceRecord) -> None:
        if not options.quiet:
            _emit(TransitionLine(speaker, record.source, record.event, record.dest,
                                 record.elapsed_ms, record.note))

    stop = trio.Event()
    code = EXIT_OK
    async with trio.open_nursery() as nursery:
        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    stop.set()
                    return

        nursery.start_soon(on_signals)
        nursery.start_soon(watch_lifeline)
        with trio.CancelScope() as scope:
            is_ready = False

            async def cancel_on_stop() -> None:
                await stop.wait()
                if not is_ready:  # in ready, the wait below closes the cluster cleanly
                    scope.cancel()

            nursery.start_soon(cancel_on_stop)
            try:
                async with bootstrap_cluster(config, observers=[log],
                                             trace_path=options.trace_json) as cluster:
                    if config.verify:
                        try:
                            total = await _verify(cluster.group)
                        except VerifyFailed as exc:
                            _emit(ErrorLine(speaker, cluster.state, type(exc).__name__,
                                            str(exc)))
                            code = EXIT_FAILED
                        else:
                            expected = config.world_size * (config.world_size + 1) / 2
                            _emit(AllSumLine(speaker, total, expected))
                            if total != expected:
                                _emit(VerifyFailedLine(speaker))
                                code = EXIT_FAILED
                    if code == EXIT_OK:
                        _emit(ReadyLine(cluster.rank, cluster.group.size(), cluster.backend,
                                        cluster.session_id.hex()))
                    is_ready = True
                    if (options.worker or not options.once) and code == EXIT_OK:
                        failed = await hold_group(cluster, stop, options.worker)
                        if failed is not None:
                            traceback.print_exception(failed, file=sys.stderr)
                        if isinstance(cluster.error, PeerLost | LinkLost):
                            _emit(ErrorLine(speaker, cluster.state, type(cluster.error).__name__,
                                            str(cluster.error)))
                            code = EXIT_FAILED
                        elif failed is not None:
                            _emit(ErrorLine(speaker, WORKER_FAILED, type(failed).__name__,
                                            str(failed)))
                            code = EXIT_FAILED
                        elif cluster.state == "peer_left":
                            _emit(PeerLeftLine(speaker))
            except Exception as exc:  # noqa: BLE001 - every machine error is reported
                _emit(ErrorLine(speaker, error_state_of(exc), type(exc).__name__, str(exc)))
                code = EXIT_FAILED
        if scope.cancelled_caught:
            _emit(StoppedLine(speaker))
            # Only a stop before ready cancels the scope (in ready it closes the
            # cluster): interrupted, with or without --once (exitcodes).
            code = EXIT_INTERRUPTED if code == EXIT_OK else code
        nursery.cancel_scope.cancel()
    return code


#: ``--verify``'s ``all_sum`` runs once every rank has confirmed the group, and takes
#: milliseconds; a peer that never joins it (started without ``--verify``) would leave
#: this rank waiting inside MLX for as long as the peer lives.
VERIFY_TIMEOUT_S = 10.0


@attrs.frozen(auto_exc=True)
class VerifyFailed(Exception):
    """``--verify``'s ``all_sum`` did not complete: MLX failed it (a peer's connection
    was lost), or it did not finish within :data:`VERIFY_TIMEOUT_S`."""

    detail: str

    def __str__(self) -> str:
        return self.detail


async def _verify(group: Any) -> float:
    """``all_sum`` of ``rank + 1`` over the group, in a worker thread, bounded.

    The thread is abandoned at the bound (MLX cannot be interrupted; the process exits
    soon after, its peers learn of it by the close)."""

    def all_sum() -> float:
        import mlx.core as mx

        out = mx.distributed.all_sum(mx.array([float(group.rank() + 1)]), group=group)
        mx.eval(out)
        value: Any = out.item()
        return float(value)

    with trio.move_on_after(VERIFY_TIMEOUT_S):
        try:
            return await trio.to_thread.run_sync(all_sum, abandon_on_cancel=True)
        except RuntimeError as exc:  # MLX: "[ring] connection to a peer was lost"
            raise VerifyFailed(f"--verify: the all_sum failed: {exc}") from None
    raise VerifyFailed(f"--verify: the all_sum did not complete within {VERIFY_TIMEOUT_S:g} s "
                       "(does every rank run with --verify?)")
