"""Every benchmark still runs, with tiny parameters (no timing is asserted).

``bench/run_all.py --quick`` runs each bench once as its own process, exactly as the
full run does, and prints the table without touching docs/performance.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def test_every_bench_runs_and_reports_a_row() -> None:
    before = (ROOT / "docs" / "performance.md").read_bytes()
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run_all.py"), "--quick"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("Time to a working group, 2 ranks", "Per-state latency", "Engine:",
                 "Readiness latency", "Scale:", "Codec: bootstrap frame", "Codec: heartbeat",
                 "Provider example: decode rate", "Provider example: time to first token",
                 "Seal: heartbeat frames", "Seal: 64 KiB frames", "Seal: AEAD",
                 "Seal: handshake", "Seal: import", "Seal: time to a 2-rank group",
                 "Ring stall, init only, 2 ranks", "Start-up: imports of the serve path",
                 "App message 1 KiB round trip", "App messages 64 KiB throughput",
                 "App flood", "Heartbeat CPU in ready",
                 "Detecting a lost peer, SIGSTOP", "Detecting a lost peer, SIGKILL"):
        assert f"| {name}" in done.stdout, name
    assert (ROOT / "docs" / "performance.md").read_bytes() == before
