"""Property: whatever strangers do to rank 0's port, every legitimate rank gets ready.

Issue 12, item 8. Each example is a cluster of 2 to 4 ranks on real loopback sockets
(resets only exist there), rank 0 and the joiners in this process with the fake group
initializer, the real clock. Joiners start at random times inside the deadlines, some
through a 20 ms delay relay; meanwhile random connections misbehave against rank 0:
reset, close at once, half-close, garbage, silence, a valid HELLO then a reset, one
byte a second. Every legitimate rank must end ``ready``, and no rank ever reaches
``unexpected`` (reserved for bugs).

Seeded and bounded (``derandomize``, ``EXAMPLES``) to stay fast in CI; set
``HYPOTHESIS_PROFILE=dev`` for more examples.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from contextlib import suppress

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clusterfsm.states.api import Cluster
from clusterfsm.states.config import Address, ClusterConfig
from tests.net_chaos import BEHAVIOURS, DelayRelay
from tests.tcp_harness import (
    RankRun,
    RecordingTransport,
    all_ready,
    joiner_config,
    rank0_config,
    run_rank,
)

_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
EXAMPLES = 10 if _PROFILE not in ("dev", "long") else 60
#: Rank 0's handshaking deadline; every joiner starts well inside it.
DEADLINE = 10.0
LATEST_JOIN = 1.5

joins = st.lists(st.tuples(st.floats(0.0, LATEST_JOIN), st.booleans()),
                 min_size=1, max_size=3)
attacks = st.lists(st.tuples(st.sampled_from(sorted(BEHAVIOURS)), st.floats(0.0, LATEST_JOIN)),
                   max_size=10)


async def _cluster(joiners: list[tuple[float, bool]],
                   strangers: list[tuple[str, float]]) -> list[RankRun]:
    world = len(joiners) + 1
    results = [RankRun(rank) for rank in range(world)]
    recording = RecordingTransport()
    hold = all_ready(world, at_most=DEADLINE)
    deadlines = {"handshaking": DEADLINE}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: run_rank(rank0_config(world, deadlines=deadlines),
                                            results[0], transport=recording, in_ready=hold))
        await recording.bound.wait()
        assert recording.address is not None
        address = recording.address
        async with trio.open_nursery() as side:
            for behaviour, delay in strangers:
                side.start_soon(_stranger, behaviour, delay, address)
            async with trio.open_nursery() as ranks:
                for rank, (delay, far) in enumerate(joiners, start=1):
                    target = (await side.start(DelayRelay(address, delay=0.02).serve)
                              if far else address)
                    cfg = joiner_config(rank, target, world, deadlines=deadlines)
                    ranks.start_soon(_join_later, delay, cfg, results[rank], hold)
            side.cancel_scope.cancel()
    return results


async def _stranger(behaviour: str, delay: float, address: Address) -> None:
    await trio.sleep(delay)
    with suppress(OSError, trio.BrokenResourceError):  # rank 0 reset or refused it: fine
        await BEHAVIOURS[behaviour](address)


async def _join_later(delay: float, cfg: ClusterConfig, result: RankRun,
                      hold: Callable[[Cluster], Awaitable[None]]) -> None:
    await trio.sleep(delay)
    await run_rank(cfg, result, in_ready=hold)


@settings(max_examples=EXAMPLES, derandomize=_PROFILE not in ("dev", "long"),
          deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(joiners=joins, strangers=attacks)
def test_every_legitimate_rank_gets_ready_whatever_strangers_do(
    joiners: list[tuple[float, bool]], strangers: list[tuple[str, float]],
) -> None:
    results = trio.run(_cluster, joiners, strangers)
    for run in results:
        assert run.reached_ready, (run.rank, run.path, run.error, joiners, strangers)
        assert "unexpected" not in run.path, (run.rank, run.path, run.error)
