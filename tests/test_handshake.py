"""Sans-IO handshake: success, every refusal on both sides, replay, reflection, fuzz.

The Noise layer itself (messages, keys, sealed frames) is tested in tests/test_seal.py;
this file tests what the handshake builds on it: which checks run when, and the
Challenge, Auth and Welcome it exchanges.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clusterfsm.states import seal
from clusterfsm.states.codec import (
    Auth,
    Challenge,
    FrameDecoder,
    Hello,
    Message,
    Ping,
    Reject,
    Welcome,
    decode_message,
    encode_message,
)
from clusterfsm.states.errors import FrameError, FrameErrorKind, HandshakeRejected, RejectReason
from clusterfsm.states.handshake import PROTOCOL_VERSION, CoordinatorHandshake, JoinerHandshake

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
J_ID = bytes(range(0x10, 0x20))
C_ID = bytes(range(0x20, 0x30))
J_NONCE = bytes(range(0x30, 0x40))
E_C = bytes(range(0x50, 0x70))  # the coordinator's ephemeral X25519 private key
E_J = bytes(range(0x70, 0x90))  # the joiner's
SID = bytes.fromhex("5e551011000000000000000000000001")
DOCS = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def joiner(**kw: object) -> JoinerHandshake:
    args: dict[str, object] = {
        "key": KEY,
        "node_id": J_ID,
        "rank": 1,
        "world_size": 2,
        "data_port": 6000,
        "nonce": J_NONCE,
        "ephemeral": E_J,
        "peer": "rank0",
    }
    args.update(kw)
    return JoinerHandshake(**args)  # type: ignore[arg-type]


def coordinator(**kw: object) -> CoordinatorHandshake:
    args: dict[str, object] = {
        "key": KEY,
        "node_id": C_ID,
        "world_size": 2,
        "session_id": SID,
        "taken_ranks": set(),
        "taken_node_ids": set(),
        "ephemeral": E_C,
        "peer": "rank1",
    }
    args.update(kw)
    return CoordinatorHandshake(**args)  # type: ignore[arg-type]


def wire(msg: Message) -> Message:
    """Round-trip through the codec, as the link would."""
    [frame] = FrameDecoder().feed(encode_message(msg))
    return decode_message(frame)


def run(j: JoinerHandshake, c: CoordinatorHandshake) -> tuple[Challenge, Auth, Welcome]:
    [ch] = c.receive(wire(j.start()))
    [au] = j.receive(wire(ch))
    [we] = c.receive(wire(au))
    assert j.receive(wire(we)) == []
    assert isinstance(ch, Challenge)
    assert isinstance(au, Auth)
    assert isinstance(we, Welcome)
    return ch, au, we


# --------------------------------------------------------------------------- success


def test_successful_handshake() -> None:
    j, c = joiner(), coordinator()
    assert not j.done
    assert not c.done
    run(j, c)
    assert j.done
    assert c.done
    assert j.session_id == SID
    assert j.peer_node_id == C_ID
    assert c.rank == 1
    assert c.peer_node_id == J_ID
    assert c.data_port == 6000
    assert c.software == "clusterfsm/0.1"
    assert j.outbox_on_failure == ()
    assert c.outbox_on_failure == ()
    assert j.error is None
    assert c.error is None
    assert j.keys is not None and c.keys is not None
    assert (j.keys.send_key, j.keys.receive_key) == (c.keys.receive_key, c.keys.send_key)
    assert j.keys.handshake_hash == c.keys.handshake_hash
    assert (JoinerHandshake.SEAL_REPLIES, CoordinatorHandshake.SEAL_REPLIES) == (False, True)


def test_default_nonces_and_ephemeral_keys_are_random_and_the_handshake_works() -> None:
    assert joiner(nonce=None).start().nonce != joiner(nonce=None).start().nonce
    j1, j2 = joiner(nonce=None, ephemeral=None), joiner(nonce=None, ephemeral=None)
    c1, c2 = coordinator(ephemeral=None), coordinator(ephemeral=None)
    ch1, _, _ = run(j1, c1)
    ch2, _, _ = run(j2, c2)
    assert ch1.noise[:32] != ch2.noise[:32]
    assert j1.keys is not None and j2.keys is not None
    assert j1.keys.send_key != j2.keys.send_key


def test_results_unavailable_before_done() -> None:
    j, c = joiner(), coordinator()
    for get in (lambda: j.session_id, lambda: j.peer_node_id, lambda: c.rank, lambda: c.data_port):
        with pytest.raises(RuntimeError):
            get()


#: The documented vectors' joiner epoch (a wall-clock ns stamp, as supervisors make).
DOC_EPOCH = 1_700_000_000_000_000_000
DOC_EPOCH_BYTES = bytes.fromhex("17979cfe362a0000")


def test_noise_messages_match_the_seal_vectors_and_doc_vectors() -> None:
    """The Challenge carries Noise message 1 and the Auth message 2 of docs/protocol.md
    section 8 (same inputs), so the handshake is that Noise handshake."""
    j, c = joiner(epoch=DOC_EPOCH), coordinator()
    ch, au, we = run(j, c)
    text = DOCS.read_text(encoding="utf-8")
    block = re.search(r"^```text seal vectors\n(.*?)^```", text, re.M | re.S)
    assert block is not None
    flat = re.sub(r"\n\s+", "", block[1])
    vectors = dict(re.findall(r"^([\w >-]+?) = ([0-9a-f]+)$", flat, re.M))
    assert ch.noise == bytes.fromhex(vectors["message 1"])
    assert au.noise == bytes.fromhex(vectors["message 2"])
    assert ch.protocol_version == PROTOCOL_VERSION == 3
    assert c.keys is not None and c.keys.send_key == bytes.fromhex(vectors["key c->j"])
    # The same frames appear as test vectors in docs/protocol.md section 7.
    for name, msg in (("challenge", ch), ("auth", au), ("welcome", we)):
        m = re.search(rf"^```hex vector {name}\n(.*?)^```", text, re.M | re.S)
        assert m is not None, name
        assert bytes.fromhex("".join(m[1].split())) == encode_message(msg)


def test_key_never_on_the_wire() -> None:
    j, c = joiner(), coordinator()
    ch, au, we = run(j, c)
    hello = Hello(PROTOCOL_VERSION, J_ID, 1, 2, J_NONCE)
    blob = b"".join(encode_message(m) for m in (hello, ch, au, we))
    assert KEY not in blob
    assert seal.derive_psk(KEY) not in blob


# --------------------------------------------------------------------------- coordinator refusals


@pytest.mark.parametrize(
    ("hello_kw", "coord_kw", "reason"),
    [
        ({"protocol_version": PROTOCOL_VERSION + 1}, {}, RejectReason.VERSION_MISMATCH),
        ({"protocol_version": 1}, {}, RejectReason.VERSION_MISMATCH),  # the HMAC version
        # the build whose APP_DATA frame carried 65533 app bytes
        ({"protocol_version": 2}, {}, RejectReason.VERSION_MISMATCH),
        ({"world_size": 3}, {}, RejectReason.WORLD_SIZE_MISMATCH),
        ({"rank": 0}, {}, RejectReason.BAD_RANK),
        ({"rank": 2}, {}, RejectReason.BAD_RANK),
        ({}, {"taken_ranks": {1}}, RejectReason.DUPLICATE_RANK),
        ({"node_id": C_ID}, {}, RejectReason.DUPLICATE_NODE_ID),
        ({}, {"taken_node_ids": {J_ID}}, RejectReason.DUPLICATE_NODE_ID),
    ],
)
def test_coordinator_refuses_hello(
    hello_kw: dict[str, object], coord_kw: dict[str, object], reason: RejectReason
) -> None:
    fields: dict[str, object] = {
        "protocol_version": PROTOCOL_VERSION,
        "node_id": J_ID,
        "rank": 1,
        "world_size": 2,
        "nonce": J_NONCE,
    }
    fields.update(hello_kw)
    c = coordinator(**coord_kw)
    with pytest.raises(HandshakeRejected) as info:
        c.receive(Hello(**fields))  # type: ignore[arg-type]
    err = info.value
    assert (err.reason, err.remote, err.peer) == (reason, False, "rank1")
    [reject] = c.outbox_on_failure
    assert isinstance(reject, Reject)
    assert reject.reason is reason
    assert reject.detail == err.detail
    assert c.failed
    # The joiner, receiving that Reject, fails with the same reason, remote.
    j = joiner()
    j.start()
    with pytest.raises(HandshakeRejected) as remote:
        j.receive(wire(reject))
    assert (remote.value.reason, remote.value.remote) == (reason, True)
    assert remote.value.detail == err.detail
    assert j.outbox_on_failure == ()


def test_coordinator_rechecks_rank_at_auth() -> None:
    taken: set[int] = set()
    c = coordinator(taken_ranks=taken)
    j = joiner()
    [ch] = c.receive(j.start())
    [au] = j.receive(ch)
    taken.add(1)  # another connection was admitted with rank 1 meanwhile
    with pytest.raises(HandshakeRejected) as info:
        c.receive(au)
    assert info.value.reason is RejectReason.DUPLICATE_RANK
    assert not info.value.remote
    # Both sides hold the keys by now: the link sends this Reject sealed.
    assert c.keys is not None and j.keys is not None
    assert c.keys.send_key == j.keys.receive_key


# --------------------------------------------------------------------------- joiner refusals


def _challenge(**kw: object) -> Challenge:
    c = coordinator(**kw.pop("coord", {}))  # type: ignore[arg-type]
    j = joiner(**kw)
    [ch] = c.receive(j.start())
    assert isinstance(ch, Challenge)
    return ch


def _forged_challenge(node_id: bytes, world_size: int, version: int = PROTOCOL_VERSION,
                      key: bytes = KEY) -> Challenge:
    """A Challenge made with ``key`` for the joiner's Hello, saying what we choose."""
    hello = joiner().start()
    noise = seal.InitiatorHandshake(seal.derive_psk(key), seal.prologue(hello.encode()))
    return Challenge(version, noise.write_message1(node_id + bytes([world_size])))


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: attrs.evolve(_challenge(), protocol_version=PROTOCOL_VERSION + 1),
         RejectReason.VERSION_MISMATCH),
        (lambda: attrs.evolve(_challenge(), protocol_version=1), RejectReason.VERSION_MISMATCH),
        (lambda: attrs.evolve(_challenge(), protocol_version=2), RejectReason.VERSION_MISMATCH),
        (lambda: _forged_challenge(C_ID, 3), RejectReason.WORLD_SIZE_MISMATCH),
        (lambda: _forged_challenge(J_ID, 2), RejectReason.DUPLICATE_NODE_ID),
        (lambda: _forged_challenge(C_ID, 2, key=OTHER_KEY), RejectReason.BAD_KEY),
        # Altered: the ephemeral key, the sealed node id, the tag.
        (lambda: attrs.evolve(_challenge(), noise=_flip(_challenge().noise, 0)),
         RejectReason.BAD_KEY),
        (lambda: attrs.evolve(_challenge(), noise=_flip(_challenge().noise, 40)),
         RejectReason.BAD_KEY),
        (lambda: attrs.evolve(_challenge(), noise=_flip(_challenge().noise, 64)),
         RejectReason.BAD_KEY),
    ],
)
def test_joiner_refuses_challenge(make: Any, reason: RejectReason) -> None:
    ch = make()
    j = joiner()
    j.start()
    with pytest.raises(HandshakeRejected) as info:
        j.receive(ch)
    err = info.value
    assert (err.reason, err.remote, err.peer) == (reason, False, "rank0")
    assert j.keys is None  # never past message 1: the Reject goes in clear
    [reject] = j.outbox_on_failure
    assert isinstance(reject, Reject)
    assert reject.reason is reason
    # And the coordinator, told so, fails with that reason, remote.
    c = coordinator()
    c.receive(Hello(PROTOCOL_VERSION, J_ID, 1, 2, J_NONCE))
    with pytest.raises(HandshakeRejected) as remote:
        c.receive(wire(reject))
    assert (remote.value.reason, remote.value.remote) == (reason, True)


