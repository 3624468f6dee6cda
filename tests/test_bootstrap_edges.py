"""Every declared edge of the bootstrap table, driven through the runner with scripts.

The real-activity tests (test_bootstrap_machine.py, test_integration_ring.py) take
the paths a real cluster takes. Some edges only a bug can take (every state's
``unexpected``) or are awkward to provoke with real peers in every state; this
parametrized test drives each declared edge with scripted activities on the real
table, so the table, its compiled ``transitions.Machine`` and the runner agree on
every one of them.
"""

from __future__ import annotations

import pytest

from fsm import Edge
from fsm.testing import HANG, run_scripted, script_for_edge, shortest_paths
from states.machine import BOOTSTRAP


@pytest.mark.parametrize("edge", BOOTSTRAP.edges(),
                         ids=lambda e: f"{e.source}--{e.trigger}-->{e.dest}")
def test_every_declared_bootstrap_edge_is_taken(edge: Edge) -> None:
    if edge.kind == "cancel":
        path = shortest_paths(BOOTSTRAP)[edge.source]
        script = script_for_edge(BOOTSTRAP, path[-1]) if path else {}
        script.setdefault(edge.source, []).append(HANG)
        out = run_scripted(BOOTSTRAP, script, cancel_after=0.001)
    else:
        out = run_scripted(BOOTSTRAP, script_for_edge(BOOTSTRAP, edge))
    assert (edge.source, edge.trigger, edge.dest) in [
        (r.source, r.event, r.dest) for r in out.records]
