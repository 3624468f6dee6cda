"""A cluster's health as changes, published by its trio loop for the readers that watch.

``cluster.health()`` needs none of this: it computes the health at the call, from the
links' state (:meth:`clusterfsm.states.api.Cluster.health`). What lives here serves
``async for health in cluster.health_changes()``: the loop that runs the cluster
recomputes the health (``_publish_health`` in :mod:`clusterfsm.states.api`) on every
event that changes it (a link's failure, a first answer, the end), and, only while a
reader waits for a change, also on the timer that catches a link turning stale or fresh
again. Why only then: a timer nobody waits on is the loop's main cost in a quiet
``ready`` (several wake-ups a second per rank, re-armed by every heartbeat), paid by
every rank for a stream most apps never read.

A reader that starts waiting asks the loop for a fresh value first (:meth:`poke`), so
what it gets is never older than its own call, even after a time with no timer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import trio

#: ``healthy``; ``degraded``: a peer's last answer is older than three heartbeat
#: intervals; ``unavailable``: a link failed or never answered, or the cluster ended.
Health = Literal["healthy", "degraded", "unavailable"]


class HealthPublisher:
    """The latest health computed by the loop, and the readers waiting for a change.

    Loop-only (every method runs in the cluster's trio loop); ``cluster.health()``
    does not read it.
    """

    def __init__(self, compute: Callable[[], Health]) -> None:
        self._compute = compute
        self._value: Health = compute()
        self._changed = trio.Event()  # set (and replaced) when the value changes
        self._refreshed = trio.Event()  # set (and replaced) on every recompute
        self._poked = trio.Event()  # wakes the publishing loop
        self._readers = 0  # readers waiting inside ``__anext__``
        self._ended = False

    @property
    def value(self) -> Health:
        """The latest published health: current only while a reader watches (else as
        of the last event); ``cluster.health()`` computes its own."""
        return self._value

    @property
    def ended(self) -> bool:
        """The cluster left ``ready``: the value is ``unavailable`` for good."""
        return self._ended

    @property
    def watched(self) -> bool:
        """A reader waits for a change: the loop keeps its timer armed."""
        return self._readers > 0

    def refresh(self) -> None:
        """Recompute; wake the readers waiting for a fresh value, and those waiting
        for a change if it changed."""
        self._publish(self._compute())

    def finish(self) -> None:
        """The cluster left ``ready``: publish ``unavailable`` and end every reader."""
        self._ended = True
        self._publish("unavailable", force=True)

    def poke(self) -> None:
        """Wake the publishing loop: an event may have changed the health, or a reader
        has started waiting and needs a fresh value and the timer."""
        self._poked.set()

    async def wait_poked(self, deadline: float) -> None:
        """The loop's wait: until :meth:`poke` or ``deadline`` (``inf``: no timer)."""
        with trio.move_on_at(deadline):
            await self._poked.wait()
        if self._poked.is_set():
            self._poked = trio.Event()

    def _publish(self, value: Health, *, force: bool = False) -> None:
        refreshed, self._refreshed = self._refreshed, trio.Event()
        if value != self._value or force:
            self._value = value
            changed, self._changed = self._changed, trio.Event()
            changed.set()
        refreshed.set()

    def changes(self) -> HealthChanges:
        return HealthChanges(self)


class HealthChanges:
    """``async for health in cluster.health_changes()``: the current health first,
    then each new value, ending after ``unavailable`` once the cluster left ``ready``.

    A reader sees the latest value when it looks, never a backlog: a flap that came
    and went while it was busy elsewhere is not replayed (nothing to buffer, nothing
    to lose but the past). Each call first asks the loop to recompute (the loop runs
    no timer while nobody waits), so even the first value is as of the call.
    """

    def __init__(self, publisher: HealthPublisher) -> None:
        self._publisher = publisher
        self._last: Health | None = None

    def __aiter__(self) -> HealthChanges:
        return self

    async def __anext__(self) -> Health:
        publisher = self._publisher
        publisher._readers += 1
        try:
            if not publisher._ended:
                refreshed = publisher._refreshed
                publisher.poke()
                await refreshed.wait()
            while True:
                value = publisher._value
                if value != self._last:
                    self._last = value
                    return value
                if publisher._ended:
                    raise StopAsyncIteration
                await publisher._changed.wait()
        finally:
            publisher._readers -= 1
