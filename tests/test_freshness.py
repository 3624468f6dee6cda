"""states/freshness.py: each (timestamp, nonce) is accepted once, memory stays bounded."""

from __future__ import annotations

import pytest

from clusterfsm.states.freshness import Replayed, ReplayGuard, ReplayKind


def refused(guard: ReplayGuard, timestamp: float, nonce: bytes, now: float) -> ReplayKind:
    with pytest.raises(Replayed) as err:
        guard.check(timestamp, nonce, now)
    return err.value.kind


def test_fresh_once_then_replayed() -> None:
    guard = ReplayGuard(window=30)
    guard.check(1000.0, b"a" * 8, now=1000.1)
    assert refused(guard, 1000.0, b"a" * 8, now=1000.2) is ReplayKind.REPLAYED
    guard.check(1000.0, b"b" * 8, now=1000.2)  # same time, another nonce: fine


def test_outside_the_window_either_way() -> None:
    guard = ReplayGuard(window=30)
    assert refused(guard, 969.0, b"a" * 8, now=1000.0) is ReplayKind.STALE
    assert refused(guard, 1031.0, b"b" * 8, now=1000.0) is ReplayKind.FUTURE
    guard.check(971.0, b"c" * 8, now=1000.0)
    guard.check(1029.0, b"d" * 8, now=1000.0)


def test_a_recording_replayed_after_the_window_is_stale_and_forgotten() -> None:
    guard = ReplayGuard(window=30)
    guard.check(1000.0, b"a" * 8, now=1000.0)
    assert refused(guard, 1000.0, b"a" * 8, now=1031.0) is ReplayKind.STALE
    assert len(guard) == 0


def test_memory_is_bounded_and_a_full_cache_raises_the_floor() -> None:
    guard = ReplayGuard(window=30, capacity=4)
    for i in range(100):
        guard.check(1000.0 + i / 100, i.to_bytes(8, "big"), now=1000.0 + i / 100)
        assert len(guard) <= 4
    # Every nonce that left the cache early is refused by the floor, not forgotten.
    for i in range(96):
        assert refused(guard, 1000.0 + i / 100, i.to_bytes(8, "big"),
                       now=1001.0) in (ReplayKind.STALE, ReplayKind.REPLAYED)
    assert guard.floor == pytest.approx(1000.95)
    guard.check(1001.0, b"new", now=1001.0)  # a fresh one still gets in


def test_bad_configuration() -> None:
    with pytest.raises(ValueError):
        ReplayGuard(window=0)
    with pytest.raises(ValueError):
        ReplayGuard(capacity=0)
    assert "our clock" in str(Replayed(ReplayKind.STALE, "sent at 1, our clock 2"))
