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

The byte layout of every frame and message is documented (with test vectors that the
tests check) in ``docs/protocol.md``.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Final, Self, TypeAlias

import attrs

from clusterfsm.states.errors import FrameError, FrameErrorKind, RejectReason

__all__ = [
    "FRAME_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_PAYLOAD",
    "MAX_STR",
    "MESSAGE_TYPES",
    "Abort",
    "Auth",
    "Backend",
    "BootstrapAck",
    "Challenge",
    "ClusterMsgType",
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
    "JacclBootstrapPayload",
    "JacclEntry",
    "LinkReport",
    "Message",
    "Ping",
    "Pong",
    "Reject",
    "Step",
    "Token",
    "Topology",
    "Welcome",
    "decode_message",
    "encode_frame",
    "encode_message",
]

MAGIC: Final = b"CF"
FRAME_VERSION: Final = 1
HEADER_SIZE: Final = 8
#: Hard limit on a frame's payload. Control messages are tiny; the largest legitimate one
#: is a bootstrap frame for 8 ranks, far below this.
MAX_PAYLOAD: Final = 65536
#: Default limit (in UTF-8 bytes) of a string field.
MAX_STR: Final = 1024
#: Limit (in characters) of one topology string: an ``ip:port`` or an RDMA device name.
MAX_TOPOLOGY_STR: Final = 64
#: jaccl's mesh limit (see DESIGN.md section 3).
MAX_JACCL_RANKS: Final = 8

_HEADER = struct.Struct(">2sBBI")
_MAGIC0, _MAGIC1 = MAGIC[0], MAGIC[1]


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
    STEP = 0x20
    TOKEN = 0x21


# A plain dict lookup is several times faster than calling the enum, and the decoder
# does it once per frame.
_TYPE_BY_BYTE: Final[dict[int, ClusterMsgType]] = {int(t): t for t in ClusterMsgType}


class Backend(enum.IntEnum):
    """The MLX distributed backend named in the bootstrap frame."""

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


def encode_frame(frame: Frame) -> bytes:
    """Serialize ``frame`` (header + payload).

    Raises ValueError (a local bug, not a peer's fault) if the payload is above
    :data:`MAX_PAYLOAD` or the type is unknown: we never emit a frame we would refuse.
    """
    n = len(frame.payload)
    if n > MAX_PAYLOAD:
        raise ValueError(f"payload of {n} bytes exceeds the {MAX_PAYLOAD}-byte frame limit")
    if frame.type not in _TYPE_BY_BYTE:
        raise ValueError(f"unknown message type {frame.type!r}")
    return _HEADER.pack(MAGIC, FRAME_VERSION, frame.type, n) + frame.payload


def _check_header_prefix(buf: Any, pos: int, avail: int) -> None:
    """Validate the first ``avail`` (< 8) header bytes at ``buf[pos:]``.

    Why: a peer speaking another protocol (or a scanner) is told off on its first
    bytes instead of leaving us waiting for a header it will never complete; and a
    length whose known high bytes already exceed the limit is refused before the rest
    arrives. The order of checks is the same as for a full header, so the error kind
    never depends on how the stream was split.
    """
    if buf[pos] != _MAGIC0 or (avail >= 2 and buf[pos + 1] != _MAGIC1):
        raise FrameError(FrameErrorKind.BAD_MAGIC, f"magic {bytes(buf[pos : pos + 2])!r}")
    if avail >= 3 and buf[pos + 2] != FRAME_VERSION:
        raise FrameError(FrameErrorKind.BAD_VERSION, f"framing version {buf[pos + 2]}")
    if avail >= 4 and buf[pos + 3] not in _TYPE_BY_BYTE:
        raise FrameError(FrameErrorKind.UNKNOWN_TYPE, f"message type 0x{buf[pos + 3]:02x}")
    if avail >= 5:
        known = avail - 4  # 1..3 high-order bytes of the length are known
        low = int.from_bytes(bytes(buf[pos + 4 : pos + avail]), "big") << (8 * (4 - known))
        if low > MAX_PAYLOAD:
            raise FrameError(FrameErrorKind.OVERSIZE, f"declared length >= {low} > {MAX_PAYLOAD}")


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
        """Bytes held for the incomplete frame (at most ``8 + MAX_PAYLOAD``)."""
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
        unpack_from = _HEADER.unpack_from
        types = _TYPE_BY_BYTE
        n = len(src)
        pos = 0
        try:
            with memoryview(src) as mv:
                while True:
                    avail = n - pos
                    if avail < HEADER_SIZE:
                        if avail:
                            _check_header_prefix(mv, pos, avail)
                        break
                    magic, version, type_byte, length = unpack_from(mv, pos)
                    if magic != MAGIC:
                        raise FrameError(FrameErrorKind.BAD_MAGIC, f"magic {magic!r}")
                    if version != FRAME_VERSION:
                        raise FrameError(FrameErrorKind.BAD_VERSION, f"framing version {version}")
                    mtype = types.get(type_byte)
                    if mtype is None:
                        raise FrameError(
                            FrameErrorKind.UNKNOWN_TYPE, f"message type 0x{type_byte:02x}"
                        )
                    if length > MAX_PAYLOAD:
                        raise FrameError(
                            FrameErrorKind.OVERSIZE, f"declared length {length} > {MAX_PAYLOAD}"
                        )
                    start = pos + HEADER_SIZE
                    end = start + length
                    if end > n:
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
# Field validators (attrs): bad values fail where they enter, on both the local and the
# decode path (decode turns ValueError/TypeError into FrameError(BAD_PAYLOAD)).


