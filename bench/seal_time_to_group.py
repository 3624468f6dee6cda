"""Time to a 2-rank group, sealed against unsealed, in the same run.

Sealed = ``clusterfsm demo --ranks 2`` from this tree (protocol 2 and later: Noise handshake,
every frame sealed, the `cryptography` import included). Unsealed = the same command
from the tree just before the sealing layer was added (protocol 1: HMAC handshake,
cleartext frames), exported with ``git archive`` into a temporary directory. Both run
with this interpreter, through the same launcher, interleaved A B A B, each timed from
spawn to exit (wall clock, process start included).

Three figures: the wall-clock median; the median of the control plane (per run, the
slower rank's time in every state before ``ready`` except ``initializing_group``, from
the runs' traces); and the same bootstrap without processes or MLX (both ranks in one
interpreter over real loopback TCP, group init faked, ``tests/tcp_harness.py`` of each
tree; time from the first state to both ranks ``ready``), which isolates what sealing
adds from process start, scheduling and MLX. Sealing changes only the control plane;
MLX's own init is the same code either way and carries MLX's 1 s connect back-off (see
time_to_group.py), which makes the wall median jump by hundreds of ms on a loaded
machine. So the target (grow < 5 ms) is checked on the in-process bootstrap, and the
demo's figures are shown beside it.

Run: python bench/seal_time_to_group.py [--runs 15] [--baseline REV] [--json OUT]
(REV defaults to the parent of the commit that added states/seal.py).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from common import ROOT, emit, median, row
from time_to_group import BOOT_STATES, state_times

TARGET_MS = 5.0
LAUNCH = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
          "from clusterfsm.states.cli import main; sys.exit(main())")


def baseline_rev() -> str:
    added = subprocess.run(
        ["git", "log", "--diff-filter=A", "--format=%H", "--", "states/seal.py"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    if not added:
        raise SystemExit("states/seal.py has no commit adding it: pass --baseline REV")
    return f"{added[-1]}^"


def export(rev: str, into: Path) -> None:
    data = subprocess.run(["git", "archive", "--format=tar", rev], cwd=ROOT,
                          capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="tar")


def check_tree(tree: Path, expected: Path) -> None:
    """The launcher really imports from ``tree`` (not the installed package)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import clusterfsm.states.handshake"
            " as h; print(h.__file__, h.PROTOCOL_VERSION)")
    out = subprocess.run([sys.executable, "-c", code, str(tree)], capture_output=True,
                         text=True, check=True).stdout.split()
    assert Path(out[0]).resolve().is_relative_to(expected.resolve()), out


IN_PROCESS = """
import json, sys
sys.path.insert(0, sys.argv[1])
import trio
from tests.tcp_harness import (RankRun, RecordingTransport, all_ready, joiner_config,
                               rank0_config, run_rank)

async def one():
    transport, r0, r1 = RecordingTransport(), RankRun(0), RankRun(1)
    hold = all_ready(2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: run_rank(rank0_config(), r0, transport=transport,
                                            in_ready=hold))
        await transport.bound.wait()
        await run_rank(joiner_config(1, transport.address), r1, in_ready=hold)
    assert r0.reached_ready and r1.reached_ready, (r0.path, r1.path)
    return max(next(x.t for x in r.records if x.dest == "ready") - r.records[0].t
               for r in (r0, r1)) * 1000

async def main():
    await one()  # the first bootstrap of a process warms everything up
    print(json.dumps([await one() for _ in range(int(sys.argv[2]))]))

trio.run(main)
"""


def in_process(tree: Path, runs: int) -> list[float]:
    """ms from the first state to both ranks ready, per bootstrap, in one interpreter."""
    done = subprocess.run([sys.executable, "-c", IN_PROCESS, str(tree), str(runs)],
                          capture_output=True, text=True, timeout=300, cwd=tree)
    if done.returncode != 0:
        raise RuntimeError(f"in-process bootstrap from {tree} failed:\n{done.stderr}")
    result: list[float] = json.loads(done.stdout.splitlines()[-1])
    return result


