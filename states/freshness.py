"""Refusing replayed datagrams: a timestamp window plus a bounded cache of nonces.

Sans-IO. Discovery beacons are datagrams authenticated by a tag under the cluster key,
so nobody without the key can make one up - but anyone on the link can record one and
send it again. Each beacon therefore carries the sender's wall-clock time and a random
nonce, and :class:`ReplayGuard` accepts a (timestamp, nonce) once:

- a timestamp more than ``window`` away from our clock, either way, is refused
  (``STALE`` or ``FUTURE``): a recording is useful for ``window`` seconds at most;
- a nonce already accepted within the window is refused (``REPLAYED``);
- memory is bounded: at most ``capacity`` nonces are kept. Nonces leave the cache when
  their timestamp leaves the window; when the cache is full, the oldest leaves early
  and its timestamp becomes a *floor*: nothing at or below it is accepted any more. So
  a full cache shortens the window instead of forgetting a nonce it could be fooled by.

Clocks across ranks must agree within ``window`` (default 30 s; NTP keeps them within
milliseconds); a peer whose clock is further off has its beacons refused as ``STALE``
or ``FUTURE``, with both times in the detail so the operator sees why.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from typing import Final

import attrs

__all__ = ["DEFAULT_CAPACITY", "DEFAULT_WINDOW", "ReplayGuard", "ReplayKind", "Replayed"]

#: Seconds a timestamp may be away from our clock, either way.
DEFAULT_WINDOW: Final = 30.0
#: Nonces remembered at most: 8 ranks x 4 links x 10 beacons/s for 12 s before the
#: floor starts to shorten the window.
DEFAULT_CAPACITY: Final = 4096


class ReplayKind(enum.Enum):
    STALE = "stale"  # older than the window (or at or below the floor)
    FUTURE = "future"  # further ahead of our clock than the window
    REPLAYED = "replayed"  # this nonce was accepted before


@attrs.frozen(auto_exc=True)
class Replayed(Exception):
    """A datagram refused as not fresh."""

    kind: ReplayKind
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.detail}"


class ReplayGuard:
    """Accept each (timestamp, nonce) once, within ``window`` seconds of ``now``."""

    __slots__ = ("_capacity", "_floor", "_seen", "_window")

    def __init__(self, *, window: float = DEFAULT_WINDOW,
                 capacity: int = DEFAULT_CAPACITY) -> None:
        if window <= 0 or capacity < 1:
            raise ValueError("window must be positive and capacity at least 1")
        self._window = window
        self._capacity = capacity
        self._floor = float("-inf")
        # nonce -> timestamp, in order of acceptance (roughly timestamp order).
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    @property
    def floor(self) -> float:
        """Timestamps at or below this are refused (raised when the cache overflows)."""
        return self._floor

    def check(self, timestamp: float, nonce: bytes, now: float) -> None:
        """Accept (remember) or raise :class:`Replayed`; ``now`` is our wall clock."""
        self._expire(now)
        if timestamp < now - self._window or timestamp <= self._floor:
            raise Replayed(ReplayKind.STALE,
                           f"sent at {timestamp:.3f}, our clock {now:.3f}, window "
                           f"{self._window:g} s" + (f", floor {self._floor:.3f}"
                                                    if timestamp <= self._floor else ""))
        if timestamp > now + self._window:
            raise Replayed(ReplayKind.FUTURE,
                           f"sent at {timestamp:.3f}, our clock {now:.3f} is more than "
                           f"{self._window:g} s behind")
        if nonce in self._seen:
            raise Replayed(ReplayKind.REPLAYED, f"nonce {nonce.hex()} seen before")
        while len(self._seen) >= self._capacity:
            _, oldest = self._seen.popitem(last=False)
            self._floor = max(self._floor, oldest)
        self._seen[nonce] = timestamp

    def _expire(self, now: float) -> None:
        """Forget nonces whose timestamps have left the window (they are refused as
        STALE anyway). Entries are in acceptance order, so stop at the first fresh one;
        an out-of-order old entry behind it just stays until capacity evicts it."""
        horizon = now - self._window
        seen = self._seen
        while seen:
            nonce, timestamp = next(iter(seen.items()))
            if timestamp >= horizon:
                break
            del seen[nonce]
