"""The typed errors the cluster bootstrap can end in.

Each type is bound to exactly one error state of the bootstrap machine
(:mod:`clusterfsm.states.machine`). They are frozen attrs exceptions: an activity raises one, the
runner moves the machine into the bound error state, and the embedding app gets the
same value back (``cluster.error``) with the facts an operator needs.

Naming follows h11: a *local* rejection is one we decided, a *remote* rejection is one
the peer sent us. Both are :class:`HandshakeRejected`; ``remote`` tells them apart.

For app authors every one of them is a :class:`ClusterError`: ``except ClusterError``
catches any failed bootstrap, ``error.state`` names its error state (looked up in the
machine's own table, the one the runner uses) and ``error.retryable`` says whether a
new attempt, in a new process, can succeed without anyone changing the configuration
(the table is in docs/embedding.md, "Errors").
"""

from __future__ import annotations

import enum
from typing import ClassVar

import attrs

from clusterfsm.fsm.errors import StateTimeout
from clusterfsm.fsm.spec import UNEXPECTED_STATE, MachineSpec

#: The machine whose table binds these types to error states: set by
#: :mod:`clusterfsm.states.machine` where it declares that table (this module cannot
#: import the machine, which imports every activity and so this module).
_BOUND_MACHINE: list[MachineSpec] = []


def bind_error_states(spec: MachineSpec) -> None:
    """Make ``spec``'s table the one :attr:`ClusterError.state` looks errors up in."""
    _BOUND_MACHINE[:] = [spec]


class ClusterError(Exception):
    """The base of every error a bootstrap can end in.

    ``state`` is the error state the bootstrap machine binds this type to, asked of
    the machine's own table (:meth:`clusterfsm.fsm.MachineSpec.error_state_for`, the
    lookup the runner moves by), so nobody reads it from a message.

    ``retryable`` is declared per type: True when a new attempt with the same
    configuration can succeed once something outside this process changes by itself
    (a peer restarts, a link comes back, a deadline was just too short); False when
    someone has to change something first (a key, a version, a flag, a cable plan).
    A retry always means a new process: MLX keeps one group per process, so a rank
    that got as far as group init cannot bootstrap again in the same process
    (:class:`GroupAlreadyInitialized`). Supervision (``clusterfsm serve --supervise``,
    :func:`clusterfsm.states.supervised.supervise_ranks`) does exactly that.
    """

    __slots__ = ()

    retryable: ClassVar[bool] = False

    @property
    def state(self) -> str:
        """The bootstrap machine's error state for this error (``unexpected`` if none)."""
        if not _BOUND_MACHINE:
            raise RuntimeError("import clusterfsm.states.machine first: it declares the "
                               "error states")
        bound = _BOUND_MACHINE[0].error_state_for(type(self))
        return UNEXPECTED_STATE if bound is None else bound.name


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
class FrameError(ClusterError):
    """Malformed or out-of-place input from a peer. The connection is closed."""

    retryable: ClassVar[bool] = False

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
class HandshakeRejected(ClusterError):
    """The handshake with ``peer`` failed; ``remote`` is True when the peer refused us."""

    retryable: ClassVar[bool] = False

    reason: RejectReason
    detail: str = ""
    peer: str = ""
    remote: bool = False

    def __str__(self) -> str:
        side = "peer refused us" if self.remote else "we refused the peer"
        who = f" {self.peer}" if self.peer else ""
        return f"handshake rejected ({self.reason.name.lower()}, {side}{who}): {self.detail}"


@attrs.frozen(auto_exc=True)
class PeerDisconnected(ClusterError):
    """A peer's control link closed before the group was ready."""

    retryable: ClassVar[bool] = True

    peer: str
    during: str  # the state the link was in
    detail: str = ""

    def __str__(self) -> str:
        return f"peer {self.peer} disconnected during {self.during}: {self.detail or 'EOF'}"


@attrs.frozen(auto_exc=True)
class PeerAborted(ClusterError):
    """A peer failed and told us so (ABORT frame, or a failed group confirmation)."""

    retryable: ClassVar[bool] = True

    rank: int
    error: str
    detail: str = ""

    def __str__(self) -> str:
        return f"rank {self.rank} aborted with {self.error}: {self.detail}"


