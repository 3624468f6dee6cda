"""Frame codec: round trips, every error kind, streaming, bounded memory, doc vectors, fuzz.

Hypothesis profiles (select with ``HYPOTHESIS_PROFILE``, default ``ci``): ``ci`` runs the
main decoder fuzz with 10,000 derandomized examples; ``dev`` and ``long`` run 100,000. The
profiles are applied per test (not loaded globally) so they do not change the example
counts of other test modules; the smaller tests scale with the profile.
"""

from __future__ import annotations

import os
import random
import re
import tracemalloc
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clusterfsm.states.codec import (
    MAX_APP_CHUNK,
    MAX_APP_PAYLOAD,
    MAX_INNER_PAYLOAD,
    MAX_PAYLOAD,
    MAX_SEALED_PAYLOAD,
    MAX_STATUS,
    MESSAGE_TYPES,
    Abort,
    AppCredit,
    AppData,
    Auth,
    BeatPort,
    BootstrapAck,
    BootstrapPayload,
    Challenge,
    ClusterMsgType,
    Compat,
    Frame,
    FrameDecoder,
    GatherPart,
    GatherResult,
    Goodbye,
    GroupConfirm,
    GroupConfirmed,
    Hello,
    InitGo,
    InitReady,
    LinkReport,
    Message,
    Ping,
    Pong,
    Reject,
    Sealed,
    Welcome,
    WireBackend,
    decode_message,
    encode_frame,
    encode_message,
)
from clusterfsm.states.errors import FrameError, FrameErrorKind, RejectReason
from clusterfsm.states.handshake import CoordinatorHandshake

# --------------------------------------------------------------------------- profiles

