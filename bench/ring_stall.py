"""MLX's ring stall under load: raw ``init`` against our init window, same processes.

Every trial starts N processes that import MLX and wait; then they are released as our
barrier does (all but the last at once, the last as rank 0 calls init, and it waits
5 ms more) and each calls init:

- A, ``raw``: ``mx.distributed.init(backend="ring")`` as MLX ships it;
- B, ``window``: the same call through :class:`clusterfsm.states.groupinit.GroupInitializer`
  (``SCHED_BATCH`` on the ranks an accept wakes, the last rank waits for rank 0's
  listener when it is local, MLX's back-off log read: docs/design.md section 3.5).

A trial whose slowest init takes 0.9 s or more paid MLX's 1 s connect back-off. Trials
are interleaved A B A B with one busy-loop process running the whole time (a provider's
model keeps a core busy). ``--netns`` runs 2 ranks in two network namespaces joined by
a veth pair (closer to two hosts than loopback; needs root; the namespaces are deleted
at the end, also on failure).

Run: python bench/ring_stall.py [--runs 30] [--ranks 2,3,4] [--netns] [--json OUT]
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, BusyCore, emit, load_average, median, row

CHILD = r"""
import json, os, sys, time
import mlx.core as mx
import trio
from clusterfsm.states.groupinit import GroupInitializer, InitPlan, TopologyDir
rank, size, mode, hostfile = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
sys.stdout.write("loaded\n"); sys.stdout.flush()
sys.stdin.readline()
if rank == size - 1:
    time.sleep(0.005)
start = time.perf_counter()
backoff = None
def calling():
    sys.stdout.write("calling\n"); sys.stdout.flush()
async def before_call():
    calling()
    await trio.lowlevel.checkpoint()
if mode == "raw":
    os.environ.update(MLX_RANK=str(rank), MLX_HOSTFILE=hostfile)
    calling()
    group = mx.distributed.init(strict=True, backend="ring")
else:
    topology = tuple(tuple(e) for e in json.load(open(hostfile)))
    init = GroupInitializer()
    files = TopologyDir()
    try:
        group = trio.run(init.initialize, InitPlan("ring", rank, size, topology, b"b" * 16),
                         files, None, before_call)
    finally:
        files.close()
    backoff = init.backoff and init.backoff.describe()
took = time.perf_counter() - start
total = mx.distributed.all_sum(mx.array([1.0]), group=group)
mx.eval(total)
assert total.item() == size
print(json.dumps({"rank": rank, "init_s": took, "backoff": backoff}), flush=True)
"""
BACKOFF_S = 0.9


def _free_port(host: str, prefix: list[str]) -> int:
    if not prefix:
        with socket.socket() as s:
            s.bind((host, 0))
            return int(s.getsockname()[1])
    return 20000 + int(time.monotonic_ns() // 1000 % 20000)


def trial(n: int, mode: str, hosts: list[str], prefixes: list[list[str]],
          tmp: Path) -> tuple[float, list[int]] | None:
    """One release of N processes; (slowest init in s, ranks that named a back-off),
    or None if a process failed."""
    ports = [_free_port(hosts[r], prefixes[r]) + r for r in range(n)]
    hostfile = tmp / "hosts.json"
    hostfile.write_text(json.dumps([[f"{hosts[r]}:{ports[r]}"] for r in range(n)]))
    procs = [subprocess.Popen([*prefixes[r], sys.executable, "-c", CHILD, str(r), str(n),
                               mode, str(hostfile)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=ROOT) for r in range(n)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == "loaded\n"
        # As our barrier does: all but the last at once, the last as rank 0 calls init
        # (it then waits 5 ms more).
        for p in procs[:-1]:
            _release(p)
        assert procs[0].stdout is not None and procs[0].stdout.readline() == "calling\n"
        _release(procs[-1])
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=60)
            lines = out.strip().splitlines()
            if p.returncode != 0 or not lines or not lines[-1].startswith("{"):
                return None  # MLX lost a peer at start (seen under load): counted apart
            results.append(json.loads(lines[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    return (max(r["init_s"] for r in results),
            [r["rank"] for r in results if r["backoff"]])


def _release(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()


def compare(label: str, n: int, runs: int, hosts: list[str],
            prefixes: list[list[str]]) -> dict[str, object]:
    times: dict[str, list[float]] = {"raw": [], "window": []}
    named = 0
    failed = {"raw": 0, "window": 0}
    loads = [load_average()]
    with tempfile.TemporaryDirectory(prefix="bench-stall-") as tmp, BusyCore():
        for i in range(runs):
            for mode in ("raw", "window"):
                got = trial(n, mode, hosts, prefixes, Path(tmp))
                if got is None:
                    failed[mode] += 1
                    continue
                times[mode].append(got[0])
                named += bool(got[1])
            if i % 10 == 9:
                loads.append(load_average())
    slow = {m: sum(t >= BACKOFF_S for t in v) for m, v in times.items()}
    done = {m: len(v) for m, v in times.items()}
    print(f"\n{label}, {runs} trials each, interleaved, one core hogged, load average "
          f"{' '.join(loads)}:")
    for mode, v in times.items():
        print(f"  {mode:<7}: slowest-rank init median {median(v) * 1000:6.0f} ms, max "
              f"{max(v) * 1000:6.0f}; trials >= {BACKOFF_S:g} s: {slow[mode]}/{done[mode]}")
    print(f"  window trials whose trace would name the back-off: {named}; failed "
          f"trials (a process exited with an error, not counted): {failed}")
    return row(f"Ring stall, init only, {label} ({runs} trials, one core hogged, "
               f"load {loads[0]}-{max(loads, key=float)})",
               f"init window {slow['window']}/{done['window']} stalled (median "
               f"{median(times['window']) * 1000:.0f} ms)",
               f"raw MLX init {slow['raw']}/{done['raw']} stalled (median "
               f"{median(times['raw']) * 1000:.0f} ms)",
               f"{slow['window']}/{slow['raw']} stalls",
               "0 stalls", slow["window"] == 0)


def main(argv: list[str]) -> None:
    runs = int(argv[argv.index("--runs") + 1]) if "--runs" in argv else 30
    ranks = ([int(x) for x in argv[argv.index("--ranks") + 1].split(",")]
             if "--ranks" in argv else [2, 3, 4])
    rows = [compare(f"{n} ranks on loopback", n, runs, ["127.0.0.1"] * n, [[]] * n)
            for n in ranks]
    if "--netns" in argv:
        sys.path.insert(0, str(ROOT))
        from tests.netns import NetnsPair, NetnsUnavailable

        try:
            pair = NetnsPair.create()
        except NetnsUnavailable as exc:
            print(f"\nnetns: skipped ({exc})")
        else:
            with pair:
                rows.append(compare("2 ranks in two network namespaces", 2, runs,
                                    [pair.a.address, pair.b.address],
                                    [pair.a.command([]), pair.b.command([])]))
    emit(rows, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
