"""A cluster's health, computed by its trio loop and published for any thread.

The loop that runs the cluster recomputes the health (from the links' heartbeats:
:func:`clusterfsm.states.api.session_health`) whenever it could have changed (a link
turning stale, a failure, a first answer, the end: ``_publish_health`` in
:mod:`clusterfsm.states.api`), and stores the result in one attribute. Reading it is one reference
read: safe from any thread (an asyncio loop, a web server's worker, a signal-free
monitoring thread), with no trio call made outside the loop. Readers inside the loop
can also wait for changes (:meth:`HealthPublisher.changes`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import trio

#: ``healthy``; ``degraded``: a peer's last answer is older than three heartbeat
#: intervals; ``unavailable``: a link failed or never answered, or the cluster ended.
Health = Literal["healthy", "degraded", "unavailable"]


class HealthPublisher:
    """Holds the latest health; written by the loop only, read from anywhere."""

    def __init__(self, compute: Callable[[], Health]) -> None:
        self._compute = compute
        self._value: Health = compute()
        self._changed = trio.Event()  # loop-only
        self._ended = False

    @property
    def value(self) -> Health:
        """The latest published health (thread-safe: one attribute read)."""
        return self._value

    def refresh(self) -> None:
        """Recompute (loop thread only); wake the waiting readers if it changed."""
        self._publish(self._compute())

    def finish(self) -> None:
        """The cluster left ``ready``: publish ``unavailable`` and end every reader."""
        self._ended = True
        self._publish("unavailable", force=True)

    def _publish(self, value: Health, *, force: bool = False) -> None:
        if value != self._value or force:
            self._value = value
            changed, self._changed = self._changed, trio.Event()
            changed.set()

    def changes(self) -> HealthChanges:
        return HealthChanges(self)


class HealthChanges:
    """``async for health in cluster.health_changes()``: the current health first,
    then each new value, ending after ``unavailable`` once the cluster left ``ready``.

    A reader sees the latest value when it looks, never a backlog: a flap that came
    and went while it was busy elsewhere is not replayed (nothing to buffer, nothing
    to lose but the past).
    """

    def __init__(self, publisher: HealthPublisher) -> None:
        self._publisher = publisher
        self._last: Health | None = None

    def __aiter__(self) -> HealthChanges:
        return self

    async def __anext__(self) -> Health:
        publisher = self._publisher
        while True:
            value = publisher.value
            if value != self._last:
                self._last = value
                return value
            if publisher._ended:
                raise StopAsyncIteration
            await publisher._changed.wait()