_MAIN_FUZZ_EXAMPLES = {"ci": 10_000, "dev": 100_000, "long": 100_000}
for _name, _n in _MAIN_FUZZ_EXAMPLES.items():
    settings.register_profile(
        _name,
        max_examples=_n,
        derandomize=_name == "ci",
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
_PROFILE_NAME = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if _PROFILE_NAME not in _MAIN_FUZZ_EXAMPLES:
    _PROFILE_NAME = "ci"
PROFILE = settings.get_profile(_PROFILE_NAME)
_SCALE = 1 if _PROFILE_NAME == "ci" else 10


def scaled(n: int) -> settings:
    """Settings for the smaller property tests: ``n`` examples in ci, 10x otherwise."""
    return settings(PROFILE, max_examples=n * _SCALE)


DOCS = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
HEADER_LIMIT = 8 + MAX_SEALED_PAYLOAD  # one incomplete frame, the largest kind

ID_A = bytes(range(0x10, 0x20))
ID_B = bytes(range(0x20, 0x30))
SID = bytes.fromhex("5e551011000000000000000000000001")

RING2 = (("127.0.0.1:5001",), ("127.0.0.1:5002",))
JACCL3 = (
    (None, "rdma_en2", ("rdma_en3", "rdma_en4")),
    ("rdma_en2", None, "rdma_en5"),
    ("rdma_en3", "rdma_en5", None),
)

SAMPLES: list[Message] = [
    Hello(1, ID_A, 1, 2, ID_B, "clusterfsm/0.1"),
    Hello(0xFFFF, ID_A, 255, 255, ID_B, "é" * 32, 2**64 - 1),
    Challenge(2, bytes(range(65))),
    Auth(bytes(range(50))),
    Welcome(SID),
    Ping(0),
    Ping(2**64 - 1),
    Pong(42),
    BootstrapPayload(5000, SID, WireBackend.RING, 2, RING2),
    BootstrapPayload(0, SID, WireBackend.JACCL, 3, JACCL3),
    BootstrapPayload(1, SID, WireBackend.JACCL, 1, ((None,),)),
    BootstrapAck(SID),
    InitReady(SID),
    InitGo(SID, 25),
    GroupConfirm(SID, True, 2, ""),
    GroupConfirm(SID, False, 1, "size 1 ≠ 2"),
    GroupConfirmed(SID),
    Abort(bytes(16), "handshaking", "HandshakeTimeout", "x" * 1024),
    Reject(RejectReason.STALE_SESSION, "old session"),
    Compat(SID, '{"backends":["ring"],"extra":{},"mlx":"0.32.4","wire":1,"world":2}'),
    LinkReport(SID, ()),
    LinkReport(SID, ((ID_A, ("en2", "en3")), (ID_B, ("bridge0",)))),
    GatherPart(SID, 0, b"\x01" * 64),
    GatherResult(SID, 65535, b""),
    Goodbye(SID),
    Sealed(bytes(17)),
    Sealed(b"\xff" * MAX_SEALED_PAYLOAD),
    AppData(0, 1, False, b""),
    AppData(1, 0, True, b"\x00" * MAX_APP_CHUNK),  # a payload of exactly MAX_APP_PAYLOAD
    AppCredit(16),
    BeatPort(b"s" * 16, 40000),
    Ping(7, b"loaded"),
    Pong(7, b"\xff" * MAX_STATUS),
]


def _is_big(m: Message) -> bool:
    """The max-size sample, left out of the mixed streams."""
    return isinstance(m, AppData) and len(m.body) == MAX_APP_CHUNK


def frame_bytes(msg: Message) -> bytes:
    return encode_message(msg)


def decode_all(data: bytes, chunks: Iterable[int] | None = None) -> list[Message]:
    """Feed ``data`` (split at ``chunks`` sizes, or whole), close, decode every frame."""
    dec = FrameDecoder()
    frames: list[Frame] = []
    if chunks is None:
        frames += dec.feed(data)
    else:
        pos = 0
        for size in chunks:
            frames += dec.feed(data[pos : pos + size])
            pos += size
        frames += dec.feed(data[pos:])
    dec.close()
    assert dec.buffered == 0
    return [decode_message(f) for f in frames]


# --------------------------------------------------------------------------- round trips


def test_samples_cover_every_type() -> None:
    assert {m.TYPE for m in SAMPLES} == set(ClusterMsgType) == set(MESSAGE_TYPES)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    data = encode_message(msg)
    assert data[:2] == b"CF"
    assert data[2] == 1
    assert data[3] == msg.TYPE
    assert int.from_bytes(data[4:8], "big") == len(data) - 8
    [frame] = FrameDecoder().feed(data)
    assert frame == Frame(msg.TYPE, msg.encode())
    back = decode_message(frame)
    assert back == msg
    assert type(back) is type(msg)
    assert type(msg).decode(msg.encode()) == msg


def test_topology_lists_become_tuples_and_encoding_is_deterministic() -> None:
    from_lists = BootstrapPayload(
        5000, SID, WireBackend.JACCL, 3,
        [[None, "a", ["b", "c"]], ["a", None, "d"], ["b", "d", None]],
    )
    assert from_lists.topology[0][2] == ("b", "c")
    assert isinstance(from_lists.topology, tuple)
    payload = from_lists.encode()
    assert b'[[null,"a",["b","c"]],["a",null,"d"],["b","d",null]]' in payload
    assert from_lists.encode() == BootstrapPayload.decode(payload).encode()


# --------------------------------------------------------------------------- strategies

ids16 = st.binary(min_size=16, max_size=16)
u8, u16, u64 = (st.integers(0, 2**b - 1) for b in (8, 16, 64))


def text(max_bytes: int) -> st.SearchStrategy[str]:
    return st.text(max_size=max_bytes // 4)  # 4 UTF-8 bytes per character at most


topo_name = st.from_regex(r"[a-z0-9_]{1,12}", fullmatch=True)
endpoint = st.builds(
    lambda h, p: f"{h}:{p}",
    st.from_regex(r"[a-z0-9.]{1,20}", fullmatch=True),
    st.integers(1, 65535),
)


@st.composite
def bootstrap_payloads(draw: st.DrawFn) -> BootstrapPayload:
    backend = draw(st.sampled_from(WireBackend))
    n = draw(st.integers(1, 4 if backend is WireBackend.RING else 8))
    topo: tuple[tuple[Any, ...], ...]
    if backend is WireBackend.RING:
        topo = tuple(tuple(draw(st.lists(endpoint, min_size=1, max_size=3))) for _ in range(n))
    else:
        cell = st.one_of(topo_name, st.lists(topo_name, min_size=1, max_size=4).map(tuple))
        topo = tuple(tuple(None if i == j else draw(cell) for j in range(n)) for i in range(n))
    return BootstrapPayload(draw(u16), draw(ids16), backend, n, topo)


messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Hello, u16, ids16, u8, st.integers(1, 255), ids16, text(64), u64),
    st.builds(Challenge, u16, st.binary(min_size=65, max_size=65)),
    st.builds(Auth, st.binary(min_size=50, max_size=50)),
    st.builds(Welcome, ids16),
    st.builds(Ping, u64),
    st.builds(Pong, u64),
    bootstrap_payloads(),
    st.builds(BootstrapAck, ids16),
    st.builds(InitReady, ids16),
    st.builds(InitGo, ids16, u16),
    st.builds(GroupConfirm, ids16, st.booleans(), u8, text(1024)),
    st.builds(GroupConfirmed, ids16),
    st.builds(Abort, ids16, text(64), text(64), text(1024)),
    st.builds(Reject, st.sampled_from(RejectReason), text(1024)),
    st.builds(Sealed, st.binary(max_size=200)),
    st.builds(AppData, st.integers(0, 255), st.integers(0, 255), st.booleans(),
              st.binary(max_size=200)),
    st.builds(AppCredit, st.integers(1, 65535)),
)