def test_a_hello_altered_on_the_way_fails_the_challenge() -> None:
    """The Hello is the Noise prologue: a coordinator that answered an altered Hello
    (any field, the software string included) answered another prologue."""
    hello = joiner().start()
    for altered in (attrs.evolve(hello, software="clusterfsm/9.9"),
                    attrs.evolve(hello, epoch=2**64 - 1), attrs.evolve(hello, nonce=bytes(16))):
        [ch] = coordinator().receive(altered)
        j = joiner()
        j.start()
        with pytest.raises(HandshakeRejected) as info:
            j.receive(ch)
        assert info.value.reason is RejectReason.BAD_KEY


@pytest.mark.parametrize("reason", list(RejectReason))
def test_every_reason_received_is_remote_on_both_sides(reason: RejectReason) -> None:
    j = joiner()
    j.start()
    with pytest.raises(HandshakeRejected) as a:
        j.receive(Reject(reason, "because"))
    # attrs exceptions compare by identity: compare the fields.
    assert (a.value.reason, a.value.detail, a.value.peer, a.value.remote) == (
        reason,
        "because",
        "rank0",
        True,
    )
    c = coordinator()
    with pytest.raises(HandshakeRejected) as b:
        c.receive(Reject(reason, ""))
    assert (b.value.reason, b.value.remote, b.value.peer) == (reason, True, "rank1")
    assert j.outbox_on_failure == c.outbox_on_failure == ()