class TamperKind(enum.Enum):
    """Why bytes from an authenticated peer could not be trusted."""

    FORGED = "forged"  # fails authentication at its position: altered, replayed,
    # reordered, dropped-then-resent, truncated, or sealed under another key
    MALFORMED = "malformed"  # a sealed message of impossible length (below a tag)
    UNSEALED = "unsealed"  # a cleartext frame where only sealed frames are allowed
    EXHAUSTED = "exhausted"  # the direction's counter reached its limit


@attrs.frozen(auto_exc=True)
class LinkTampered(ClusterError):
    """Input on a sealed link did not authenticate (``states/seal.py``): a frame
    altered, replayed, reordered, dropped, truncated or injected in cleartext. The
    link is closed. ``frame`` is the position (counter) the receiver expected.

    Retryable: nothing in our configuration is wrong; a new session (new keys) gets
    through once whatever wrote into the link is gone."""

    retryable: ClassVar[bool] = True

    kind: TamperKind
    detail: str = ""
    peer: str = ""
    frame: int = -1

    def __str__(self) -> str:
        who = f" from {self.peer}" if self.peer else ""
        at = f" at frame {self.frame}" if self.frame >= 0 else ""
        return f"link tampered ({self.kind.value}){who}{at}: {self.detail}"


@attrs.frozen(auto_exc=True)
class BootstrapRejected(ClusterError):
    """The bootstrap frame (0x07) or its acknowledgement was not acceptable."""

    retryable: ClassVar[bool] = True

    reason: str
    peer: str = ""

    def __str__(self) -> str:
        return f"bootstrap rejected from {self.peer or 'peer'}: {self.reason}"


@attrs.frozen(auto_exc=True)
class BackendUnavailable(ClusterError):
    """The requested MLX backend cannot run here; ``missing`` names what is absent."""

    retryable: ClassVar[bool] = False

    backend: str
    missing: str

    def __str__(self) -> str:
        return f"backend {self.backend!r} unavailable: {self.missing}"


@attrs.frozen(auto_exc=True)
class GroupInitFailed(ClusterError):
    """``mx.distributed.init`` raised (connection refused, RDMA error, ...)."""

    retryable: ClassVar[bool] = True

    backend: str
    cause: str

    def __str__(self) -> str:
        return f"{self.backend} group init failed: {self.cause}"


@attrs.frozen(auto_exc=True)
class GroupSizeMismatch(ClusterError):
    """MLX returned a group whose size is not the world size (the silent size-1 case)."""

    retryable: ClassVar[bool] = False

    expected: int
    got: int

    def __str__(self) -> str:
        return f"group size {self.got}, expected {self.expected}"


@attrs.frozen(auto_exc=True)
class PeerLost(ClusterError):
    """After ``ready``, a peer's heartbeats stopped or its link closed."""

    retryable: ClassVar[bool] = True

    rank: int
    silence_s: float
    detail: str = ""

    def __str__(self) -> str:
        return f"rank {self.rank} lost after {self.silence_s:.3f} s of silence: {self.detail}"


@attrs.frozen(auto_exc=True)
class InterfaceUnavailable(ClusterError):
    """A ``--interface`` cannot carry the cluster: missing, down, no carrier, no IPv4
    address, or sockets cannot be bound to it on this platform."""

    retryable: ClassVar[bool] = True

    interface: str
    reason: str

    def __str__(self) -> str:
        return f"interface {self.interface!r} unavailable: {self.reason}"


@attrs.frozen(auto_exc=True)
class LinkLost(ClusterError):
    """An ``--interface`` the group runs over went down, lost carrier (cable pulled,
    peer powered off) or lost its address while the rank was in ``ready``."""

    retryable: ClassVar[bool] = True  # when the cable is back (supervision waits for it)

    interface: str
    reason: str

    def __str__(self) -> str:
        return f"link on {self.interface!r} lost: {self.reason}"


@attrs.frozen(auto_exc=True)
class IncompatiblePeer(ClusterError):
    """Before init, a rank does not fit rank 0: another MLX or wire version, another
    world size, a backend it lacks, or an app-defined field (model id, shard plan)
    that differs. ``differences`` names each one."""

    retryable: ClassVar[bool] = False  # someone must install the same versions first

    differences: tuple[str, ...]

    def __str__(self) -> str:
        return "incompatible ranks: " + "; ".join(self.differences)