@scaled(300)
@given(messages)
def test_round_trip_property(msg: Message) -> None:
    assert decode_all(encode_message(msg)) == [msg]


# --------------------------------------------------------------------------- streaming


def test_byte_by_byte_equals_whole() -> None:
    data = b"".join(frame_bytes(m) for m in SAMPLES if not _is_big(m))
    dec = FrameDecoder()
    got: list[Frame] = []
    for i in range(len(data)):
        got += dec.feed(data[i : i + 1])
        assert dec.buffered <= HEADER_LIMIT
    dec.close()
    assert [decode_message(f) for f in got] == [m for m in SAMPLES if not _is_big(m)]


@scaled(200)
@given(st.lists(messages, max_size=6), st.data())
def test_random_splits_give_the_same_frames(msgs: list[Message], data: st.DataObject) -> None:
    stream = b"".join(encode_message(m) for m in msgs)
    sizes = data.draw(st.lists(st.integers(0, max(1, len(stream))), max_size=10))
    assert decode_all(stream, sizes) == msgs


def test_empty_feeds_and_frame_boundaries() -> None:
    dec = FrameDecoder()
    assert dec.feed(b"") == []
    ping = encode_message(Ping(7))
    assert dec.feed(ping[:8]) == []
    assert dec.buffered == 8
    assert dec.feed(b"") == []
    assert dec.feed(ping[8:] + ping) == [Frame(ClusterMsgType.PING, Ping(7).encode())] * 2
    assert dec.buffered == 0
    dec.close()


def test_large_frame_in_small_chunks_is_linear_enough() -> None:
    step = encode_message(AppData(0, 0, False, bytes(MAX_APP_CHUNK)))
    dec = FrameDecoder()
    out: list[Frame] = []
    for i in range(0, len(step), 100):
        out += dec.feed(step[i : i + 100])
    assert len(out) == 1
    assert out[0].payload == bytes(MAX_APP_PAYLOAD)


# --------------------------------------------------------------------------- error kinds


def _feed_and_close(data: bytes) -> None:
    dec = FrameDecoder()
    for f in dec.feed(data):
        decode_message(f)
    dec.close()


def _unexpected() -> None:
    hs = CoordinatorHandshake(bytes(32), ID_A, 2, SID, set(), set())
    hs.receive(Ping(1))


def _payload(t: ClusterMsgType, payload: bytes) -> bytes:
    return b"CF\x01" + bytes([t]) + len(payload).to_bytes(4, "big") + payload


TRIGGERS: dict[FrameErrorKind, Callable[[], None]] = {
    FrameErrorKind.BAD_MAGIC: lambda: _feed_and_close(b"GET / HTTP/1.1\r\n"),
    FrameErrorKind.BAD_VERSION: lambda: _feed_and_close(b"CF\x02\x05" + bytes(12)),
    FrameErrorKind.UNKNOWN_TYPE: lambda: _feed_and_close(b"CF\x01\x7f" + bytes(4)),
    FrameErrorKind.OVERSIZE: lambda: _feed_and_close(b"CF\x01\x05\x00\x01\x00\x01"),
    FrameErrorKind.TRUNCATED: lambda: _feed_and_close(encode_message(Ping(1))[:-1]),
    FrameErrorKind.BAD_PAYLOAD: lambda: _feed_and_close(_payload(ClusterMsgType.PING, b"\x00")),
    FrameErrorKind.UNEXPECTED: _unexpected,
}


