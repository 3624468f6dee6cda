"""Generated files for the supervisor machine (``clusterfsm diagram`` writes them).

- ``diagrams/supervisor.mmd`` and ``diagrams/supervisor.dot``: the machine;
- the Mermaid block between the supervisor markers in ``docs/operations.md``.

Kept apart from :mod:`clusterfsm.states.generated` (which calls :func:`expected_files`) so the
bootstrap's generated files and the supervisor's have one owner each.
"""

from __future__ import annotations

import re
from pathlib import Path

from clusterfsm.fsm.diagram import to_dot, to_mermaid
from clusterfsm.states.supervisor import SUPERVISOR

START = "<!-- generated: supervisor diagram (clusterfsm diagram) -->"
END = "<!-- end of generated diagram -->"
OPERATIONS = "docs/operations.md"


def with_diagram(text: str) -> str:
    """``text`` with its generated supervisor-diagram block replaced by the current one."""
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"no generated-diagram markers ({START!r}) found")
    block = f"{START}\n```mermaid\n{to_mermaid(SUPERVISOR)}```\n{END}"
    return pattern.sub(lambda _m: block, text)


def expected_files(root: Path) -> dict[Path, str]:
    out = {
        root / "diagrams/supervisor.mmd": to_mermaid(SUPERVISOR),
        root / "diagrams/supervisor.dot": to_dot(SUPERVISOR),
    }
    path = root / OPERATIONS
    if path.exists():
        out[path] = with_diagram(path.read_text())
    return out
