"""Sans-IO handshake between the coordinator (rank 0) and a joiner: Noise_NNpsk0.

Theory of operation
-------------------
Every rank holds the same pre-shared cluster key. The handshake follows the Noise
pattern ``Noise_NNpsk0_25519_AESGCM_SHA256`` exactly (``states/seal.py`` implements
it and says why this pattern), with the coordinator as the Noise initiator::

    joiner (responder)                                  coordinator (initiator)
      Hello(version, node_id_j, rank, world_size, nonce_j, software, epoch)  ->
                                                        checks version, world size, rank,
                                                        stale epoch, duplicate rank / node id
      <-  Challenge(version, noise message 1 = e_c + sealed(node_id_c, world_size))
    checks the version, opens message 1 (the coordinator holds the key, and answered
    this very Hello), checks world size and node id
      Auth(noise message 2 = e_j + sealed(data_port))  ->
                                                        opens message 2 (the joiner holds
                                                        the key and is live: ee)
      <-  Welcome(session_id), SEALED, like every later frame either way

A refusal on either side is a ``Reject(reason, detail)`` frame, then the link closes.

The Hello stays in clear and keeps the layout of every protocol version: it is the
version negotiation, so a peer of another version answers ``VERSION_MISMATCH`` rather
than failing to decode. It is the Noise *prologue*, so every Hello field (nonce, epoch,
software, ...) is in the handshake hash and covered by both AEAD tags: a Hello altered
on the way fails message 1, and a recorded Challenge fails for a fresh Hello.

After message 2 both sides hold :attr:`keys` (``states.seal.SessionKeys``): one key per
direction, from the PSK and an ephemeral X25519 exchange (forward secrecy). The link
seals every frame after the handshake with them. The coordinator installs them before
sending its Welcome, the joiner right after sending its Auth
(:attr:`_Handshake.SEAL_REPLIES` says which).

Stale generations: a supervised joiner sends its *epoch* (its supervisor's generation
stamp, larger for every later process of that rank; 0 = unsupervised). The coordinator
is given a caller-owned map ``epoch_floors`` (rank -> newest epoch already admitted for
that rank, also remembered across coordinator restarts by its supervisor) and refuses
an older epoch with ``STALE_SESSION``, at the Hello and again after the Auth. The epoch
is in the prologue: refusing at the Hello needs no trust in it (a forged low epoch
costs only that one connection, which an on-path attacker could drop anyway), but an
epoch is *recorded* only once message 2 has authenticated the Hello it came in, so
nobody without the key can raise a floor and lock the legitimate generation out.

Like h11, these objects do no I/O: the link code calls :meth:`receive` with each
decoded message and sends what it returns.

Failure contract (both roles): :meth:`receive` raises
:class:`~states.errors.HandshakeRejected` (``remote=True`` when the peer sent us a
Reject, ``remote=False`` when we refused) or :class:`~states.errors.FrameError`
(``UNEXPECTED``: a message that is not allowed at this step). When we refused, the
``Reject`` to send before closing is in :attr:`outbox_on_failure`; it is empty in every
other case. So the caller's pattern is::

    try:
        to_send = hs.receive(msg)
    except (HandshakeRejected, FrameError):
        for m in hs.outbox_on_failure:
            await link.send(m)
        raise

After a failure the object is poisoned: every later :meth:`receive` raises the same
error again.

What this guarantees: both ends held the key during this connection; the Hello the
coordinator answered is the one the joiner sent; the coordinator's node id and world
size and the joiner's data port are the ones their senders meant; and the two session
keys are fresh, per direction, and known to nobody else (see docs/security.md).
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Container, Mapping
from typing import ClassVar, Final, NoReturn

from clusterfsm.states import seal
from clusterfsm.states.codec import Auth, Challenge, Hello, Message, Reject, Welcome
from clusterfsm.states.errors import (
    FrameError,
    FrameErrorKind,
    HandshakeRejected,
    LinkTampered,
    RejectReason,
)
from clusterfsm.states.keys import check_key_length

__all__ = [
    "PROTOCOL_VERSION",
    "CoordinatorHandshake",
    "JoinerHandshake",
]

#: The clusterfsm protocol version exchanged in Hello/Challenge (not the framing version).
#: 1: HMAC challenge-response, cleartext. 2: the Noise handshake and the sealed link.
#: 3: the same, and an APP_DATA frame carries a whole 64 KiB (payload up to 65539, a
#: SEALED frame up to 65556), which a protocol 2 rank would refuse as OVERSIZE in the
#: middle of a session; so the two refuse each other at the handshake instead.
PROTOCOL_VERSION: Final = 3
SOFTWARE: Final = "clusterfsm/0.1"


def _check_init(key: bytes, node_id: bytes, world_size: int, nonce: bytes | None) -> bytes:
    """Validate the local configuration (ValueError: our bug, not the peer's)."""
    if not isinstance(key, bytes):
        raise ValueError(f"the cluster key must be bytes, got {type(key).__name__}")
    check_key_length(key)
    if len(node_id) != 16:
        raise ValueError("node_id must be 16 bytes")
    if not 1 <= world_size <= 255:
        raise ValueError(f"world_size {world_size} outside 1..255")
    if nonce is None:
        return secrets.token_bytes(16)
    if len(nonce) != 16:
        raise ValueError("nonce must be 16 bytes")
    return nonce


class _Step(enum.Enum):
    START = "start"
    SENT_HELLO = "sent_hello"
    AWAIT_HELLO = "await_hello"
    AWAIT_AUTH = "await_auth"
    SENT_AUTH = "sent_auth"
    DONE = "done"
    FAILED = "failed"


class _Handshake:
    """What both roles share: the step, the poison, and the failure outbox."""

    __slots__ = (
        "_ephemeral",
        "_error",
        "_node_id",
        "_psk",
        "_step",
        "keys",
        "outbox_on_failure",
        "peer",
    )

    _ROLE = ""
    #: Seal the replies of the step that derived :attr:`keys` (the coordinator's
    #: Welcome), or only what follows them (the joiner's Auth is Noise message 2).
    SEAL_REPLIES: ClassVar[bool] = False

    def __init__(self, key: bytes, node_id: bytes, peer: str,
                 ephemeral: bytes | None) -> None:
        self._psk = seal.derive_psk(key)
        self._node_id = node_id
        self._ephemeral = ephemeral
        self.peer = peer
        self._step = _Step.START
        self._error: HandshakeRejected | FrameError | None = None
        #: The messages to send before closing after a local refusal (else empty).
        self.outbox_on_failure: tuple[Message, ...] = ()
        #: The session keys, once Noise message 2 is written (joiner) or read
        #: (coordinator); from then on the link seals (see :attr:`SEAL_REPLIES`).
        self.keys: seal.SessionKeys | None = None

    @property
    def done(self) -> bool:
        """The handshake succeeded."""
        return self._step is _Step.DONE

    @property
    def failed(self) -> bool:
        """The handshake failed; :attr:`error` says why."""
        return self._step is _Step.FAILED

    @property
    def error(self) -> HandshakeRejected | FrameError | None:
        return self._error

    def _require_done(self, what: str) -> None:
        if self._step is not _Step.DONE:
            raise RuntimeError(f"{what} is only known once the handshake is done")

    def _guard(self, msg: Message) -> None:
        """Common entry checks: poison, completion, and a peer's Reject."""
        if self._error is not None:
            raise self._error
        if self._step is _Step.DONE:
            # A completed handshake stays completed; the stray message is the caller's
            # (or the peer's) problem, reported without poisoning the result.
            raise self._unexpected(msg)
        if isinstance(msg, Reject):
            self._fail(
                HandshakeRejected(msg.reason, msg.detail or "refused by peer", self.peer, True)
            )

    def _unexpected(self, msg: Message) -> FrameError:
        return FrameError(
            FrameErrorKind.UNEXPECTED,
            f"{type(msg).__name__} during {self._ROLE} handshake step {self._step.value}",
            self.peer,
        )

    def _fail(self, exc: HandshakeRejected | FrameError) -> NoReturn:
        self._step = _Step.FAILED
        self._error = exc
        raise exc

    def _refuse(self, reason: RejectReason, detail: str) -> NoReturn:
        """Local refusal: queue the Reject for the caller, then raise."""
        self.outbox_on_failure = (Reject(reason, detail),)
        self._fail(HandshakeRejected(reason, detail, self.peer, False))


class JoinerHandshake(_Handshake):
    """The joiner's side (rank k > 0, dials rank 0): :meth:`start`, then :meth:`receive`."""

    __slots__ = (
        "_data_port",
        "_epoch",
        "_noise",
        "_nonce",
        "_peer_node_id",
        "_protocol_version",
        "_rank",
        "_session_id",
        "_software",
        "_world_size",
    )
    _ROLE = "joiner"

    def __init__(
        self,
        key: bytes,
        node_id: bytes,
        rank: int,
        world_size: int,
        data_port: int,
        *,
        protocol_version: int = PROTOCOL_VERSION,
        nonce: bytes | None = None,
        software: str = SOFTWARE,
        epoch: int = 0,
        peer: str = "",
        ephemeral: bytes | None = None,
    ) -> None:
        self._nonce = _check_init(key, node_id, world_size, nonce)
        super().__init__(key, node_id, peer, ephemeral)
        if not 0 <= epoch < 2**64:
            raise ValueError(f"epoch {epoch} outside 0..2**64-1")
        if not 1 <= rank < world_size:
            raise ValueError(f"a joiner's rank must be in 1..{world_size - 1}, got {rank}")
        if not 0 <= data_port <= 0xFFFF:
            raise ValueError(f"data_port {data_port} outside 0..65535")
        self._rank = rank
        self._world_size = world_size
        self._data_port = data_port
        self._protocol_version = protocol_version
        self._software = software
        self._epoch = epoch
        self._session_id: bytes | None = None
        self._peer_node_id: bytes | None = None
        self._noise: seal.ResponderHandshake | None = None

    def start(self) -> Hello:
        """The Hello to send first."""
        if self._step is not _Step.START:
            raise RuntimeError("start() may be called once")
        hello = Hello(
            self._protocol_version,
            self._node_id,
            self._rank,
            self._world_size,
            self._nonce,
            self._software,
            self._epoch,
        )
        self._noise = seal.ResponderHandshake(
            self._psk, seal.prologue(hello.encode()), ephemeral=self._ephemeral, peer=self.peer)
        self._step = _Step.SENT_HELLO
        return hello

    def receive(self, msg: Message) -> list[Message]:
        """Handle one message from the coordinator; return what to send back."""
        if self._step is _Step.START:
            raise RuntimeError("call start() and send the Hello first")
        self._guard(msg)
        if self._step is _Step.SENT_HELLO and isinstance(msg, Challenge):
            return [self._on_challenge(msg)]
        if self._step is _Step.SENT_AUTH and isinstance(msg, Welcome):
            self._session_id = msg.session_id
            self._step = _Step.DONE
            return []
        self._fail(self._unexpected(msg))

    def _on_challenge(self, ch: Challenge) -> Auth:
        # The version is named before anything is opened: with another version the
        # message could not open anyway, and "bad key" would mislead.
        if ch.protocol_version != self._protocol_version:
            self._refuse(
                RejectReason.VERSION_MISMATCH,
                f"coordinator speaks {ch.protocol_version}, we speak {self._protocol_version}",
            )
        assert self._noise is not None
        try:
            payload = self._noise.read_message1(ch.noise)
        except LinkTampered:
            self._refuse(RejectReason.BAD_KEY, "coordinator's Challenge does not authenticate "
                         "(another key, or it or our Hello was altered on the way)")
        node_id, world_size = payload[:16], payload[16]
        if world_size != self._world_size:
            self._refuse(
                RejectReason.WORLD_SIZE_MISMATCH,
                f"coordinator world size {world_size}, ours {self._world_size}",
            )
        if node_id == self._node_id:
            self._refuse(
                RejectReason.DUPLICATE_NODE_ID,
                f"coordinator has our node id {self._node_id.hex()} (copied config?)",
            )
        message2, self.keys = self._noise.write_message2(self._data_port.to_bytes(2, "big"))
        self._peer_node_id = node_id
        self._step = _Step.SENT_AUTH
        return Auth(message2)

    @property
    def session_id(self) -> bytes:
        """The session id from the Welcome (once done)."""
        self._require_done("session_id")
        assert self._session_id is not None
        return self._session_id

    @property
    def peer_node_id(self) -> bytes:
        """The coordinator's node id (once done)."""
        self._require_done("peer_node_id")
        assert self._peer_node_id is not None
        return self._peer_node_id


class CoordinatorHandshake(_Handshake):
    """Rank 0's side of one joiner connection: feed it with :meth:`receive`.

    ``taken_ranks`` and ``taken_node_ids`` are live containers the caller owns (for
    example the sets of admitted peers); only ``in`` is used. They are consulted when
    the Hello arrives and again when the Auth verifies, so two concurrent connections
    claiming the same rank cannot both be admitted - provided the caller registers
    :attr:`rank` and :attr:`peer_node_id` as soon as :attr:`done` turns true (before
    handling the next message of any connection). The coordinator's own node id is
    always taken.

    ``epoch_floors`` (rank -> newest epoch admitted for that rank) is likewise the
    caller's, read live at the Hello and after the Auth: a nonzero epoch below the
    rank's floor is refused with ``STALE_SESSION`` (checked before the duplicate rank,
    since it is the more precise reason). The caller raises the floor to :attr:`epoch`
    when it registers an admitted joiner. An equal epoch is the same process (an
    in-process retry of ``bootstrap_cluster``) and is let in; epoch 0 (unsupervised)
    is never refused and never raises a floor.
    """

    __slots__ = (
        "_data_port",
        "_epoch_floors",
        "_hello",
        "_noise",
        "_protocol_version",
        "_session_id",
        "_taken_node_ids",
        "_taken_ranks",
        "_world_size",
    )
    _ROLE = "coordinator"
    SEAL_REPLIES: ClassVar[bool] = True

    def __init__(
        self,
        key: bytes,
        node_id: bytes,
        world_size: int,
        session_id: bytes,
        taken_ranks: Container[int],
        taken_node_ids: Container[bytes],
        *,
        epoch_floors: Mapping[int, int] | None = None,
        protocol_version: int = PROTOCOL_VERSION,
        peer: str = "",
        ephemeral: bytes | None = None,
    ) -> None:
        _check_init(key, node_id, world_size, None)
        super().__init__(key, node_id, peer, ephemeral)
        if len(session_id) != 16:
            raise ValueError("session_id must be 16 bytes")
        self._world_size = world_size
        self._session_id = session_id
        self._taken_ranks = taken_ranks
        self._taken_node_ids = taken_node_ids
        self._epoch_floors: Mapping[int, int] = {} if epoch_floors is None else epoch_floors
        self._protocol_version = protocol_version
        self._hello: Hello | None = None
        self._noise: seal.InitiatorHandshake | None = None
        self._data_port: int | None = None
        self._step = _Step.AWAIT_HELLO

    def receive(self, msg: Message) -> list[Message]:
        """Handle one message from the joiner; return what to send back."""
        self._guard(msg)
        if self._step is _Step.AWAIT_HELLO and isinstance(msg, Hello):
            return [self._on_hello(msg)]
        if self._step is _Step.AWAIT_AUTH and isinstance(msg, Auth):
            return [self._on_auth(msg)]
        self._fail(self._unexpected(msg))

    def _check_admission(self, hello: Hello) -> None:
        floor = self._epoch_floors.get(hello.rank, 0)
        if hello.epoch and hello.epoch < floor:
            self._refuse(
                RejectReason.STALE_SESSION,
                f"epoch {hello.epoch} of rank {hello.rank} is older than a generation "
                "already admitted for that rank (a process from an earlier session)",
            )
        if hello.rank in self._taken_ranks:
            self._refuse(RejectReason.DUPLICATE_RANK, f"rank {hello.rank} is already admitted")
        if hello.node_id == self._node_id or hello.node_id in self._taken_node_ids:
            self._refuse(
                RejectReason.DUPLICATE_NODE_ID,
                f"node id {hello.node_id.hex()} is already in the cluster (copied config?)",
            )

    def _on_hello(self, hello: Hello) -> Challenge:
        if hello.protocol_version != self._protocol_version:
            self._refuse(
                RejectReason.VERSION_MISMATCH,
                f"joiner speaks {hello.protocol_version}, we speak {self._protocol_version}",
            )
        if hello.world_size != self._world_size:
            self._refuse(
                RejectReason.WORLD_SIZE_MISMATCH,
                f"joiner world size {hello.world_size}, ours {self._world_size}",
            )
        if not 1 <= hello.rank < self._world_size:
            self._refuse(
                RejectReason.BAD_RANK,
                f"rank {hello.rank} is not a joiner rank (1..{self._world_size - 1})",
            )
        self._check_admission(hello)
        self._hello = hello
        self._step = _Step.AWAIT_AUTH
        self._noise = seal.InitiatorHandshake(
            self._psk, seal.prologue(hello.encode()), ephemeral=self._ephemeral, peer=self.peer)
        message1 = self._noise.write_message1(
            self._node_id + self._world_size.to_bytes(1, "big"))
        return Challenge(self._protocol_version, message1)

    def _on_auth(self, auth: Auth) -> Welcome:
        hello, noise = self._hello, self._noise
        assert hello is not None and noise is not None
        try:
            payload, keys = noise.read_message2(auth.noise)
        except LinkTampered:
            self._refuse(RejectReason.BAD_KEY, "joiner's Auth does not authenticate "
                         "(another key, a replay, or altered on the way)")
        # From here the joiner holds the keys too: a refusal below goes out sealed.
        self.keys = keys
        # Re-check: another connection may have been admitted with this rank meanwhile.
        self._check_admission(hello)
        self._data_port = int.from_bytes(payload, "big")
        self._step = _Step.DONE
        return Welcome(self._session_id)

    def _admitted_hello(self, what: str) -> Hello:
        """The joiner's Hello, readable only once the handshake is done."""
        self._require_done(what)
        assert self._hello is not None
        return self._hello

    @property
    def rank(self) -> int:
        """The admitted joiner's rank (once done)."""
        return self._admitted_hello("rank").rank

    @property
    def peer_node_id(self) -> bytes:
        """The admitted joiner's node id (once done)."""
        return self._admitted_hello("peer_node_id").node_id

    @property
    def software(self) -> str:
        """The joiner's software string (once done), for logs."""
        return self._admitted_hello("software").software

    @property
    def epoch(self) -> int:
        """The joiner's epoch, authenticated by its Auth (once done; 0 = unsupervised)."""
        return self._admitted_hello("epoch").epoch

    @property
    def data_port(self) -> int:
        """The joiner's data port, sealed in its Auth (once done)."""
        self._require_done("data_port")
        assert self._data_port is not None
        return self._data_port

    @property
    def session_id(self) -> bytes:
        """The session id this coordinator hands out."""
        return self._session_id