@pytest.mark.parametrize("kind", list(FrameErrorKind), ids=lambda k: k.name)
def test_every_error_kind_is_triggered(kind: FrameErrorKind) -> None:
    with pytest.raises(FrameError) as info:
        TRIGGERS[kind]()
    assert info.value.kind is kind


@pytest.mark.parametrize(
    ("prefix", "kind"),
    [
        (b"X", FrameErrorKind.BAD_MAGIC),
        (b"CX", FrameErrorKind.BAD_MAGIC),
        (b"CF\x00", FrameErrorKind.BAD_VERSION),
        (b"CF\x01\x00", FrameErrorKind.UNKNOWN_TYPE),
        (b"CF\x01\x01\x01", FrameErrorKind.OVERSIZE),  # length >= 2**24
        (b"CF\x01\x01\x00\x02", FrameErrorKind.OVERSIZE),  # length >= 0x20000
        (b"CF\x01\x01\x00\x01\x00\x01", FrameErrorKind.OVERSIZE),  # 65537
    ],
)
def test_header_fields_are_judged_as_soon_as_they_arrive(
    prefix: bytes, kind: FrameErrorKind
) -> None:
    with pytest.raises(FrameError) as info:
        FrameDecoder().feed(prefix)
    assert info.value.kind is kind


def test_check_order_is_magic_version_type_length() -> None:
    cases = [
        (b"XF\x09\xff\xff\xff\xff\xff", FrameErrorKind.BAD_MAGIC),
        (b"CF\x09\xff\xff\xff\xff\xff", FrameErrorKind.BAD_VERSION),
        (b"CF\x01\xff\xff\xff\xff\xff", FrameErrorKind.UNKNOWN_TYPE),
        (b"CF\x01\x01\xff\xff\xff\xff", FrameErrorKind.OVERSIZE),
    ]
    for data, kind in cases:
        for split in range(len(data) + 1):
            dec = FrameDecoder()
            with pytest.raises(FrameError) as info:
                dec.feed(data[:split])
                dec.feed(data[split:])
            assert info.value.kind is kind


def test_max_payload_is_accepted_and_one_more_is_not() -> None:
    """Every type but APP_DATA and SEALED: MAX_PAYLOAD (a GATHER_PART, the one other
    type whose payload can reach it)."""
    full = GatherPart(SID, 7, bytes(MAX_PAYLOAD - 18))
    ok = _payload(ClusterMsgType.GATHER_PART, full.encode())
    assert len(full.encode()) == MAX_PAYLOAD and decode_all(ok) == [full]
    with pytest.raises(ValueError):
        encode_frame(Frame(ClusterMsgType.GATHER_PART, bytes(MAX_PAYLOAD + 1)))
    with pytest.raises(ValueError):
        encode_message(GatherPart(SID, 7, bytes(MAX_PAYLOAD - 17)))
    for data in (_payload(ClusterMsgType.GATHER_PART, bytes(MAX_PAYLOAD + 1)),
                 b"CF\x01\x05" + (MAX_PAYLOAD + 1).to_bytes(4, "big")):
        with pytest.raises(FrameError) as info:
            FrameDecoder().feed(data)
        assert info.value.kind is FrameErrorKind.OVERSIZE


def test_a_whole_64_kib_app_chunk_is_one_frame() -> None:
    """APP_DATA carries 65536 app bytes after its 3-byte head: a 64 KiB message is one
    frame, round trip through the streaming decoder, whole and trickled."""
    assert MAX_APP_CHUNK == 65536 and MAX_APP_PAYLOAD == MAX_APP_CHUNK + 3
    body = random.Random(18).randbytes(MAX_APP_CHUNK)
    msg = AppData(2, 0, False, body)
    data = encode_message(msg)
    assert len(data) == 8 + MAX_APP_PAYLOAD
    assert data[:8] == b"CF\x01\x20" + MAX_APP_PAYLOAD.to_bytes(4, "big")
    assert decode_all(data) == [msg]
    assert decode_all(data, [5, 3, 4096, 1] * 20) == [msg]
    assert encode_frame(Frame(ClusterMsgType.APP_DATA, msg.encode())) == data


