"""The service examples (examples/service/) run what they claim, with restart policies
that do not fight the supervisor's own (docs/operations.md, "Running as a service")."""

from __future__ import annotations

import configparser
import plistlib
import shlex
from pathlib import Path

from clusterfsm.states.cli import build_parser
from clusterfsm.states.exitcodes import EXIT_USAGE
from clusterfsm.states.supervisor import RestartPolicy
from clusterfsm.states.supervisor_cli import parse_backoff

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "examples" / "service"


def check_supervisor_args(argv: list[str], restart_wait_s: float, stop_timeout_s: float
                          ) -> None:
    args = build_parser().parse_args(argv)
    assert args.command == "serve" and args.supervise and args.worker
    _, backoff_max = parse_backoff(args.restart_backoff)
    # The service manager waits longer than the supervisor's largest back-off ...
    assert restart_wait_s > backoff_max
    # ... and gives a stop time for SIGTERM, the child's grace and the kill wait.
    assert stop_timeout_s > args.stop_grace + RestartPolicy().kill_wait_s


def test_systemd_unit() -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(SERVICE / "clusterfsm.service")
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/clusterfsm")
    check_supervisor_args(argv[1:], float(service["RestartSec"]),
                          float(service["TimeoutStopSec"]))
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == str(EXIT_USAGE)
    assert service["KillMode"] in ("mixed", "control-group")
    assert service["KillSignal"] == "SIGTERM"


def test_launchd_plist() -> None:
    job = plistlib.loads((SERVICE / "com.clusterfsm.serve.plist").read_bytes())
    argv = job["ProgramArguments"]
    assert argv[0].endswith("/clusterfsm")
    check_supervisor_args(argv[1:], job["ThrottleInterval"], job["ExitTimeOut"])
    assert job["KeepAlive"] == {"SuccessfulExit": False}
    assert job["AbandonProcessGroup"] is False


def test_operations_doc_shows_both() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    for name in ("examples/service/clusterfsm.service",
                 "examples/service/com.clusterfsm.serve.plist"):
        assert name in text
