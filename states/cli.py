"""``clusterfsm``: demo, serve, doctor, diagram, keygen, trace, report.

What ``serve`` prints is the ``serve`` line protocol (:mod:`clusterfsm.states.lines`).

Exit codes: 0 success; 1 the machine ended in an error state (the state and error
type are printed); 2 bad usage or configuration; 130 interrupted before ready.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from clusterfsm.states.config import BACKENDS, Address
from clusterfsm.states.discovery import DEFAULT_BEACON_PORT
from clusterfsm.states.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from clusterfsm.states.keys import KeyFileError, write_key


def _deadline(text: str) -> tuple[str, float]:
    """``STATE=SECONDS`` as text; whether the machine accepts it is :func:`_check_deadlines`'s."""
    state, sep, seconds = text.partition("=")
    try:
        value = float(seconds)
    except ValueError:
        value = math.nan  # refused below: not a number
    if not sep or not state or math.isnan(value):
        raise argparse.ArgumentTypeError(f"expected STATE=SECONDS, got {text!r}")
    return state, value


def _check_deadlines(deadlines: Sequence[tuple[str, float]]) -> str | None:
    """Why the bootstrap machine refuses these ``--deadline`` overrides, or None.

    The runner's own rule (:func:`clusterfsm.fsm.effective_deadlines`), applied once the
    flags are parsed and before anything runs: a bad override is a usage error, not a
    run that ends in ``unexpected`` (which a supervisor would restart).
    """
    if not deadlines:
        return None
    from clusterfsm.fsm import DeadlineOverrideError, effective_deadlines
    from clusterfsm.states.machine import BOOTSTRAP

    try:
        effective_deadlines(BOOTSTRAP, dict(deadlines))
    except DeadlineOverrideError as exc:
        return str(exc)
    return None