def test_an_app_chunk_one_byte_over_is_refused_with_a_typed_error() -> None:
    """A 65537-byte body: not built, not framed, and refused on the header when a peer
    declares it (or anything above the APP_DATA limit), at every split of the header,
    before a byte of payload is buffered."""
    with pytest.raises(ValueError):
        AppData(0, 0, False, bytes(MAX_APP_CHUNK + 1))
    with pytest.raises(ValueError):
        encode_frame(Frame(ClusterMsgType.APP_DATA, bytes(MAX_APP_PAYLOAD + 1)))
    over = _payload(ClusterMsgType.APP_DATA, b"\x00\x01\x00" + bytes(MAX_APP_CHUNK + 1))
    for header in (over[:8], b"CF\x01\x20" + (2**31).to_bytes(4, "big")):
        for split in range(1, 9):
            dec = FrameDecoder()
            with pytest.raises(FrameError) as info:
                dec.feed(header[:split])
                dec.feed(header[split:] + over[8:])
            assert info.value.kind is FrameErrorKind.OVERSIZE, split
            assert dec.buffered == 0
    # The same rule for a frame opened from a SEALED one (states/link.py), whose size
    # only the seal's larger limit bounded.
    for mtype, size in ((ClusterMsgType.APP_DATA, MAX_APP_PAYLOAD + 1),
                        (ClusterMsgType.GATHER_PART, MAX_PAYLOAD + 1),
                        (ClusterMsgType.PING, MAX_INNER_PAYLOAD)):
        with pytest.raises(FrameError) as opened:
            decode_message(Frame(mtype, bytes(size)))
        assert opened.value.kind is FrameErrorKind.OVERSIZE, mtype


def test_a_sealed_frame_may_carry_the_largest_payload_plus_type_byte_and_tag() -> None:
    ok = _payload(ClusterMsgType.SEALED, bytes(MAX_SEALED_PAYLOAD))
    assert decode_all(ok) == [Sealed(bytes(MAX_SEALED_PAYLOAD))]
    assert MAX_INNER_PAYLOAD == MAX_APP_PAYLOAD
    assert MAX_SEALED_PAYLOAD == MAX_INNER_PAYLOAD + 17 == 65556
    with pytest.raises(ValueError):
        encode_frame(Frame(ClusterMsgType.SEALED, bytes(MAX_SEALED_PAYLOAD + 1)))
    for data in (b"CF\x01\x30" + (MAX_SEALED_PAYLOAD + 1).to_bytes(4, "big"),
                 b"CF\x01\x30\x00\x02", b"CF\x01\x05" + (MAX_PAYLOAD + 1).to_bytes(4, "big")):
        with pytest.raises(FrameError) as info:
            FrameDecoder().feed(data)
        assert info.value.kind is FrameErrorKind.OVERSIZE


def test_four_gib_header_is_refused_immediately_with_tiny_memory() -> None:
    tracemalloc.start()
    try:
        dec = FrameDecoder()
        with pytest.raises(FrameError) as info:
            dec.feed(b"CF\x01\x20\xff\xff\xff\xff")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.kind is FrameErrorKind.OVERSIZE
    assert dec.buffered == 0
    assert peak < 64 * 1024


def test_poisoned_decoder_repeats_the_same_error() -> None:
    dec = FrameDecoder()
    with pytest.raises(FrameError) as first:
        dec.feed(b"CF\x01\x05\x00\x00\x00\x08" + bytes(8) + b"junk")
    assert dec.error is first.value
    assert dec.buffered == 0
    for data in (encode_message(Ping(1)), b""):
        with pytest.raises(FrameError) as again:
            dec.feed(data)
        assert again.value is first.value
    with pytest.raises(FrameError) as at_close:
        dec.close()
    assert at_close.value is first.value


def test_close_with_partial_frame_is_truncated_and_poisons() -> None:
    dec = FrameDecoder()
    dec.feed(encode_message(Welcome(SID))[:10])
    assert dec.buffered == 10
    with pytest.raises(FrameError) as info:
        dec.close()
    assert info.value.kind is FrameErrorKind.TRUNCATED
    with pytest.raises(FrameError) as again:
        dec.feed(b"")
    assert again.value is info.value


