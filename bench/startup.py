"""Start-up: import time of the ``serve`` path, with its biggest items named.

The serve path is what ``clusterfsm serve`` imports before its machine runs: the CLI,
``clusterfsm.states.serve`` and what its run imports (``clusterfsm.states.api``: the
machine, its activities, links, the watchdog). MLX itself is imported in ``idle``
(``GroupInitializer.prepare``) and is measured apart. Each figure is the best of
``--runs`` fresh interpreters (``python -X importtime``), less what a bare interpreter
imports at start (``site``, ``encodings``, the editable-install finder); the baseline
is a bare interpreter start (``python -c pass``, wall) in the same run.

Whether clusterfsm's own modules were loaded from bytecode is said with the figures:
with ``PYTHONDONTWRITEBYTECODE`` set and no ``__pycache__`` (an editable install that
never wrote one), every start compiles them from source, ~50 ms on the reference
machine that an installed package (its bytecode written at install) does not pay.

Run: python bench/startup.py [--runs 5] [--json OUT]
"""

from __future__ import annotations

import subprocess
import sys
import time

from common import emit, row

SERVE_PATH = "import clusterfsm.states.cli, clusterfsm.states.serve, clusterfsm.states.api"


def _importtime(code: str) -> tuple[int, dict[str, int]]:
    """(total us, self us per item) of one fresh interpreter's imports; an item is a
    clusterfsm module, or a third-party/stdlib top-level package with its submodules."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code],
                          capture_output=True, text=True, check=True, timeout=120)
    total = 0
    items: dict[str, int] = {}
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        head, cumulative, name = line.split("|")
        if len(name) - len(name.lstrip(" ")) == 1:  # a top-level import
            total += int(cumulative)
        module = name.strip()
        item = module if module.startswith("clusterfsm.") else module.split(".")[0]
        items[item] = items.get(item, 0) + int(head.split(":")[1])
    return total, items


def _compiled_from_source() -> bool:
    """True if a fresh interpreter would compile clusterfsm's modules from source."""
    probe = ("import importlib.util, os, sys, clusterfsm.states.codec as m; "
             "print(int(not os.path.exists(importlib.util.cache_from_source(m.__file__))))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True, timeout=120)
    return done.stdout.strip() == "1"


def _wall(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    return time.perf_counter() - start


def main(argv: list[str]) -> None:
    runs = int(argv[argv.index("--runs") + 1]) if "--runs" in argv else 5
    best: dict[str, int] = {}
    totals, walls, bare, mlx = [], [], [], []
    for _ in range(runs):  # interleaved: serve path, bare interpreter, MLX
        total, items = _importtime(SERVE_PATH)
        start_total, start_items = _importtime("pass")  # what every interpreter imports
        totals.append(total - start_total)
        items = {n: us for n, us in items.items() if n not in start_items}
        for name, us in items.items():
            best[name] = min(best.get(name, us), us)
        walls.append(_wall(SERVE_PATH))
        bare.append(_wall("pass"))
        mlx.append(_importtime("import mlx.core")[0])
    ours = min(totals) / 1000
    source = ("clusterfsm compiled from source at every start (no bytecode written)"
              if _compiled_from_source() else "clusterfsm from its bytecode")
    top = sorted(((us, n) for n, us in best.items()), reverse=True)
    print(f"serve path imports (best of {runs}, -X importtime): {ours:.0f} ms; "
          f"wall with interpreter start {min(walls) * 1000:.0f} ms; bare interpreter "
          f"{min(bare) * 1000:.0f} ms; mlx.core (imported in idle) "
          f"{min(mlx) / 1000:.0f} ms; {source}")
    print("  biggest items (own time; a package with its submodules):")
    for us, name in top[:10]:
        print(f"    {us / 1000:6.1f} ms  {name}")
    names = ", ".join(f"{n.removeprefix('clusterfsm.states.')} {us / 1000:.0f}"
                      for us, n in top[:5])
    emit([row(f"Start-up: imports of the serve path (best of {runs}, MLX apart)",
              f"{ours:.0f} ms (biggest, own ms: {names}; {source})",
              f"bare interpreter {min(bare) * 1000:.0f} ms; mlx.core {min(mlx) / 1000:.0f} ms",
              f"{ours / (min(bare) * 1000):.1f}x the bare start",
              "(measured, no target)", None)], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