def _field(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _demo_ranks(text: str) -> int:
    from clusterfsm.states.demo import demo_problem

    try:
        ranks = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of ranks, got {text!r}") from None
    problem = demo_problem(ranks, 1.0)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return ranks


def _demo_timeout(text: str) -> float:
    from clusterfsm.states.demo import demo_problem

    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    problem = demo_problem(1, seconds)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return seconds


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
    demo.add_argument("--ranks", type=_demo_ranks, default=2,
                      help="how many ranks, 1..255 (1: MLX's single-process group)")
    demo.add_argument("--backend", choices=BACKENDS, default="ring")
    demo.add_argument("--trace-json", metavar="PATH",
                      help="write each rank's trace to PATH with .rankN before the suffix")
    demo.add_argument("--deadline", type=_deadline, action="append", default=[],
                      metavar="STATE=SECONDS")
    demo.add_argument("--timeout", type=_demo_timeout, default=120.0,
                      help="kill every rank after this many seconds (default 120)")
    demo.add_argument("--report", metavar="OUT.html",
                      help="also write the HTML report of the ranks' traces")

    serve = sub.add_parser("serve", help="run one rank")
    serve.add_argument("--rank", required=True, help="N, or auto (elected from node ids; "
                       "needs --interface)")
    serve.add_argument("--world-size", type=int, required=True)
    serve.add_argument("--listen", type=_address, metavar="HOST:PORT")
    serve.add_argument("--peer", type=_address, action="append", default=[],
                       metavar="HOST:PORT")
    serve.add_argument("--interface", action="append", default=[], metavar="IF",
                       help="discover the peers by UDP beacons on this interface "
                            "(repeatable; instead of --peer)")
    serve.add_argument("--node-id-file", metavar="F",
                       help="this machine's node id (created on first use; default "
                            "~/.config/clusterfsm/node-id)")
    serve.add_argument("--beacon-port", type=int, default=DEFAULT_BEACON_PORT, metavar="PORT",
                       help=f"UDP port of the discovery beacons (default {DEFAULT_BEACON_PORT})")
    serve.add_argument("--backend", choices=BACKENDS, default="ring")
    serve.add_argument("--key-file", metavar="F", required=True)
    serve.add_argument("--trace-json", metavar="PATH")
    serve.add_argument("--compat", type=_field, action="append", default=[],
                       metavar="KEY=VALUE",
                       help="an app-defined field every rank must match before init, "
                            "e.g. model=llama-70b (repeatable)")
    serve.add_argument("--verify", action="store_true",
                       help="all_sum over the group before reporting ready")
    serve.add_argument("--once", action="store_true", help="exit 0 once ready")
    serve.add_argument("--deadline", type=_deadline, action="append", default=[],
                       metavar="STATE=SECONDS")
    serve.add_argument("--peer-lost-after", type=float, default=3.0, metavar="SECONDS",
                       help="in ready, a peer silent this long is lost (default 3; more "
                            "than two heartbeat intervals of 0.1 s)")
    serve.add_argument("--quiet", action="store_true", help="do not log transitions")
    serve.add_argument("--worker", metavar="MODULE:FUNCTION",
                       help="run this async function with the ready cluster (the app's "
                            "code; with --supervise, in every generation)")
    serve.add_argument("--supervise", action="store_true",
                       help="run the rank in a child process and restart it (new session) "
                            "after peer_lost, a group-init deadline or a crash "
                            "(docs/operations.md)")
    serve.add_argument("--max-restarts", type=int, default=5, metavar="N",
                       help="with --supervise: consecutive restarts before giving up (5)")
    serve.add_argument("--restart-backoff", default="0.2:5", metavar="MIN:MAX",
                       help="with --supervise: jittered exponential back-off bounds (0.2:5 s)")
    serve.add_argument("--stop-grace", type=float, default=2.0, metavar="SECONDS",
                       help="with --supervise: SIGTERM to SIGKILL grace for a child (2 s)")

    diagram = sub.add_parser("diagram", help="write diagrams/ and generated docs")
    diagram.add_argument("--check", action="store_true",
                         help="exit 1 if the files on disk differ from the code")
    diagram.add_argument("--root", default=".", help="repository root (default .)")

    doctor = sub.add_parser("doctor", help="every pre-init check on this machine, with "
                            "the remedy; exit 0 only if a bootstrap could start")
    doctor.add_argument("--interface", action="append", default=[], metavar="IF")
    doctor.add_argument("--backend", choices=BACKENDS, default="ring")
    doctor.add_argument("--key-file", metavar="F")
    doctor.add_argument("--node-id-file", metavar="F")
    doctor.add_argument("--beacon-port", type=int, default=DEFAULT_BEACON_PORT, metavar="PORT")
    doctor.add_argument("--listen", type=_address, metavar="HOST:PORT")
    doctor.add_argument("--listen-seconds", type=float, default=1.5, metavar="S",
                        help="how long to listen for the peers' beacons (1.5)")
    doctor.add_argument("--json", action="store_true", help="one JSON object")

    keygen = sub.add_parser("keygen", help="write a new cluster key (mode 0600)")
    keygen.add_argument("path")

    trace = sub.add_parser("trace", help="latency per state of traces; the path on the diagram")
    trace.add_argument("files", nargs="+", metavar="FILE", help="JSON-lines trace, one per rank")
    trace.add_argument("--diagram", metavar="OUT.mmd|OUT.svg|OUT.dot",
                       help="draw the machine with the path taken (.svg needs Graphviz)")

    report = sub.add_parser("report", help="one self-contained HTML report of traces")
    report.add_argument("files", nargs="+", metavar="FILE", help="JSON-lines trace, one per rank")
    report.add_argument("--html", metavar="OUT.html", required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("serve", "demo"):
        problem = _check_deadlines(args.deadline)
        if problem is not None:
            print(f"clusterfsm {args.command}: {problem}", file=sys.stderr)
            return EXIT_USAGE
    if args.command == "keygen":
        return _keygen(args.path)
    if args.command == "diagram":
        return _diagram(Path(args.root), check=args.check)
    if args.command == "serve" and args.supervise:
        from clusterfsm.states.supervisor_cli import run_supervised

        args.argv = list(sys.argv[1:] if argv is None else argv)  # the child re-runs it
        return run_supervised(args)
    if args.command == "doctor":
        from clusterfsm.states.doctor import DoctorOptions, run_doctor

        try:
            options = DoctorOptions(
                tuple(args.interface), args.backend, args.key_file, args.node_id_file,
                args.beacon_port, args.listen, args.listen_seconds)
        except ValueError as exc:
            print(f"clusterfsm doctor: {exc}", file=sys.stderr)
            return EXIT_USAGE
        return run_doctor(options, as_json=args.json)
    if args.command == "serve":
        from clusterfsm.states.serve import run_serve

        return run_serve(args)
    if args.command == "demo":
        from clusterfsm.states.demo import DemoRun, run_demo

        def demo(trace_json: str | None) -> DemoRun:
            return run_demo(ranks=args.ranks, backend=args.backend, trace_json=trace_json,
                            deadlines=dict(args.deadline), timeout=args.timeout)

        if args.report:
            from clusterfsm.states.htmlreport import run_demo_with_report
            from clusterfsm.states.serve import check_output_path

            try:  # before the ranks run, not after
                check_output_path(args.report, "--report")
            except ValueError as exc:
                print(f"clusterfsm demo: {exc}", file=sys.stderr)
                return EXIT_USAGE

            def traced(base: str) -> tuple[int, Sequence[Path]]:
                run = demo(base)
                return run.code, run.traces

            return run_demo_with_report(traced, trace_json=args.trace_json, out=args.report)
        return demo(args.trace_json).code
    if args.command == "trace":
        from clusterfsm.states.tracereport import run_trace

        return run_trace(args.files, args.diagram)
    if args.command == "report":
        from clusterfsm.states.htmlreport import run_report

        return run_report(args.files, args.html)
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
    from clusterfsm.states import generated

    if not generated.is_checkout(root):
        print(f"clusterfsm diagram: {str(root)!r} is not a clusterfsm repository (no "
              "README.md with the generated diagram); run it in the repository's root, "
              "or pass --root", file=sys.stderr)
        return EXIT_USAGE
    if check:
        stale = generated.stale(root)
        for path in stale:
            print(f"out of date: {path} (run `clusterfsm diagram`)", file=sys.stderr)
        return EXIT_FAILED if stale else EXIT_OK
    for path in generated.write(root):
        print(f"wrote {path}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