# --------------------------------------------------------------------- keys, replay, reflection


def test_wrong_key_detected_by_joiner() -> None:
    """Coordinator has a different key: the joiner refuses its Challenge before proving."""
    j, c = joiner(), coordinator(key=OTHER_KEY)
    [ch] = c.receive(j.start())
    with pytest.raises(HandshakeRejected) as info:
        j.receive(ch)
    assert (info.value.reason, info.value.remote) == (RejectReason.BAD_KEY, False)
    [reject] = j.outbox_on_failure
    with pytest.raises(HandshakeRejected) as remote:
        c.receive(reject)
    assert (remote.value.reason, remote.value.remote) == (RejectReason.BAD_KEY, True)


def test_wrong_key_detected_by_coordinator() -> None:
    """An Auth made under another key (an attacker that skips verifying the Challenge)
    does not open."""
    c = coordinator()
    hello = Hello(PROTOCOL_VERSION, J_ID, 1, 2, J_NONCE)
    c.receive(hello)
    other_psk, pro = seal.derive_psk(OTHER_KEY), seal.prologue(hello.encode())
    other = seal.InitiatorHandshake(other_psk, pro)
    attacker = seal.ResponderHandshake(other_psk, pro)
    attacker.read_message1(other.write_message1(C_ID + b"\x02"))
    forged, _ = attacker.write_message2((6000).to_bytes(2, "big"))
    for auth in (Auth(forged), Auth(bytes(50))):
        c = coordinator()
        c.receive(hello)
        with pytest.raises(HandshakeRejected) as info:
            c.receive(auth)
        assert (info.value.reason, info.value.remote) == (RejectReason.BAD_KEY, False)
        assert c.outbox_on_failure == (Reject(RejectReason.BAD_KEY, info.value.detail),)
        assert not c.done and c.keys is None