def test_close_on_a_frame_boundary_is_fine() -> None:
    dec = FrameDecoder()
    dec.close()
    dec.feed(encode_message(Ping(3)))
    dec.close()


def _bad(t: ClusterMsgType, payload: bytes) -> str:
    with pytest.raises(FrameError) as info:
        MESSAGE_TYPES[t].decode(payload)
    assert info.value.kind is FrameErrorKind.BAD_PAYLOAD
    return info.value.detail


HELLO_PAYLOAD = Hello(1, ID_A, 1, 2, ID_B, "sw").encode()
RING_PAYLOAD = BootstrapPayload(5000, SID, WireBackend.RING, 2, RING2).encode()
_PREFIX = RING_PAYLOAD[:20]


def _topo(json_text: str, *, backend: int = 1, world: int = 2) -> bytes:
    raw = json_text.encode()
    head = _PREFIX[:18] + bytes([backend, world])
    return head + len(raw).to_bytes(4, "big") + raw


BAD_PAYLOADS = [
    (ClusterMsgType.HELLO, HELLO_PAYLOAD[:-1], "too short"),
    (ClusterMsgType.HELLO, HELLO_PAYLOAD + b"\x00", "trailing"),
    (ClusterMsgType.HELLO, HELLO_PAYLOAD[:19] + b"\x00" + HELLO_PAYLOAD[20:], "world_size"),
    (ClusterMsgType.HELLO, HELLO_PAYLOAD[:36] + b"\x00\x41" + b"a" * 65, "limit 64"),
    (ClusterMsgType.HELLO, HELLO_PAYLOAD[:36] + b"\x00\x02\xff\xfe", "UTF-8"),
    (ClusterMsgType.GROUP_CONFIRM, SID + b"\x02\x02\x00\x00", "bool"),
    (ClusterMsgType.REJECT, b"\x63\x00\x00", "RejectReason"),
    (ClusterMsgType.REJECT, b"\x01\x04\x01" + b"a" * 1025, "limit 1024"),
    (ClusterMsgType.BOOTSTRAP, RING_PAYLOAD[:18] + b"\x03" + RING_PAYLOAD[19:], "WireBackend"),
    (ClusterMsgType.BOOTSTRAP, _topo('[["a:1"]]'), "rows"),
    (ClusterMsgType.BOOTSTRAP, _topo('[["a:1"],["b"]]'), "host:port"),
    (ClusterMsgType.BOOTSTRAP, _topo('[["a:1"],["b:0"]]'), "host:port"),
    (ClusterMsgType.BOOTSTRAP, _topo('[["a:1"],[]]'), "endpoints"),
    (ClusterMsgType.BOOTSTRAP, _topo('[["a:1"],["b:2",1]]'), "numbers"),
    (ClusterMsgType.BOOTSTRAP, _topo('{"a":"b"}'), "list"),
    (ClusterMsgType.BOOTSTRAP, _topo("[[" + "x" * 10), "JSON"),
    (ClusterMsgType.BOOTSTRAP, _topo("[" * 50_000 + "]" * 50_000), "JSON"),
    (ClusterMsgType.BOOTSTRAP, _topo('[["a:1"],["' + "b" * 70 + ':1"]]'), "length"),
    (ClusterMsgType.BOOTSTRAP, _topo('[["a b:1"],["b:1"]]'), "ASCII"),
    (ClusterMsgType.BOOTSTRAP, _topo('[[null,"x"],["y","z"]]', backend=2), "diagonal"),
    (ClusterMsgType.BOOTSTRAP, _topo('[["w","x"],["y",null]]', backend=2), "diagonal"),
    (ClusterMsgType.BOOTSTRAP, _topo('[[null,null],["y",null]]', backend=2), "only"),
    (ClusterMsgType.BOOTSTRAP, _topo('[[null,[]],["y",null]]', backend=2), "1..4"),
    (ClusterMsgType.BOOTSTRAP, _topo('[[null,"x"],[null]]', backend=2), "entries"),
    (ClusterMsgType.BOOTSTRAP, _topo("[" + ",".join(["[]"] * 9) + "]", backend=2, world=9), "8"),
    (ClusterMsgType.BOOTSTRAP, _topo('[[null,"x"],["y",null]]', backend=2)[:-1], "too short"),
]


