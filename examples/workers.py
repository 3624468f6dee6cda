"""Example workers: the app's own code, run by every generation of a supervised rank.

``clusterfsm serve --supervise --worker examples/workers.py:all_sum_loop ...`` (or
``supervise_ranks(args, worker=all_sum_loop)``) imports this file in each generation's
child process and runs ``await all_sum_loop(cluster)`` once the group is ready
(states/worker.py describes the contract). It stands in for a provider's serving
loop: it does real collective work on the group until it is cancelled (a lost peer,
SIGTERM) or finds a wrong sum, which it raises, ending the generation.
"""

from __future__ import annotations

import os
from typing import Any

import trio

from clusterfsm.states.api import Cluster

#: Print progress every this many all_sums (``WORKER_REPORT_EVERY`` overrides).
REPORT_EVERY = int(os.environ.get("WORKER_REPORT_EVERY", "200"))


def _all_sum(group: Any, value: float, width: int) -> float:
    import mlx.core as mx

    out = mx.distributed.all_sum(mx.full((width,), value), group=group)
    mx.eval(out)
    first: Any = out[0].item()
    return float(first)


async def all_sum_loop(cluster: Cluster[Any]) -> None:
    """``all_sum`` of ``rank + 1`` over 4096 floats, again and again, checked."""
    expected = cluster.size * (cluster.size + 1) / 2
    done = 0
    while True:
        # A collective blocks in MLX: a worker thread, abandoned if we are cancelled
        # (a lost peer may leave it blocked; the process ends soon after anyway).
        total = await trio.to_thread.run_sync(
            _all_sum, cluster.group, float(cluster.rank + 1), 4096, abandon_on_cancel=True)
        if total != expected:
            raise ArithmeticError(f"all_sum {done + 1} gave {total:g}, expected {expected:g}")
        done += 1
        if done % REPORT_EVERY == 0:
            print(f"rank {cluster.rank}: {done} all_sums", flush=True)


async def fail_after_ready(cluster: Cluster[Any]) -> None:
    """Raises at once: shows how a failing worker ends its generation."""
    raise LookupError(f"rank {cluster.rank} has no model to serve")
