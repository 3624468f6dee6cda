"""Time to a working group: ``clusterfsm demo`` against raw ``mlx.launch``.

A = ``clusterfsm demo --ranks N`` (N ranks on loopback, ``all_sum`` checked);
B = ``mlx.launch --backend ring -n N python allsum.py`` running the same ``all_sum``
check. Runs are interleaved A B A B ..., each timed from spawn to exit (wall clock,
process start included), for each N. With ``--hog`` one busy-loop process runs for
the whole measurement (a provider's model keeps a core busy: the case of MLX's ring
stall, docs/design.md section 3.5). Every demo run keeps its traces: a run whose
``initializing_group`` record carries a note paid MLX's connect back-off (the note
names it), and the 2-rank traces give the per-state latency decomposition.

Run: python bench/time_to_group.py [--runs 15] [--ranks 2,3,4] [--hog] [--json OUT]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common import BusyCore, compile_bytecode, emit, load_average, median, row

from clusterfsm.fsm import read_trace, state_totals

ALL_SUM = """\
import mlx.core as mx
group = mx.distributed.init(strict=True, backend="ring")
total = mx.distributed.all_sum(mx.array([float(group.rank() + 1)]), group=group)
mx.eval(total)
expected = group.size() * (group.size() + 1) / 2
assert group.size() == {n} and total.item() == expected, (group.size(), total.item())
print(f"rank {{group.rank()}}: all_sum = {{total.item():g}} (expected {{expected:g}})")
"""
#: States that precede ``ready``; everything but group init counts against 20 ms.
BOOT_STATES = ("idle", "discovering", "handshaking", "awaiting_session",
               "exchanging_bootstrap", "initializing_group", "confirming_group")
#: An init or run longer than this paid MLX's 1 s connect back-off.
BACKOFF_S = 0.9


def _tool(name: str, module: str) -> list[str]:
    path = Path(sys.executable).parent / name
    if path.exists():
        return [str(path)]
    found = shutil.which(name)
    return [found] if found else [sys.executable, "-m", module]


def run_ours(n: int, trace: Path | None) -> float:
    cmd = [*_tool("clusterfsm", "clusterfsm.states.cli"),
           "demo", "--ranks", str(n), "--timeout", "60"]
    if trace is not None:
        cmd += ["--trace-json", str(trace)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - start
    if done.returncode != 0 or f"demo OK: {n} ranks" not in done.stdout:
        raise RuntimeError(f"clusterfsm demo failed:\n{done.stdout}\n{done.stderr}")
    return wall


def run_raw(n: int, script: Path) -> float | None:
    """The wall time of one ``mlx.launch`` run; None if it failed (under load MLX's
    ring sometimes loses a peer at start: counted and shown, not fatal)."""
    cmd = [*_tool("mlx.launch", "mlx.launch"), "--backend", "ring", "-n", str(n),
           sys.executable, str(script)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - start
    expected = f"all_sum = {n * (n + 1) // 2:g}"
    if done.returncode != 0 or done.stdout.count(expected) != n:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"  mlx.launch run failed (exit {done.returncode}): {last}")
        return None
    return wall


def _rank_trace(trace_base: Path, rank: int) -> Path:
    return trace_base.with_name(f"{trace_base.stem}.rank{rank}{trace_base.suffix}")


def backoff_notes(trace_base: Path, ranks: int) -> list[int]:
    """The ranks whose trace names a connect back-off (MLX's refused dial)."""
    out = []
    for r in range(ranks):
        path = _rank_trace(trace_base, r)
        if any(rec.note and "back-off" in rec.note for rec in read_trace(path).records):
            out.append(r)
    return out


def state_times(trace_base: Path, ranks: int) -> list[dict[str, float]]:
    out = []
    for r in range(ranks):
        path = trace_base.with_name(f"{trace_base.stem}.rank{r}{trace_base.suffix}")
        out.append(state_totals(read_trace(path).records))
    return out


def measure(runs: int, rank_counts: list[int], hog: bool) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ttg-") as tmp:
        per_state: list[list[dict[str, float]]] = []  # per run: per rank: state -> ms
        for n in rank_counts:
            script = Path(tmp) / f"allsum{n}.py"
            script.write_text(ALL_SUM.format(n=n))
            run_ours(n, None), run_raw(n, script)  # warm the page cache for both
            ours: list[float] = []
            raw: list[float] = []
            noted: dict[int, int] = {}  # rank -> runs in which its trace names a back-off
            slow_unnamed = 0
            slow_init = 0  # runs whose slowest rank spent >= 0.9 s in initializing_group
            raw_failed = 0
            loads = [load_average()]
            with BusyCore() if hog else _nothing():
                for i in range(runs):
                    trace = Path(tmp) / f"t{n}-{i}.jsonl"
                    ours.append(run_ours(n, trace))
                    raw_wall = run_raw(n, script)
                    if raw_wall is None:
                        raw_failed += 1
                    else:
                        raw.append(raw_wall)
                    named = backoff_notes(trace, n)
                    init_ms = max(state_totals(read_trace(_rank_trace(trace, r)).records)
                                  .get("initializing_group", 0.0) for r in range(n))
                    slow_init += init_ms >= BACKOFF_S * 1000
                    for r in named:
                        noted[r] = noted.get(r, 0) + 1
                    slow_unnamed += ours[-1] > BACKOFF_S and not named
                    if n == 2:
                        per_state.append(state_times(trace, n))
                    for f in Path(tmp).glob(f"t{n}-{i}.rank*.jsonl"):
                        f.unlink()
                    if i % 10 == 9:
                        loads.append(load_average())
            m_ours, m_raw = median(ours), median(raw)
            slow_raw = sum(t > BACKOFF_S for t in raw)
            slow_ours = sum(t > BACKOFF_S for t in ours)
            cond = "one core hogged" if hog else "no hog"
            print(f"\n{n} ranks, {runs} runs each, interleaved A B A B, {cond}, "
                  f"load average {' '.join(loads)}:")
            print(f"  clusterfsm demo : median {m_ours * 1000:6.0f} ms  min "
                  f"{min(ours) * 1000:5.0f}  max {max(ours) * 1000:6.0f}  "
                  f"(runs over {BACKOFF_S:g} s: {slow_ours})")
            print(f"  mlx.launch raw  : median {m_raw * 1000:6.0f} ms  min "
                  f"{min(raw) * 1000:5.0f}  max {max(raw) * 1000:6.0f}  "
                  f"(runs over {BACKOFF_S:g} s: {slow_raw})")
            print(f"  ratio of medians ours/raw: {m_ours / m_raw:.2f}x; worst ours "
                  f"{max(ours) * 1000:.0f} ms vs raw median {m_raw * 1000:.0f} ms")
            named_text = ", ".join(f"rank {r}: {c}" for r, c in sorted(noted.items())) or "none"
            print(f"  ours, back-off named in the trace (runs per rank): {named_text}; "
                  f"slow runs with no note: {slow_unnamed}; runs with a rank >= "
                  f"{BACKOFF_S:g} s in initializing_group: {slow_init}")
            if raw_failed:
                print(f"  mlx.launch runs that failed (not counted): {raw_failed}")
            print("  ours sorted (ms): " + " ".join(f"{t * 1000:.0f}" for t in sorted(ours)))
            print("  raw  sorted (ms): " + " ".join(f"{t * 1000:.0f}" for t in sorted(raw)))
            target_median = 0.35 if n == 2 else None
            met = slow_ours == 0 and (target_median is None or m_ours <= target_median)
            rows.append(row(
                f"Time to a working group, {n} ranks, {cond} (median of {runs}, wall, "
                f"spawn to exit; load {loads[0]}-{max(loads, key=float)})",
                f"{m_ours * 1000:.0f} ms (worst {max(ours) * 1000:.0f}, "
                f"{slow_ours} run(s) > {BACKOFF_S:g} s, {slow_init} with init >= "
                f"{BACKOFF_S:g} s; named: {named_text})",
                f"mlx.launch {m_raw * 1000:.0f} ms (best {min(raw) * 1000:.0f}, "
                f"{slow_raw} run(s) > {BACKOFF_S:g} s"
                + (f", {raw_failed} failed" if raw_failed else "") + ")",
                f"{m_ours / m_raw:.2f}x",
                "0 runs > 0.9 s" + ("; median <= 0.35 s" if target_median else ""),
                met))
        if per_state:
            rows.extend(_decomposition(per_state))
    return rows


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _decomposition(per_state: list[list[dict[str, float]]]) -> list[dict[str, object]]:
    print(f"\nPer-state time, 2-rank demo, median of {len(per_state)} runs (ms):")
    print(f"  {'state':<22}{'rank 0':>9}{'rank 1':>9}")
    for state in BOOT_STATES:
        cols = [median([run[r].get(state, 0.0) for run in per_state]) for r in (0, 1)]
        print(f"  {state:<22}{cols[0]:9.2f}{cols[1]:9.2f}")
    # Per run, the slower rank's total outside init; then the median over runs.
    outside = [max(sum(v for s, v in run[r].items()
                       if s in BOOT_STATES and s != "initializing_group") for r in (0, 1))
               for run in per_state]
    init = [max(run[r].get("initializing_group", 0.0) for r in (0, 1)) for run in per_state]
    parts = ", ".join(
        f"{s} {median([max(run[r].get(s, 0.0) for r in (0, 1)) for run in per_state]):.1f}"
        for s in BOOT_STATES)
    print(f"  everything but group init (slower rank per run): median "
          f"{median(outside):.1f} ms, max {max(outside):.1f} ms; group init median "
          f"{median(init):.1f} ms")
    return [row("Per-state latency, 2-rank bootstrap on loopback (slower rank, median ms)",
                f"all but group init {median(outside):.1f} ms (max {max(outside):.1f})",
                f"group init {median(init):.1f} ms",
                f"{median(outside) / median(init):.2f}x of init",
                "all but group init < 20 ms", median(outside) < 20, detail=parts)]


def main(argv: list[str]) -> None:
    compile_bytecode()  # as installed, like mlx.launch's modules (common.py)
    runs = int(argv[argv.index("--runs") + 1]) if "--runs" in argv else 15
    ranks = ([int(x) for x in argv[argv.index("--ranks") + 1].split(",")]
             if "--ranks" in argv else [2, 3, 4])
    emit(measure(runs, ranks, "--hog" in argv), argv)


if __name__ == "__main__":
    main(sys.argv[1:])
