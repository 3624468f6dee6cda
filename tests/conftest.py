"""Session-wide transition coverage (see tests/test_zz_transition_coverage.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from clusterfsm.fsm.testing import TransitionCoverage

COVERAGE = TransitionCoverage()


@pytest.fixture(scope="session", autouse=True)
def _record_transitions() -> Iterator[None]:
    uninstall = COVERAGE.install()
    yield
    uninstall()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the coverage gate last, whatever order the rest runs in."""
    gates = [i for i in items if i.get_closest_marker("coverage_gate")]
    for gate in gates:
        items.remove(gate)
        items.append(gate)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "coverage_gate: runs last; checks transition coverage")