@pytest.mark.parametrize("index", [0, 31, 32, 33, 34, 49])
def test_data_port_and_ephemeral_key_are_bound_by_the_aead(index: int) -> None:
    j, c = joiner(), coordinator()
    [ch] = c.receive(j.start())
    [au] = j.receive(ch)
    assert isinstance(au, Auth)
    with pytest.raises(HandshakeRejected) as info:
        c.receive(Auth(_flip(au.noise, index)))
    assert info.value.reason is RejectReason.BAD_KEY


def test_replayed_auth_is_rejected() -> None:
    """A whole joiner recorded from one handshake (Hello, Auth) is useless against a
    fresh coordinator ephemeral key."""
    j1, c1 = joiner(), coordinator()
    _, recorded_auth, _ = run(j1, c1)
    c2 = coordinator(ephemeral=bytes(range(0x90, 0xB0)))
    # the recorded Hello
    c2.receive(Hello(PROTOCOL_VERSION, J_ID, 1, 2, J_NONCE, "clusterfsm/0.1"))
    with pytest.raises(HandshakeRejected) as info:
        c2.receive(recorded_auth)
    assert (info.value.reason, info.value.remote) == (RejectReason.BAD_KEY, False)


def test_replayed_challenge_is_rejected() -> None:
    """A Challenge recorded from one handshake fails for a joiner's fresh Hello."""
    recorded = _challenge()
    j = joiner(nonce=bytes(range(0xA0, 0xB0)))
    j.start()
    with pytest.raises(HandshakeRejected) as info:
        j.receive(recorded)
    assert info.value.reason is RejectReason.BAD_KEY


def test_reflected_coordinator_message_is_rejected() -> None:
    """The coordinator's own message 1 fed back as the joiner's message 2 fails."""
    c = coordinator()
    [ch] = c.receive(Hello(PROTOCOL_VERSION, J_ID, 1, 2, J_NONCE))
    assert isinstance(ch, Challenge)
    for reflected in (ch.noise[:50], ch.noise[:32] + ch.noise[-18:]):
        c2 = coordinator()
        c2.receive(Hello(PROTOCOL_VERSION, J_ID, 1, 2, J_NONCE))
        with pytest.raises(HandshakeRejected) as info:
            c2.receive(Auth(reflected))
        assert info.value.reason is RejectReason.BAD_KEY


def test_reflected_challenge_to_joiner_is_rejected() -> None:
    """A fake coordinator without the key gets nowhere, whatever it echoes."""
    j = joiner()
    hello = j.start()
    with pytest.raises(HandshakeRejected):
        j.receive(Challenge(PROTOCOL_VERSION, hello.nonce * 4 + bytes(1)))


# --------------------------------------------------------------------------- wrong messages


