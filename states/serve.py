"""``clusterfsm serve``: run one rank until ready (``--once``) or until stopped.

Logs each transition, prints ``DistributedGroup ready rank= size=`` when the group is
up (after an ``all_sum`` with ``--verify``), and on failure prints the error state and
the error type and exits 1. SIGINT/SIGTERM before ready cancel the machine (exit 130);
in ready they close the cluster cleanly.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

import trio

from clusterfsm.fsm import TraceRecord
from clusterfsm.states.config import ClusterConfig
from clusterfsm.states.epochs import (
    EPOCH_ENV,
    EPOCH_FLOORS_ENV,
    parse_epoch,
    parse_floors,
    report_admissions,
)
from clusterfsm.states.exitcodes import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from clusterfsm.states.keys import KeyFileError, load_key
from clusterfsm.states.nodeid import load_or_create_node_id


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
    # Set by a supervisor (serve --supervise): this process's generation, and the
    # newest generation per rank its earlier coordinators admitted (stale refusal).
    if EPOCH_ENV in os.environ:
        extra["epoch"] = parse_epoch(os.environ[EPOCH_ENV])
    if EPOCH_FLOORS_ENV in os.environ:
        extra["epoch_floors"] = parse_floors(os.environ[EPOCH_FLOORS_ENV])
    return ClusterConfig(
        rank=rank,
        world_size=args.world_size,
        key=load_key(args.key_file),
        listen=args.listen,
        peers=tuple(args.peer),
        backend=args.backend,
        deadlines=dict(args.deadline),
        verify=args.verify,
        interfaces=tuple(args.interface),
        **extra,  # type: ignore[arg-type]
    )


def run_serve(args: argparse.Namespace) -> int:
    if getattr(args, "supervise", False):
        from clusterfsm.states.supervisor_cli import run_supervised

        return run_supervised(args)
    try:
        config = _config_from(args)  # --deadline was checked when parsed (cli)
        if args.trace_json:
            _check_trace_path(args.trace_json)
    except (ValueError, KeyFileError) as exc:
        print(f"clusterfsm serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if config.epoch:
        # Supervised: the supervisor learns admitted epochs from these stdout lines.
        report_admissions(sys.stdout)
    return trio.run(_serve_async, config, args.trace_json, args.once, args.quiet)



def _check_trace_path(path: str) -> None:
    """Refuse a ``--trace-json`` path that cannot be created, before the machine runs.

    The trace file is opened when the machine starts; a missing directory found there
    would end the run in ``unexpected`` (a FileNotFoundError) instead of a usage error.
    """
    target = Path(path)
    parent = target.parent
    if not parent.is_dir():
        raise ValueError(f"--trace-json {path}: directory {str(parent)!r} does not exist")
    if target.is_dir():
        raise ValueError(f"--trace-json {path}: is a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--trace-json {path}: directory {str(parent)!r} is not writable")


async def _serve_async(config: ClusterConfig, trace: str | None, once: bool,
                       quiet: bool) -> int:
    from clusterfsm.states.api import bootstrap_cluster
    from clusterfsm.states.errors import PeerLost, printable

    # --rank auto: the rank is elected in discovering; name the node until then.
    prefix = (f"rank {config.rank}" if config.rank is not None
              else f"node {config.node_id.hex()[:8]}")

    def log(record: TraceRecord) -> None:
        if not quiet:
            print(f"{prefix}: {record.source} --{record.event}--> {record.dest} "
                  f"({record.elapsed_ms:.1f} ms)", flush=True)

    stop = trio.Event()
    code = EXIT_OK
    async with trio.open_nursery() as nursery:
        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    stop.set()
                    return

        nursery.start_soon(on_signals)
        with trio.CancelScope() as scope:
            is_ready = False

            async def cancel_on_stop() -> None:
                await stop.wait()
                if not is_ready:  # in ready, the wait below closes the cluster cleanly
                    scope.cancel()

            nursery.start_soon(cancel_on_stop)
            try:
                async with bootstrap_cluster(config, observers=[log],
                                             trace_path=trace) as cluster:
                    if config.verify:
                        total = await _verify(cluster.group)
                        expected = config.world_size * (config.world_size + 1) / 2
                        print(f"{prefix}: all_sum = {total:g} (expected {expected:g})",
                              flush=True)
                        if total != expected:
                            print(f"{prefix}: all_sum is wrong", file=sys.stderr)
                            code = EXIT_FAILED
                    if code == EXIT_OK:
                        print(f"DistributedGroup ready rank={cluster.rank} "
                              f"size={cluster.group.size()} backend={config.backend} "
                              f"session={cluster.session_id.hex()}", flush=True)
                    is_ready = True
                    if not once and code == EXIT_OK:
                        async with trio.open_nursery() as waiters:
                            async def lost() -> None:
                                await cluster.wait_lost()
                                waiters.cancel_scope.cancel()

                            waiters.start_soon(lost)
                            await stop.wait()
                            waiters.cancel_scope.cancel()
                        if isinstance(cluster.error, PeerLost):
                            print(f"{prefix}: state peer_lost, error PeerLost: "
                                  f"{printable(cluster.error)}", file=sys.stderr)
                            code = EXIT_FAILED
                        elif cluster.state == "peer_left":
                            print(f"{prefix}: state peer_left (a peer closed the cluster "
                                  "on purpose; the group is no longer usable)", flush=True)
            except Exception as exc:  # noqa: BLE001 - every machine error is reported
                state = _state_of(exc)
                print(f"{prefix}: state {state}, error {type(exc).__name__}: "
                      f"{printable(exc)}",
                      file=sys.stderr, flush=True)
                code = EXIT_FAILED
        if scope.cancelled_caught:
            print(f"{prefix}: stopped by signal", file=sys.stderr)
            code = EXIT_INTERRUPTED if code == EXIT_OK and once else code
        nursery.cancel_scope.cancel()
    return code


def _state_of(exc: BaseException) -> str:
    for note in getattr(exc, "__notes__", []):
        if "ended in state" in note:
            return str(note.rsplit("'", 2)[-2])
    return "unexpected"


async def _verify(group: Any) -> float:
    """``all_sum`` of ``rank + 1`` over the group, in a worker thread."""

    def all_sum() -> float:
        import mlx.core as mx

        out = mx.distributed.all_sum(mx.array([float(group.rank() + 1)]), group=group)
        mx.eval(out)
        value: Any = out.item()
        return float(value)

    return await trio.to_thread.run_sync(all_sum)
