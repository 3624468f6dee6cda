"""Diagrams come from the spec's compiled edges and are byte-for-byte deterministic."""

from __future__ import annotations

from clusterfsm.fsm.diagram import to_dot, to_mermaid
from tests.toy_machine import TOY


def test_mermaid_is_deterministic_valid_header_and_styles_errors() -> None:
    text = to_mermaid(TOY)
    assert text == to_mermaid(TOY)
    assert text.startswith("---\ntitle: toy\n---\nstateDiagram-v2\n")
    assert "\n  class work_failed s_error\n" in text
    assert "\n  class serving s_final\n" in text
    assert "working --> work_timeout: deadline 5 s" in text
    assert "working --> work_failed: WorkFailed" in text
    assert "working --> warming: again [guard]" in text
    assert 'state "cancelled (from any state)" as cancelled' in text
    assert "--> cancelled" not in text  # drawn once as 'from any state', not per state
    assert "Class " not in text


def test_deadline_overrides_show_on_the_timeout_edges() -> None:
    assert "working --> work_timeout: deadline 0.5 s" in to_mermaid(
        TOY, deadlines={"working": 0.5})


def test_dot_is_deterministic_and_colours_error_edges() -> None:
    text = to_dot(TOY)
    assert text == to_dot(TOY)
    assert text.startswith("digraph toy {")
    assert 'working -> work_failed [label=WorkFailed color=darkred' in text


def test_a_run_path_can_be_overlaid() -> None:
    text = to_mermaid(TOY, visited=["idle", "warming", "warmup_timeout"],
                      taken=[("idle", "warming"), ("warming", "warmup_timeout")],
                      annotations={"warming": "(2000 ms)"})
    assert "class warmup_timeout s_ended_error" in text
    assert "class idle s_visited" in text
    assert "class serving s_unvisited" in text
    assert 'state "warming (2000 ms)" as warming' in text