@pytest.mark.parametrize("msg", [Ping(1), Welcome(SID), Auth(bytes(50))])
def test_joiner_unexpected_message(msg: Message) -> None:
    j = joiner()
    j.start()
    with pytest.raises(FrameError) as info:
        j.receive(msg)
    assert info.value.kind is FrameErrorKind.UNEXPECTED
    assert info.value.peer == "rank0"
    assert j.outbox_on_failure == ()
    with pytest.raises(FrameError) as again:  # poisoned
        j.receive(_challenge())
    assert again.value is info.value


def test_joiner_challenge_after_auth_is_unexpected() -> None:
    j, c = joiner(), coordinator()
    [ch] = c.receive(j.start())
    j.receive(ch)
    with pytest.raises(FrameError) as info:
        j.receive(ch)
    assert info.value.kind is FrameErrorKind.UNEXPECTED


@pytest.mark.parametrize(
    "msg", [Ping(1), Auth(bytes(50)), Challenge(PROTOCOL_VERSION, bytes(65))]
)
def test_coordinator_unexpected_first_message(msg: Message) -> None:
    c = coordinator()
    with pytest.raises(FrameError) as info:
        c.receive(msg)
    assert info.value.kind is FrameErrorKind.UNEXPECTED
    assert c.failed


def test_coordinator_second_hello_is_unexpected() -> None:
    c = coordinator()
    hello = Hello(PROTOCOL_VERSION, J_ID, 1, 2, J_NONCE)
    c.receive(hello)
    with pytest.raises(FrameError) as info:
        c.receive(hello)
    assert info.value.kind is FrameErrorKind.UNEXPECTED


def test_message_after_done_is_unexpected_but_keeps_the_result() -> None:
    j, c = joiner(), coordinator()
    run(j, c)
    for hs in (j, c):
        with pytest.raises(FrameError) as info:
            hs.receive(Ping(1))
        assert info.value.kind is FrameErrorKind.UNEXPECTED
        assert hs.done
    assert c.rank == 1


def test_local_misuse_is_a_programming_error() -> None:
    j = joiner()
    with pytest.raises(RuntimeError):
        j.receive(Ping(1))
    j.start()
    with pytest.raises(RuntimeError):
        j.start()
    for bad in (
        {"key": b"short"},
        {"rank": 0},
        {"rank": 2},
        {"node_id": b"x"},
        {"nonce": b"x"},
        {"data_port": 70000},
    ):
        with pytest.raises(ValueError):
            joiner(**bad)
    for bad in ({"session_id": b"x"}, {"world_size": 0}, {"key": b""}):
        with pytest.raises(ValueError):
            coordinator(**bad)


# --------------------------------------------------------------------------- fuzzing

ids16 = st.binary(min_size=16, max_size=16)
small = st.integers(0, 3)
any_message: st.SearchStrategy[Message] = st.one_of(
    st.builds(
        Hello,
        st.sampled_from([0, 1, 2]),
        st.sampled_from([J_ID, C_ID]) | ids16,
        small,
        st.integers(1, 3),
        ids16,
    ),
    st.builds(Challenge, st.sampled_from([0, 1, 2]), st.binary(min_size=65, max_size=65)),
    st.builds(Auth, st.binary(min_size=50, max_size=50)),
    st.builds(Welcome, ids16),
    st.builds(Ping, st.integers(0, 10)),
    st.builds(Reject, st.sampled_from(RejectReason)),
    # Genuine messages, so sequences also reach the later steps.
    st.sampled_from(run(joiner(), coordinator())),
    st.just(Hello(PROTOCOL_VERSION, J_ID, 1, 2, J_NONCE, "clusterfsm/0.1")),
)


@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(st.lists(any_message, max_size=5), st.sampled_from(["joiner", "coordinator"]))
def test_fuzz_random_sequences_raise_only_typed_errors(msgs: list[Message], role: str) -> None:
    hs: JoinerHandshake | CoordinatorHandshake
    if role == "joiner":
        hs = joiner()
        hs.start()
    else:
        hs = coordinator(taken_ranks={2}, taken_node_ids={bytes(16)})
    for msg in msgs:
        try:
            out = hs.receive(msg)
        except (HandshakeRejected, FrameError) as exc:
            assert hs.failed or hs.done
            assert hs.outbox_on_failure == () or isinstance(hs.outbox_on_failure[0], Reject)
            if isinstance(exc, HandshakeRejected) and not exc.remote:
                assert len(hs.outbox_on_failure) == 1
            continue
        assert all(isinstance(m, Challenge | Auth | Welcome) for m in out)
