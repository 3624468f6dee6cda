"""Every benchmark still runs, with tiny parameters (no timing is asserted).

``bench/run_all.py --quick`` runs each bench once as its own process, exactly as the
full run does, and prints the table without touching docs/performance.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration
#: Whether the run makes network namespaces (bench/run_all.py leaves them out otherwise).
NAMESPACES = os.geteuid() == 0 and shutil.which("ip") is not None


def test_every_bench_runs_and_reports_a_row() -> None:
    before = (ROOT / "docs" / "performance.md").read_bytes()
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run_all.py"), "--quick"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("Time to a working group, 2 ranks", "Per-state latency", "Engine:",
                 "Readiness latency", "Scale:", "Codec: bootstrap frame", "Codec: heartbeat",
                 "Provider example: decode rate", "Provider example: time to first token",
                 "Seal: heartbeat frames", "Seal: 64 KiB frames", "Seal: AEAD",
                 "Seal: handshake", "Seal: import", "Seal: time to a 2-rank group",
                 "Ring stall, init only, 2 ranks", "Start-up: imports of the serve path",
                 "App message 1 KiB round trip", "App messages 64 KiB throughput",
                 "App flood", "Heartbeat CPU in ready",
                 "Detecting a lost peer, SIGSTOP", "Detecting a lost peer, SIGKILL",
                 "Recovery after SIGKILL of rank 1 child",
                 "Recovery after SIGKILL of rank 0 child",
                 "Recovery after SIGKILL of rank 1 supervisor"):
        assert f"| {name}" in done.stdout, name
    netns = ("Detecting a lost peer, cable pulled, direct veth",
             "Detecting a lost peer, cable pulled behind a switch, near side",
             "Detecting a lost peer, cable pulled behind a switch, far side",
             "Link plug-in noticed, rtnetlink", "Link pull noticed, rtnetlink")
    for name in netns:  # network namespaces: root and iproute2, else left out (and said)
        assert (f"| {name}" in done.stdout) == NAMESPACES, name
    assert (ROOT / "docs" / "performance.md").read_bytes() == before
