"""A rank typed end to end: ``mypy --strict examples/typed_group.py`` passes (CI runs it).

``cluster.group`` is ``mlx.core.distributed.Group`` (MLX's own stubs), so handing it to
``mx.distributed.all_sum`` needs no cast and no ``Any``. The configuration comes from
the ``CLUSTERFSM_*`` variables (docs/embedding.md, "Configuration")::

    CLUSTERFSM_RANK=0 CLUSTERFSM_WORLD_SIZE=2 CLUSTERFSM_LISTEN=127.0.0.1:7700 \\
    CLUSTERFSM_KEY_FILE=cluster.key python examples/typed_group.py
"""

from __future__ import annotations

import mlx.core as mx
import trio

from clusterfsm.states.api import bootstrap_cluster, config_from_env
from clusterfsm.states.errors import ClusterError


def all_sum_of_ranks(group: mx.distributed.Group) -> float:
    total = mx.distributed.all_sum(mx.array([float(group.rank() + 1)]), group=group)
    mx.eval(total)
    value = total.item()
    assert isinstance(value, float)
    return value


async def main() -> int:
    config = config_from_env()
    try:
        async with bootstrap_cluster(config) as cluster:
            group: mx.distributed.Group = cluster.group
            total = await trio.to_thread.run_sync(all_sum_of_ranks, group)
            print(f"rank {cluster.rank}/{cluster.size} on {cluster.backend}: all_sum {total:g}")
    except ClusterError as exc:
        print(f"failed in {exc.state} (retryable: {exc.retryable}): {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(trio.run(main))
