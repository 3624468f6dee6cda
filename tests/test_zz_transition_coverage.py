"""The gate: every declared transition was taken by at least one test of this run."""

from __future__ import annotations

import pytest

from clusterfsm.states.machine import BOOTSTRAP
from tests.conftest import COVERAGE
from tests.toy_machine import TOY


@pytest.mark.coverage_gate
def test_every_declared_transition_was_exercised(request: pytest.FixtureRequest) -> None:
    session = request.session
    if session.config.option.keyword or session.config.option.markexpr or (
            session.testscollected < 100):
        pytest.skip("only meaningful when the whole suite runs")
    COVERAGE.assert_complete(BOOTSTRAP)
    COVERAGE.assert_complete(TOY)

