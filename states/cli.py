"""``clusterfsm``: demo, serve, diagram, keygen (the contract is DESIGN.md section 4).

Exit codes: 0 success; 1 the machine ended in an error state (the state and error
type are printed); 2 bad usage or configuration; 130 interrupted before ready.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from fsm import TraceRecord
from states.config import BACKENDS, Address, ClusterConfig
from states.keys import KeyFileError, load_key, write_key

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _deadline(text: str) -> tuple[str, float]:
    state, sep, seconds = text.partition("=")
    try:
        value = float(seconds)
    except ValueError:
        value = math.nan
    if not sep or not state or not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected STATE=SECONDS, got {text!r}")
    return state, value


def _address(text: str) -> Address:
    try:
        return Address.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clusterfsm",
        description="Bootstrap an MLX distributed group as a declared state machine.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run N local ranks on loopback and all_sum")
    demo.add_argument("--ranks", type=int, default=2)
    demo.add_argument("--backend", choices=BACKENDS, default="ring")
    demo.add_argument("--trace-json", metavar="PATH",
                      help="write each rank's trace to PATH with .rankN before the suffix")
    demo.add_argument("--deadline", type=_deadline, action="append", default=[],
                      metavar="STATE=SECONDS")
    demo.add_argument("--timeout", type=float, default=120.0,
                      help="kill every rank after this many seconds (default 120)")

    serve = sub.add_parser("serve", help="run one rank")
    serve.add_argument("--rank", required=True)
    serve.add_argument("--world-size", type=int, required=True)
    serve.add_argument("--listen", type=_address, metavar="HOST:PORT")
    serve.add_argument("--peer", type=_address, action="append", default=[],
                       metavar="HOST:PORT")
    serve.add_argument("--interface", action="append", default=[], metavar="IF")
    serve.add_argument("--backend", choices=BACKENDS, default="ring")
    serve.add_argument("--key-file", metavar="F", required=True)
    serve.add_argument("--trace-json", metavar="PATH")
    serve.add_argument("--verify", action="store_true",
                       help="all_sum over the group before reporting ready")
    serve.add_argument("--once", action="store_true", help="exit 0 once ready")
    serve.add_argument("--deadline", type=_deadline, action="append", default=[],
                       metavar="STATE=SECONDS")
    serve.add_argument("--quiet", action="store_true", help="do not log transitions")

    diagram = sub.add_parser("diagram", help="write diagrams/ and generated docs")
    diagram.add_argument("--check", action="store_true",
                         help="exit 1 if the files on disk differ from the code")
    diagram.add_argument("--root", default=".", help="repository root (default .)")

    keygen = sub.add_parser("keygen", help="write a new cluster key (mode 0600)")
    keygen.add_argument("path")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "keygen":
        return _keygen(args.path)
    if args.command == "diagram":
        return _diagram(Path(args.root), check=args.check)
    if args.command == "serve":
        return _serve(args)
    if args.command == "demo":
        from states.demo import run_demo

        return run_demo(ranks=args.ranks, backend=args.backend, trace_json=args.trace_json,
                        deadlines=dict(args.deadline), timeout=args.timeout)
    raise AssertionError(args.command)


def _keygen(path: str) -> int:
    try:
        written = write_key(path)
    except KeyFileError as exc:
        print(f"clusterfsm keygen: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote a new cluster key to {written} (mode 0600); copy it to every rank")
    return EXIT_OK


def _diagram(root: Path, *, check: bool) -> int:
    from states import generated

    if check:
        stale = generated.stale(root)
        for path in stale:
            print(f"out of date: {path} (run `clusterfsm diagram`)", file=sys.stderr)
        return EXIT_FAILED if stale else EXIT_OK
    for path in generated.write(root):
        print(f"wrote {path}")
    return EXIT_OK


def _config_from(args: argparse.Namespace) -> ClusterConfig:
    if args.rank == "auto":
        raise ValueError("--rank auto needs interface discovery, which is not built yet; "
                         "give --rank N")
    if args.interface:
        raise ValueError("--interface discovery is not built yet; use --peer HOST:PORT")
    try:
        rank = int(args.rank)
    except ValueError as exc:
        raise ValueError(f"--rank must be an integer or 'auto', got {args.rank!r}") from exc
    return ClusterConfig(
        rank=rank,
        world_size=args.world_size,
        key=load_key(args.key_file),
        listen=args.listen,
        peers=tuple(args.peer),
        backend=args.backend,
        deadlines=dict(args.deadline),
        verify=args.verify,
    )


def _serve(args: argparse.Namespace) -> int:
    try:
        config = _config_from(args)
        from states.machine import BOOTSTRAP

        known = {s.name for s in BOOTSTRAP.states if not s.final}
        for state in config.deadlines:
            if state not in known:
                raise ValueError(f"--deadline {state}=...: no such state "
                                 f"(one of: {', '.join(sorted(known))})")
    except (ValueError, KeyFileError) as exc:
        print(f"clusterfsm serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return trio.run(_serve_async, config, args.trace_json, args.once, args.quiet)


async def _serve_async(config: ClusterConfig, trace: str | None, once: bool,
                       quiet: bool) -> int:
    from states.api import bootstrap_cluster
    from states.errors import PeerLost

    prefix = f"rank {config.rank}"

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
                                  f"{cluster.error}", file=sys.stderr)
                            code = EXIT_FAILED
            except Exception as exc:  # noqa: BLE001 - every machine error is reported
                state = _state_of(exc)
                print(f"{prefix}: state {state}, error {type(exc).__name__}: {exc}",
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


if __name__ == "__main__":
    sys.exit(main())
