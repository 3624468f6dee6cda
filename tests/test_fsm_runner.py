"""The trio runner: outcomes become triggers; deadlines, errors, cancellation are typed."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from clusterfsm.fsm import (
    DeadlineOverrideError,
    IllegalTransition,
    MachineCancelled,
    Runner,
    TraceWriter,
    UnexpectedError,
    current_deadline,
    effective_deadlines,
    note_outcome,
    read_trace,
    report_progress,
    time_left,
)
from clusterfsm.fsm.testing import HANG, After, Script, run_scripted
from tests.toy_machine import TOY, Lost, WarmupTimeout, WorkFailed, WorkFailedBadly, WorkTimeout

HAPPY = {"idle": "start", "warming": "warm", "working": "done", "serving": "stop"}


def test_happy_path_visits_states_in_order_with_elapsed_times() -> None:
    script = dict(HAPPY, warming=After(0.25, "warm"))
    out = run_scripted(TOY, script)
    assert out.ok and out.state == "stopped"
    assert [(r.source, r.event, r.dest) for r in out.records] == [
        ("idle", "start", "warming"),
        ("warming", "warm", "working"),
        ("working", "done", "serving"),
        ("serving", "stop", "stopped"),
    ]
    assert out.records[1].elapsed_ms == pytest.approx(250.0)
    assert all(r.error is None for r in out.records)


def test_declared_error_goes_to_its_error_state_with_the_value() -> None:
    err = WorkFailed(7)
    out = run_scripted(TOY, {"idle": "start", "warming": "warm", "working": err})
    assert out.state == "work_failed" and out.error is err
    assert out.records[-1].event == "WorkFailed" and out.records[-1].error == "WorkFailed"


def test_subclass_of_declared_error_is_routed_through_the_mro() -> None:
    out = run_scripted(TOY, {"idle": "start", "warming": "warm", "working": WorkFailedBadly(1)})
    assert out.state == "work_failed"
    assert isinstance(out.error, WorkFailedBadly)


def test_deadline_fires_the_states_timeout_error_with_progress_detail() -> None:
    async def waiting(_ctx: object) -> str:
        report_progress("waiting for 2 of 3 peers")
        await trio.sleep_forever()
        raise AssertionError

    spec = Script({"idle": "start", "warming": "warm"}).apply(TOY).with_activities(
        {"working": waiting})
    out = run_scripted(spec, {})
    assert out.state == "work_timeout"
    assert out.error == WorkTimeout("working", 5.0, "waiting for 2 of 3 peers") or (
        isinstance(out.error, WorkTimeout) and out.error.detail == "waiting for 2 of 3 peers")
    assert out.records[-1].elapsed_ms == pytest.approx(5000.0)


def test_a_noted_outcome_goes_on_that_steps_record_only(tmp_path: Path) -> None:
    async def slow_but_fine(_ctx: object) -> str:
        note_outcome("a library slept in its retry; not a hang")
        return "done"

    spec = Script({"idle": "start", "warming": "warm", "serving": "stop"}).apply(
        TOY).with_activities({"working": slow_but_fine})
    path = tmp_path / "t.jsonl"
    writer = TraceWriter(path)
    out = run_scripted(spec, {}, observers=[writer.record])
    writer.close()
    assert [r.note for r in out.records] == [
        None, None, "a library slept in its retry; not a hang", None]
    assert [r.note for r in read_trace(path).records] == [r.note for r in out.records]
    note_outcome("outside a run: nothing happens")


def test_deadline_override_per_run() -> None:
    out = run_scripted(TOY, {"idle": "start", "warming": HANG}, deadlines={"warming": 0.5})
    assert out.state == "warmup_timeout"
    assert isinstance(out.error, WarmupTimeout) and out.error.deadline_s == 0.5
    assert out.records[-1].elapsed_ms == pytest.approx(500.0)


@pytest.mark.parametrize(
    ("deadlines", "message"),
    [({"nope": 1.0}, "not a state"), ({"stopped": 1.0}, "not a state"),
     ({"idle": -1.0}, "positive"), ({"idle": math.inf}, "positive")],
)
def test_bad_deadline_overrides_are_refused(deadlines: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Runner(TOY, None, deadlines=deadlines)


@pytest.mark.parametrize(
    ("deadlines", "problem"),
    [({"nope": 1.0}, "no such state"), ({"stopped": 1.0}, "it is final"),
     ({"serving": 1.0}, "declares no timeout error"), ({"idle": 0.0}, "positive"),
     ({"idle": math.nan}, "finite")],
)
def test_a_deadline_override_error_is_typed_and_names_the_states_that_take_one(
    deadlines: dict[str, float], problem: str,
) -> None:
    with pytest.raises(DeadlineOverrideError) as caught:
        effective_deadlines(TOY, deadlines)
    error = caught.value
    [name] = deadlines
    assert error.machine == "toy" and error.state == name and problem in error.problem
    assert error.allowed == ("idle", "warming", "working")
    assert str(error).startswith(f"deadline {name}=")
    assert "\n" not in str(error)


def test_effective_deadlines_are_the_declared_ones_with_the_overrides() -> None:
    assert effective_deadlines(TOY) == {"idle": 1.0, "warming": 2.0, "working": 5.0}
    assert effective_deadlines(TOY, {"warming": 0.5}) == {
        "idle": 1.0, "warming": 0.5, "working": 5.0}
    runner = Runner(TOY, None, deadlines={"warming": 0.5})
    assert runner.deadline_for("warming") == 0.5 and runner.deadline_for("serving") is None


def test_an_activity_reads_its_time_left_from_the_runner() -> None:
    seen: dict[str, tuple[str, float, float | None, float]] = {}

    def noting(event: str, wait: float = 0.0) -> Callable[[object], Awaitable[str]]:
        async def activity(_ctx: object) -> str:
            await trio.sleep(wait)
            deadline = current_deadline()
            seen[deadline.state] = (deadline.state, deadline.elapsed(), deadline.seconds,
                                    time_left())
            return event
        return activity

    spec = TOY.with_activities({
        "idle": noting("start"), "warming": noting("warm", 0.25),
        "working": noting("done"), "serving": noting("stop")})

    async def main() -> None:
        await Runner(spec, None, deadlines={"warming": 0.5}).run()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert seen["idle"] == ("idle", 0.0, 1.0, 1.0)
    assert seen["warming"] == ("warming", 0.25, 0.5, 0.25)
    assert seen["serving"][2] is None and seen["serving"][3] == math.inf


def test_current_deadline_outside_an_activity_is_an_error() -> None:
    async def main() -> None:
        with pytest.raises(RuntimeError, match="inside an activity"):
            current_deadline()

    trio.run(main)


def test_the_run_state_has_one_home_the_transitions_model() -> None:
    async def returns_start(_ctx: object) -> str:
        return "start"

    async def hangs(_ctx: object) -> str:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    spec = TOY.with_activities({"idle": returns_start, "warming": hangs})

    async def main() -> None:
        runner = Runner(spec, None)
        assert runner.state == runner._model.state == "idle"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner.run)
            assert await runner.wait_for("warming") == "warming"
            assert runner.state == runner._model.state == "warming"
            nursery.cancel_scope.cancel()
        assert runner.state == runner._model.state == "cancelled"

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_undeclared_exception_ends_in_unexpected_and_is_kept() -> None:
    boom = KeyError("boom")
    out = run_scripted(TOY, {"idle": boom})
    assert out.state == "unexpected"
    assert isinstance(out.error, UnexpectedError)
    assert out.error.exception is boom and out.error.state == "idle"


def test_declared_error_raised_where_not_declared_is_an_illegal_transition() -> None:
    out = run_scripted(TOY, {"idle": Lost("early")})
    assert out.state == "unexpected"
    assert isinstance(out.error, UnexpectedError)
    assert isinstance(out.error.exception, IllegalTransition)
    assert out.error.exception.trigger == "Lost"


def test_illegal_trigger_is_a_typed_error_not_ignored() -> None:
    out = run_scripted(TOY, {"idle": "warm"})
    assert out.state == "unexpected"
    assert isinstance(out.error, UnexpectedError)
    illegal = out.error.exception
    assert isinstance(illegal, IllegalTransition)
    assert (illegal.state, illegal.trigger) == ("idle", "warm")
    out = run_scripted(TOY, {"idle": "no_such_trigger"})
    assert isinstance(out.error, UnexpectedError)
    assert "declares no such trigger" in str(out.error.exception)


def test_failing_guard_is_an_illegal_transition() -> None:
    script = {"idle": "start", "warming": "warm", "working": "again"}
    out = run_scripted(TOY, script, context={"budget": 0})
    assert out.state == "unexpected"
    assert isinstance(out.error, UnexpectedError)
    assert "guard" in str(out.error.exception)
    ok = run_scripted(TOY, {"idle": "start", "warming": ["warm", HANG], "working": "again"},
                      context={"budget": 1})
    assert [r.event for r in ok.records][:3] == ["start", "warm", "again"]


def test_activity_returning_a_non_string_is_unexpected() -> None:
    async def bad(_ctx: object) -> str:
        return 42  # type: ignore[return-value]

    out = run_scripted(TOY.with_activities({"idle": bad}), {})
    assert isinstance(out.error, UnexpectedError)
    assert isinstance(out.error.exception, TypeError)


def test_exception_group_from_a_nursery_is_routed_by_its_declared_leaf() -> None:
    async def two_tasks(_ctx: object) -> str:
        async def fail() -> None:
            raise WorkFailed(3)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fail)
            nursery.start_soon(trio.sleep_forever)
        return "done"

    spec = Script({"idle": "start", "warming": "warm"}).apply(TOY).with_activities(
        {"working": two_tasks})
    out = run_scripted(spec, {})
    assert out.state == "work_failed"
    assert out.error == WorkFailed(3) or (
        isinstance(out.error, WorkFailed) and out.error.code == 3)


def test_outside_cancellation_ends_in_cancelled_and_propagates() -> None:
    out = run_scripted(TOY, {"idle": "start", "warming": HANG}, cancel_after=0.3)
    assert out.state == "cancelled"
    assert isinstance(out.error, MachineCancelled) and out.error.state == "warming"
    assert out.records[-1].event == "cancel"


async def test_cancellation_is_reraised_to_the_caller(autojump_clock: trio.abc.Clock) -> None:
    runner = Runner(Script({"idle": HANG}).apply(TOY), None)
    with trio.move_on_after(0.1) as scope:
        await runner.run()
    assert scope.cancelled_caught
    assert runner.state == "cancelled"


async def test_run_leaves_no_task_behind(autojump_clock: trio.abc.Clock) -> None:
    async def spawner(_ctx: object) -> str:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            nursery.start_soon(trio.sleep_forever)
            await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
        return "start"

    before = trio.lowlevel.current_statistics().tasks_living
    nurseries = list(trio.lowlevel.current_task().child_nurseries)
    spec = Script({"warming": HANG}).apply(TOY).with_activities({"idle": spawner})
    out = await Runner(spec, None).run()
    assert out.state == "warmup_timeout"
    assert trio.lowlevel.current_statistics().tasks_living == before
    assert trio.lowlevel.current_task().child_nurseries == nurseries


async def test_observers_subscribers_and_wait_for_see_every_transition(
    autojump_clock: trio.abc.Clock,
) -> None:
    seen: list[str] = []
    spec = Script(dict(HAPPY, working=After(1.0, "done"))).apply(TOY)
    runner = Runner(spec, None, observers=[lambda r: seen.append(r.dest)])
    channel = runner.subscribe()
    streamed: list[str] = []
    async with trio.open_nursery() as nursery:
        async def consume() -> None:
            async for rec in channel:
                streamed.append(rec.dest)

        nursery.start_soon(consume)
        nursery.start_soon(runner.run)
        assert await runner.wait_for("serving") in ("serving", "stopped")
    assert seen == streamed == ["warming", "working", "serving", "stopped"]
    assert await runner.wait_for("working") == "stopped"  # finished: returns at once


def test_a_failing_observer_is_logged_and_the_run_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(_rec: object) -> None:
        raise RuntimeError("display crashed")

    with caplog.at_level(logging.ERROR, logger="clusterfsm.fsm.runner"):
        out = run_scripted(TOY, HAPPY, observers=[broken])
    assert out.ok
    assert "display crashed" in caplog.text


async def test_a_runner_runs_once(autojump_clock: trio.abc.Clock) -> None:
    runner = Runner(Script(HAPPY).apply(TOY), None)
    await runner.run()
    with pytest.raises(RuntimeError, match="runs once"):
        await runner.run()
    closed = runner.subscribe()
    with pytest.raises(trio.EndOfChannel):
        closed.receive_nowait()
    with pytest.raises(KeyError):
        await runner.wait_for("nope")


def test_steady_state_without_deadline_lasts_until_its_activity_ends() -> None:
    script = dict(HAPPY, serving=After(3600.0, Lost("peer gone")))
    out = run_scripted(TOY, script)
    assert out.state == "lost"
    assert out.records[-1].elapsed_ms == pytest.approx(3_600_000.0)