@pytest.mark.parametrize(("t", "payload", "why"), BAD_PAYLOADS, ids=[c[2] for c in BAD_PAYLOADS])
def test_bad_payloads(t: ClusterMsgType, payload: bytes, why: str) -> None:
    assert why.lower() in _bad(t, payload).lower()


def test_validators_refuse_bad_local_values() -> None:
    with pytest.raises(ValueError):
        Welcome(b"short")
    with pytest.raises(TypeError):
        Welcome("0" * 16)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Ping(-1)
    with pytest.raises(TypeError):
        Ping(True)
    with pytest.raises(ValueError):
        Hello(1, ID_A, 1, 0, ID_B)
    with pytest.raises(ValueError):
        Abort(SID, "s" * 65, "e")
    with pytest.raises(ValueError):
        Reject(RejectReason.BAD_KEY, "\ud800")
    with pytest.raises(TypeError):
        Reject(1, "")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        GroupConfirm(SID, 1, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        BootstrapPayload(1, SID, WireBackend.JACCL, 9, ((None,),) * 9)
    with pytest.raises(ValueError, match="limit"):
        big = tuple(tuple(f"{'h' * 58}:{p}" for p in range(1, 9)) for _ in range(255))
        BootstrapPayload(1, SID, WireBackend.RING, 255, big)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        Ping(1).seq = 2  # type: ignore[misc]


def test_a_message_field_must_be_declared_with_its_wire_type() -> None:
    from clusterfsm.states.wire import derive_codec

    @attrs.frozen
    class Undeclared:
        seq: int

    with pytest.raises(TypeError, match="wire"):
        derive_codec(Undeclared)


def test_a_type_byte_has_one_class() -> None:
    from clusterfsm.states.codec import U64, message
    from clusterfsm.states.wire import wire

    with pytest.raises(TypeError, match="already"):

        @message(ClusterMsgType.PING)
        class SecondPing(Message):
            seq: int = wire(U64)

    assert MESSAGE_TYPES[ClusterMsgType.PING] is Ping


# --------------------------------------------------------------------------- doc vectors

VECTOR_RE = re.compile(r"^```hex vector (?P<name>[\w-]+)\n(?P<body>.*?)^```", re.M | re.S)
DOC_VECTORS: dict[str, Message] = {
    "hello": Hello(3, ID_A, 1, 2, bytes(range(0x30, 0x40)), "clusterfsm/0.1",
                   1_700_000_000_000_000_000),
    # The same Hello from a protocol 1 and a protocol 2 peer: it decodes, and is refused
    # by version.
    "hello-v1": Hello(1, ID_A, 1, 2, bytes(range(0x30, 0x40)), "clusterfsm/0.1",
                      1_700_000_000_000_000_000),
    "hello-v2": Hello(2, ID_A, 1, 2, bytes(range(0x30, 0x40)), "clusterfsm/0.1",
                      1_700_000_000_000_000_000),
    "ping": Ping(42),
    "bootstrap-ring-2": BootstrapPayload(5000, SID, WireBackend.RING, 2, RING2),
    "abort": Abort(SID, "initializing_group", "GroupSizeMismatch", "group size 1, expected 2"),
    # The handshake vectors' Noise messages are recomputed from their inputs in
    # test_handshake.py and test_seal.py.
    "challenge": Challenge(3, bytes.fromhex(
        "392d174a38b3b1beafaf1fe824870841c5fa531bc6eafdb6402c124664488c1c"
        "31c53706c19d3817bccc2190d300c6e7b4dba0dc92d0e962624b67b500ba6dd0a0")),
    "auth": Auth(bytes.fromhex(
        "23b7bb8c91ae008711fb12846780bcdf1e065f821bdfec49f57e7c7dcd4c4823"
        "8ca349d1fb4cb6c4ed0fa2f9b61b644349ad")),
    "welcome": Welcome(SID),
    "app-data": AppData(1, 0, False, b"hello"),
}


def doc_vectors() -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for m in VECTOR_RE.finditer(DOCS.read_text(encoding="utf-8")):
        assert m["name"] not in found, f"duplicate vector {m['name']}"
        found[m["name"]] = bytes.fromhex("".join(m["body"].split()))
    return found


def test_docs_have_every_vector() -> None:
    assert set(doc_vectors()) == set(DOC_VECTORS)


@pytest.mark.parametrize("name", sorted(DOC_VECTORS))
def test_doc_vector(name: str) -> None:
    data = doc_vectors()[name]
    assert decode_all(data) == [DOC_VECTORS[name]]
    assert encode_message(DOC_VECTORS[name]) == data


# --------------------------------------------------------------------------- fuzzing

VALID_STREAM = b"".join(encode_message(m) for m in SAMPLES if not _is_big(m))


@st.composite
def mutated_streams(draw: st.DrawFn) -> bytes:
    """A few valid frames with byte flips, insertions, deletions and a possible cut."""
    msgs = draw(st.lists(st.sampled_from(SAMPLES[:-3]), min_size=1, max_size=3))
    data = bytearray(b"".join(encode_message(m) for m in msgs))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] = draw(u8)
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del data[i]
        else:
            del data[i:]
    return bytes(data)