def _uint(bits: int) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    return _int_range(0, (1 << bits) - 1)


def _int_range(lo: int, hi: int) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    def check(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{attr.name} must be an int, got {type(value).__name__}")
        if not lo <= value <= hi:
            raise ValueError(f"{attr.name}={value} outside {lo}..{hi}")

    return check


def _fixed_bytes(size: int) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    def check(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, bytes):
            raise TypeError(f"{attr.name} must be bytes, got {type(value).__name__}")
        if len(value) != size:
            raise ValueError(f"{attr.name} must be {size} bytes, got {len(value)}")

    return check


def _text(max_bytes: int = MAX_STR) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    def check(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, str):
            raise TypeError(f"{attr.name} must be str, got {type(value).__name__}")
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError as exc:  # lone surrogates
            raise ValueError(f"{attr.name} is not encodable as UTF-8: {exc}") from None
        if size > max_bytes:
            raise ValueError(f"{attr.name} is {size} UTF-8 bytes, limit {max_bytes}")

    return check


def _is_bool(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{attr.name} must be bool, got {type(value).__name__}")


def _body(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bytes):
        raise TypeError(f"{attr.name} must be bytes, got {type(value).__name__}")
    if len(value) > MAX_PAYLOAD:
        raise ValueError(f"{attr.name} is {len(value)} bytes, limit {MAX_PAYLOAD}")


# ---------------------------------------------------------------------------------------
# Wire field codecs. Each message class lists one per attrs field, in order (``_LAYOUT``),
# and the generic encode/decode in ``_Message`` walks that list. One place per rule.


class _Reader:
    """Cursor over a payload; every shortfall is a ``FrameError(BAD_PAYLOAD)``."""

    __slots__ = ("_data", "_name", "_pos")

    def __init__(self, data: bytes, name: str) -> None:
        self._data = data
        self._name = name
        self._pos = 0

    def fail(self, detail: str) -> FrameError:
        return FrameError(FrameErrorKind.BAD_PAYLOAD, f"{self._name}: {detail}")

    def take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise self.fail(f"payload too short: need {end} bytes, have {len(self._data)}")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def rest(self) -> bytes:
        chunk = self._data[self._pos :]
        self._pos = len(self._data)
        return chunk

    def end(self) -> None:
        extra = len(self._data) - self._pos
        if extra:
            raise self.fail(f"{extra} trailing bytes")


class _Field:
    """How one attrs field goes on the wire."""

    __slots__ = ()

    def pack(self, value: Any) -> bytes:
        raise NotImplementedError

    def unpack(self, r: _Reader) -> Any:
        raise NotImplementedError


class _UInt(_Field):
    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size

    def pack(self, value: Any) -> bytes:
        return int(value).to_bytes(self.size, "big")

    def unpack(self, r: _Reader) -> Any:
        return r.uint(self.size)


class _Raw(_Field):
    """Fixed-size bytes."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size

    def pack(self, value: Any) -> bytes:
        return bytes(value)

    def unpack(self, r: _Reader) -> Any:
        return r.take(self.size)


class _Bool(_Field):
    __slots__ = ()

    def pack(self, value: Any) -> bytes:
        return b"\x01" if value else b"\x00"

    def unpack(self, r: _Reader) -> Any:
        b = r.uint(1)
        if b > 1:
            raise r.fail(f"bool byte must be 0 or 1, got {b}")
        return b == 1


class _Enum(_Field):
    __slots__ = ("enum",)

    def __init__(self, enum_type: type[enum.IntEnum]) -> None:
        self.enum = enum_type

    def pack(self, value: Any) -> bytes:
        return int(value).to_bytes(1, "big")

    def unpack(self, r: _Reader) -> Any:
        b = r.uint(1)
        try:
            return self.enum(b)
        except ValueError:
            raise r.fail(f"{b} is not a {self.enum.__name__}") from None


class _Str(_Field):
    """u16 length + UTF-8."""

    __slots__ = ("max_bytes",)

    def __init__(self, max_bytes: int = MAX_STR) -> None:
        self.max_bytes = max_bytes

    def pack(self, value: Any) -> bytes:
        raw = str(value).encode("utf-8")
        return len(raw).to_bytes(2, "big") + raw

    def unpack(self, r: _Reader) -> Any:
        n = r.uint(2)
        if n > self.max_bytes:
            raise r.fail(f"string of {n} bytes, limit {self.max_bytes}")
        raw = r.take(n)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise r.fail(f"invalid UTF-8: {exc.reason}") from None


class _LinkTable(_Field):
    """u8 count, then per entry: 16-byte node id, u8 count, that many ``_Str(15)``."""

    __slots__ = ()

    def pack(self, value: Any) -> bytes:
        out = [len(value).to_bytes(1, "big")]
        for node_id, names in value:
            out.append(bytes(node_id) + len(names).to_bytes(1, "big"))
            out.extend(_IFNAME.pack(name) for name in names)
        return b"".join(out)

    def unpack(self, r: _Reader) -> Any:
        entries = []
        for _ in range(r.uint(1)):
            node_id = r.take(16)
            entries.append((node_id, tuple(_IFNAME.unpack(r) for _ in range(r.uint(1)))))
        return tuple(entries)


class _Rest(_Field):
    """The whole remaining payload, opaque."""

    __slots__ = ()

    def pack(self, value: Any) -> bytes:
        return bytes(value)

    def unpack(self, r: _Reader) -> Any:
        return r.rest()


def _no_numbers(text: str) -> Any:
    raise ValueError(f"numbers are not allowed in a topology ({text[:20]!r})")


class _TopologyJson(_Field):
    """u32 length + UTF-8 JSON (deterministic: sorted keys, no spaces)."""

    __slots__ = ()

    def pack(self, value: Any) -> bytes:
        raw = json.dumps(
            _topology_to_json(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode("utf-8")
        return len(raw).to_bytes(4, "big") + raw

    def unpack(self, r: _Reader) -> Any:
        raw = r.take(r.uint(4))
        try:
            obj = json.loads(
                raw.decode("utf-8"),
                parse_int=_no_numbers,
                parse_float=_no_numbers,
                parse_constant=_no_numbers,
            )
            return _topology_from_json(obj)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
            raise r.fail(f"bad topology JSON: {exc}") from None


# ---------------------------------------------------------------------------------------
# Topology values

#: One cell of a jaccl device matrix: ``None`` (diagonal), a device name, or several.
JacclEntry: TypeAlias = str | tuple[str, ...] | None
#: ring: one tuple of ``"ip:port"`` per rank. jaccl: an N x N matrix of :data:`JacclEntry`.
Topology: TypeAlias = tuple[tuple[JacclEntry, ...], ...]


def _topology_to_json(topology: Topology) -> list[list[Any]]:
    return [[list(e) if isinstance(e, tuple) else e for e in row] for row in topology]


def _topology_from_json(obj: Any) -> Topology:
    """Lists (JSON or Python) to tuples, by the fixed 3-level shape (no recursion).

    Anything that is not a list at levels 1-2 is left for the validator to name; a
    value that cannot be a topology at all raises ValueError.
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


def _check_topology_str(value: Any, where: str, max_len: int = MAX_TOPOLOGY_STR) -> str:
    """A name on the wire (endpoint, device, interface): printable ASCII, no spaces."""
    if not isinstance(value, str):
        raise TypeError(f"{where}: expected a string, got {type(value).__name__}")
    if not 1 <= len(value) <= max_len:
        raise ValueError(f"{where}: string length {len(value)} outside 1..{max_len}")
    if not (value.isascii() and value.isprintable()) or " " in value:
        raise ValueError(f"{where}: {value!r} must be printable ASCII without spaces")
    return value


def _check_endpoint(value: Any, where: str) -> None:
    _check_topology_str(value, where)
    host, sep, port = value.rpartition(":")
    if not sep or not host or not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"{where}: {value!r} is not host:port")


def _validate_topology(inst: JacclBootstrapPayload, _attr: Any, topo: Topology) -> None:
    """Check the topology against the backend and world size of the same frame.

    Why here and not in the group-init code: a wrong matrix must fail where it enters
    (the config on rank 0, the bootstrap frame on the others) with a clear message,
    rather than inside MLX (which crashes or returns a silent size-1 group).
    """
    n = inst.world_size
    if not isinstance(topo, tuple) or not all(isinstance(row, tuple) for row in topo):
        raise TypeError("topology must be a tuple of tuples")
    if len(topo) != n:
        raise ValueError(f"topology has {len(topo)} rows, world_size is {n}")
    if inst.backend is Backend.RING:
        for i, row in enumerate(topo):
            if not 1 <= len(row) <= 8:
                raise ValueError(f"ring rank {i}: {len(row)} endpoints, need 1..8")
            for j, cell in enumerate(row):
                _check_endpoint(cell, f"ring rank {i} endpoint {j}")
    else:
        if n > MAX_JACCL_RANKS:
            raise ValueError(f"jaccl supports at most {MAX_JACCL_RANKS} ranks, got {n}")
        for i, row in enumerate(topo):
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
                    if not 1 <= len(cell) <= 4:
                        raise ValueError(f"{where}: {len(cell)} devices, need 1..4")
                    for k, name in enumerate(cell):
                        _check_topology_str(name, f"{where}[{k}]")
                else:
                    _check_topology_str(cell, where)


def _topology_converter(value: Any) -> Topology:
    """Accept lists for convenience (config code); the validator does the judging."""
    if isinstance(value, list | tuple):
        return _topology_from_json(value)
    return value  # type: ignore[no-any-return]  # not a sequence: the validator names it


# ---------------------------------------------------------------------------------------
# Messages


def _build(factory: Callable[..., Any], values: Sequence[Any], name: str) -> Any:
    try:
        return factory(*values)
    except (TypeError, ValueError) as exc:
        raise FrameError(FrameErrorKind.BAD_PAYLOAD, f"{name}: {exc}") from None


class _Message:
    """Generic payload encode/decode driven by the subclass's ``_LAYOUT``."""

    __slots__ = ()

    TYPE: ClassVar[ClusterMsgType]
    _LAYOUT: ClassVar[tuple[_Field, ...]]
    _NAMES: ClassVar[tuple[str, ...]]

    def encode(self) -> bytes:
        """The payload bytes (without the frame header)."""
        return b"".join(
            f.pack(getattr(self, name)) for f, name in zip(self._LAYOUT, self._NAMES, strict=True)
        )

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a payload; anything wrong is ``FrameError(BAD_PAYLOAD)``."""
        r = _Reader(payload, cls.__name__)
        values = [f.unpack(r) for f in cls._LAYOUT]
        r.end()
        result: Self = _build(cls, values, cls.__name__)
        return result


_U8, _U16, _U64 = _UInt(1), _UInt(2), _UInt(8)
#: Interface names are at most 15 bytes (IFNAMSIZ - 1 on Linux and macOS).
MAX_INTERFACE_NAME: Final = 15
_IFNAME = _Str(MAX_INTERFACE_NAME)
_ID16, _MAC32 = _Raw(16), _Raw(32)


@attrs.frozen
class Hello(_Message):
    """Joiner -> coordinator: who I am, what I speak, and my nonce."""

    TYPE: ClassVar[ClusterMsgType] = ClusterMsgType.HELLO
    _LAYOUT: ClassVar[tuple[_Field, ...]] = (_U16, _ID16, _U8, _U8, _ID16, _Str(64), _U64)

    protocol_version: int = attrs.field(validator=_uint(16))
    node_id: bytes = attrs.field(validator=_fixed_bytes(16))
    # The codec does not check rank < world_size: the handshake refuses that with a
    # typed reason (BAD_RANK) the joiner can be told about.
    rank: int = attrs.field(validator=_uint(8))
    world_size: int = attrs.field(validator=_int_range(1, 255))
    nonce: bytes = attrs.field(validator=_fixed_bytes(16))
    software: str = attrs.field(default="", validator=_text(64))
    # The joiner's generation (its supervisor's epoch; 0 = unsupervised). Rank 0
    # refuses an epoch older than the newest admitted for this rank (STALE_SESSION);
    # both handshake MACs cover it, so an on-path attacker cannot change it.
    epoch: int = attrs.field(default=0, validator=_uint(64))


@attrs.frozen
class Challenge(_Message):
    """Coordinator -> joiner: my identity, my nonce, and proof that I hold the key."""

    TYPE: ClassVar[ClusterMsgType] = ClusterMsgType.CHALLENGE
    _LAYOUT: ClassVar[tuple[_Field, ...]] = (_U16, _ID16, _U8, _ID16, _MAC32)

    protocol_version: int = attrs.field(validator=_uint(16))
    node_id: bytes = attrs.field(validator=_fixed_bytes(16))
    world_size: int = attrs.field(validator=_int_range(1, 255))
    nonce: bytes = attrs.field(validator=_fixed_bytes(16))
    mac: bytes = attrs.field(validator=_fixed_bytes(32))


@attrs.frozen
class Auth(_Message):
    """Joiner -> coordinator: proof that I hold the key, bound to my data port."""

    TYPE: ClassVar[ClusterMsgType] = ClusterMsgType.AUTH
    _LAYOUT: ClassVar[tuple[_Field, ...]] = (_MAC32, _U16)

    mac: bytes = attrs.field(validator=_fixed_bytes(32))
    data_port: int = attrs.field(validator=_uint(16))


@attrs.frozen
class Welcome(_Message):
    """Coordinator -> joiner: admitted; here is the session id."""

    TYPE: ClassVar[ClusterMsgType] = ClusterMsgType.WELCOME
    _LAYOUT: ClassVar[tuple[_Field, ...]] = (_ID16,)

    session_id: bytes = attrs.field(validator=_fixed_bytes(16))


@attrs.frozen
class Ping(_Message):
    """Heartbeat request; ``seq`` pairs it with its Pong."""

    TYPE: ClassVar[ClusterMsgType] = ClusterMsgType.PING
    _LAYOUT: ClassVar[tuple[_Field, ...]] = (_U64,)

    seq: int = attrs.field(validator=_uint(64))


@attrs.frozen
class Pong(_Message):
    """Heartbeat answer, echoing the Ping's ``seq``."""

    TYPE: ClassVar[ClusterMsgType] = ClusterMsgType.PONG
    _LAYOUT: ClassVar[tuple[_Field, ...]] = (_U64,)

    seq: int = attrs.field(validator=_uint(64))


@attrs.frozen
class JacclBootstrapPayload(_Message):
    """Rank 0 -> every rank (type 0x07): what each rank needs to call ``init``.

    Named for jaccl but carries either backend: for ``RING`` the topology is the
    hostfile (one tuple of ``"ip:port"`` per rank), for ``JACCL`` the N x N device matrix.
    """

    TYPE: ClassVar[ClusterMsgType] = ClusterMsgType.BOOTSTRAP
    _LAYOUT: ClassVar[tuple[_Field, ...]] = (_U16, _ID16, _Enum(Backend), _U8, _TopologyJson())

    coordinator_port: int = attrs.field(validator=_uint(16))
    session_id: bytes = attrs.field(validator=_fixed_bytes(16))
    backend: Backend = attrs.field(validator=attrs.validators.instance_of(Backend))
    world_size: int = attrs.field(validator=_int_range(1, 255))
    topology: Topology = attrs.field(converter=_topology_converter, validator=_validate_topology)

    def __attrs_post_init__(self) -> None:
        # The one message whose size depends on its content: refuse one that cannot be
        # framed here, not at send time.
        size = len(self.encode())
        if size > MAX_PAYLOAD:
            raise ValueError(f"bootstrap payload is {size} bytes, limit {MAX_PAYLOAD}")


@attrs.frozen
class BootstrapAck(_Message):
    """Rank k -> rank 0: bootstrap frame accepted for this session."""

    TYPE: ClassVar[ClusterMsgType] = ClusterMsgType.BOOTSTRAP_ACK
    _LAYOUT: ClassVar[tuple[_Field, ...]] = (_ID16,)

    session_id: bytes = attrs.field(validator=_fixed_bytes(16))


@attrs.frozen
class InitReady(_Message):
    """Rank k -> rank 0: environment set, about to call ``init`` (barrier arrival)."""

    TYPE: ClassVar[ClusterMsgType] = ClusterMsgType.INIT_READY
    _LAYOUT: ClassVar[tuple[_Field, ...]] = (_ID16,)

    session_id: bytes = attrs.field(validator=_fixed_bytes(16))


@attrs.frozen
class InitGo(_Message):
    """Rank 0 -> rank k: barrier release; wait ``delay_ms`` then call ``init``."""

    TYPE: ClassVar[ClusterMsgType] = ClusterMsgType.INIT_GO
    _LAYOUT: ClassVar[tuple[_Field, ...]] = (_ID16, _U16)

    session_id: bytes = attrs.field(validator=_fixed_bytes(16))
    delay_ms: int = attrs.field(validator=_uint(16))


@attrs.frozen
class GroupConfirm(_Message):
    """Rank k -> rank 0: my ``init`` result (``ok``, the group ``size`` I got)."""

    TYPE: ClassVar[ClusterMsgType] = ClusterMsgType.GROUP_CONFIRM
    _LAYOUT: ClassVar[tuple[_Field, ...]] = (_ID16, _Bool(), _U8, _Str())

    session_id: bytes = attrs.field(validator=_fixed_bytes(16))
    ok: bool = attrs.field(validator=_is_bool)
    size: int = attrs.field(validator=_uint(8))
    detail: str = attrs.field(default="", validator=_text())


@attrs.frozen
class GroupConfirmed(_Message):
    """Rank 0 -> rank k: every rank confirmed; the group is ready."""

    TYPE: ClassVar[ClusterMsgType] = ClusterMsgType.GROUP_CONFIRMED
    _LAYOUT: ClassVar[tuple[_Field, ...]] = (_ID16,)

    session_id: bytes = attrs.field(validator=_fixed_bytes(16))


NO_SESSION: Final = bytes(16)


@attrs.frozen
class Abort(_Message):
    """Either direction: I failed in ``state`` with ``error``; ``session_id`` zeros if none."""

    TYPE: ClassVar[ClusterMsgType] = ClusterMsgType.ABORT
    _LAYOUT: ClassVar[tuple[_Field, ...]] = (_ID16, _Str(64), _Str(64), _Str())

    session_id: bytes = attrs.field(validator=_fixed_bytes(16))
    state: str = attrs.field(validator=_text(64))
    error: str = attrs.field(validator=_text(64))
    detail: str = attrs.field(default="", validator=_text())


@attrs.frozen
class Reject(_Message):
    """Either direction during the handshake: refused, and why."""

    TYPE: ClassVar[ClusterMsgType] = ClusterMsgType.REJECT
    _LAYOUT: ClassVar[tuple[_Field, ...]] = (_Enum(RejectReason), _Str())

    reason: RejectReason = attrs.field(validator=attrs.validators.instance_of(RejectReason))
    detail: str = attrs.field(default="", validator=_text())


@attrs.frozen
class Step(_Message):
    """Application message, opaque to clusterfsm (routed by the embedding app)."""

    TYPE: ClassVar[ClusterMsgType] = ClusterMsgType.STEP
    _LAYOUT: ClassVar[tuple[_Field, ...]] = (_Rest(),)

    body: bytes = attrs.field(default=b"", validator=_body)


@attrs.frozen
class Token(_Message):
    """Application message, opaque to clusterfsm (routed by the embedding app)."""

    TYPE: ClassVar[ClusterMsgType] = ClusterMsgType.TOKEN
    _LAYOUT: ClassVar[tuple[_Field, ...]] = (_Rest(),)

    body: bytes = attrs.field(default=b"", validator=_body)


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
            _check_topology_str(name, f"{attr.name}: interface name", MAX_INTERFACE_NAME)


@attrs.frozen
class LinkReport(_Message):
    """Joiner -> rank 0, first thing after the session is healthy: which of my
    interfaces reached which peer (by node id), so rank 0 can build the jaccl device
    matrix. Empty with static discovery (``--peer``)."""

    TYPE: ClassVar[ClusterMsgType] = ClusterMsgType.LINK_REPORT
    _LAYOUT: ClassVar[tuple[_Field, ...]] = (_ID16, _LinkTable())

    session_id: bytes = attrs.field(validator=_fixed_bytes(16))
    links: tuple[tuple[bytes, tuple[str, ...]], ...] = attrs.field(
        default=(), validator=_link_table)


@attrs.frozen
class GatherPart(_Message):
    """Joiner -> rank 0 during group init: this rank's share of one all-gather round
    of jaccl's side channel (``init(all_gather_factory=...)``)."""

    TYPE: ClassVar[ClusterMsgType] = ClusterMsgType.GATHER_PART
    _LAYOUT: ClassVar[tuple[_Field, ...]] = (_ID16, _U16, _Rest())

    session_id: bytes = attrs.field(validator=_fixed_bytes(16))
    round: int = attrs.field(validator=_uint(16))
    data: bytes = attrs.field(default=b"", validator=_body)


@attrs.frozen
class GatherResult(_Message):
    """Rank 0 -> joiner: every rank's share of one all-gather round, in rank order."""

    TYPE: ClassVar[ClusterMsgType] = ClusterMsgType.GATHER_RESULT
    _LAYOUT: ClassVar[tuple[_Field, ...]] = (_ID16, _U16, _Rest())

    session_id: bytes = attrs.field(validator=_fixed_bytes(16))
    round: int = attrs.field(validator=_uint(16))
    data: bytes = attrs.field(default=b"", validator=_body)


@attrs.frozen
class Goodbye(_Message):
    """Either direction, after ``ready``: my app closed the cluster on purpose; the
    link's EOF that follows is a departure (``peer_left``), not a loss (``peer_lost``)."""

    TYPE: ClassVar[ClusterMsgType] = ClusterMsgType.GOODBYE
    _LAYOUT: ClassVar[tuple[_Field, ...]] = (_ID16,)

    session_id: bytes = attrs.field(validator=_fixed_bytes(16))


Message: TypeAlias = (
    Hello
    | Challenge
    | Auth
    | Welcome
    | Ping
    | Pong
    | JacclBootstrapPayload
    | BootstrapAck
    | InitReady
    | InitGo
    | GroupConfirm
    | GroupConfirmed
    | Abort
    | Reject
    | LinkReport
    | GatherPart
    | GatherResult
    | Goodbye
    | Step
    | Token
)

MESSAGE_TYPES: Final[dict[ClusterMsgType, type[Message]]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Challenge,
        Auth,
        Welcome,
        Ping,
        Pong,
        JacclBootstrapPayload,
        BootstrapAck,
        InitReady,
        InitGo,
        GroupConfirm,
        GroupConfirmed,
        Abort,
        Reject,
        LinkReport,
        GatherPart,
        GatherResult,
        Goodbye,
        Step,
        Token,
    )
}


def _bind_layouts() -> None:
    """Tie each layout to its attrs fields and check the registry is complete."""
    assert set(MESSAGE_TYPES) == set(ClusterMsgType), "every message type needs a class"
    for cls in MESSAGE_TYPES.values():
        names = tuple(f.name for f in attrs.fields(cls))
        assert len(names) == len(cls._LAYOUT), f"{cls.__name__}: layout/fields mismatch"
        cls._NAMES = names


_bind_layouts()


def encode_message(msg: Message) -> bytes:
    """A whole frame (header + payload) for ``msg``."""
    return encode_frame(Frame(msg.TYPE, msg.encode()))


def decode_message(frame: Frame) -> Message:
    """The typed message in ``frame``; ``FrameError(BAD_PAYLOAD)`` if it does not parse."""
    cls = MESSAGE_TYPES.get(frame.type)
    if cls is None:
        raise FrameError(FrameErrorKind.UNKNOWN_TYPE, f"message type {frame.type!r}")
    return cls.decode(frame.payload)
