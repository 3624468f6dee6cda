"""The typed errors the cluster bootstrap can end in.

Each type is bound to exactly one error state of the bootstrap machine
(:mod:`clusterfsm.states.machine`). They are frozen attrs exceptions: an activity raises one, the
runner moves the machine into the bound error state, and the embedding app gets the
same value back (``cluster.error``) with the facts an operator needs.

Naming follows h11: a *local* rejection is one we decided, a *remote* rejection is one
the peer sent us. Both are :class:`HandshakeRejected`; ``remote`` tells them apart.
"""

from __future__ import annotations

import enum

import attrs

from clusterfsm.fsm.errors import StateTimeout


class FrameErrorKind(enum.Enum):
    """Why bytes from the network could not be turned into a message."""

    TRUNCATED = "truncated"  # the stream ended inside a frame
    OVERSIZE = "oversize"  # declared payload length above the hard limit
    UNKNOWN_TYPE = "unknown_type"  # message type byte we do not know
    BAD_VERSION = "bad_version"  # framing version we do not speak
    BAD_MAGIC = "bad_magic"  # not a clusterfsm frame at all
    BAD_PAYLOAD = "bad_payload"  # the payload does not decode as its type says
    UNEXPECTED = "unexpected"  # a valid message that is not allowed at this point


@attrs.frozen(auto_exc=True)
class FrameError(Exception):
    """Malformed or out-of-place input from a peer. The connection is closed."""

    kind: FrameErrorKind
    detail: str = ""
    peer: str = ""

    def __str__(self) -> str:
        who = f" from {self.peer}" if self.peer else ""
        return f"{self.kind.value} frame{who}: {self.detail}"


class RejectReason(enum.IntEnum):
    """Why a handshake was refused. Sent on the wire as one byte."""

    BAD_KEY = 1
    VERSION_MISMATCH = 2
    WORLD_SIZE_MISMATCH = 3
    DUPLICATE_RANK = 4
    BAD_RANK = 5
    DUPLICATE_NODE_ID = 6
    SESSION_FULL = 7
    STALE_SESSION = 8


def printable(text: object) -> str:
    """``text`` on one line, control characters escaped: a peer's words (a Reject
    detail, an ABORT message) end up in our log and output lines, which a supervisor
    parses line by line; a peer must not be able to forge a line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


@attrs.frozen(auto_exc=True)
class HandshakeRejected(Exception):
    """The handshake with ``peer`` failed; ``remote`` is True when the peer refused us."""

    reason: RejectReason
    detail: str = ""
    peer: str = ""
    remote: bool = False

    def __str__(self) -> str:
        side = "peer refused us" if self.remote else "we refused the peer"
        who = f" {self.peer}" if self.peer else ""
        return f"handshake rejected ({self.reason.name.lower()}, {side}{who}): {self.detail}"


@attrs.frozen(auto_exc=True)
class PeerDisconnected(Exception):
    """A peer's control link closed before the group was ready."""

    peer: str
    state: str
    detail: str = ""

    def __str__(self) -> str:
        return f"peer {self.peer} disconnected during {self.state}: {self.detail or 'EOF'}"


@attrs.frozen(auto_exc=True)
class PeerAborted(Exception):
    """A peer failed and told us so (ABORT frame, or a failed group confirmation)."""

    rank: int
    error: str
    detail: str = ""

    def __str__(self) -> str:
        return f"rank {self.rank} aborted with {self.error}: {self.detail}"


@attrs.frozen(auto_exc=True)
class BootstrapRejected(Exception):
    """The bootstrap frame (0x07) or its acknowledgement was not acceptable."""

    reason: str
    peer: str = ""

    def __str__(self) -> str:
        return f"bootstrap rejected from {self.peer or 'peer'}: {self.reason}"


@attrs.frozen(auto_exc=True)
class BackendUnavailable(Exception):
    """The requested MLX backend cannot run here; ``missing`` names what is absent."""

    backend: str
    missing: str

    def __str__(self) -> str:
        return f"backend {self.backend!r} unavailable: {self.missing}"


@attrs.frozen(auto_exc=True)
class GroupInitFailed(Exception):
    """``mx.distributed.init`` raised (connection refused, RDMA error, ...)."""

    backend: str
    cause: str

    def __str__(self) -> str:
        return f"{self.backend} group init failed: {self.cause}"