fuzz_bytes = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda t, b: b"CF\x01" + bytes([t]) + b, st.sampled_from(ClusterMsgType), st.binary()
    ),
    mutated_streams(),
)


def _outcome(data: bytes, sizes: list[int] | None) -> tuple[list[Frame], FrameErrorKind | None]:
    """Frames and the decoder's error kind; every frame must decode or raise FrameError."""
    dec = FrameDecoder()
    frames: list[Frame] = []
    try:
        pos = 0
        for size in [*(sizes or []), len(data)]:
            frames += dec.feed(data[pos : pos + size])
            assert dec.buffered <= HEADER_LIMIT
            pos += size
        dec.close()
        kind = None
    except FrameError as exc:
        assert exc.kind is not FrameErrorKind.BAD_PAYLOAD  # the decoder never judges payloads
        kind = exc.kind
    for frame in frames:
        try:
            decode_message(frame)
        except FrameError as exc:
            assert exc.kind is FrameErrorKind.BAD_PAYLOAD
    return frames, kind


@PROFILE
@given(fuzz_bytes, st.lists(st.integers(0, 64), max_size=8))
def test_fuzz_decoder_raises_only_frame_error(data: bytes, sizes: list[int]) -> None:
    """The main fuzz: arbitrary and mutated bytes, arbitrary chunks -> FrameError only.

    Also: the decoder's verdict does not depend on the split (same frames if clean, same
    error kind if not; frames completed in the same ``feed`` as the error are dropped, so
    only the kind is compared then) and the buffer never exceeds one frame.
    """
    whole = _outcome(data, None)
    split = _outcome(data, sizes)
    assert split[1] == whole[1]
    if whole[1] is None:
        assert split[0] == whole[0]


@scaled(1000)
@given(st.sampled_from(ClusterMsgType), st.binary(max_size=120))
def test_fuzz_payload_decoders(t: ClusterMsgType, payload: bytes) -> None:
    try:
        msg = MESSAGE_TYPES[t].decode(payload)
    except FrameError as exc:
        assert exc.kind is FrameErrorKind.BAD_PAYLOAD
    else:
        assert type(msg).decode(msg.encode()) == msg


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=70) | endpoint,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=2)
    ),
    max_leaves=20,
)


@scaled(500)
@given(json_values, st.sampled_from([1, 2, 7]), st.integers(0, 9))
def test_fuzz_topology_json(value: Any, backend: int, world: int) -> None:
    import json

    payload = _topo(json.dumps(value), backend=backend, world=world)
    try:
        msg = BootstrapPayload.decode(payload)
    except FrameError as exc:
        assert exc.kind is FrameErrorKind.BAD_PAYLOAD
    else:
        assert BootstrapPayload.decode(msg.encode()) == msg


def test_prefix_of_valid_stream_never_errors_before_close() -> None:
    for cut in range(len(VALID_STREAM)):
        dec = FrameDecoder()
        dec.feed(VALID_STREAM[:cut])  # must not raise: only close() can know it is cut
        assert dec.buffered <= HEADER_LIMIT
