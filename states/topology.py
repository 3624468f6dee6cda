"""The jaccl device matrix, built from what discovery saw.

jaccl wants ``devices[i][j]``: the RDMA device on rank ``i`` that reaches rank ``j``
(``rdma_<interface>``, as ``ibv_devices`` names it), several names for several
cables, ``null`` on the diagonal, the same matrix on every rank (DESIGN.md section
3). Rank 0 builds it from every rank's :class:`~states.codec.LinkReport` (which of its
interfaces heard which peer's beacon) and sends it in the bootstrap frame, so no rank
guesses. A pair that cannot reach each other both ways is a typed error here, not an
RDMA failure inside MLX.
"""

from __future__ import annotations

from collections.abc import Mapping

from clusterfsm.states.codec import JacclEntry, Topology
from clusterfsm.states.errors import PrecheckFailed

#: What ``ibv_devices`` calls the RDMA device of a Thunderbolt interface.
RDMA_PREFIX = "rdma_"


def device_name(interface: str) -> str:
    return f"{RDMA_PREFIX}{interface}"


def build_device_matrix(world_size: int,
                        reach: Mapping[int, Mapping[int, tuple[str, ...]]]) -> Topology:
    """``reach[i][j]`` = rank i's interfaces that heard rank j; the N x N matrix."""
    rows: list[tuple[JacclEntry, ...]] = []
    for i in range(world_size):
        row: list[JacclEntry] = []
        for j in range(world_size):
            if i == j:
                row.append(None)
                continue
            interfaces = tuple(reach.get(i, {}).get(j, ()))
            if not interfaces:
                raise PrecheckFailed(
                    "matrix_incomplete",
                    f"rank {i} has no interface that reaches rank {j} (jaccl needs a "
                    "full mesh: a Thunderbolt cable between every pair of Macs)")
            if not reach.get(j, {}).get(i):
                raise PrecheckFailed(
                    "matrix_incomplete",
                    f"rank {i} hears rank {j} but not the other way round")
            names = tuple(device_name(name) for name in sorted(interfaces))
            row.append(names[0] if len(names) == 1 else names)
        rows.append(tuple(row))
    return tuple(rows)


def devices_in_row(topology: Topology, rank: int) -> list[str]:
    """The device names rank ``rank`` must have (its row of the matrix)."""
    names: list[str] = []
    for cell in topology[rank]:
        if isinstance(cell, tuple):
            names.extend(cell)
        elif cell is not None:
            names.append(cell)
    return names


def check_matrix(topology: Topology, world_size: int) -> None:
    """Shape and naming rules MLX does not check before it crashes or hangs."""
    if len(topology) != world_size or any(len(row) != world_size for row in topology):
        raise PrecheckFailed("matrix_shape", f"the device matrix is not {world_size} x "
                             f"{world_size}: {[len(row) for row in topology]}")
    for i in range(world_size):
        if topology[i][i] is not None:
            raise PrecheckFailed("matrix_shape", f"devices[{i}][{i}] must be null")
        for name in devices_in_row(topology, i):
            if not name.startswith(RDMA_PREFIX):
                raise PrecheckFailed(
                    "matrix_names", f"devices[{i}] names {name!r}: an interface name, "
                    f"not an RDMA device (expected {RDMA_PREFIX}<interface>)")
