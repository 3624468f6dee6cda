"""Binary fields for attrs classes: each field declared once, with its wire type.

A class lists its fields in wire order, each as ``name: T = wire(TYPE)``;
:func:`derive_codec` reads those fields and returns the class's ``encode`` and
``decode``. The codec (``states/codec.py``) uses this for every control-link message;
this module knows nothing of frames or message types.

A wire type says how a value is encoded *and* what a local value must be to be sent
(range, length, type), as an attrs validator. ``decode`` builds the object through its
constructor, so a peer's value meets the same checks as ours; every failure is
``FrameError(BAD_PAYLOAD)`` naming the class.

Why runs of fixed-size fields: consecutive :class:`FixedWire` fields are packed and
unpacked by one :class:`struct.Struct`, and a class made only of them (the heartbeats,
acks and handshake frames) decodes with one ``struct`` call and no reader.

A new kind of field is a :class:`FixedWire` (one :mod:`struct` code, and
``from_wire`` if the unpacked value needs converting) or a :class:`VarWire`
(``pack``/``unpack`` against a :class:`Reader`).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from operator import attrgetter
from typing import Any, ClassVar, Final, Generic, TypeVar, cast, overload

import attrs

from clusterfsm.states.errors import FrameError, FrameErrorKind

__all__ = [
    "Bool",
    "EnumByte",
    "FixedWire",
    "Raw",
    "Reader",
    "Rest",
    "Str",
    "UInt",
    "VarWire",
    "WireType",
    "derive_codec",
    "wire",
]

T = TypeVar("T")
S = TypeVar("S")
_Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


# ---------------------------------------------------------------------------------------
# Wire types


class Reader:
    """Cursor over a payload; every shortfall is a ``FrameError(BAD_PAYLOAD)``."""

    __slots__ = ("_data", "_name", "_pos")

    def __init__(self, data: bytes, name: str) -> None:
        self._data = data
        self._name = name
        self._pos = 0

    def fail(self, detail: str) -> FrameError:
        return FrameError(FrameErrorKind.BAD_PAYLOAD, f"{self._name}: {detail}")

    def _need(self, n: int) -> int:
        end = self._pos + n
        if end > len(self._data):
            raise self.fail(f"payload too short: need {end} bytes, have {len(self._data)}")
        return end

    def take(self, n: int) -> bytes:
        end = self._need(n)
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def unpack(self, layout: struct.Struct) -> tuple[Any, ...]:
        end = self._need(layout.size)
        values = layout.unpack_from(self._data, self._pos)
        self._pos = end
        return values

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


class WireType(Generic[T]):
    """How one field goes on the wire; ``validator`` judges the value (attrs)."""

    __slots__ = ("converter", "validator")

    def __init__(
        self, validator: _Validator | None, converter: Callable[[Any], T] | None = None
    ) -> None:
        self.validator = validator
        self.converter = converter


class FixedWire(WireType[T]):
    """A fixed-size field: one :mod:`struct` code. Runs of them are packed by one struct.

    ``from_wire`` turns the unpacked value into the field's value (raise ValueError with
    the reason if it cannot); ``converts`` says whether it does anything, so the hot
    path skips it for plain integers and byte strings.
    """

    __slots__ = ("code",)
    converts: ClassVar[bool] = False

    def __init__(self, code: str, validator: _Validator) -> None:
        super().__init__(validator)
        self.code = code

    def from_wire(self, raw: Any) -> T:
        return raw  # type: ignore[no-any-return]  # identity unless ``converts``


class VarWire(WireType[T]):
    """A variable-size field: encodes itself and reads itself from a :class:`Reader`."""

    __slots__ = ()

    def pack(self, value: T) -> bytes:
        raise NotImplementedError

    def unpack(self, r: Reader) -> T:
        raise NotImplementedError


def _int_range(lo: int, hi: int) -> _Validator:
    def check(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{attr.name} must be an int, got {type(value).__name__}")
        if not lo <= value <= hi:
            raise ValueError(f"{attr.name}={value} outside {lo}..{hi}")

    return check


def _bytes_of(size: int) -> _Validator:
    def check(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, bytes):
            raise TypeError(f"{attr.name} must be bytes, got {type(value).__name__}")
        if len(value) != size:
            raise ValueError(f"{attr.name} must be {size} bytes, got {len(value)}")

    return check


def _text(max_bytes: int) -> _Validator:
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


def _bytes_up_to(max_bytes: int) -> _Validator:
    def check(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, bytes):
            raise TypeError(f"{attr.name} must be bytes, got {type(value).__name__}")
        if len(value) > max_bytes:
            raise ValueError(f"{attr.name} is {len(value)} bytes, limit {max_bytes}")

    return check


class UInt(FixedWire[int]):
    """Big-endian unsigned integer of 8, 16 or 64 bits; ``lo`` raises the floor."""

    __slots__ = ()

    def __init__(self, bits: int, lo: int = 0) -> None:
        super().__init__({8: "B", 16: "H", 64: "Q"}[bits], _int_range(lo, (1 << bits) - 1))


class Raw(FixedWire[bytes]):
    """Exactly ``size`` bytes (ids, nonces, MACs)."""

    __slots__ = ()

    def __init__(self, size: int) -> None:
        super().__init__(f"{size}s", _bytes_of(size))


class Bool(FixedWire[bool]):
    """One byte, 0 or 1."""

    __slots__ = ()
    converts = True

    def __init__(self) -> None:
        super().__init__("B", _is_bool)

    def from_wire(self, raw: Any) -> bool:
        if raw > 1:
            raise ValueError(f"bool byte must be 0 or 1, got {raw}")
        return bool(raw)


E = TypeVar("E", bound=enum.IntEnum)


class EnumByte(FixedWire[E]):
    """One byte naming a member of an ``IntEnum``."""

    __slots__ = ("enum",)
    converts = True

    def __init__(self, enum_type: type[E]) -> None:
        super().__init__("B", attrs.validators.instance_of(enum_type))
        self.enum = enum_type

    def from_wire(self, raw: Any) -> E:
        try:
            return self.enum(raw)
        except ValueError:
            raise ValueError(f"{raw} is not a {self.enum.__name__}") from None


class Str(VarWire[str]):
    """u16 length + UTF-8, at most ``max_bytes`` bytes."""

    __slots__ = ("max_bytes",)

    def __init__(self, max_bytes: int) -> None:
        super().__init__(_text(max_bytes))
        self.max_bytes = max_bytes

    def pack(self, value: str) -> bytes:
        raw = value.encode("utf-8")
        return len(raw).to_bytes(2, "big") + raw

    def unpack(self, r: Reader) -> str:
        n = r.uint(2)
        if n > self.max_bytes:
            raise r.fail(f"string of {n} bytes, limit {self.max_bytes}")
        try:
            return r.take(n).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise r.fail(f"invalid UTF-8: {exc.reason}") from None


class Rest(VarWire[bytes]):
    """The whole remaining payload, opaque (at most ``max_bytes``)."""

    __slots__ = ()

    def __init__(self, max_bytes: int) -> None:
        super().__init__(_bytes_up_to(max_bytes))

    def pack(self, value: bytes) -> bytes:
        return value

    def unpack(self, r: Reader) -> bytes:
        return r.rest()


# ---------------------------------------------------------------------------------------
# The field helper and the codec derived from the fields

_WIRE: Final = "clusterfsm.wire"  # the attrs metadata key of a field's wire type


@overload
def wire(wire_type: WireType[T], *, validator: _Validator | None = None) -> T: ...
@overload
def wire(wire_type: WireType[T], *, default: T, validator: _Validator | None = None) -> T: ...
def wire(
    wire_type: WireType[T], *, default: Any = attrs.NOTHING, validator: _Validator | None = None
) -> Any:
    """An attrs field that goes on the wire as ``wire_type`` (and is checked by it).

    ``validator`` adds a check that needs the whole message (it runs after the type's).
    """
    checks = [v for v in (wire_type.validator, validator) if v is not None]
    return attrs.field(
        default=default,
        # A list would wrap even a single check in attrs' and_(): a call more per field.
        validator=checks[0] if len(checks) == 1 else checks,
        converter=wire_type.converter,
        metadata={_WIRE: wire_type},
    )


class _Run:
    """Consecutive fixed-size fields, packed and unpacked by one :class:`struct.Struct`."""

    __slots__ = ("converters", "get", "layout", "many")

    def __init__(self, names: list[str], types: list[FixedWire[Any]]) -> None:
        self.layout = struct.Struct(">" + "".join(t.code for t in types))
        self.get = attrgetter(*names)
        self.many = len(names) > 1  # attrgetter of one name returns the value itself
        self.converters = tuple((i, t) for i, t in enumerate(types) if t.converts)

    def pack(self, msg: Any) -> bytes:
        return self.layout.pack(*self.get(msg)) if self.many else self.layout.pack(self.get(msg))

    def convert(self, raw: tuple[Any, ...]) -> tuple[Any, ...]:
        if not self.converters:
            return raw
        values = list(raw)
        for i, wire_type in self.converters:
            values[i] = wire_type.from_wire(values[i])
        return tuple(values)

    def read(self, r: Reader, values: list[Any]) -> None:
        values.extend(self.convert(r.unpack(self.layout)))


class _Var:
    """One variable-size field."""

    __slots__ = ("name", "wire_type")

    def __init__(self, name: str, wire_type: VarWire[Any]) -> None:
        self.name = name
        self.wire_type = wire_type

    def pack(self, msg: Any) -> bytes:
        return self.wire_type.pack(getattr(msg, self.name))

    def read(self, r: Reader, values: list[Any]) -> None:
        values.append(self.wire_type.unpack(r))


def _bad_payload(name: str, exc: Exception) -> FrameError:
    return FrameError(FrameErrorKind.BAD_PAYLOAD, f"{name}: {exc}")


def derive_codec(cls: type[S]) -> tuple[Callable[[S], bytes], Callable[[bytes], S]]:
    """``encode(obj) -> bytes`` and ``decode(bytes) -> obj`` for the attrs class ``cls``,
    from its :func:`wire` fields in declaration order (every field must be one)."""
    name = cls.__name__
    segments: list[_Run | _Var] = []
    names: list[str] = []
    fixed: list[FixedWire[Any]] = []
    for field in attrs.fields(cast("type[attrs.AttrsInstance]", cls)):
        wire_type = field.metadata.get(_WIRE)
        if isinstance(wire_type, FixedWire):
            names.append(field.name)
            fixed.append(wire_type)
            continue
        if not isinstance(wire_type, VarWire):
            raise TypeError(f"{name}.{field.name} is not declared with wire()")
        if names:
            segments.append(_Run(names, fixed))
            names, fixed = [], []
        segments.append(_Var(field.name, wire_type))
    if names:
        segments.append(_Run(names, fixed))

    if len(segments) == 1 and isinstance(segments[0], _Run):
        # The hot path (heartbeats, acks, the handshake's fixed frames): one struct call
        # each way, no reader.
        run = segments[0]
        size, unpack, convert = run.layout.size, run.layout.unpack, run.convert

        def decode_fixed(payload: bytes) -> S:
            if len(payload) != size:
                if len(payload) < size:
                    detail = f"payload too short: need {size} bytes, have {len(payload)}"
                else:
                    detail = f"{len(payload) - size} trailing bytes"
                raise FrameError(FrameErrorKind.BAD_PAYLOAD, f"{name}: {detail}")
            try:
                return cls(*convert(unpack(payload)))
            except (TypeError, ValueError) as exc:
                raise _bad_payload(name, exc) from None

        pack, get = run.layout.pack, run.get
        if run.many:
            def encode_fixed(msg: S) -> bytes:
                return pack(*get(msg))
        else:
            def encode_fixed(msg: S) -> bytes:
                return pack(get(msg))

        return encode_fixed, decode_fixed

    def encode(msg: S) -> bytes:
        return b"".join([segment.pack(msg) for segment in segments])

    def decode(payload: bytes) -> S:
        r = Reader(payload, name)
        values: list[Any] = []
        try:
            for segment in segments:
                segment.read(r, values)
            r.end()
            return cls(*values)
        except (TypeError, ValueError) as exc:
            raise _bad_payload(name, exc) from None

    return encode, decode


