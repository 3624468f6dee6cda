"""App messages on the control links: ordered, bounded, flow-controlled.

``cluster.send(rank, data)``, ``cluster.broadcast(data)`` and ``cluster.messages()``
(:mod:`clusterfsm.states.api`) are built here. Why these rules:

- **Ordered per peer.** A message is one or more ``APP_DATA`` chunks sent back to back
  on one link (one message at a time per link), and a link is one TCP stream.
- **Bounded.** A message is at most :data:`MAX_APP_MESSAGE` bytes (bigger ones raise
  :class:`MessageTooLarge` before a byte is sent); a chunk at most
  :data:`~clusterfsm.states.codec.MAX_APP_CHUNK`.
- **Back-pressure, no drops.** A sender sends a chunk only against credit: each link
  direction starts with :data:`WINDOW` frames of credit and the receiver gives credit
  back (``APP_CREDIT``) as it takes frames off its queue. The link's reader puts a
  chunk in a queue of exactly :data:`WINDOW` frames without ever waiting (a peer that
  sends beyond its credit breaks the protocol: typed ``FrameError``, link closed), so
  heartbeats and control frames are never stuck behind app frames. A delivery task
  per link reassembles the chunks and waits for room in the app's inbox
  (:data:`INBOX` messages); while the app does not read, no credit goes back and
  the sender's ``send`` waits. Memory per link is bounded by
  ``WINDOW * MAX_APP_CHUNK`` queued bytes (32 x 64 KiB = 2 MiB) plus one message being
  reassembled, and the inbox by ``INBOX * MAX_APP_MESSAGE``.
- **Star topology.** A joiner has one link, to rank 0. A message from one joiner to
  another goes through rank 0, which relays it whole (its own inbox is not used, and
  back-pressure carries through: the relay waits for credit on the next link).

Frames pass through :meth:`ControlLink.send <clusterfsm.states.link.ControlLink.send>`
and its reader like every other frame, so whatever protects the link protects them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

import attrs
import trio

from clusterfsm.states.codec import MAX_APP_CHUNK, AppCredit, AppData, Message
from clusterfsm.states.errors import FrameError, FrameErrorKind

#: Largest app message (1 MiB); bigger is refused with :class:`MessageTooLarge`.
MAX_APP_MESSAGE = 1 << 20
#: APP_DATA frames a sender may have unacknowledged on one link (its credit).
WINDOW = 32
#: Whole messages waiting for the app in ``cluster.messages()``.
INBOX = 16
#: A message whose credit is granted goes out within this many seconds, or the link
#: is closed (only a frozen or vanished peer stops a stream its reader drains).
SEND_BOUND = 10.0
# A whole message must fit in the window: its credit is taken at once (a 1 MiB
# message is 16 frames of 64 KiB).
assert -(-MAX_APP_MESSAGE // MAX_APP_CHUNK) <= WINDOW


@attrs.frozen(auto_exc=True)
class MessageTooLarge(ValueError):
    """``cluster.send``/``broadcast`` of more than :data:`MAX_APP_MESSAGE` bytes (a
    local usage error: nothing was sent; split the payload in the app)."""

    size: int
    limit: int = MAX_APP_MESSAGE

    def __str__(self) -> str:
        return f"app message of {self.size} bytes exceeds the {self.limit}-byte limit"


@attrs.frozen(auto_exc=True)
class UnknownRank(ValueError):
    """``cluster.send`` to a rank that is not a peer (out of range, or our own)."""

    rank: int
    world_size: int

    def __str__(self) -> str:
        return f"rank {self.rank} is not a peer in a group of {self.world_size}"


class LinkSide(Protocol):
    """What a lane needs of its link (``states/link.py``'s ControlLink)."""

    failed: trio.Event
    failure: BaseException | None

    @property
    def peer(self) -> str: ...

    async def send(self, msg: Message) -> None: ...

    async def send_many(self, msgs: Sequence[Message]) -> None: ...

    async def aclose(self) -> None: ...


def _violation(detail: str, peer: str) -> FrameError:
    return FrameError(FrameErrorKind.UNEXPECTED, detail, peer)


class AppLane:
    """One link's app traffic, both directions: credit for sending, the received
    chunk queue, and delivery (:meth:`deliver`)."""

    def __init__(self, link: LinkSide, window: int = WINDOW) -> None:
        self._link = link
        self._window = window
        self._queue_in, self._queue = trio.open_memory_channel[AppData](window)
        self._credit = window
        self._credit_added = trio.Event()
        self._sending = trio.Lock()  # one message's chunks back to back
        self._taken = 0  # frames taken off the queue, credit not yet given back

    # -- called by the link's reader: never waits ---------------------------------------

    def received(self, frame: AppData) -> None:
        """Queue a chunk; beyond the credit we gave is a protocol violation."""
        try:
            self._queue_in.send_nowait(frame)
        except trio.WouldBlock:
            raise _violation(f"APP_DATA beyond the {self._window}-frame credit",
                             self._link.peer) from None
        except trio.ClosedResourceError:
            pass  # the link failed; nothing will read it

    def credited(self, frames: int) -> None:
        """The peer took ``frames`` more of ours off its queue."""
        if self._credit + frames > self._window:
            raise _violation(f"APP_CREDIT of {frames} exceeds what is in flight",
                             self._link.peer)
        self._credit += frames
        self._credit_added.set()
        self._credit_added = trio.Event()

    def close(self) -> None:
        """The link failed: deliver nothing more."""
        self._queue_in.close()

    # -- sending ------------------------------------------------------------------------

    async def send(self, src: int, dst: int, data: bytes) -> None:
        """Send one whole message, each chunk against credit (waits while the peer's
        queue is full: that is the back-pressure).

        Cancellation never leaves half a message on the wire (the peer would glue the
        next message onto it): the credit for every chunk is waited for first, while
        cancelling is harmless, then the chunks go out shielded. Those sends cannot
        wait on the peer's app (its reader always drains the stream), only on a frozen
        or vanished peer, so they are bounded by :data:`SEND_BOUND`, after which the
        link is closed.
        """
        if len(data) <= MAX_APP_CHUNK:
            chunks = [data]
        else:
            chunks = [data[i:i + MAX_APP_CHUNK] for i in range(0, len(data), MAX_APP_CHUNK)]
        async with self._sending:
            while self._credit < len(chunks):
                if self._link.failure is not None:
                    raise self._link.failure
                await _wait_either(self._credit_added, self._link.failed)
            self._credit -= len(chunks)
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + SEND_BOUND
                last = len(chunks) - 1
                await self._link.send_many(
                    [AppData(src, dst, i < last, chunk) for i, chunk in enumerate(chunks)])
            if scope.cancelled_caught:
                await self._link.aclose()
                assert self._link.failure is not None
                raise self._link.failure

    # -- receiving ----------------------------------------------------------------------

    async def deliver(self, check: Callable[[AppData], None],
                      route: Callable[[int, int, bytes], Awaitable[None]]) -> None:
        """Until the link fails: reassemble messages, ``check`` each chunk (raise to
        refuse it), hand each message to ``route`` (which may wait), give credit back."""
        parts: list[bytes] = []
        size = 0
        async for frame in self._queue:
            check(frame)
            size += len(frame.body)
            if size > MAX_APP_MESSAGE:
                raise _violation(f"app message above {MAX_APP_MESSAGE} bytes",
                                 self._link.peer)
            parts.append(frame.body)
            if not frame.more:
                data = b"".join(parts)
                parts, size = [], 0
                await route(frame.src, frame.dst, data)
            self._taken += 1
            if self._taken >= max(1, self._window // 2):
                taken, self._taken = self._taken, 0
                await self._link.send(AppCredit(taken))


async def _wait_either(a: trio.Event, b: trio.Event) -> None:
    async with trio.open_nursery() as nursery:
        async def on(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(on, a)
        nursery.start_soon(on, b)


class AppLink(Protocol):
    """A link as the router sees it."""

    peer_rank: int
    app: AppLane

    async def run_guarded(self, task: Callable[[], Awaitable[None]]) -> None: ...


class AppRouter:
    """One rank's app messaging over its links: send, broadcast, relay, the inbox."""

    def __init__(self, rank: int, world_size: int, links: Mapping[int, AppLink],
                 inbox: int = INBOX) -> None:
        self.rank = rank
        self.world_size = world_size
        self._links = links
        self._inbox_in, self._inbox = trio.open_memory_channel[tuple[int, bytes]](inbox)

    def start(self, nursery: trio.Nursery) -> None:
        """One delivery task per link; its failure fails that link."""
        for link in self._links.values():
            nursery.start_soon(link.run_guarded, self._delivery(link),
                               name=f"app-delivery[{link.peer_rank}]")

    def _delivery(self, link: AppLink) -> Callable[[], Awaitable[None]]:
        def check(frame: AppData) -> None:
            if self.rank == 0:
                ok = frame.src == link.peer_rank and 0 <= frame.dst < self.world_size \
                    and frame.dst != link.peer_rank
            else:
                ok = frame.dst == self.rank and frame.src != self.rank \
                    and frame.src < self.world_size
            if not ok:
                raise _violation(f"APP_DATA src {frame.src} -> dst {frame.dst} on the "
                                 f"link of rank {link.peer_rank}", "")

        async def run() -> None:
            await link.app.deliver(check, self._route)

        return run

    async def _route(self, src: int, dst: int, data: bytes) -> None:
        if dst == self.rank:
            await self._inbox_in.send((src, data))
        else:  # rank 0 relays between joiners
            await self._links[dst].app.send(src, dst, data)

    def _check(self, data: bytes) -> None:
        if len(data) > MAX_APP_MESSAGE:
            raise MessageTooLarge(len(data))

    async def send(self, rank: int, data: bytes) -> None:
        """Send ``data`` to ``rank`` (through rank 0 if neither end is rank 0)."""
        self._check(data)
        if not 0 <= rank < self.world_size or rank == self.rank:
            raise UnknownRank(rank, self.world_size)
        hop = rank if rank in self._links else 0
        await self._links[hop].app.send(self.rank, rank,
                                        data if type(data) is bytes else bytes(data))

    async def broadcast(self, data: bytes) -> None:
        """Send ``data`` to every other rank (in rank order; each sees it in order
        with what else we send it)."""
        self._check(data)
        for rank in range(self.world_size):
            if rank != self.rank:
                await self.send(rank, data)

    def messages(self) -> trio.MemoryReceiveChannel[tuple[int, bytes]]:
        """``(rank, data)`` for every message sent to us, in order per sender; the
        iteration ends when the cluster closes. One reader (the channel is shared)."""
        return self._inbox

    def close(self) -> None:
        self._inbox_in.close()
