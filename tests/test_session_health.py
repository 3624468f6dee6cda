"""Session health from the links' heartbeats: healthy, degraded, unavailable."""

from __future__ import annotations

import math
import threading
from types import SimpleNamespace
from typing import Any

import trio

from clusterfsm.states.api import session_health


def link(last_heard: float, *, answered: bool = True, failure: Any = None,
         heartbeats_since: float = -math.inf) -> Any:
    pong = trio.Event()
    if answered:
        pong.set()
    # as ControlLink.quiet_since: the peer's last word, or our heartbeats' start
    return SimpleNamespace(quiet_since=max(last_heard, heartbeats_since), first_pong=pong,
                           failure=failure)


def ctx(*links: Any) -> Any:
    return SimpleNamespace(config=SimpleNamespace(heartbeat_interval=0.1),
                           links=dict(enumerate(links, start=1)))


async def test_health_follows_the_heartbeats(autojump_clock: Any) -> None:
    await trio.sleep(10)
    now = trio.current_time()
    assert session_health(ctx(link(now - 0.05), link(now - 0.2))) == "healthy"
    # an answer older than three intervals: degraded, not yet lost
    assert session_health(ctx(link(now - 0.05), link(now - 0.5))) == "degraded"
    # never answered, or failed: unavailable, whatever the others say
    assert session_health(ctx(link(now), link(now, answered=False))) == "unavailable"
    assert session_health(ctx(link(now), link(now, failure=EOFError()))) == "unavailable"
    # quiet before ready (heartbeats start there) is not stale on arrival
    assert session_health(ctx(link(now - 5, heartbeats_since=now - 0.01))) == "healthy"
    assert session_health(ctx(link(now - 5, heartbeats_since=now - 0.5))) == "degraded"


class _Runner:
    """Just what the health publisher reads of a runner: the state and its end."""

    def __init__(self) -> None:
        self.state = "ready"
        self.ended = trio.Event()

    async def wait_for(self, *states: str) -> str:
        await self.ended.wait()
        return self.state

    def end(self) -> None:
        self.state = "closed"
        self.ended.set()


def live_link() -> Any:
    """A link as the publisher sees it: answered, and heard as its heartbeats say."""
    pong = trio.Event()
    pong.set()
    return SimpleNamespace(quiet_since=trio.current_time(), first_pong=pong,
                           failure=None, failed=trio.Event())


async def test_the_publisher_wakes_rarely_and_reports_changes_in_time(
        autojump_clock: Any) -> None:
    from clusterfsm.states.api import _publish_health
    from clusterfsm.states.health import Health, HealthPublisher

    interval = 0.1
    a, b = live_link(), live_link()
    cluster = ctx(a, b)
    runner = _Runner()
    computed = [0]

    def compute() -> Health:
        computed[0] += 1
        return session_health(cluster)

    publisher = HealthPublisher(compute)
    beating = {id(a): True, id(b): True}
    seen: list[tuple[float, Health]] = []

    async def heartbeats(link: Any, phase: float) -> None:
        await trio.sleep(phase)
        while True:
            if beating[id(link)]:
                link.quiet_since = trio.current_time()
            await trio.sleep(interval)

    async def watch() -> None:
        async for health in publisher.changes():
            seen.append((trio.current_time(), health))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(heartbeats, a, 0.03)
        nursery.start_soon(heartbeats, b, 0.07)
        nursery.start_soon(_publish_health, runner, cluster, publisher)
        nursery.start_soon(watch)

        # healthy, both peers answering: at most one recompute per two intervals
        await trio.sleep(1.0)
        start, before = trio.current_time(), computed[0]
        await trio.sleep(10.0)
        per_second = (computed[0] - before) / (trio.current_time() - start)
        assert per_second <= 1 / (2 * interval)
        assert publisher.value == "healthy"

        # b falls silent: degraded the moment its silence passes three intervals
        beating[id(b)] = False
        await trio.sleep(interval)  # b's last beat is behind us now
        last_heard = b.quiet_since
        await trio.sleep(1.0)
        assert publisher.value == "degraded"
        degraded_at = next(t for t, h in seen if h == "degraded")
        assert last_heard + 3 * interval < degraded_at <= last_heard + 3 * interval + 1e-9

        # b answers again: healthy within one interval of being heard
        beating[id(b)] = True
        await trio.sleep(interval)
        heard_again = b.quiet_since
        await trio.sleep(1.0)
        assert publisher.value == "healthy"
        healthy_at = seen[-1][0]
        assert seen[-1][1] == "healthy"
        assert heard_again <= healthy_at <= heard_again + interval

        # a link fails: unavailable at once (an event, not a timer)
        a.failure = EOFError()
        a.failed.set()
        failed_at = trio.current_time()
        await trio.sleep(1.0)
        assert seen[-1] == (failed_at, "unavailable")
        quiet_from = computed[0]
        await trio.sleep(10.0)
        assert computed[0] == quiet_from  # nothing but the end changes it now

        runner.end()
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    assert publisher.value == "unavailable" and publisher._ended