def run_demo(tree: Path, trace: Path) -> tuple[float, float]:
    """(wall ms, control-plane ms) of one 2-rank demo run from ``tree``."""
    cmd = [sys.executable, "-c", LAUNCH, str(tree), "demo", "--ranks", "2", "--timeout", "60",
           "--trace-json", str(trace)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - start
    if done.returncode != 0 or "demo OK: 2 ranks" not in done.stdout:
        raise RuntimeError(f"demo from {tree} failed:\n{done.stdout}\n{done.stderr}")
    control = max(sum(v for state, v in rank.items()
                      if state in BOOT_STATES and state != "initializing_group")
                  for rank in state_times(trace, 2))
    return wall * 1000, control


def measure(runs: int, rev: str) -> list[dict[str, object]]:
    with tempfile.TemporaryDirectory(prefix="unsealed-") as tmp:
        old = Path(tmp) / "tree"
        old.mkdir()
        export(rev, old)
        check_tree(ROOT, ROOT)
        check_tree(old, old)
        traces = Path(tmp) / "t.jsonl"
        run_demo(ROOT, traces), run_demo(old, traces)  # warm the page cache for both
        sealed, unsealed = [], []
        for _ in range(runs):
            sealed.append(run_demo(ROOT, traces))
            unsealed.append(run_demo(old, traces))
        quick_s, quick_u = [], []
        for _ in range(3):  # interleaved batches of bootstraps in one interpreter each
            quick_s += in_process(ROOT, 10 * runs // 3 + 1)
            quick_u += in_process(old, 10 * runs // 3 + 1)
    wall_s, wall_u = median([w for w, _ in sealed]), median([w for w, _ in unsealed])
    ctl_s, ctl_u = median([c for _, c in sealed]), median([c for _, c in unsealed])
    fast_s, fast_u = median(quick_s), median(quick_u)
    grew = fast_s - fast_u
    print(f"2-rank bootstrap in one interpreter (real TCP, init faked), median of "
          f"{len(quick_s)}: sealed {fast_s:.2f} ms vs unsealed {fast_u:.2f} ms: {grew:+.2f} ms"
          f" (fastest: {min(quick_s):.2f} vs {min(quick_u):.2f} ms: "
          f"{min(quick_s) - min(quick_u):+.2f} ms)")
    print(f"2-rank demo, median of {runs}, sealed vs unsealed ({rev[:12]}):")
    print(f"  control plane (all states before ready but init, slower rank): "
          f"{ctl_s:.1f} ms vs {ctl_u:.1f} ms: {ctl_s - ctl_u:+.1f} ms")
    print(f"  wall, spawn to exit: {wall_s:.0f} ms vs {wall_u:.0f} ms: "
          f"{wall_s - wall_u:+.0f} ms")
    print(f"  sealed wall   {sorted(round(w) for w, _ in sealed)}")
    print(f"  unsealed wall {sorted(round(w) for w, _ in unsealed)}")
    print(f"  sealed ctl    {sorted(round(c, 1) for _, c in sealed)}")
    print(f"  unsealed ctl  {sorted(round(c, 1) for _, c in unsealed)}")
    return [row(f"Seal: time to a 2-rank group (bootstrap in one process, median of "
                f"{len(quick_s)}; demo: median of {runs})",
                f"{fast_s:.2f} ms sealed, fastest {min(quick_s):.2f} (demo: control plane "
                f"{ctl_s:.1f} ms, wall {wall_s:.0f} ms)",
                f"unsealed (protocol 1) {fast_u:.2f} ms, fastest {min(quick_u):.2f} (demo: "
                f"{ctl_u:.1f} ms, wall {wall_u:.0f} ms)",
                f"{grew:+.2f} ms (demo: {ctl_s - ctl_u:+.1f} ms, wall {wall_s - wall_u:+.0f})",
                f"< +{TARGET_MS:g} ms", grew < TARGET_MS)]


def main(argv: list[str]) -> None:
    runs = int(argv[argv.index("--runs") + 1]) if "--runs" in argv else 15
    rev = argv[argv.index("--baseline") + 1] if "--baseline" in argv else baseline_rev()
    emit(measure(runs, rev), argv)


if __name__ == "__main__":
    main(sys.argv[1:])
