"""Files generated from the declared machine, and the check that they are current.

``clusterfsm diagram`` writes them; ``clusterfsm diagram --check`` (run by CI) fails
if any file on disk differs from what the code generates. Generated:

- ``diagrams/bootstrap.mmd`` and ``diagrams/bootstrap.dot``: the machine;
- the Mermaid block between markers in ``README.md`` and ``docs/states.md``;
- ``docs/errors.md``: every error state, its error type, cause and remedy.
"""

from __future__ import annotations

import re
from pathlib import Path

from clusterfsm.fsm import MachineSpec
from clusterfsm.fsm.diagram import to_dot, to_mermaid
from clusterfsm.states.machine import BOOTSTRAP
from clusterfsm.states.supervisor_docs import expected_files as supervisor_files

START = "<!-- generated: bootstrap diagram (clusterfsm diagram) -->"
END = "<!-- end of generated diagram -->"


def diagram_files(spec: MachineSpec = BOOTSTRAP) -> dict[str, str]:
    return {
        "diagrams/bootstrap.mmd": to_mermaid(spec),
        "diagrams/bootstrap.dot": to_dot(spec),
    }


def errors_doc(spec: MachineSpec = BOOTSTRAP) -> str:
    lines = [
        "# Error states",
        "",
        "Generated from `states/machine.py` by `clusterfsm diagram`; do not edit.",
        "Every failure of a rank ends in exactly one of these states, carrying an error",
        "value of the named type (`cluster.error`, the trace's `error` field, and the",
        "`serve` exit message). `bootstrap_cluster` raises it as a `ClusterError`",
        "whose `state` is the error state and whose `retryable` is the column below:",
        "whether a new process with the same configuration can succeed once something",
        "outside it changes by itself (docs/embedding.md, \"Errors\").",
        "",
        "| error state | error type | retryable | reached from | what causes it | what to do |",
        "|---|---|---|---|---|---|",
    ]
    edges = spec.edges()
    for err in spec.errors:
        sources = sorted({e.source for e in edges if e.dest == err.name},
                         key=[s.name for s in spec.states].index)
        where = ", ".join(f"`{s}`" for s in sources) if err.name not in (
            "cancelled", "unexpected") else "any state"
        retryable = getattr(err.error, "retryable", None)
        retry = "-" if retryable is None else "yes" if retryable else "no"
        lines.append(f"| `{err.name}` | `{err.error.__name__}` | {retry} | {where} | "
                     f"{err.doc} | {err.remedy} |")
    return "\n".join(lines) + "\n"


def _mermaid_block(spec: MachineSpec) -> str:
    return f"{START}\n```mermaid\n{to_mermaid(spec)}```\n{END}"


def with_diagram(text: str, spec: MachineSpec = BOOTSTRAP) -> str:
    """``text`` with its generated diagram block replaced by the current one."""
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"no generated-diagram markers ({START!r}) found")
    return pattern.sub(lambda _m: _mermaid_block(spec), text)


def is_checkout(root: Path) -> bool:
    """True if ``root`` is the repository: its README carries the generated diagram.
    Elsewhere (an installed package, a home directory) there is nothing to check, and
    writing would scatter ``diagrams/`` and ``docs/`` there."""
    readme = root / "README.md"
    try:
        return readme.is_file() and START in readme.read_text(errors="replace")
    except OSError:
        return False


def expected_files(root: Path) -> dict[Path, str]:
    out = {root / name: text for name, text in diagram_files().items()}
    out[root / "docs/errors.md"] = errors_doc()
    out.update(supervisor_files(root))
    for doc in ("README.md", "docs/states.md"):
        path = root / doc
        if path.exists():
            out[path] = with_diagram(path.read_text())
    return out


def write(root: Path) -> list[Path]:
    changed = []
    for path, text in expected_files(root).items():
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            changed.append(path)
    return changed


def stale(root: Path) -> list[Path]:
    return [p for p, text in expected_files(root).items()
            if not p.exists() or p.read_text() != text]
