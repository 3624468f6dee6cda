"""Fuzz the whole receive path, bytes -> FrameDecoder -> decode_message -> handshake.

tests/test_codec.py fuzzes the decoder alone and tests/test_handshake.py feeds the
handshake typed messages; here mutated *genuine* handshake byte streams, cut into
random chunks, go through the same path the link uses, for both roles. Properties:

- only ``FrameError``, ``HandshakeRejected`` and ``LinkTampered`` ever come out
  (nothing else escapes);
- the decoder never holds more than one frame (``8 + MAX_SEALED_PAYLOAD`` bytes);
- no forged admission: when rank 0's handshake completes, the Auth it accepted is
  byte-for-byte the genuine joiner's and so is every field of the Hello (the Noise
  prologue), its ``software`` string included; when the joiner's completes, the
  Welcome it opened is the genuine one (it arrives sealed, as on the link).

Examples (``HYPOTHESIS_PROFILE``, as in test_codec): ``ci`` (default) 10,000,
derandomized; ``dev``/``long`` 100,000.
"""

from __future__ import annotations

import os
import tracemalloc

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clusterfsm.states.codec import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    MAX_SEALED_PAYLOAD,
    Auth,
    ClusterMsgType,
    Frame,
    FrameDecoder,
    Hello,
    Message,
    Welcome,
    decode_message,
    encode_message,
)
from clusterfsm.states.errors import (
    FrameError,
    FrameErrorKind,
    HandshakeRejected,
    LinkTampered,
)
from clusterfsm.states.handshake import CoordinatorHandshake, JoinerHandshake
from clusterfsm.states.seal import Opener

KEY = bytes(range(32))
J_ID, C_ID = b"J" * 16, b"C" * 16
J_NONCE = b"n" * 16
E_J, E_C = b"e" * 32, b"E" * 32  # fixed ephemeral keys: the streams replay exactly
SID = b"S" * 16
BOUND = HEADER_SIZE + MAX_SEALED_PAYLOAD

