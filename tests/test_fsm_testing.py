"""The test kit itself: scripts, shortest paths, generated edge tests, coverage."""

from __future__ import annotations

import pytest

from clusterfsm.fsm import Edge, Runner
from clusterfsm.fsm.testing import (
    Script,
    ScriptExhausted,
    TransitionCoverage,
    drive_edge,
    run_scripted,
    sample_error,
    shortest_paths,
)
from tests.toy_machine import TOY, WorkFailed


def test_shortest_paths_reach_every_state() -> None:
    paths = shortest_paths(TOY)
    assert set(paths) == set(TOY.state_names)
    assert [e.trigger for e in paths["lost"]] == ["start", "warm", "done", "Lost"]
    assert paths["idle"] == ()


@pytest.mark.parametrize("edge", TOY.edges(), ids=lambda e: f"{e.source}-{e.trigger}")
def test_every_declared_toy_edge_can_be_driven(edge: Edge) -> None:
    out = drive_edge(TOY, edge, context={"budget": 1})
    taken = [(r.source, r.event, r.dest) for r in out.records]
    assert (edge.source, edge.trigger, edge.dest) in taken


def test_exhausted_script_is_a_clear_failure() -> None:
    out = run_scripted(TOY, {"idle": "start", "warming": "warm", "working": "again"},
                       context={"budget": 1})
    assert out.state == "unexpected"
    assert isinstance(getattr(out.error, "exception", None), ScriptExhausted)


def test_sample_error_fills_required_fields() -> None:
    err = sample_error(WorkFailed)
    assert isinstance(err, WorkFailed) and err.code == 0


async def test_coverage_lists_untaken_edges() -> None:
    coverage = TransitionCoverage()
    uninstall = coverage.install()
    try:
        await Runner(Script({"idle": "start", "warming": WorkFailed(1)}).apply(TOY), None).run()
    finally:
        uninstall()
    missing = coverage.missing(TOY)
    assert ("idle", "start", "warming") not in [(e.source, e.trigger, e.dest) for e in missing]
    assert ("working", "done", "serving") in [(e.source, e.trigger, e.dest) for e in missing]
    with pytest.raises(AssertionError, match="never taken"):
        coverage.assert_complete(TOY)
