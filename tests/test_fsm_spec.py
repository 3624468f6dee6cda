"""Spec validation reports every problem at build time, in plain sentences."""

from __future__ import annotations

import attrs
import pytest

from clusterfsm.fsm import ErrorState, SpecError, State, Transition, machine_spec
from tests.toy_machine import TOY, Lost, WarmupTimeout, WorkFailed, never


def problems(**kwargs: object) -> tuple[str, ...]:
    base: dict[str, object] = {
        "initial": "a",
        "states": [State("a", never, deadline=1, on_timeout=WarmupTimeout), State("b")],
        "transitions": [Transition("a", "go", "b")],
        "errors": [ErrorState("warmup_timeout", WarmupTimeout)],
    }
    base.update(kwargs)
    with pytest.raises(SpecError) as info:
        machine_spec("t", **base)  # type: ignore[arg-type]
    return info.value.problems


def test_a_valid_spec_builds_and_gets_the_builtin_error_states() -> None:
    assert "cancelled" in TOY.state_names and "unexpected" in TOY.state_names


def test_unreachable_state_is_reported() -> None:
    got = problems(states=[State("a", never, deadline=1, on_timeout=WarmupTimeout),
                           State("b"), State("island")])
    assert "state 'island' is unreachable from 'a'" in got


def test_error_state_that_no_state_raises_is_unreachable() -> None:
    got = problems(errors=[ErrorState("warmup_timeout", WarmupTimeout),
                           ErrorState("work_failed", WorkFailed)])
    assert "error state 'work_failed' is unreachable from 'a'" in got


def test_state_without_deadline_is_reported() -> None:
    got = problems(states=[State("a", never), State("b")])
    assert "state 'a' has no deadline (declare one, or steady=True)" in got


def test_deadline_without_timeout_error_is_reported() -> None:
    got = problems(states=[State("a", never, deadline=1), State("b")])
    assert "state 'a' has a deadline but no on_timeout error type" in got


def test_timeout_type_bound_to_no_error_state_is_reported() -> None:
    got = problems(errors=[])
    assert "state 'a': on_timeout WarmupTimeout is bound to no error state" in got


def test_error_type_bound_to_two_states_is_reported() -> None:
    got = problems(errors=[ErrorState("warmup_timeout", WarmupTimeout),
                           ErrorState("again", WarmupTimeout)])
    assert any("bound to two states" in p for p in got)


def test_error_type_must_be_an_attrs_exception() -> None:
    class Plain(Exception):
        pass

    got = problems(states=[State("a", never, deadline=1, on_timeout=WarmupTimeout,
                                 raises=(Plain,)), State("b")],
                   errors=[ErrorState("warmup_timeout", WarmupTimeout),
                           ErrorState("plain", Plain)])
    assert "error state 'plain': Plain is not an attrs class" in got


def test_transition_out_of_a_final_state_leads_nowhere() -> None:
    got = problems(transitions=[Transition("a", "go", "b"), Transition("b", "back", "a")])
    assert "transition b --back--> a: leads nowhere, 'b' is final (no activity)" in got


def test_unknown_source_and_dest_are_reported() -> None:
    got = problems(transitions=[Transition("a", "go", "b"), Transition("zz", "x", "yy")])
    assert "transition zz --x--> yy: source is not a declared state" in got
    assert "transition zz --x--> yy: dest is not a declared state" in got


def test_reserved_and_colliding_triggers_are_reported() -> None:
    got = problems(transitions=[Transition("a", "deadline", "b"),
                                Transition("a", "WarmupTimeout", "b")])
    assert "transition a --deadline--> b: trigger 'deadline' is reserved" in got
    assert any("collides with an error type" in p for p in got)


def test_activity_without_outgoing_transition_is_reported() -> None:
    got = problems(states=[State("a", never, deadline=1, on_timeout=WarmupTimeout),
                           State("b", never, deadline=1, on_timeout=WarmupTimeout)])
    assert "state 'b' has an activity but no outgoing transition" in got


def test_steady_state_must_declare_how_it_ends() -> None:
    got = problems(states=[State("a", never, deadline=1, on_timeout=WarmupTimeout),
                           State("b", never, steady=True)],
                   transitions=[Transition("a", "go", "b"), Transition("b", "x", "a")])
    assert "steady state 'b' declares no error it can end in" in got


def test_raising_an_unbound_error_is_reported() -> None:
    got = problems(states=[State("a", never, deadline=1, on_timeout=WarmupTimeout,
                                 raises=(Lost,)), State("b")])
    assert "state 'a' raises Lost, which is bound to no error state" in got


def test_initial_state_must_exist_and_have_an_activity() -> None:
    assert "initial state 'zz' is not a declared state" in problems(initial="zz")
    assert "initial state 'b' has no activity" in problems(initial="b")


def test_names_must_be_unique_snake_case() -> None:
    got = problems(states=[State("a", never, deadline=1, on_timeout=WarmupTimeout),
                           State("b"), State("Bad-Name")])
    assert "state name 'Bad-Name' is not lower_snake_case" in got
    got = problems(states=[State("a", never, deadline=1, on_timeout=WarmupTimeout),
                           State("b"), State("b")])
    assert "state name 'b' is declared twice" in got


def test_spec_error_lists_all_problems_in_its_message() -> None:
    with pytest.raises(SpecError, match="is not valid:\n  - ") as info:
        machine_spec("t", initial="a", states=[State("a", never)], transitions=[])
    assert len(info.value.problems) >= 2


def test_edges_are_stable_and_include_error_deadline_cancel_and_unexpected() -> None:
    edges = [(e.source, e.trigger, e.dest, e.kind) for e in TOY.edges()]
    assert edges == [(e.source, e.trigger, e.dest, e.kind) for e in TOY.edges()]
    assert ("working", "WorkFailed", "work_failed", "error") in edges
    assert ("working", "deadline", "work_timeout", "deadline") in edges
    assert ("serving", "Lost", "lost", "error") in edges
    assert ("serving", "cancel", "cancelled", "cancel") in edges
    assert ("idle", "unexpected", "unexpected", "unexpected") in edges
    assert not any(e[0] == "stopped" for e in edges)


def test_with_activities_rejects_unknown_states() -> None:
    with pytest.raises(KeyError):
        TOY.with_activities({"nope": never})
    assert attrs.has(type(TOY))
