"""docs/visualizing.md's Mermaid picture is what `clusterfsm trace --diagram` draws today
from the traces printed in the same page (so a machine change cannot leave it stale)."""

from __future__ import annotations

import re
from pathlib import Path

from clusterfsm.states.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "visualizing.md"


def test_the_docs_picture_is_regenerated_from_the_docs_traces(tmp_path: Path) -> None:
    text = DOC.read_text()
    traces = re.findall(r"`(wrong-key\.rank\d\.jsonl)`:\n```json\n(.*?)```", text, re.S)
    assert len(traces) == 2
    for name, body in traces:
        (tmp_path / name).write_text(body)
    out = tmp_path / "wrong-key.mmd"
    assert main(["trace", *(str(tmp_path / n) for n, _ in traces), "--diagram", str(out)]) == 0
    shown = re.search(r"```mermaid\n(.*?)```", text, re.S)
    assert shown is not None
    assert shown.group(1).rstrip("\n") == out.read_text().rstrip("\n"), (
        "docs/visualizing.md's picture is stale: regenerate it with the command above")
