"""The control-link frame codec: bytes in, typed messages out, and back.

Sans-IO, in the style of h11: nothing here touches a socket, trio or MLX, so every
rule of the wire format is tested and fuzzed without a network.  The link code feeds
whatever ``recv`` returned into a :class:`FrameDecoder` and gets whole :class:`Frame`
values back; :func:`decode_message` turns a frame into one of the typed messages below.

Why a hard frame limit and early header checks: the control link faces whatever can
reach the port before authentication.  A peer that declares a 4 GiB payload, or sends
HTTP at us, must cost one header's worth of memory and end in a typed
:class:`~states.errors.FrameError`, never an allocation or a hang waiting for bytes
that a real clusterfsm peer would never send.

Each message is one class, as in hyperframe: the :func:`message` decorator registers
its type byte and derives its payload codec from its attrs fields, which are declared
once, in wire order, each with its wire type (``states/wire.py``)::

    @message(ClusterMsgType.PING)
    class Ping(Message):
        seq: int = wire(U64)

To add a field: one line ``name: T = wire(TYPE)`` at its place in the wire order
(``default=`` keeps existing constructor calls working). To add a message type: one
member of :class:`ClusterMsgType` and one decorated class (an import-time check refuses
a type byte without a class). A new kind of field: see ``states/wire.py``. Either way
the wire changes: bump ``PROTOCOL_VERSION`` in ``states/handshake.py`` (or
:data:`FRAME_VERSION` for a framing change) and update the layout tables and vectors
of ``docs/protocol.md``, which the tests check byte for byte.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Callable
from typing import Any, ClassVar, Final, Self, TypeVar, dataclass_transform

import attrs

from clusterfsm.states import topology
from clusterfsm.states.errors import FrameError, FrameErrorKind, RejectReason
from clusterfsm.states.topology import MAX_INTERFACE_NAME, Topology
from clusterfsm.states.wire import (
    Bool,
    EnumByte,
    Raw,
    Reader,
    Rest,
    Str,
    UInt,
    VarWire,
    derive_codec,
    wire,
)

__all__ = [
    "FRAME_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_APP_CHUNK",
    "MAX_APP_PAYLOAD",
    "MAX_INNER_PAYLOAD",
    "MAX_PAYLOAD",
    "MAX_SEALED_PAYLOAD",
    "MAX_STATUS",
    "MAX_STR",
    "MESSAGE_TYPES",
    "NO_SESSION",
    "SEAL_OVERHEAD",
    "Abort",
    "AppCredit",
    "AppData",
    "Auth",
    "BeatPort",
    "BootstrapAck",
    "BootstrapPayload",
    "Challenge",
    "ClusterMsgType",
    "Compat",
    "Frame",
    "FrameDecoder",
    "GatherPart",
    "GatherResult",
    "Goodbye",
    "GroupConfirm",
    "GroupConfirmed",
    "Hello",
    "InitGo",
    "InitReady",
    "LinkReport",
    "Message",
    "Ping",
    "Pong",
    "Reject",
    "Sealed",
    "Welcome",
    "WireBackend",
    "decode_message",
    "encode_frame",
    "encode_message",
    "message",
    "payload_limit",
]

MAGIC: Final = b"CF"
FRAME_VERSION: Final = 1
HEADER_SIZE: Final = 8
#: Hard limit on a frame's payload, for every type but the two below. Control messages
#: are tiny; the largest legitimate one is a bootstrap frame for 8 ranks, far below this.
MAX_PAYLOAD: Final = 65536
#: The most app bytes one APP_DATA frame carries: a whole 64 KiB, the unit an app sends,
#: so a 64 KiB message is one frame (one seal, one credit), not two.
MAX_APP_CHUNK: Final = 65536
#: An APP_DATA payload: src, dst and more (3 bytes), then up to MAX_APP_CHUNK of body.
MAX_APP_PAYLOAD: Final = 3 + MAX_APP_CHUNK
#: The largest payload of any type that is sealed (every type but SEALED itself).
MAX_INNER_PAYLOAD: Final = max(MAX_PAYLOAD, MAX_APP_PAYLOAD)
#: What sealing adds to a payload: the inner type byte and the 16-byte AEAD tag
#: (``states/seal.py``); a SEALED frame's payload may be this much above the largest
#: inner payload.
SEAL_OVERHEAD: Final = 1 + 16
MAX_SEALED_PAYLOAD: Final = MAX_INNER_PAYLOAD + SEAL_OVERHEAD
#: Default limit (in UTF-8 bytes) of a string field.
MAX_STR: Final = 1024
#: The session id of an Abort sent before there is a session.
NO_SESSION: Final = bytes(16)

_HEADER = struct.Struct(">2sBBI")


class ClusterMsgType(enum.IntEnum):
    """The message type byte (header offset 3)."""

    HELLO = 0x01
    CHALLENGE = 0x02
    AUTH = 0x03
    WELCOME = 0x04
    PING = 0x05
    PONG = 0x06
    BOOTSTRAP = 0x07
    BOOTSTRAP_ACK = 0x08
    INIT_READY = 0x09
    INIT_GO = 0x0A
    GROUP_CONFIRM = 0x0B
    GROUP_CONFIRMED = 0x0C
    ABORT = 0x0D
    REJECT = 0x0E
    LINK_REPORT = 0x0F
    GATHER_PART = 0x10
    GATHER_RESULT = 0x11
    GOODBYE = 0x12
    COMPAT = 0x13
    BEAT_PORT = 0x14
    APP_DATA = 0x20
    APP_CREDIT = 0x21
    SEALED = 0x30


# A plain dict lookup is several times faster than calling the enum, and the decoder
# does it once per frame.
_TYPE_BY_BYTE: Final[dict[int, ClusterMsgType]] = {int(t): t for t in ClusterMsgType}
#: The types whose payload may exceed MAX_PAYLOAD, and by how much.
_LIMITS: Final[dict[int, int]] = {
    int(ClusterMsgType.APP_DATA): MAX_APP_PAYLOAD,
    int(ClusterMsgType.SEALED): MAX_SEALED_PAYLOAD,
}
# The hot paths test ``n > MAX_PAYLOAD`` first and look the type up only above it.
assert min(_LIMITS.values()) >= MAX_PAYLOAD


def payload_limit(type_byte: int) -> int:
    """The payload limit of a frame type: :data:`MAX_PAYLOAD`, except APP_DATA (a whole
    :data:`MAX_APP_CHUNK` of app bytes after its 3-byte head) and SEALED (the largest
    inner payload, plus its type byte and tag). The encoder, the decoder and the seal
    all ask this one function, so a frame we emit is never one we refuse."""
    return _LIMITS.get(type_byte, MAX_PAYLOAD)


class WireBackend(enum.IntEnum):
    """The MLX distributed backend as the bootstrap frame names it (one byte).

    Not the user's choice (``config.BackendChoice``, which may be ``"any"``): by the
    time a bootstrap frame is built the backend is decided.
    """

    RING = 1
    JACCL = 2


# ---------------------------------------------------------------------------------------
# Frames


@attrs.frozen
class Frame:
    """One framed message: its type and its (still encoded) payload.

    No validators here on purpose: the decoder builds one per frame on the hot path and
    has already checked everything; :func:`encode_frame` checks the payload size.
    """

    type: ClusterMsgType
    payload: bytes


def _framed(type_byte: int, payload: bytes) -> bytes:
    n = len(payload)
    if n > MAX_PAYLOAD and n > payload_limit(type_byte):
        raise ValueError(f"payload of {n} bytes exceeds the {payload_limit(type_byte)}-byte "
                         "limit")
    return _HEADER.pack(MAGIC, FRAME_VERSION, type_byte, n) + payload


def encode_frame(frame: Frame) -> bytes:
    """Serialize ``frame`` (header + payload).

    Raises ValueError (a local bug, not a peer's fault) if the payload is above its
    type's :func:`payload_limit` or the type is unknown: we never emit a frame we would
    refuse.
    """
    if frame.type not in _TYPE_BY_BYTE:
        raise ValueError(f"unknown message type {frame.type!r}")
    return _framed(frame.type, frame.payload)


#: The rest of a header that passes every check: a partial header is judged with its
#: missing bytes taken from here, so only the bytes already received can fail, and the
#: length is judged by its lower bound.
_PASSING_HEADER: Final = _HEADER.pack(MAGIC, FRAME_VERSION, min(_TYPE_BY_BYTE), 0)


def _judge_header(buf: memoryview, pos: int, avail: int) -> tuple[ClusterMsgType, int]:
    """Check the header at ``buf[pos:]``, of which ``avail`` bytes (>= 1) are here.

    Checks magic, version, type, length, in that order, on as many bytes as have
    arrived. Why judge a partial header: a peer speaking another protocol (or a
    scanner) is told off on its first bytes instead of leaving us waiting for a header
    it will never complete, and a length whose known high bytes already exceed the
    limit is refused before the rest arrives. One function for whole and partial
    headers, so the error kind never depends on how the stream was split. The result
    is meaningful only when ``avail >= HEADER_SIZE``.
    """
    if avail >= HEADER_SIZE:
        magic, version, type_byte, length = _HEADER.unpack_from(buf, pos)
    else:
        head = bytes(buf[pos : pos + avail]) + _PASSING_HEADER[avail:]
        magic, version, type_byte, length = _HEADER.unpack(head)
    if magic != MAGIC:
        raise FrameError(FrameErrorKind.BAD_MAGIC, f"magic {bytes(buf[pos : pos + 2])!r}")
    if version != FRAME_VERSION:
        raise FrameError(FrameErrorKind.BAD_VERSION, f"framing version {version}")
    mtype = _TYPE_BY_BYTE.get(type_byte)
    if mtype is None:
        raise FrameError(FrameErrorKind.UNKNOWN_TYPE, f"message type 0x{type_byte:02x}")
    if length > MAX_PAYLOAD and length > payload_limit(type_byte):
        at_least = "" if avail >= HEADER_SIZE else ">= "
        raise FrameError(
            FrameErrorKind.OVERSIZE,
            f"declared length {at_least}{length} > {payload_limit(type_byte)}",
        )
    return mtype, length


class FrameDecoder:
    """Streaming frame decoder: feed it bytes as they arrive, get whole frames back.

    Memory is bounded: it buffers at most one incomplete frame, and a header is judged
    (magic, version, type, length - in that order) as soon as its bytes are there, so a
    huge declared length is refused before a byte of its payload is stored.

    An error poisons the decoder: every later :meth:`feed` or :meth:`close` raises the
    same :class:`FrameError`. A byte stream has no resynchronization point, so once a
    frame is bad nothing after it can be trusted; the link closes. Frames that were
    complete before the bad bytes *in the same* :meth:`feed` call are not returned.
    """

    __slots__ = ("_buf", "_error")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._error: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for the incomplete frame (at most ``8 + MAX_SEALED_PAYLOAD``)."""
        return len(self._buf)

    @property
    def error(self) -> FrameError | None:
        """The error that poisoned this decoder, if any."""
        return self._error

    def feed(self, data: bytes) -> list[Frame]:
        """Add ``data`` and return every frame it completes (possibly none)."""
        if self._error is not None:
            raise self._error
        buf = self._buf
        if buf:
            buf += data
            src: bytes | bytearray = buf
        else:
            # Fast path: nothing pending, parse straight out of the caller's bytes
            # without copying them into the buffer first.
            src = data
        frames: list[Frame] = []
        append = frames.append
        n = len(src)
        pos = 0
        try:
            with memoryview(src) as mv:
                while pos < n:
                    mtype, length = _judge_header(mv, pos, n - pos)
                    start = pos + HEADER_SIZE
                    end = start + length
                    if end > n:  # also when the header itself is incomplete
                        break
                    append(Frame(mtype, bytes(mv[start:end])))
                    pos = end
        except FrameError as exc:
            self._poison(exc)
            raise
        if src is buf:
            if pos:
                del buf[:pos]
        elif pos < n:
            self._buf = bytearray(src[pos:])
        return frames

    def close(self) -> None:
        """Declare end of stream; raise ``FrameError(TRUNCATED)`` if inside a frame."""
        if self._error is not None:
            raise self._error
        if self._buf:
            exc = FrameError(
                FrameErrorKind.TRUNCATED, f"stream ended with {len(self._buf)} bytes of a frame"
            )
            self._poison(exc)
            raise exc

    def _poison(self, exc: FrameError) -> None:
        self._error = exc
        self._buf = bytearray()  # release the memory; nothing more will be parsed


# ---------------------------------------------------------------------------------------
# The protocol's wire types (states/wire.py has the generic ones)

#: Which of a joiner's interfaces reached which peer: ``((node_id, (name, ...)), ...)``.
Links = tuple[tuple[bytes, tuple[str, ...]], ...]
_IFNAME = Str(MAX_INTERFACE_NAME)


def _link_table(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, tuple) or len(value) > 255:
        raise ValueError(f"{attr.name} must be a tuple of at most 255 entries")
    for entry in value:
        if not (isinstance(entry, tuple) and len(entry) == 2):
            raise TypeError(f"{attr.name}: entries are (node_id, interface names)")
        node_id, names = entry
        if not (isinstance(node_id, bytes) and len(node_id) == 16):
            raise ValueError(f"{attr.name}: node id must be 16 bytes")
        if not (isinstance(names, tuple) and 1 <= len(names) <= 4):
            raise ValueError(f"{attr.name}: 1..4 interfaces per peer")
        for name in names:
            topology.check_name(name, f"{attr.name}: interface name", MAX_INTERFACE_NAME)


class LinkTable(VarWire[Links]):
    """u8 count, then per entry: 16-byte node id, u8 count, that many ``Str(15)``."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(_link_table)

    def pack(self, value: Links) -> bytes:
        out = [len(value).to_bytes(1, "big")]
        for node_id, names in value:
            out.append(node_id + len(names).to_bytes(1, "big"))
            out.extend(_IFNAME.pack(name) for name in names)
        return b"".join(out)

    def unpack(self, r: Reader) -> Links:
        entries = []
        for _ in range(r.uint(1)):
            node_id = r.take(16)
            entries.append((node_id, tuple(_IFNAME.unpack(r) for _ in range(r.uint(1)))))
        return tuple(entries)


def _no_numbers(text: str) -> Any:
    raise ValueError(f"numbers are not allowed in a topology ({text[:20]!r})")


class TopologyJson(VarWire[Topology]):
    """u32 length + UTF-8 JSON (deterministic: sorted keys, no spaces).

    Accepts lists for convenience (config code). No check of its own: the topology
    rules depend on the backend and world size, so the message that carries one adds
    them (see :class:`BootstrapPayload`).
    """

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(None, converter=topology.from_lists)

    def pack(self, value: Topology) -> bytes:
        raw = json.dumps(
            topology.to_lists(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode("utf-8")
        return len(raw).to_bytes(4, "big") + raw

    def unpack(self, r: Reader) -> Topology:
        raw = r.take(r.uint(4))
        try:
            obj = json.loads(
                raw.decode("utf-8"),
                parse_int=_no_numbers,
                parse_float=_no_numbers,
                parse_constant=_no_numbers,
            )
            return topology.from_lists(obj)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
            raise r.fail(f"bad topology JSON: {exc}") from None


U8, U16, U64 = UInt(8), UInt(16), UInt(64)
#: A group has 1..255 ranks.
WORLD_SIZE = UInt(8, lo=1)
BYTES16 = Raw(16)
BOOL = Bool()
TEXT, TEXT64 = Str(MAX_STR), Str(64)
REST = Rest(MAX_PAYLOAD)
#: Noise message 1 (``states/seal.py``): the coordinator's ephemeral key (32) and its
#: sealed node id (16) and world size (1), with the tag (16).
NOISE_MESSAGE1 = Raw(32 + 17 + 16)
#: Noise message 2: the joiner's ephemeral key (32) and its sealed data port (2), tag (16).
NOISE_MESSAGE2 = Raw(32 + 2 + 16)
#: Limit of the app-defined status a heartbeat carries (``cluster.set_status``).
MAX_STATUS: Final = 256
STATUS = Rest(MAX_STATUS)


# ---------------------------------------------------------------------------------------
# Messages: the base class, the registry and the class decorator


class Message:
    """Base of every message; :func:`message` fills in ``TYPE``, ``encode``, ``decode``."""

    __slots__ = ()

    TYPE: ClassVar[ClusterMsgType]

    def encode(self) -> bytes:
        """The payload bytes (without the frame header)."""
        raise NotImplementedError

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a payload; anything wrong is ``FrameError(BAD_PAYLOAD)``."""
        raise NotImplementedError


MESSAGE_TYPES: Final[dict[ClusterMsgType, type[Message]]] = {}
M = TypeVar("M", bound=Message)


@dataclass_transform(frozen_default=True, field_specifiers=(wire, attrs.field))
def message(msg_type: ClusterMsgType) -> Callable[[type[M]], type[M]]:
    """Class decorator: a frozen attrs message of type ``msg_type``, registered, with
    ``encode``/``decode`` derived from its :func:`wire` fields in declaration order."""

    def register(cls: type[M]) -> type[M]:
        if msg_type in MESSAGE_TYPES:
            raise TypeError(f"{msg_type!r} already belongs to {MESSAGE_TYPES[msg_type]}")
        made = attrs.frozen(cls)
        made.TYPE = msg_type
        encode, decode = derive_codec(made)
        made.encode = encode  # type: ignore[method-assign, assignment]
        made.decode = staticmethod(decode)  # type: ignore[method-assign, assignment]
        MESSAGE_TYPES[msg_type] = made
        return made

    return register


# ---------------------------------------------------------------------------------------
# The messages, in type-byte order (docs/protocol.md has the byte layout of each)


@message(ClusterMsgType.HELLO)
class Hello(Message):
    """Joiner -> coordinator: who I am, what I speak, and my nonce."""

    protocol_version: int = wire(U16)
    node_id: bytes = wire(BYTES16)
    # The codec does not check rank < world_size: the handshake refuses that with a
    # typed reason (BAD_RANK) the joiner can be told about.
    rank: int = wire(U8)
    world_size: int = wire(WORLD_SIZE)
    nonce: bytes = wire(BYTES16)
    software: str = wire(TEXT64, default="")
    # The joiner's generation (its supervisor's epoch; 0 = unsupervised). Rank 0
    # refuses an epoch older than the newest admitted for this rank (STALE_SESSION);
    # the Hello is the Noise prologue, so an on-path attacker cannot change it.
    epoch: int = wire(U64, default=0)


@message(ClusterMsgType.CHALLENGE)
class Challenge(Message):
    """Coordinator -> joiner: my version in clear (so a mismatch is named), then Noise
    message 1 (``-> psk, e``): my ephemeral key and my sealed node id and world size."""

    protocol_version: int = wire(U16)
    noise: bytes = wire(NOISE_MESSAGE1)


@message(ClusterMsgType.AUTH)
class Auth(Message):
    """Joiner -> coordinator: Noise message 2 (``<- e, ee``): my ephemeral key and my
    sealed data port. After it, every frame either way is SEALED."""

    noise: bytes = wire(NOISE_MESSAGE2)


@message(ClusterMsgType.WELCOME)
class Welcome(Message):
    """Coordinator -> joiner: admitted; here is the session id."""

    session_id: bytes = wire(BYTES16)


@message(ClusterMsgType.PING)
class Ping(Message):
    """Heartbeat request; ``seq`` pairs it with its Pong. ``status``: the sender's
    app-defined status (``cluster.set_status``), empty until it sets one."""

    seq: int = wire(U64)
    status: bytes = wire(STATUS, default=b"")


@message(ClusterMsgType.PONG)
class Pong(Message):
    """Heartbeat answer, echoing the Ping's ``seq``, with the answering rank's status."""

    seq: int = wire(U64)
    status: bytes = wire(STATUS, default=b"")


def _topology_fits(inst: BootstrapPayload, _attr: Any, value: Topology) -> None:
    """The topology rules of the frame's own backend and world size (states.topology)."""
    if inst.backend is WireBackend.RING:
        topology.check_ring_hostfile(value, inst.world_size)
    else:
        topology.check_jaccl_matrix(value, inst.world_size)


@message(ClusterMsgType.BOOTSTRAP)
class BootstrapPayload(Message):
    """Rank 0 -> every rank (type 0x07): what each rank needs to call ``init``.

    For ``RING`` the topology is the hostfile (one tuple of ``"ip:port"`` per rank),
    for ``JACCL`` the N x N device matrix.
    """

    coordinator_port: int = wire(U16)
    session_id: bytes = wire(BYTES16)
    backend: WireBackend = wire(EnumByte(WireBackend))
    world_size: int = wire(WORLD_SIZE)
    topology: Topology = wire(TopologyJson(), validator=_topology_fits)

    def __attrs_post_init__(self) -> None:
        # The one message whose size depends on its content: refuse one that cannot be
        # framed here, not at send time.
        size = len(self.encode())
        if size > MAX_PAYLOAD:
            raise ValueError(f"bootstrap payload is {size} bytes, limit {MAX_PAYLOAD}")


@message(ClusterMsgType.BOOTSTRAP_ACK)
class BootstrapAck(Message):
    """Rank k -> rank 0: bootstrap frame accepted for this session."""

    session_id: bytes = wire(BYTES16)


@message(ClusterMsgType.INIT_READY)
class InitReady(Message):
    """Rank k -> rank 0: environment set, about to call ``init`` (barrier arrival)."""

    session_id: bytes = wire(BYTES16)


@message(ClusterMsgType.INIT_GO)
class InitGo(Message):
    """Rank 0 -> rank k: barrier release; wait ``delay_ms`` then call ``init``."""

    session_id: bytes = wire(BYTES16)
    delay_ms: int = wire(U16)


@message(ClusterMsgType.GROUP_CONFIRM)
class GroupConfirm(Message):
    """Rank k -> rank 0: my ``init`` result (``ok``, the group ``size`` I got)."""

    session_id: bytes = wire(BYTES16)
    ok: bool = wire(BOOL)
    size: int = wire(U8)
    detail: str = wire(TEXT, default="")


@message(ClusterMsgType.GROUP_CONFIRMED)
class GroupConfirmed(Message):
    """Rank 0 -> rank k: every rank confirmed; the group is ready."""

    session_id: bytes = wire(BYTES16)


@message(ClusterMsgType.ABORT)
class Abort(Message):
    """Either direction: I failed in ``state`` with ``error``; ``session_id`` zeros if none."""

    session_id: bytes = wire(BYTES16)
    state: str = wire(TEXT64)
    error: str = wire(TEXT64)
    detail: str = wire(TEXT, default="")


@message(ClusterMsgType.REJECT)
class Reject(Message):
    """Either direction during the handshake: refused, and why."""

    reason: RejectReason = wire(EnumByte(RejectReason))
    detail: str = wire(TEXT, default="")


@message(ClusterMsgType.LINK_REPORT)
class LinkReport(Message):
    """Joiner -> rank 0, first thing after the session is healthy: which of my
    interfaces reached which peer (by node id), so rank 0 can build the jaccl device
    matrix. Empty with static discovery (``--peer``)."""

    session_id: bytes = wire(BYTES16)
    links: Links = wire(LinkTable(), default=())


@message(ClusterMsgType.GATHER_PART)
class GatherPart(Message):
    """Joiner -> rank 0 during group init: this rank's share of one all-gather round
    of jaccl's side channel (``init(all_gather_factory=...)``)."""

    session_id: bytes = wire(BYTES16)
    round: int = wire(U16)
    data: bytes = wire(REST, default=b"")


@message(ClusterMsgType.GATHER_RESULT)
class GatherResult(Message):
    """Rank 0 -> joiner: every rank's share of one all-gather round, in rank order."""

    session_id: bytes = wire(BYTES16)
    round: int = wire(U16)
    data: bytes = wire(REST, default=b"")


@message(ClusterMsgType.GOODBYE)
class Goodbye(Message):
    """Either direction, after ``ready``: my app closed the cluster on purpose; the
    link's EOF that follows is a departure (``peer_left``), not a loss (``peer_lost``)."""

    session_id: bytes = wire(BYTES16)


#: Limit of a COMPAT message's JSON text (its content is checked by states.compat).
MAX_COMPAT_TEXT: Final = 4096


@message(ClusterMsgType.COMPAT)
class Compat(Message):
    """Joiner -> rank 0, first thing in the bootstrap exchange: what this rank brings
    (MLX version, wire version, backends, world size, app-defined fields) as a JSON
    object that rank 0 compares with its own before anyone calls init
    (:mod:`clusterfsm.states.compat`)."""

    session_id: bytes = wire(BYTES16)
    info: str = wire(Str(MAX_COMPAT_TEXT), default="{}")


@message(ClusterMsgType.BEAT_PORT)
class BeatPort(Message):
    """Either direction, on entering ``ready``: the UDP port of my off-loop heartbeat
    socket (same host as this link), so heartbeats survive a busy app loop
    (``states/beats.py``)."""

    session_id: bytes = wire(BYTES16)
    port: int = wire(UInt(16, lo=1))


@message(ClusterMsgType.APP_DATA)
class AppData(Message):
    """One chunk of an app message (``cluster.send``), opaque to clusterfsm. A message
    is one or more chunks, in order, on one link; ``more`` is set on all but the last.
    ``src``/``dst`` are ranks: rank 0 relays a chunk between two joiners. Sent only
    against credit (``AppCredit``): ``states/appmsg.py``."""

    src: int = wire(U8)
    dst: int = wire(U8)
    more: bool = wire(BOOL)
    body: bytes = wire(Rest(MAX_APP_CHUNK), default=b"")


@message(ClusterMsgType.APP_CREDIT)
class AppCredit(Message):
    """The receiver has taken ``frames`` more APP_DATA frames off its queue: the
    sender may send that many more (flow control, ``states/appmsg.py``)."""

    frames: int = wire(UInt(16, lo=1))


@message(ClusterMsgType.SEALED)
class Sealed(Message):
    """Either direction, after the handshake: another message, sealed
    (``states/seal.py``). The link opens it; it is never handled as a message."""

    body: bytes = wire(Rest(MAX_SEALED_PAYLOAD), default=b"")


if _missing := set(ClusterMsgType) - set(MESSAGE_TYPES):
    raise TypeError(f"message types without a class: {sorted(_missing)}")


def encode_message(msg: Message) -> bytes:
    """A whole frame (header + payload) for ``msg``."""
    return _framed(msg.TYPE, msg.encode())


def decode_message(frame: Frame) -> Message:
    """The typed message in ``frame``; ``FrameError(BAD_PAYLOAD)`` if it does not parse.

    ``FrameError(OVERSIZE)`` for a payload above its type's :func:`payload_limit`: the
    decoder has refused that on the header already, but a frame opened from a SEALED one
    (``states/link.py``) comes from a payload sized by the seal's larger limit, and the
    rule must be the same sealed or not.
    """
    cls = MESSAGE_TYPES.get(frame.type)
    if cls is None:
        raise FrameError(FrameErrorKind.UNKNOWN_TYPE, f"message type {frame.type!r}")
    n = len(frame.payload)
    if n > MAX_PAYLOAD and n > payload_limit(frame.type):
        raise FrameError(FrameErrorKind.OVERSIZE,
                         f"{frame.type.name} payload of {n} bytes > {payload_limit(frame.type)}")
    return cls.decode(frame.payload)
