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

from clusterfsm.fsm import Edge
from clusterfsm.fsm.testing import drive_edge
from clusterfsm.states.machine import BOOTSTRAP


@pytest.mark.parametrize("edge", BOOTSTRAP.edges(),
                         ids=lambda e: f"{e.source}--{e.trigger}-->{e.dest}")
def test_every_declared_bootstrap_edge_is_taken(edge: Edge) -> None:
    out = drive_edge(BOOTSTRAP, edge)
    assert (edge.source, edge.trigger, edge.dest) in [
        (r.source, r.event, r.dest) for r in out.records]
