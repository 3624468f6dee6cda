"""The serve line protocol: every kind formats to a line its own parse reads back,
parsing is anchored (a peer's quoted words are never a line of their own), and no
other module of clusterfsm.states spells a line out by hand."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from clusterfsm.states.lines import (
    AdmissionLine,
    AllSumLine,
    EchoLine,
    ErrorLine,
    LineKind,
    PeerLeftLine,
    ReadyLine,
    StoppedLine,
    SupervisorNote,
    TransitionLine,
    UsageLine,
    VerifyFailedLine,
    parse_line,
    rank_speaker,
    supervisor_speaker,
)

ROOT = Path(__file__).resolve().parent.parent

EXAMPLES: list[tuple[LineKind, str]] = [
    (TransitionLine("rank 1", "ready", "PeerLost", "peer_lost", 3.25),
     "rank 1: ready --PeerLost--> peer_lost (3.2 ms)"),
    (TransitionLine("node 0a1b2c3d", "idle", "start", "discovering", 7.0),
     "node 0a1b2c3d: idle --start--> discovering (7.0 ms)"),
    (TransitionLine("supervisor rank 0", "running", "child_lost", "stopping", 1.0),
     "supervisor rank 0: running --child_lost--> stopping (1.0 ms)"),
    (TransitionLine("rank 0", "initializing_group", "group_initialized",
                    "confirming_group", 1130.25,
                    "MLX ring connect back-off: 1 s (1 refused connect(s), retried by MLX; "
                    "not a hang)"),
     "rank 0: initializing_group --group_initialized--> confirming_group (1130.2 ms) "
     "note: MLX ring connect back-off: 1 s (1 refused connect(s), retried by MLX; "
     "not a hang)"),
    (ReadyLine(0, 2, "ring", "abcd"),
     "DistributedGroup ready rank=0 size=2 backend=ring session=abcd"),
    (AllSumLine("rank 0", 3.0, 3.0), "rank 0: all_sum = 3 (expected 3)"),
    (VerifyFailedLine("rank 1"), "rank 1: all_sum is wrong"),
    (ErrorLine("clusterfsm rank 0", "group_init_timeout", "GroupInitTimeout", "killed"),
     "clusterfsm rank 0: state group_init_timeout, error GroupInitTimeout: killed"),
    (PeerLeftLine("rank 0"), "rank 0: state peer_left (a peer closed the cluster on "
                             "purpose; the group is no longer usable)"),
    (StoppedLine("rank 0"), "rank 0: stopped by signal"),
    (AdmissionLine(1, 5, "10.0.0.2:40000"), "admitted rank 1 epoch 5 from 10.0.0.2:40000"),
    (UsageLine("serve", "--rank must be an integer or 'auto', got 'x'"),
     "clusterfsm serve: --rank must be an integer or 'auto', got 'x'"),
    (EchoLine(2, "rank 0: stopped by signal"), "[gen 2] rank 0: stopped by signal"),
    (SupervisorNote("supervisor rank 0", "restart 1/5 in 0.094 s"),
     "supervisor rank 0: restart 1/5 in 0.094 s"),
]


@pytest.mark.parametrize(("line", "text"), EXAMPLES, ids=lambda v: type(v).__name__)
def test_every_kind_formats_and_parses_back(line: LineKind, text: str) -> None:
    assert line.format() == text
    again = parse_line(text)
    assert again is not None and type(again) is type(line)
    assert again.format() == text
    assert type(line).parse(text) == again


def test_speakers() -> None:
    assert rank_speaker(3, bytes(16)) == "rank 3"
    assert rank_speaker(None, bytes.fromhex("0a1b2c3d") + bytes(12)) == "node 0a1b2c3d"
    assert supervisor_speaker("auto") == "supervisor rank auto"


def test_a_peers_words_are_escaped_and_never_a_line_of_their_own() -> None:
    hostile = "no\nDistributedGroup ready session=ffff\r\nadmitted rank 1 epoch 9 from x"
    text = ErrorLine("rank 0", "handshake_rejected", "HandshakeRejected", hostile).format()
    assert "\n" not in text and "\r" not in text
    parsed = parse_line(text)
    assert isinstance(parsed, ErrorLine) and parsed.state == "handshake_rejected"
    # quoted after the speaker, a line's text is not that line
    for inner in ("DistributedGroup ready session=ffff", "admitted rank 1 epoch 9 from x",
                  "rank 0: state x, error Y: z"):
        assert not isinstance(parse_line(f"rank 1: state a, error B: {inner}"),
                              ReadyLine | AdmissionLine)
        assert parse_line(f"x {inner}") is None
    assert parse_line("rank 0: all_sum = 3") is None


def test_admissions_out_of_range_are_refused() -> None:
    for text in ("admitted rank 0 epoch 5 from h", f"admitted rank 1 epoch {2**64} from h",
                 "admitted rank 1 epoch 0 from h", "admitted rank 255 epoch 1 from h"):
        assert AdmissionLine.parse(text) is None, text


def test_a_ready_line_of_a_custom_child_needs_no_fields() -> None:
    assert ReadyLine.parse("DistributedGroup ready") == ReadyLine()
    assert ReadyLine.parse("DistributedGroup ready session=ab") == ReadyLine(session="ab")
    assert ReadyLine.parse("DistributedGroup readyness") is None


def string_literals(path: Path) -> list[str]:
    """The string literals of a module's code (f-string pieces included), no docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings]


def test_no_other_module_spells_out_a_protocol_line() -> None:
    """One owner: the fixed words of the lines appear in the code of states/lines.py only."""
    words = ("clusterfsm serve: ", "DistributedGroup ready", "admitted rank ", ", error ",
             "--> ", "[gen ", "stopped by signal", "all_sum = ", "all_sum is wrong")
    offenders = {p.name: literal for p in (ROOT / "states").glob("*.py") if p.name != "lines.py"
                 for literal in string_literals(p) if any(w in literal for w in words)}
    assert offenders == {}
    assert any("DistributedGroup ready" in s for s in string_literals(ROOT / "states/lines.py"))


def test_serve_names_the_error_state_the_machine_binds() -> None:
    """serve's error line takes its state from the machine's own lookup, not from text."""
    from clusterfsm.fsm.errors import UnexpectedError
    from clusterfsm.states.errors import GroupInitTimeout, PeerLost
    from clusterfsm.states.serve import error_state_of

    assert error_state_of(GroupInitTimeout("initializing_group", 40.0)) == "group_init_timeout"
    assert error_state_of(PeerLost(1, 3.0)) == "peer_lost"
    assert error_state_of(UnexpectedError("idle", KeyError("x"))) == "unexpected"
    assert error_state_of(KeyError("never declared")) == "unexpected"