@attrs.frozen(auto_exc=True)
class GroupSizeMismatch(Exception):
    """MLX returned a group whose size is not the world size (the silent size-1 case)."""

    expected: int
    got: int

    def __str__(self) -> str:
        return f"group size {self.got}, expected {self.expected}"


@attrs.frozen(auto_exc=True)
class PeerLost(Exception):
    """After ``ready``, a peer's heartbeats stopped or its link closed."""

    rank: int
    silence_s: float
    detail: str = ""

    def __str__(self) -> str:
        return f"rank {self.rank} lost after {self.silence_s:.3f} s of silence: {self.detail}"


@attrs.frozen(auto_exc=True)
class InterfaceUnavailable(Exception):
    """A ``--interface`` cannot carry the cluster: missing, down, no carrier, no IPv4
    address, or sockets cannot be bound to it on this platform."""

    interface: str
    reason: str

    def __str__(self) -> str:
        return f"interface {self.interface!r} unavailable: {self.reason}"


@attrs.frozen(auto_exc=True)
class LinkLost(Exception):
    """An ``--interface`` the group runs over went down, lost carrier (cable pulled,
    peer powered off) or lost its address while the rank was in ``ready``."""

    interface: str
    reason: str

    def __str__(self) -> str:
        return f"link on {self.interface!r} lost: {self.reason}"


@attrs.frozen(auto_exc=True)
class IncompatiblePeer(Exception):
    """Before init, a rank does not fit rank 0: another MLX or wire version, another
    world size, a backend it lacks, or an app-defined field (model id, shard plan)
    that differs. ``differences`` names each one."""

    differences: tuple[str, ...]

    def __str__(self) -> str:
        return "incompatible ranks: " + "; ".join(self.differences)


@attrs.frozen(auto_exc=True)
class DuplicateNodeId(Exception):
    """Two running nodes share one node id (a copied config or node-id file). A
    silent split would follow; we stop instead."""

    node_id: str  # hex
    sources: str  # where each claimant was heard

    def __str__(self) -> str:
        return (f"node id {self.node_id} is used by two nodes ({self.sources}); "
                "give one of them a new node id (delete its node-id file)")


@attrs.frozen(auto_exc=True)
class ElectionFailed(Exception):
    """Discovery found peers, but no single rank assignment follows from them (two
    nodes claim one rank, explicit and ``auto`` ranks mixed, too many nodes)."""

    reason: str

    def __str__(self) -> str:
        return f"rank election failed: {self.reason}"


@attrs.frozen(auto_exc=True)
class PrecheckFailed(Exception):
    """A check that runs before ``mx.distributed.init`` failed, so MLX is never asked
    to crash or hang on it. ``check`` names it (``rdma_disabled``, ``device_missing``,
    ``matrix_shape``, ``interface_down``, ``side_channel``, ...)."""

    check: str
    detail: str

    def __str__(self) -> str:
        return f"pre-init check {self.check!r} failed: {self.detail}"


# One timeout type per state, so each state's deadline has its own error state.


@attrs.frozen(auto_exc=True)
class DiscoveryTimeout(StateTimeout):
    """No peers were found before the discovery deadline."""


@attrs.frozen(auto_exc=True)
class LinkWaitTimeout(StateTimeout):
    """An ``--interface`` was still unusable when ``waiting_for_link``'s deadline (set
    with ``--deadline waiting_for_link=S``; none by default) passed."""


@attrs.frozen(auto_exc=True)
class HandshakeTimeout(StateTimeout):
    """Not every rank completed the handshake before the deadline."""


@attrs.frozen(auto_exc=True)
class SessionUnavailable(StateTimeout):
    """The session's health stayed ``unavailable`` (no heartbeat answered) until the deadline."""


@attrs.frozen(auto_exc=True)
class BootstrapTimeout(StateTimeout):
    """The bootstrap frame or an acknowledgement did not arrive in time."""


@attrs.frozen(auto_exc=True)
class GroupInitTimeout(StateTimeout):
    """Group init (barrier + ``mx.distributed.init``) did not finish before its hard deadline."""


@attrs.frozen(auto_exc=True)
class ConfirmationTimeout(StateTimeout):
    """The group-ready confirmation round did not complete in time."""