@attrs.frozen(auto_exc=True)
class DuplicateNodeId(ClusterError):
    """Two running nodes share one node id (a copied config or node-id file). A
    silent split would follow; we stop instead."""

    retryable: ClassVar[bool] = False

    node_id: str  # hex
    sources: str  # where each claimant was heard

    def __str__(self) -> str:
        return (f"node id {self.node_id} is used by two nodes ({self.sources}); "
                "give one of them a new node id (delete its node-id file)")


@attrs.frozen(auto_exc=True)
class ElectionFailed(ClusterError):
    """Discovery found peers, but no single rank assignment follows from them (two
    nodes claim one rank, explicit and ``auto`` ranks mixed, too many nodes)."""

    retryable: ClassVar[bool] = False

    reason: str

    def __str__(self) -> str:
        return f"rank election failed: {self.reason}"


@attrs.frozen(auto_exc=True)
class PrecheckFailed(ClusterError):
    """A check that runs before ``mx.distributed.init`` failed, so MLX is never asked
    to crash or hang on it. ``check`` names it (``rdma_disabled``, ``device_missing``,
    ``matrix_shape``, ``interface_down``, ``side_channel``, ...)."""

    retryable: ClassVar[bool] = False

    check: str
    detail: str

    def __str__(self) -> str:
        return f"pre-init check {self.check!r} failed: {self.detail}"


# One timeout type per state, so each state's deadline has its own error state.


@attrs.frozen(auto_exc=True)
class DiscoveryTimeout(StateTimeout, ClusterError):
    """No peers were found before the discovery deadline."""

    retryable: ClassVar[bool] = True


@attrs.frozen(auto_exc=True)
class LinkWaitTimeout(StateTimeout, ClusterError):
    """An ``--interface`` was still unusable when ``waiting_for_link``'s deadline (set
    with ``--deadline waiting_for_link=S``; none by default) passed."""

    retryable: ClassVar[bool] = True


@attrs.frozen(auto_exc=True)
class HandshakeTimeout(StateTimeout, ClusterError):
    """Not every rank completed the handshake before the deadline."""

    retryable: ClassVar[bool] = True


@attrs.frozen(auto_exc=True)
class SessionUnavailable(StateTimeout, ClusterError):
    """The session's health stayed ``unavailable`` (no heartbeat answered) until the deadline."""

    retryable: ClassVar[bool] = True


@attrs.frozen(auto_exc=True)
class BootstrapTimeout(StateTimeout, ClusterError):
    """The bootstrap frame or an acknowledgement did not arrive in time."""

    retryable: ClassVar[bool] = True


@attrs.frozen(auto_exc=True)
class GroupInitTimeout(StateTimeout, ClusterError):
    """Group init (barrier + ``mx.distributed.init``) did not finish before its hard deadline."""

    retryable: ClassVar[bool] = True


@attrs.frozen(auto_exc=True)
class ConfirmationTimeout(StateTimeout, ClusterError):
    """The group-ready confirmation round did not complete in time."""

    retryable: ClassVar[bool] = True


@attrs.frozen(auto_exc=True)
class GroupAlreadyInitialized(ClusterError):
    """This process already initialized an MLX group for ``backend``.

    MLX keeps the first group it makes for the life of the process and hands that
    same group to every later ``mx.distributed.init``: a second bootstrap in this
    process would get the old (possibly dead) group instead of a new one. Found
    before the barrier, so no rank enters init; the remedy is a new process.
    """

    backend: str

    retryable: ClassVar[bool] = True  # in a new process

    def __str__(self) -> str:
        return (f"this process already initialized an MLX {self.backend} group, and MLX "
                "keeps that group for the life of the process: bootstrap again in a new "
                "process (supervise the rank: `clusterfsm serve --supervise`, or "
                "clusterfsm.states.supervised.supervise_ranks)")


@attrs.frozen(auto_exc=True)
class InternalError(ClusterError):
    """The machine ended in ``unexpected``: an exception no state declares (a bug).

    What :func:`clusterfsm.states.api.bootstrap_cluster` raises for it, so an app's
    ``except ClusterError`` sees every failed bootstrap; the runner's own value
    (:class:`clusterfsm.fsm.UnexpectedError`, with the original exception) is its
    ``__cause__`` and ``cluster.error``.
    """

    in_state: str
    error: str
    detail: str = ""

    def __str__(self) -> str:
        return f"internal error in {self.in_state}: {self.error}: {self.detail}"
