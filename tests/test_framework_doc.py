"""docs/framework.md is a worked example: its Python blocks run, in order, as a test."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "framework.md"


def test_every_python_block_in_the_framework_doc_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 5
    namespace: dict[str, object] = {"__name__": "framework_doc"}
    exec(compile("\n".join(blocks), str(DOC), "exec"), namespace)
