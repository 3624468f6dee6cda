"""Silence in ready counts from entering ready: periodic heartbeats start there, so a
peer that went quiet while another rank's init was slow is not "lost" on arrival."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from clusterfsm.states.groupinit import Group
from clusterfsm.states.testing import fake_initializer
from tests.cluster_harness import config, run_ranks


async def test_a_slow_init_elsewhere_does_not_make_a_quiet_peer_lost(
        autojump_clock: Any) -> None:
    slow = fake_initializer()
    direct = slow.run_blocking

    async def five_seconds_late(fn: Callable[[], Group]) -> Group:
        await trio.sleep(5)  # longer than peer_lost_after (3 s)
        result: Group = await direct(fn)
        return result

    slow.run_blocking = five_seconds_late
    results = await run_ranks([config(0, 3), config(1, 3), config(2, 3)],
                              initializers={2: slow})
    assert [r.state for r in results] == ["closed"] * 3, [r.error for r in results]


class QuietLink:
    """A link whose peer last spoke long ago and now says nothing at all."""

    def __init__(self, last_heard: float) -> None:
        self.last_heard = last_heard
        self.failure = None
        self.failed = trio.Event()
        self.heartbeats_since = trio.current_time()  # ready started them just now

    @property
    def quiet_since(self) -> float:  # as ControlLink.quiet_since
        return max(self.last_heard, self.heartbeats_since)

    def said_goodbye(self, session_id: bytes) -> bool:
        return False

    async def wait_goodbye_for(self, session_id: bytes) -> None:
        await trio.sleep_forever()


async def test_silence_is_counted_from_entering_ready(autojump_clock: Any) -> None:
    import pytest

    from clusterfsm.states.activities import _watch_peer
    from clusterfsm.states.errors import PeerLost

    await trio.sleep(100)
    link = QuietLink(last_heard=trio.current_time() - 10)  # quiet during a long init
    entered = trio.current_time()
    with pytest.raises(PeerLost):
        await _watch_peer(1, link, 3.0, b"s" * 16, lambda rank: None)  # type: ignore[arg-type]
    assert trio.current_time() - entered == pytest.approx(3.0)  # not at once
