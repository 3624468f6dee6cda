"""GOODBYE handling on one control link (sans machine)."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from states.codec import Goodbye
from states.link import ControlLink
from states.transport import Conn

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
