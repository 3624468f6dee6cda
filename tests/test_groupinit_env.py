"""Group init's env window: the process's env is patched only around the MLX call, and
no other task runs inside that window.

Several fake ranks share one process in the deterministic tests; a task switch between
patching the env and the call (rank 0's ``before_call`` sent its late go signals there,
a joiner's was a checkpoint) let one rank read another's ``MLX_RANK`` and hostfile,
which the admission property test met as a missing hostfile or a group of size 1.
"""

from __future__ import annotations

import os
from typing import Any

import trio

from clusterfsm.states.groupinit import InitPlan, TopologyDir
from clusterfsm.states.testing import fake_initializer


async def _nothing(plan: InitPlan) -> None:
    await trio.lowlevel.checkpoint()


async def test_ranks_in_one_process_each_init_with_their_own_env(autojump_clock: Any) -> None:
    world = 3
    topology = tuple((f"127.0.0.1:{7000 + r}",) for r in range(world))
    got: dict[int, tuple[int, int]] = {}
    before = dict(os.environ)

    async def rank(r: int) -> None:
        initializer = fake_initializer()
        initializer.first_listener = _nothing
        files = TopologyDir()
        try:
            group = await initializer.initialize(
                InitPlan("ring", r, world, topology, b"s" * 16), files,
                before_call=trio.lowlevel.checkpoint)
            got[r] = (group.rank(), group.size())
        finally:
            files.close()

    async with trio.open_nursery() as nursery:
        for r in range(world):
            nursery.start_soon(rank, r)
    assert got == {r: (r, world) for r in range(world)}
    assert dict(os.environ) == before  # restored exactly, whatever the interleaving


def test_env_windows_closed_out_of_order_restore_the_env_exactly() -> None:
    from contextlib import ExitStack

    from clusterfsm.states.groupinit import patched_env

    os.environ["CFSM_T_KEPT"] = "before"
    os.environ.pop("CFSM_T_NEW", None)
    before = dict(os.environ)
    a, b, c = ExitStack(), ExitStack(), ExitStack()
    a.enter_context(patched_env({"CFSM_T_KEPT": "a", "CFSM_T_NEW": "a"}))
    b.enter_context(patched_env({"CFSM_T_KEPT": "b"}, clear=("CFSM_T_NEW",)))
    c.enter_context(patched_env({"CFSM_T_ONLY_C": "c"}))
    assert os.environ["CFSM_T_KEPT"] == "b" and "CFSM_T_NEW" not in os.environ
    a.close()  # the oldest first: the later windows' values stay while they are open
    assert os.environ["CFSM_T_KEPT"] == "b" and os.environ["CFSM_T_ONLY_C"] == "c"
    c.close()
    assert "CFSM_T_ONLY_C" not in os.environ and os.environ["CFSM_T_KEPT"] == "b"
    b.close()
    assert dict(os.environ) == before
    del os.environ["CFSM_T_KEPT"]
