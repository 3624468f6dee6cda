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
DEVINFO_EN4_ACTIVE = "ibv_devinfo-v-grep--tb4-patched-two-down-one-active.txt"
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


def m4pro_mac(**over: str) -> FakeTools:
    """An M4 Pro Mac mini (en2..en4) whose rdma_en4 is cabled and active. No real
    ``ifconfig`` of a per-port Thunderbolt service with IPv4 was found (the field
    notes' gaps), so en8's self-assigned block stands in for en4's."""
    answers = {
        "rdma_ctl status": sample("rdma_ctl--enabled.txt"),
        "ibv_devices": sample("ibv_devices--three-devices-m4pro-mini-guids-redacted.txt"),
        "ibv_devinfo -v -d rdma_en4": sample(DEVINFO_EN4_ACTIVE),
        "ibv_devinfo -v -d rdma_en2": sample(DEVINFO_EN4_ACTIVE),
        "ifconfig en4": sample("ifconfig--en8-self-assigned-169254-mac-mini.txt").replace(
            "en8", "en4"),
        "ifconfig en2": sample("ifconfig--tb-ports-down-no-address-mac-mini.txt"),
    }
    answers.update(over)
    return FakeTools(answers)


def with_max_pd(text: str, device: str, max_pd: int) -> str:
    """``ibv_devinfo -v`` output with a ``max_pd:`` line added to ``device``'s block.

    SYNTHESIZED: no recorded macOS ``ibv_devinfo -v`` shows its device limits (the
    field notes' gaps: no unelided paste was found). One user reported reading
    ``max_pd 11`` there. The line is written in rdma-core's ``ibv_devinfo -v`` layout
    (tab, ``max_pd:``, tabs, the number) right after the device's ``hca_id:`` line,
    where rdma-core prints the device attributes, onto a real recorded block.
    """
    out: list[str] = []
    for line in text.splitlines(keepends=True):
        out.append(line)
        if line.split(":", 1)[0].strip() == "hca_id" and line.split()[-1] == device:
            out.append(f"\tmax_pd:\t\t\t\t{max_pd}\n")
    return "".join(out)
