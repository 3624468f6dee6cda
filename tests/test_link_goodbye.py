"""GOODBYE handling on one control link (sans machine)."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from clusterfsm.states.codec import Goodbye
from clusterfsm.states.link import ControlLink
from clusterfsm.states.transport import Conn

RIGHT, OTHER = b"R" * 16, b"O" * 16


async def test_a_goodbye_for_another_session_does_not_hide_the_right_one(
        autojump_clock: Any) -> None:
    a, b = trio.testing.memory_stream_pair()
    ours = ControlLink(Conn(a, "h0", "h1:1"), peer_rank=1)
    theirs = ControlLink(Conn(b, "h1", "h0:1"), peer_rank=0)
    async with trio.open_nursery() as nursery:
        ours.start(nursery, heartbeat_interval=0.1)
        theirs.start(nursery, heartbeat_interval=0.1)
        await theirs.send(Goodbye(OTHER))
        await trio.sleep(0.05)
        assert ours.said_goodbye(OTHER) and not ours.said_goodbye(RIGHT)
        with trio.move_on_after(1) as waiting:
            async with trio.open_nursery() as inner:
                inner.start_soon(ours.wait_goodbye_for, RIGHT)
                await trio.sleep(0.1)
                await theirs.send(Goodbye(RIGHT))
        assert not waiting.cancelled_caught
        assert ours.said_goodbye(RIGHT)
        nursery.cancel_scope.cancel()
    await ours.aclose()
    await theirs.aclose()


async def test_quiet_since_counts_from_the_start_of_heartbeats(autojump_clock: Any) -> None:
    a, b = trio.testing.memory_stream_pair()
    link = ControlLink(Conn(a, "h0", "h1:1"), peer_rank=1)
    link.last_heard = 1.0  # the peer spoke at t=1, then nobody asked it anything
    await trio.sleep(10)
    assert link.quiet_since == 1.0
    async with trio.open_nursery() as nursery:
        link.start_heartbeats(nursery, 0.1)
        assert link.quiet_since == trio.current_time()
        nursery.cancel_scope.cancel()
    await link.aclose()
    await b.aclose()
