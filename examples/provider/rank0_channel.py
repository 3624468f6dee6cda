"""The one function that carries rank 0's messages to every rank.

clusterfsm has no app-message API yet (``cluster.broadcast`` / ``cluster.messages()``
are planned), so this moves the bytes over the MLX group itself: rank 0 contributes
its bytes to an ``all_sum``, every other rank contributes zeros, and every rank reads
rank 0's bytes out of the sum. Two collectives per message: the length, then the
bytes. When the app-message API lands, only :func:`share_from_rank0` changes.

Rules this keeps (see docs/embedding.md, "Collectives from your app"):

- every rank calls it at the same point of its loop, so the collectives pair up;
- it runs in a trio worker thread (a collective blocks until every rank joins), so the
  cluster's heartbeats keep running; the MLX work is evaluated before the thread
  returns, so nothing is left in flight behind it;
- it has a deadline: a rank that never joins is a ``ShareTimeout``, not a hang.
"""

from __future__ import annotations

from typing import Any

import attrs
import trio

#: Larger than any message app_messages.py makes (a request line is at most 16 KiB).
MAX_MESSAGE_BYTES = 64 * 1024


@attrs.frozen(auto_exc=True)
class ShareTimeout(Exception):
    """A rank did not join the broadcast within the deadline."""

    seconds: float

    def __str__(self) -> str:
        return f"no broadcast from every rank within {self.seconds:g} s"


@attrs.frozen(auto_exc=True)
class BadLength(Exception):
    """A message length outside 1..``MAX_MESSAGE_BYTES``: too large on the sender, or
    (on any rank) the sign that the broadcast met another collective."""

    length: int

    def __str__(self) -> str:
        return f"message length {self.length} is not in 1..{MAX_MESSAGE_BYTES}"


def _broadcast_blocking(group: Any, payload: bytes | None) -> bytes:
    import mlx.core as mx

    size = mx.array([len(payload) if payload is not None else 0], dtype=mx.int32)
    size = mx.distributed.all_sum(size, group=group)
    mx.eval(size)
    value: Any = size.item()
    length = int(value)
    if not 0 < length <= MAX_MESSAGE_BYTES:
        raise BadLength(length)
    data = (mx.array(list(payload), dtype=mx.uint8) if payload is not None
            else mx.zeros((length,), dtype=mx.uint8))
    data = mx.distributed.all_sum(data, group=group)
    mx.eval(data)
    buffer: Any = data  # an mx.array exposes the buffer protocol (uint8: the bytes)
    return bytes(memoryview(buffer))


async def share_from_rank0(group: Any, payload: bytes | None, *, deadline: float) -> bytes:
    """Rank 0 passes its ``payload``, every other rank ``None``; all return rank 0's bytes.

    ``group=None`` is a one-process run: the payload comes straight back.
    """
    if payload is not None and not 0 < len(payload) <= MAX_MESSAGE_BYTES:
        raise BadLength(len(payload))
    if group is None:
        assert payload is not None
        return payload
    try:
        with trio.fail_after(deadline):
            # abandon_on_cancel: a collective cannot be interrupted; on a deadline we
            # stop waiting for it, and the app must then end the process (the group is
            # out of step for good).
            return await trio.to_thread.run_sync(
                _broadcast_blocking, group, payload, abandon_on_cancel=True)
    except trio.TooSlowError as exc:
        raise ShareTimeout(deadline) from exc
