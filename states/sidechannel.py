"""jaccl's side channel over our authenticated control links.

``mx.distributed.init(backend="jaccl", all_gather_factory=f)`` (mlx >= 0.32.1) lets
jaccl exchange its RDMA metadata through ``f(rank, size)``'s callable instead of its
own coordinator socket, which binds a port and accepts anyone (docs/design.md section 3).
:class:`JacclSideChannel` provides that callable on top of the session's control
links, so the exchange is bound to the session and to peers that proved the key.

The callable is blocking and runs in MLX's thread (the worker thread that called
``init``, holding the GIL). It hands each round to the trio loop with
``trio.from_thread.run`` (its wait releases the GIL, so the loop, its link readers
and heartbeats run) and blocks until the round is done. Rounds are a star: joiners
send ``GATHER_PART`` to rank 0, which answers everyone with ``GATHER_RESULT``.

A failure (a link lost, a wrong session, a round slower than ``round_timeout``)
raises :class:`SideChannelError` (a ``RuntimeError``, which MLX passes back out of
``init``) and keeps the typed cause in :attr:`JacclSideChannel.failure`, which group
init re-raises instead of a generic init failure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import trio

from clusterfsm.states.codec import MAX_PAYLOAD, GatherPart, GatherResult, Message
from clusterfsm.states.errors import (
    BootstrapRejected,
    FrameError,
    LinkTampered,
    PeerAborted,
    PeerDisconnected,
    PrecheckFailed,
)
from clusterfsm.states.link import ControlLink, unexpected_message

#: Upper bound on one all-gather round (jaccl's exchanges are a few hundred bytes).
ROUND_TIMEOUT = 10.0

AllGather = Callable[[bytes, int], bytes]
AllGatherFactory = Callable[[int, int], AllGather]


def _in_trio_worker_thread() -> bool:
    """True in a thread started by ``trio.to_thread`` (whose task can be cancelled)."""
    try:
        trio.from_thread.check_cancelled()
    except trio.Cancelled:
        return True
    except RuntimeError:  # "this thread wasn't created by Trio"
        return False
    return True


def _only_cancelled(exc: BaseException) -> bool:
    """A ``trio.Cancelled``, or a group of nothing else (from a nursery in a round)."""
    if isinstance(exc, trio.Cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_cancelled(e) for e in exc.exceptions)
    return False


class SideChannelError(RuntimeError):
    """An all-gather round failed; ``JacclSideChannel.failure`` has the typed cause."""


class JacclSideChannel:
    """One init's worth of all-gather rounds between this rank and its peers."""

    def __init__(self, rank: int, world_size: int, session_id: bytes,
                 links: Mapping[int, ControlLink], *,
                 round_timeout: float = ROUND_TIMEOUT) -> None:
        self.rank, self.world_size, self.session_id = rank, world_size, session_id
        self.links = dict(links)
        self.round_timeout = round_timeout
        self.rounds = 0
        self.failure: BaseException | None = None
        self._token = trio.lowlevel.current_trio_token()

    # -- what MLX calls (blocking, in MLX's thread) --------------------------------

    def factory(self, rank: int, size: int) -> AllGather:
        """``all_gather_factory``: MLX passes the rank and size it parsed."""
        if (rank, size) != (self.rank, self.world_size):
            raise SideChannelError(f"jaccl thinks it is rank {rank} of {size}, the "
                                   f"session says {self.rank} of {self.world_size}")
        return self.all_gather

    def all_gather(self, src: bytes, n_bytes: int) -> bytes:
        """Blocking: every rank's ``n_bytes`` in rank order (``size * n_bytes``)."""
        if self.failure is not None:
            raise SideChannelError(str(self.failure))
        try:
            if _in_trio_worker_thread():
                # The thread that called init: the round runs as part of the task
                # waiting in ``to_thread.run_sync``, so the state's deadline and the
                # app's cancellation reach it.
                return trio.from_thread.run(self.gather, bytes(src), n_bytes)
            # Some other MLX thread: run it in the loop (bounded by round_timeout).
            return trio.from_thread.run(self.gather, bytes(src), n_bytes,
                                        trio_token=self._token)
        except SideChannelError:
            raise
        except Exception as exc:  # kept typed in .failure; MLX only passes text on
            self.failure = exc
            raise SideChannelError(f"{type(exc).__name__}: {exc}") from exc
        except BaseException as exc:
            if not _only_cancelled(exc):
                raise
            # The state ended (deadline, app cancel) while MLX waited on us: MLX gets
            # an error it can unwind from; the cancellation goes on in the loop.
            self.failure = PrecheckFailed("side_channel", "cancelled with its state")
            raise SideChannelError("the all-gather was cancelled with its state") from None

    # -- the round, on the trio side ------------------------------------------------

    async def gather(self, src: bytes, n_bytes: int) -> bytes:
        if len(src) != n_bytes:
            raise PrecheckFailed("side_channel", f"{len(src)} bytes given, {n_bytes} said")
        if n_bytes * self.world_size > MAX_PAYLOAD:
            raise PrecheckFailed("side_channel", f"an all-gather of {n_bytes} bytes x "
                                 f"{self.world_size} ranks exceeds a frame")
        this_round = self.rounds
        self.rounds += 1
        try:
            with trio.fail_after(self.round_timeout):
                if self.rank == 0:
                    return await self._collect(this_round, src, n_bytes)
                return await self._contribute(this_round, src, n_bytes)
        except trio.TooSlowError:
            raise PrecheckFailed("side_channel", f"all-gather round {this_round} took "
                                 f"longer than {self.round_timeout:g} s") from None

    async def _collect(self, this_round: int, src: bytes, n_bytes: int) -> bytes:
        """Wait for every joiner's part at once: the first link to fail ends the round
        (waiting in rank order would hide a lost rank 2 behind a slow rank 1)."""
        parts = {0: src}
        failures: list[BaseException] = []

        async def part_of(rank: int, link: ControlLink) -> None:
            try:
                part = await self._expect(link, GatherPart, this_round)
                if len(part.data) != n_bytes:
                    raise BootstrapRejected(f"rank {rank} sent {len(part.data)} bytes in "
                                            f"all-gather round {this_round}, not {n_bytes}",
                                            link.peer)
            except (FrameError, PeerDisconnected, PeerAborted, BootstrapRejected,
                    LinkTampered) as exc:
                failures.append(exc)
                nursery.cancel_scope.cancel()
                return
            parts[rank] = part.data

        async with trio.open_nursery() as nursery:
            for rank, link in self.links.items():
                nursery.start_soon(part_of, rank, link)
        if failures:
            raise failures[0]
        result = b"".join(parts[r] for r in range(self.world_size))
        for link in self.links.values():
            await link.send(GatherResult(self.session_id, this_round, result))
        return result

    async def _contribute(self, this_round: int, src: bytes, n_bytes: int) -> bytes:
        link = self.links[0]
        await link.send(GatherPart(self.session_id, this_round, src))
        result = await self._expect(link, GatherResult, this_round)
        if len(result.data) != n_bytes * self.world_size:
            raise BootstrapRejected(f"all-gather round {this_round} returned "
                                    f"{len(result.data)} bytes, not "
                                    f"{n_bytes * self.world_size}", link.peer)
        return result.data

    async def _expect(self, link: ControlLink, kind: type[GatherPart] | type[GatherResult],
                      this_round: int) -> GatherPart | GatherResult:
        msg: Message = await link.next_message()
        if not isinstance(msg, kind):
            raise unexpected_message(msg, "initializing_group", link.peer)
        if msg.session_id != self.session_id or msg.round != this_round:
            raise BootstrapRejected(f"all-gather message for session "
                                    f"{msg.session_id.hex()[:8]} round {msg.round}, expected "
                                    f"{self.session_id.hex()[:8]} round {this_round}",
                                    link.peer)
        return msg
