"""Shared by the benchmarks: percentiles, the machine description, JSON output.

Every bench is one command (``python bench/NAME.py``), prints its figures and its
ratio against a baseline measured in the same run, and with ``--json PATH`` also
writes its table row(s) for ``bench/run_all.py``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/x.py` from anywhere
    sys.path.insert(0, str(ROOT))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from importlib.metadata import version

        mlx = version("mlx")
    except Exception:  # noqa: BLE001 - only a label
        mlx = "?"
    return (f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, mlx {mlx}")


def row(name: str, ours: str, baseline: str, ratio: str, target: str, met: bool | None,
        **extra: Any) -> dict[str, Any]:
    """One line of docs/performance.md's table."""
    return {"name": name, "ours": ours, "baseline": baseline, "ratio": ratio,
            "target": target, "met": met, **extra}


def emit(rows: list[dict[str, Any]], argv: list[str]) -> None:
    """Write ``rows`` as JSON to the path after ``--json``, if given."""
    if "--json" in argv:
        path = Path(argv[argv.index("--json") + 1])
        path.write_text(json.dumps(rows, indent=1))


def compile_bytecode() -> None:
    """Write clusterfsm's bytecode, as ``pip install`` does for an installed package.

    Why: with ``PYTHONDONTWRITEBYTECODE`` set (this VM sets it) an editable install
    compiles every clusterfsm module from source at every process start, ~50 ms here,
    while every third-party package (trio, mlx, and ``mlx.launch`` of the baseline) was
    compiled at install. Benches that start processes call this first, so both sides
    of a comparison run from bytecode. ``compileall`` does not follow the
    ``clusterfsm/fsm`` and ``clusterfsm/states`` links, so the real folders are named.
    """
    import subprocess

    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0",
                    *(str(ROOT / d) for d in ("clusterfsm", "fsm", "states"))],
                   check=True, capture_output=True)


def load_average() -> str:
    """The 1-minute load average now (the machine is shared: figures need it)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "0.0"  # unknown (not Unix): numeric, so the rows can take a maximum


class BusyCore:
    """One busy-loop process for the block (``with BusyCore():``): a core kept busy, as a
    provider's model keeps it. Killed and reaped on exit, also on failure."""

    def __init__(self) -> None:
        import subprocess

        # Busy until this process goes, even if it is killed before __exit__.
        loop = "import os\nparent = os.getppid()\nwhile os.getppid() == parent: pass"
        self._proc = subprocess.Popen([sys.executable, "-c", loop])

    def __enter__(self) -> BusyCore:
        return self

    def __exit__(self, *exc: object) -> None:
        self._proc.kill()
        self._proc.wait()
