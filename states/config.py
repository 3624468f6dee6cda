"""What one rank needs to know to bootstrap: validated where it enters.

:class:`ClusterConfig` is a frozen attrs value; every field is checked when it is
built, so a bad rank, a missing peer or a short key fails at construction, with a
message naming the field, not three states later as a timeout. To build one from
``CLUSTERFSM_*`` variables or a TOML file: :mod:`clusterfsm.states.configsource`.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from typing import Literal

import attrs

from clusterfsm.states.dataplane import ring_refusal
from clusterfsm.states.discovery import DEFAULT_BEACON_PORT
from clusterfsm.states.keys import check_key_length

#: The backend a user asks for (``any``: jaccl if this MLX build has it, else ring);
#: the bootstrap frame carries the decided one, ``codec.WireBackend``.
BackendChoice = Literal["ring", "jaccl", "any"]
BACKENDS: tuple[str, ...] = ("ring", "jaccl", "any")


@attrs.frozen
class Address:
    """A TCP endpoint, ``host:port``."""

    host: str
    port: int = attrs.field()

    @port.validator
    def _port(self, _attr: object, value: int) -> None:
        if not 0 <= value <= 65535:
            raise ValueError(f"port {value} is out of range 0-65535")

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6); raises ValueError with the text."""
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"expected HOST:PORT, got {text!r}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]  # [v6] or [v6%scope], e.g. [fe80::1%en2]
            if ":" not in host:
                raise ValueError(f"brackets are for IPv6 addresses, got {text!r}")
        elif ":" in host or "[" in host or "]" in host:
            raise ValueError(f"write an IPv6 address in brackets, [ADDRESS]:PORT "
                             f"(with a scope id: [fe80::1%en2]:PORT), got {text!r}")
        if not host:
            raise ValueError(f"expected HOST:PORT, got {text!r}")
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# The two tuple fields convert with these rather than ``converter=tuple``: attrs asks
# a converter for its signature, and for a builtin Python answers by tokenizing its
# text signature, which costs ~2 ms of every start-up (tokenize's large regex).
def _addresses(value: Iterable[Address]) -> tuple[Address, ...]:
    return tuple(value)


