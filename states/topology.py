"""Topology values and their rules: the ring hostfile and the jaccl device matrix.

ring wants one tuple of ``"ip:port"`` per rank (its hostfile). jaccl wants
``devices[i][j]``: the RDMA device on rank ``i`` that reaches rank ``j``
(``rdma_<interface>``, as ``ibv_devices`` names it), several names for several
cables, ``null`` on the diagonal, the same matrix on every rank (docs/design.md section
3). Rank 0 builds it from every rank's :class:`~states.codec.LinkReport` (which of its
interfaces heard which peer's beacon) and sends it in the bootstrap frame, so no rank
guesses. A pair that cannot reach each other both ways is a typed error here, not an
RDMA failure inside MLX.

This module owns the shape and naming rules; the codec applies them to the bootstrap
frame (:func:`check_ring_hostfile`, :func:`check_jaccl_matrix`, which raise
ValueError/TypeError so that a bad frame becomes ``FrameError(BAD_PAYLOAD)`` and a bad
local value fails where it is built) and to the interface names of a link report
(:func:`check_name`). Why check before MLX does: a wrong matrix must fail where it
enters (the config on rank 0, the bootstrap frame on the others) with a clear message,
rather than inside MLX (which crashes or returns a silent size-1 group).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, TypeAlias

import attrs

from clusterfsm.states.errors import PrecheckFailed

#: One cell of a jaccl device matrix: ``None`` (diagonal), a device name, or several.
JacclEntry: TypeAlias = str | tuple[str, ...] | None
#: ring: one tuple of ``"ip:port"`` per rank. jaccl: an N x N matrix of :data:`JacclEntry`.
Topology: TypeAlias = tuple[tuple[JacclEntry, ...], ...]

#: Limit (in characters) of one topology string: an ``ip:port`` or an RDMA device name.
MAX_TOPOLOGY_STR: Final = 64
#: Interface names are at most 15 bytes (IFNAMSIZ - 1 on Linux and macOS).
MAX_INTERFACE_NAME: Final = 15
#: jaccl's mesh limit (see docs/design.md section 3).
MAX_JACCL_RANKS: Final = 8
#: ring endpoints per rank, and jaccl devices (cables) per pair.
MAX_RING_ENDPOINTS: Final = 8
MAX_JACCL_DEVICES: Final = 4

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


@attrs.frozen
class PeerLink:
    """One cable as this rank's plan uses it: the peer's rank, our interface that the
    device matrix names for that peer (``rdma_<interface>``), and the peer's IPv4
    address as discovery heard it on that interface. The pre-init route check asks
    the kernel whether its route to ``address`` leaves through ``interface``."""

    rank: int
    interface: str
    address: str


def peer_links(topology: Topology, rank: int,
               heard: Mapping[int, Mapping[str, str]]) -> tuple[PeerLink, ...]:
    """Every cable of ``rank``'s row: ``heard[j][interface]`` is the address rank
    ``j``'s beacons came from on our ``interface``.

    Each rank builds this from its own discovery (no new field on the wire): the
    matrix row of a rank is what that rank reported hearing, so every interface in the
    row heard that peer. One that did not is a matrix this rank cannot have reported:
    refused before init (``peer_route``)."""
    links: list[PeerLink] = []
    for j, cell in enumerate(topology[rank]):
        if j == rank or cell is None:
            continue
        for device in cell if isinstance(cell, tuple) else (cell,):
            interface = device.removeprefix(RDMA_PREFIX)
            address = heard.get(j, {}).get(interface)
            if address is None:
                raise PrecheckFailed(
                    "peer_route", f"the device matrix has rank {rank} reach rank {j} "
                    f"through {interface}, where this rank never heard rank {j}")
            links.append(PeerLink(j, interface, address))
    return tuple(links)


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


# ---------------------------------------------------------------------------------------
# Shape and naming rules of a topology as it travels (ValueError/TypeError)


def to_lists(topology: Topology) -> list[list[Any]]:
    """The JSON shape of a topology (lists instead of tuples)."""
    return [[list(e) if isinstance(e, tuple) else e for e in row] for row in topology]


def from_lists(obj: Any) -> Topology:
    """Lists (JSON or Python) to tuples, by the fixed 3-level shape (no recursion).

    Anything that is not a list at levels 1-2 is left for the checks to name; a value
    that cannot be a topology at all raises ValueError.
    """
    if not isinstance(obj, list | tuple):
        raise ValueError(f"topology must be a list, got {type(obj).__name__}")
    rows: list[tuple[JacclEntry, ...]] = []
    for row in obj:
        if not isinstance(row, list | tuple):
            raise ValueError(f"topology row must be a list, got {type(row).__name__}")
        cells: list[JacclEntry] = []
        for cell in row:
            if isinstance(cell, list | tuple):
                cells.append(tuple(cell))
            else:
                cells.append(cell)
        rows.append(tuple(cells))
    return tuple(rows)


def check_name(value: Any, where: str, max_len: int = MAX_TOPOLOGY_STR) -> str:
    """A name on the wire (endpoint, device, interface): printable ASCII, no spaces."""
    if not isinstance(value, str):
        raise TypeError(f"{where}: expected a string, got {type(value).__name__}")
    if not 1 <= len(value) <= max_len:
        raise ValueError(f"{where}: string length {len(value)} outside 1..{max_len}")
    if not (value.isascii() and value.isprintable()) or " " in value:
        raise ValueError(f"{where}: {value!r} must be printable ASCII without spaces")
    return value


def _check_endpoint(value: Any, where: str) -> None:
    check_name(value, where)
    host, sep, port = value.rpartition(":")
    if not sep or not host or not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"{where}: {value!r} is not host:port")


def _check_rows(topology: Any, world_size: int) -> None:
    if not isinstance(topology, tuple) or not all(isinstance(row, tuple) for row in topology):
        raise TypeError("topology must be a tuple of tuples")
    if len(topology) != world_size:
        raise ValueError(f"topology has {len(topology)} rows, world_size is {world_size}")


def check_ring_hostfile(topology: Any, world_size: int) -> None:
    """One row of 1..8 ``host:port`` endpoints per rank."""
    _check_rows(topology, world_size)
    for i, row in enumerate(topology):
        if not 1 <= len(row) <= MAX_RING_ENDPOINTS:
            raise ValueError(
                f"ring rank {i}: {len(row)} endpoints, need 1..{MAX_RING_ENDPOINTS}")
        for j, cell in enumerate(row):
            _check_endpoint(cell, f"ring rank {i} endpoint {j}")


def check_jaccl_matrix(topology: Any, world_size: int) -> None:
    """An N x N matrix (N <= 8): null on the diagonal only, 1..4 device names elsewhere."""
    _check_rows(topology, world_size)
    n = world_size
    if n > MAX_JACCL_RANKS:
        raise ValueError(f"jaccl supports at most {MAX_JACCL_RANKS} ranks, got {n}")
    for i, row in enumerate(topology):
        if len(row) != n:
            raise ValueError(f"jaccl matrix row {i} has {len(row)} entries, need {n}")
        for j, cell in enumerate(row):
            where = f"jaccl devices[{i}][{j}]"
            if i == j:
                if cell is not None:
                    raise ValueError(f"{where}: the diagonal must be null")
            elif cell is None:
                raise ValueError(f"{where}: null is only allowed on the diagonal")
            elif isinstance(cell, tuple):
                if not 1 <= len(cell) <= MAX_JACCL_DEVICES:
                    raise ValueError(
                        f"{where}: {len(cell)} devices, need 1..{MAX_JACCL_DEVICES}")
                for k, name in enumerate(cell):
                    check_name(name, f"{where}[{k}]")
            else:
                check_name(cell, where)
