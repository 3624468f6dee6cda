"""How fast a rank notices a cable plugged in and pulled out: rtnetlink vs the poll.

A watcher process sits in one end of a network-namespace pair (the cable is the veth)
and prints a monotonic timestamp when :func:`wait_for_link` returns (plug-in) and when
:func:`watch_for_loss` raises (pull). This process sets the peer's end up and down and
notes the time right before it runs ``ip link set`` (so the figures include that
command's own few milliseconds: an upper bound); CLOCK_MONOTONIC is the same in every
network namespace. The baseline is the 0.2 s poll, measured in the same run.

Run (root, iproute2): python bench/linkwatch.py [--cycles N]
"""

from __future__ import annotations

import argparse
import os
import select
import subprocess
import sys
import textwrap
import time

from common import emit, load_average, median, percentile, row

from tests.netns import NetnsPair

WATCHER = textwrap.dedent("""
    import sys, time, trio
    from clusterfsm.states.errors import LinkLost
    from clusterfsm.states.linkwatch import (PollEvents, open_link_events, wait_for_link,
                                             watch_for_loss)

    async def main(name, mode, cycles):
        async with open_link_events() as kernel:
            events = kernel if mode == "events" else PollEvents()
            print("ready", events.kind, flush=True)
            for _ in range(cycles):
                await wait_for_link([name], events)
                print("up", time.monotonic(), flush=True)
                try:
                    await watch_for_loss([name], events)
                except LinkLost:
                    print("lost", time.monotonic(), flush=True)

    trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]))
""")


def expect(proc: subprocess.Popen[bytes], word: str, buffer: list[bytes]) -> float:
    assert proc.stdout is not None
    end = time.monotonic() + 10
    while True:
        joined = b"".join(buffer)
        if b"\n" in joined:
            line, rest = joined.split(b"\n", 1)
            buffer[:] = [rest]
            parts = line.decode().split()
            assert parts[0] == word, (word, parts)
            return float(parts[1]) if word != "ready" else 0.0
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, end - time.monotonic()))
        chunk = os.read(proc.stdout.fileno(), 4096) if ready else b""
        if not chunk:
            raise SystemExit(f"watcher gave no {word!r} line")
        buffer.append(chunk)


def measure(mode: str, cycles: int) -> tuple[list[float], list[float]]:
    plug: list[float] = []
    pull: list[float] = []
    with NetnsPair.create() as pair:
        pair.link_down("b")
        proc = pair.a.popen([sys.executable, "-c", WATCHER, pair.a.interface, mode,
                             str(cycles)], stdout=subprocess.PIPE)
        buffer: list[bytes] = []
        expect(proc, "ready", buffer)
        for _ in range(cycles):
            time.sleep(0.05)
            t0 = time.monotonic()
            pair.link_up("b")
            plug.append(expect(proc, "up", buffer) - t0)
            time.sleep(0.05)
            t0 = time.monotonic()
            pair.link_down("b")
            pull.append(expect(proc, "lost", buffer) - t0)
    return plug, pull


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args()
    results = {mode: measure(mode, args.cycles) for mode in ("events", "poll")}
    load = load_average()
    rows = []
    for i, what in enumerate(("plug-in noticed", "pull noticed")):
        ours, base = results["events"][i], results["poll"][i]
        ours_ms = [v * 1000 for v in ours]
        base_ms = [v * 1000 for v in base]
        print(f"{what}: rtnetlink median {median(ours_ms):.2f} ms, p95 "
              f"{percentile(ours_ms, 95):.2f} ms; 0.2 s poll median {median(base_ms):.1f} ms "
              f"({args.cycles} cycles each; load {load})")
        rows.append(row(f"Link {what}, rtnetlink ({args.cycles} cycles in a namespace pair, "
                        f"load {load})",
                        f"median {median(ours_ms):.2f} ms, p95 {percentile(ours_ms, 95):.2f} ms",
                        f"0.2 s poll, median {median(base_ms):.1f} ms",
                        f"{median(base_ms) / max(median(ours_ms), 0.001):.0f}x",
                        "< 1000 ms", percentile(ours_ms, 95) < 1000))
    emit(rows, sys.argv)


if __name__ == "__main__":
    main()
