"""How rank 0's messages reach every rank: clusterfsm's app channel.

Rank 0 sends each message with ``cluster.broadcast`` (one ``APP_DATA`` message per
peer on the control links, docs/embedding.md, "App messages"); every other rank reads
them, in the order sent, with ``cluster.messages()``. Nothing goes over the MLX group,
so the only collectives the ranks run are the model's own, all inside a generation.

Rules this keeps:

- **Bounded waits.** A broadcast waits only while a peer's inbox is full (its app not
  reading); it has a deadline (``ChannelTimeout``). A rank waiting for rank 0's next
  request needs no keep-alive: the heartbeats run on their own thread, and if rank 0
  goes away the cluster leaves ``ready`` within ``peer_lost_after`` and the app's
  ``cluster.wait_lost()`` watcher ends the process (provider.py).
- **A clean stop on every rank.** A peer's GOODBYE can be handled before its app
  reads the ``Stop`` that came just before it, and the rank would then see
  ``peer_left`` while it still expects requests. So rank 0 waits (with a deadline)
  for every rank's ``Stopped`` before it leaves the cluster.
"""

from __future__ import annotations

from typing import Any

import attrs
import trio
from app_messages import BadMessage, Message, Stopped, decode, encode

from clusterfsm.states.api import Cluster

#: How long rank 0 may wait to hand one message to every rank (only a rank whose app
#: stopped reading its messages makes it wait).
SEND_DEADLINE = 10.0
#: How long rank 0 waits for every rank's ``Stopped`` after its ``Stop``.
STOPPED_DEADLINE = 10.0


@attrs.frozen(auto_exc=True)
class ChannelTimeout(Exception):
    """A send, or rank 0's wait for ``Stopped``, passed its deadline."""

    what: str
    seconds: float

    def __str__(self) -> str:
        return f"{self.what} took longer than {self.seconds:g} s"


async def broadcast(cluster: Cluster[Any], message: Message) -> None:
    """Rank 0: send ``message`` to every other rank."""
    try:
        with trio.fail_after(SEND_DEADLINE):
            await cluster.broadcast(encode(message))
    except trio.TooSlowError as exc:
        raise ChannelTimeout(f"broadcasting {type(message).__name__}", SEND_DEADLINE) from exc


async def tell_rank0(cluster: Cluster[Any], message: Message) -> None:
    """Another rank: send ``message`` to rank 0."""
    try:
        with trio.fail_after(SEND_DEADLINE):
            await cluster.send(0, encode(message))
    except trio.TooSlowError as exc:
        raise ChannelTimeout(f"sending {type(message).__name__} to rank 0", SEND_DEADLINE) from exc


def checked(sender: int, data: bytes, expected_sender: int | None = 0) -> Message:
    """A received message, decoded; from an unexpected rank it is a ``BadMessage``."""
    if expected_sender is not None and sender != expected_sender:
        raise BadMessage(f"a message from rank {sender}, expected rank {expected_sender}")
    return decode(data)


async def wait_stopped(cluster: Cluster[Any]) -> None:
    """Rank 0, after its ``Stop``: wait for a ``Stopped`` from every other rank."""
    waiting = set(range(1, cluster.size))
    try:
        with trio.fail_after(STOPPED_DEADLINE):
            async for sender, data in cluster.messages():
                if not isinstance(checked(sender, data, None), Stopped):
                    raise BadMessage(f"rank {sender} sent something else than Stopped")
                waiting.discard(sender)
                if not waiting:
                    return
    except trio.TooSlowError as exc:
        raise ChannelTimeout(f"waiting for Stopped from ranks {sorted(waiting)}",
                             STOPPED_DEADLINE) from exc
    raise BadMessage(f"the cluster closed before ranks {sorted(waiting)} said Stopped")