_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
EXAMPLES = 10_000 if _PROFILE not in ("dev", "long") else 100_000
FUZZ = settings(max_examples=EXAMPLES, derandomize=_PROFILE not in ("dev", "long"),
                deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _joiner() -> JoinerHandshake:
    return JoinerHandshake(KEY, J_ID, 1, 2, 6000, nonce=J_NONCE, ephemeral=E_J)


def _coordinator() -> CoordinatorHandshake:
    return CoordinatorHandshake(KEY, C_ID, 2, SID, set(), set(), ephemeral=E_C)


def _genuine() -> tuple[list[Message], bytes, bytes]:
    """One genuine exchange: the joiner's messages, and both byte streams as the link
    sends them (rank 0's Welcome sealed)."""
    joiner, coord = _joiner(), _coordinator()
    hello = joiner.start()
    [challenge] = coord.receive(hello)
    [auth] = joiner.receive(challenge)
    [welcome] = coord.receive(auth)
    assert coord.keys is not None
    sealed_welcome = coord.keys.sealer().seal(welcome.TYPE, welcome.encode())
    return ([hello, auth], encode_message(hello) + encode_message(auth),
            encode_message(challenge) + sealed_welcome)


TO_COORD, TO_COORD_BYTES, TO_JOINER_BYTES = _genuine()
GENUINE_HELLO, GENUINE_AUTH = TO_COORD
STREAMS = {"coordinator": TO_COORD_BYTES, "joiner": TO_JOINER_BYTES}


#: One mutation: (operation, position, value, inserted bytes); positions wrap around.
mutations = st.lists(
    st.tuples(st.integers(0, 5), st.integers(0, 1 << 16), st.integers(0, 255),
              st.binary(min_size=1, max_size=12)),
    max_size=4,
)


def mutate(data: bytes, ops: list[tuple[int, int, int, bytes]]) -> bytes:
    """Flip a bit, set a byte, cut, insert, duplicate a tail, or swap two bytes."""
    buf = bytearray(data)
    for op, where, value, extra in ops:
        if not buf:
            break
        i = where % len(buf)
        if op == 0:
            buf[i] ^= 1 << (value % 8)
        elif op == 1:
            buf[i] = value
        elif op == 2:
            del buf[i:]
        elif op == 3:
            buf[i:i] = extra
        elif op == 4:
            buf += buf[i:]
        else:
            j = value % len(buf)
            buf[i], buf[j] = buf[j], buf[i]
    return bytes(buf)


def _feed(role: str, data: bytes, cuts: list[int]) -> CoordinatorHandshake | JoinerHandshake:
    """The link's receive path; raises only what the link would turn into an error."""
    hs: CoordinatorHandshake | JoinerHandshake
    if role == "coordinator":
        hs = _coordinator()
    else:
        hs = _joiner()
        hs.start()
    decoder = FrameDecoder()
    opener: Opener | None = None
    pos = 0
    for size in [*cuts, len(data)]:
        for frame in decoder.feed(data[pos : pos + size]):
            if hs.done:
                return hs  # the link hands later frames to the session phase
            if opener is None and hs.keys is not None:
                opener = hs.keys.opener()  # as ControlLink.install_keys
            if opener is not None:  # as ControlLink._to_message
                if frame.type is not ClusterMsgType.SEALED:
                    raise opener.refuse_unsealed(frame.type)
                type_byte, payload = opener.open(frame.payload)
                frame = Frame(ClusterMsgType(type_byte), payload)
            hs.receive(decode_message(frame))
        assert decoder.buffered <= BOUND
        pos += size
    if not hs.done:
        decoder.close()
    return hs


@FUZZ
@given(st.sampled_from(["coordinator", "joiner"]), mutations,
       st.lists(st.integers(0, 40), max_size=6))
def test_fuzz_handshake_byte_stream(
    role: str, ops: list[tuple[int, int, int, bytes]], cuts: list[int],
) -> None:
    data = mutate(STREAMS[role], ops)
    try:
        hs = _feed(role, data, cuts)
    except (FrameError, HandshakeRejected, LinkTampered):
        return
    if role == "coordinator" and hs.done:
        # no forged admission: exactly the genuine joiner's Hello and Auth got through
        assert isinstance(hs, CoordinatorHandshake)
        assert hs.peer_node_id == GENUINE_HELLO.node_id and hs.rank == 1
        assert isinstance(GENUINE_AUTH, Auth) and hs.data_port == 6000
        assert encode_message(GENUINE_AUTH) in data
        assert isinstance(GENUINE_HELLO, Hello) and hs.software == GENUINE_HELLO.software
        assert hs.epoch == GENUINE_HELLO.epoch
    if role == "joiner" and hs.done:
        assert isinstance(hs, JoinerHandshake) and hs.peer_node_id == C_ID
        assert hs.session_id == SID


def test_decoder_memory_is_bounded_by_the_declared_limit() -> None:
    """Traced memory for a maximal frame trickled in, then a 4 GiB header: one frame."""
    decoder = FrameDecoder()
    header = b"CF\x01\x20" + MAX_PAYLOAD.to_bytes(4, "big")  # STEP, largest payload
    chunk = b"\xaa" * 4096
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        decoder.feed(header)
        for _ in range(MAX_PAYLOAD // len(chunk) - 1):
            decoder.feed(chunk)
            assert decoder.buffered <= BOUND
        [frame] = decoder.feed(chunk)
        assert len(frame.payload) == MAX_PAYLOAD and decoder.buffered == 0
        huge = FrameDecoder()
        try:
            huge.feed(b"CF\x01\x20" + (2**32 - 1).to_bytes(4, "big") + chunk)
        except FrameError as exc:
            assert exc.kind is FrameErrorKind.OVERSIZE
        else:
            raise AssertionError("a 4 GiB header was accepted")
        assert huge.buffered == 0
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    # the buffer, the finished payload and the chunk: a few frames' worth, never 4 GiB
    assert peak < 4 * BOUND, peak


def test_the_unmutated_streams_complete_both_handshakes() -> None:
    """Sanity for the fuzz above: the genuine streams do reach ``done``."""
    assert _feed("coordinator", STREAMS["coordinator"], []).done
    assert _feed("joiner", STREAMS["joiner"], [3, 5]).done
    assert isinstance(GENUINE_HELLO, Hello)
    assert not isinstance(TO_COORD[-1], Welcome)
    assert not isinstance(TO_COORD[-1], Welcome)