class _PublisherSteps(trio.abc.Instrument):
    """Counts the task steps of the health publisher (its loop and its watchers)."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if "_publish_health" in task.name:
            self.steps += 1


async def test_with_no_reader_the_publisher_does_not_wake_in_ready(
        autojump_clock: Any) -> None:
    from clusterfsm.states.api import _publish_health
    from clusterfsm.states.health import HealthPublisher

    interval = 0.1
    a, b = live_link(), live_link()
    cluster = ctx(a, b)
    runner: Any = _Runner()
    publisher = HealthPublisher(lambda: session_health(cluster))
    steps = _PublisherSteps()

    async def heartbeats(link: Any, phase: float) -> None:
        await trio.sleep(phase)
        while True:
            link.quiet_since = trio.current_time()
            await trio.sleep(interval)

    async def watch(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        changes = publisher.changes()
        assert await changes.__anext__() == "healthy"
        task_status.started()
        async for _ in changes:
            pass

    trio.lowlevel.add_instrument(steps)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(heartbeats, a, 0.03)
            nursery.start_soon(heartbeats, b, 0.07)
            nursery.start_soon(_publish_health, runner, cluster, publisher)
            await trio.sleep(1.0)

            # nobody reads the changes: not one wake-up in 10 s of heartbeats
            quiet_from = steps.steps
            await trio.sleep(10.0)
            assert steps.steps == quiet_from

            # a reader arms the timer: the loop wakes again (about once per two intervals)
            async with trio.open_nursery() as reading:
                await reading.start(watch)
                await trio.sleep(10.0)
                reading.cancel_scope.cancel()
            assert steps.steps - quiet_from >= 10.0 / (4 * interval)

            # the reader is gone: at most the timer already armed (a link's quiet_since
            # plus three intervals: at most three intervals away), then quiet again
            await trio.sleep(3 * interval + 0.01)
            quiet_from = steps.steps
            await trio.sleep(10.0)
            assert steps.steps == quiet_from
            runner.end()
            await trio.sleep(1.0)
            nursery.cancel_scope.cancel()
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert publisher.ended


def _in_a_thread(read: Any) -> Any:
    """Call ``read`` on another thread while this (the loop's) thread waits for it,
    blocked, as under an ``mx.eval`` on the loop: nothing in trio runs meanwhile."""
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(read()))
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    return got[0]


async def test_health_from_a_thread_is_computed_at_the_call_with_no_reader(
        autojump_clock: Any) -> None:
    from clusterfsm.states.api import Cluster, _publish_health
    from clusterfsm.states.health import HealthPublisher

    interval = 0.1
    a, b = live_link(), live_link()
    cluster_ctx = ctx(a, b)
    runner: Any = _Runner()
    publisher = HealthPublisher(lambda: session_health(cluster_ctx))
    cluster: Any = Cluster(cluster_ctx, runner, publisher)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_publish_health, runner, cluster_ctx, publisher)
        await trio.sleep(interval)
        a.quiet_since = b.quiet_since = trio.current_time()
        assert await trio.to_thread.run_sync(cluster.health) == "healthy"

        # both silent for three intervals and a hair more, nobody reading the changes
        await trio.sleep(3 * interval + 0.001)
        assert await trio.to_thread.run_sync(cluster.health) == "degraded"

        # the loop blocked: each answer is still as of the call
        a.quiet_since = b.quiet_since = trio.current_time()
        assert _in_a_thread(cluster.health) == "healthy"  # heard (as the beats thread writes)
        autojump_clock.jump(3 * interval + 0.001)  # time passes; no trio task runs
        assert _in_a_thread(cluster.health) == "degraded"
        b.quiet_since = trio.current_time()
        assert _in_a_thread(cluster.health) == "degraded"  # a is still silent
        a.quiet_since = trio.current_time()
        assert _in_a_thread(cluster.health) == "healthy"
        a.failure = EOFError()  # a link failed, the loop not told yet
        assert _in_a_thread(cluster.health) == "unavailable"
        a.failure = None
        runner.state = "peer_lost"  # the cluster left ready, the publisher not yet ended
        assert _in_a_thread(cluster.health) == "unavailable"
        assert not publisher.ended

        runner.end()
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    assert publisher.ended and cluster.health() == "unavailable"