def _names(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _key(_inst: object, _attr: object, value: bytes) -> None:
    check_key_length(value)


def _node_id(_inst: object, _attr: object, value: bytes) -> None:
    if len(value) != 16:
        raise ValueError(f"node_id must be 16 bytes, got {len(value)}")


#: The most ranks a cluster can have: ranks are one byte on the wire (0..254).
MAX_WORLD_SIZE = 255

#: Epochs are u64 on the wire (HELLO).
MAX_EPOCH = 2**64 - 1


def _check_epoch(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_EPOCH:
        raise ValueError(f"{name} must be an integer in 0..2**64-1, got {value!r}")


def _epoch_floors(_inst: object, _attr: object, value: Mapping[int, int]) -> None:
    for rank, epoch in value.items():
        if not isinstance(rank, int) or not 1 <= rank <= 254:
            raise ValueError(f"epoch_floors: {rank!r} is not a joiner rank")
        _check_epoch(f"epoch_floors[{rank}]", epoch)


def _compat(_inst: object, _attr: object, value: Mapping[str, str]) -> None:
    from clusterfsm.states.compat import MAX_EXTRA_FIELDS, MAX_FIELD_CHARS

    if len(value) > MAX_EXTRA_FIELDS or not all(
            isinstance(k, str) and isinstance(v, str) and 0 < len(k) <= MAX_FIELD_CHARS
            and len(v) <= MAX_FIELD_CHARS for k, v in value.items()):
        raise ValueError(f"compat: at most {MAX_EXTRA_FIELDS} fields, names and values "
                         f"strings of at most {MAX_FIELD_CHARS} characters")


def check_beacon_port(port: int) -> None:
    """The discovery beacons' UDP port rule (``serve`` and ``doctor`` alike)."""
    if not 1 <= port <= 65535:
        raise ValueError(f"beacon_port {port} is out of range")


@attrs.frozen
class ClusterConfig:
    """One rank's configuration.

    Rank 0 is the coordinator: it listens on ``listen`` and the other ranks dial one
    of ``peers`` (static discovery). With ``interfaces`` the ranks find each other by
    UDP beacons on those links instead (:mod:`clusterfsm.states.discovery`), and ``rank=None``
    (``--rank auto``) elects the ranks from the node ids. ``key`` is the pre-shared
    cluster key; it never crosses the wire and is never printed (``repr`` hides it).
    """

    rank: int | None
    world_size: int = attrs.field()
    key: bytes = attrs.field(repr=False, validator=_key)
    listen: Address | None = None
    peers: tuple[Address, ...] = attrs.field(default=(), converter=_addresses)
    backend: BackendChoice = attrs.field(default="ring")
    node_id: bytes = attrs.field(factory=lambda: secrets.token_bytes(16), validator=_node_id)
    #: Per-state deadline overrides (``--deadline STATE=SECONDS``) for this rank's run;
    #: the defaults are declared by the machine's states, and the runner checks and
    #: merges these (:func:`clusterfsm.fsm.effective_deadlines`).
    deadlines: Mapping[str, float] = attrs.field(factory=dict)
    heartbeat_interval: float = 0.1
    #: After ``ready``, a peer silent for this long is lost (``peer_lost``).
    peer_lost_after: float = 3.0
    #: How long the ring's last rank waits after the go signal (see states.groupinit).
    release_delay_s: float = 0.005
    #: ``clusterfsm serve`` only (``--verify``): an ``all_sum`` over the group before it
    #: prints the ready line. :func:`~clusterfsm.states.api.bootstrap_cluster` does not
    #: read it (an app checks its own group).
    verify: bool = False
    #: Discover the peers by beacons on these interfaces (``--interface``).
    interfaces: tuple[str, ...] = attrs.field(default=(), converter=_names)
    #: UDP port of the discovery beacons (the same on every rank).
    beacon_port: int = DEFAULT_BEACON_PORT
    #: This process's generation (u64, from its supervisor's ``CLUSTERFSM_EPOCH``): a
    #: later generation of the same rank always has a larger one. 0 = not supervised
    #: (never refused as stale). Sent in the Hello, authenticated by the handshake.
    epoch: int = attrs.field(default=0, validator=lambda _i, _a, v: _check_epoch("epoch", v))
    #: Rank 0 only: the newest epoch already admitted per joiner rank, remembered
    #: across coordinator restarts by the supervisor (``CLUSTERFSM_EPOCH_FLOORS``). A
    #: joiner claiming that rank with an older epoch is refused as ``STALE_SESSION``.
    epoch_floors: Mapping[int, int] = attrs.field(factory=dict, validator=_epoch_floors)
    #: App-defined fields every rank must agree on before init (the model id, the
    #: shard plan): compared by rank 0 with its own, a difference is IncompatiblePeer.
    compat: Mapping[str, str] = attrs.field(factory=dict, validator=_compat)

    @world_size.validator
    def _world(self, _attr: object, value: int) -> None:
        if not 1 <= value <= MAX_WORLD_SIZE:
            raise ValueError(f"world_size must be 1..{MAX_WORLD_SIZE}, got {value}")
        if self.rank is not None and not 0 <= self.rank < value:
            raise ValueError(f"rank must be in 0..{value - 1} (world_size {value}), "
                             f"got {self.rank}")

    @backend.validator
    def _backend(self, _attr: object, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        if value == "jaccl" and self.world_size > 8:
            raise ValueError(f"backend jaccl supports at most 8 ranks (full mesh), "
                             f"world_size is {self.world_size}")

    def __attrs_post_init__(self) -> None:
        if self.interfaces:
            if self.peers:
                raise ValueError("give either interfaces (beacon discovery) or peers "
                                 "(static addresses), not both")
            if len(set(self.interfaces)) != len(self.interfaces):
                raise ValueError(f"interface listed twice: {list(self.interfaces)}")
            check_beacon_port(self.beacon_port)
        elif self.rank is None:
            raise ValueError("rank auto (election) needs interface discovery: give "
                             "interfaces, or an explicit rank")
        elif self.rank == 0 and self.world_size > 1 and self.listen is None:
            raise ValueError("rank 0 is the coordinator and needs a listen address")
        elif self.rank > 0 and not self.peers:
            raise ValueError(f"rank {self.rank} needs at least one peer (rank 0's address)")
        if self.world_size > 1 and self.backend != "jaccl" and not self.interfaces:
            hosts = [a.host for a in (*self.peers, *([self.listen] if self.listen else []))]
            refusal = ring_refusal(hosts)
            if refusal is not None:
                raise ValueError(refusal)
        for name, value in (("heartbeat_interval", self.heartbeat_interval),
                            ("peer_lost_after", self.peer_lost_after)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not 0 <= self.release_delay_s < 1:
            raise ValueError("release_delay_s must be in [0, 1) seconds")
        if self.peer_lost_after <= 2 * self.heartbeat_interval:
            raise ValueError(f"peer_lost_after ({self.peer_lost_after:g} s) must exceed two "
                             f"heartbeat intervals (heartbeat_interval "
                             f"{self.heartbeat_interval:g} s)")

    @property
    def is_coordinator(self) -> bool:
        """True for a configured rank 0 (an elected rank is known to the context)."""
        return self.rank == 0

