"""Session health from the links' heartbeats: healthy, degraded, unavailable."""

from __future__ import annotations

import math
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
