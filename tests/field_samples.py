"""Outputs recorded on real Macs (``tests/samples/``), read the way the parsers see them.

Every sample starts with three header lines (``# source:``, ``# machine/os as
stated:``, ``# condition:``) saying where it was recorded and in which condition; the
rest is the text as posted. :func:`sample` drops exactly those three lines (a sample may
have ``#`` lines of its own). :func:`transcript_output` cuts one command's output out of
a pasted shell transcript (``$ command`` lines). :class:`FakeTools` answers the
``ToolRunner`` of :mod:`clusterfsm.states.rdma` from samples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import trio

from clusterfsm.states.errors import PrecheckFailed

SAMPLES = Path(__file__).parent / "samples"
HEADER = ("# source:", "# machine/os as stated:", "# condition:")


def sample(name: str) -> str:
    lines = (SAMPLES / name).read_text().splitlines(keepends=True)
    assert all(line.startswith(h) for line, h in zip(lines, HEADER, strict=False)), name
    return "".join(lines[3:])


def transcript_output(name: str, command: str) -> str:
    """The lines after ``$ command`` up to the next ``$`` prompt or ``#`` comment."""
    out: list[str] = []
    inside = False
    for line in sample(name).splitlines(keepends=True):
        if line.startswith(("$", "#")):
            inside = line.startswith("$") and line[1:].strip() == command
            continue
        if inside:
            out.append(line)
    return "".join(out)


class FakeTools:
    """A ToolRunner: ``answers`` maps a command line to its output; a command not in
    it fails as the real tool would (``ifconfig bridge0`` without a bridge exits 1)."""

    def __init__(self, answers: Mapping[str, str]) -> None:
        self.answers = dict(answers)
        self.calls: list[str] = []

    async def __call__(self, argv: Sequence[str]) -> str:
        await trio.lowlevel.checkpoint()
        line = " ".join(argv)
        self.calls.append(line)
        if line in self.answers:
            return self.answers[line]
        raise PrecheckFailed("tool_failed", f"`{line}` exited 1: (not in this scenario)")
