"""states/seal.py: the Noise handshake, the sealed frames, and docs/protocol.md's vectors.

The handshake and transport bytes are compared with ``noiseprotocol``, an independent
implementation of the Noise Protocol Framework: that is what "we follow
Noise_NNpsk0_25519_AESGCM_SHA256 exactly" rests on.
"""

from __future__ import annotations

import random
import re
import warnings
from pathlib import Path

import attrs
import pytest

from clusterfsm.states import seal
from clusterfsm.states.codec import (
    HEADER_SIZE,
    MAX_APP_CHUNK,
    MAX_APP_PAYLOAD,
    MAX_INNER_PAYLOAD,
    MAX_PAYLOAD,
    MAX_SEALED_PAYLOAD,
    AppData,
    ClusterMsgType,
    Frame,
    FrameDecoder,
    Hello,
    Welcome,
    decode_message,
)
from clusterfsm.states.errors import FrameError, FrameErrorKind, LinkTampered, TamperKind
from clusterfsm.states.seal import (
    InitiatorHandshake,
    Opener,
    ResponderHandshake,
    Sealer,
    SessionKeys,
)

KEY = bytes(range(32))
HELLO = Hello(3, bytes(range(0x10, 0x20)), 1, 2, bytes(range(0x30, 0x40)),
              "clusterfsm/0.1", 1700000000000000000)
E_COORDINATOR = bytes(range(0x50, 0x70))
E_JOINER = bytes(range(0x70, 0x90))
PAYLOAD1 = bytes(range(0x20, 0x30)) + b"\x02"  # coordinator node id, world size
PAYLOAD2 = (6000).to_bytes(2, "big")  # data port
SESSION_ID = bytes.fromhex("5e551011000000000000000000000001")
PROTOCOL_MD = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


def handshake(psk_i: bytes = seal.derive_psk(KEY), psk_r: bytes = seal.derive_psk(KEY),
              *, fixed: bool = False) -> tuple[SessionKeys, SessionKeys]:
    """(coordinator's keys, joiner's keys) after a whole handshake."""
    pro = seal.prologue(HELLO.encode())
    i = InitiatorHandshake(psk_i, pro, ephemeral=E_COORDINATOR if fixed else None)
    r = ResponderHandshake(psk_r, pro, ephemeral=E_JOINER if fixed else None)
    assert r.read_message1(i.write_message1(PAYLOAD1)) == PAYLOAD1
    message2, joiner = r.write_message2(PAYLOAD2)
    payload, coordinator = i.read_message2(message2)
    assert payload == PAYLOAD2
    return coordinator, joiner


# -- the pattern, checked against an independent implementation ------------------------


def _reference(initiator: bool, psk: bytes, pro: bytes, ephemeral: bytes):  # type: ignore[no-untyped-def]
    from noise.connection import Keypair, NoiseConnection

    conn = NoiseConnection.from_name(seal.PROTOCOL_NAME)
    conn.set_psks(psk)
    conn.set_prologue(pro)
    conn.set_keypair_from_private_bytes(Keypair.EPHEMERAL, ephemeral)
    if initiator:
        conn.set_as_initiator()
    else:
        conn.set_as_responder()
    with warnings.catch_warnings():  # "fixed ephemeral keys are for tests only"
        warnings.simplefilter("ignore", UserWarning)
        conn.start_handshake()
    return conn


def test_handshake_and_transport_bytes_match_an_independent_noise_implementation() -> None:
    psk, pro = seal.derive_psk(KEY), seal.prologue(HELLO.encode())
    ref_i = _reference(True, psk, pro, E_COORDINATOR)
    ref_r = _reference(False, psk, pro, E_JOINER)
    ours_i = InitiatorHandshake(psk, pro, ephemeral=E_COORDINATOR)
    ours_r = ResponderHandshake(psk, pro, ephemeral=E_JOINER)

    message1 = ours_i.write_message1(PAYLOAD1)
    assert message1 == bytes(ref_i.write_message(PAYLOAD1))
    assert bytes(ref_r.read_message(message1)) == PAYLOAD1
    assert ours_r.read_message1(message1) == PAYLOAD1
    message2, joiner = ours_r.write_message2(PAYLOAD2)
    assert message2 == bytes(ref_r.write_message(PAYLOAD2))
    assert bytes(ref_i.read_message(message2)) == PAYLOAD2
    _, coordinator = ours_i.read_message2(message2)
    assert coordinator.handshake_hash == joiner.handshake_hash == ref_i.get_handshake_hash()

    # Transport: Noise's own framing has an empty AD; ours puts the frame header there.
    # The CipherState (keys, nonces, Rekey) is the same.
    for keys, ref in ((coordinator, ref_i), (joiner, ref_r)):
        ours = seal.CipherState(keys.send_key)
        for step in range(5):
            if step == 3:
                ours.rekey()
                ref.rekey_outbound_cipher()
            text = bytes([step]) * (step * 7)
            assert ours.encrypt_with_ad(b"", text) == bytes(ref.encrypt(text))


def test_keys_are_per_direction_and_per_session() -> None:
    c1, j1 = handshake()
    c2, _ = handshake()
    assert (c1.send_key, c1.receive_key) == (j1.receive_key, j1.send_key)
    assert c1.send_key != c1.receive_key
    assert {c1.send_key, c1.receive_key}.isdisjoint({c2.send_key, c2.receive_key})
    assert "key" not in repr(c1).replace("SessionKeys", "")


def test_psk_for_keys_of_any_accepted_length() -> None:
    assert len(seal.derive_psk(bytes(16))) == 32
    assert seal.derive_psk(bytes(16)) != seal.derive_psk(bytes(32))


# -- the handshake refuses ---------------------------------------------------------------


def test_joiner_refuses_a_challenge_under_another_key() -> None:
    pro = seal.prologue(HELLO.encode())
    i = InitiatorHandshake(seal.derive_psk(b"another key 0123"), pro)
    r = ResponderHandshake(seal.derive_psk(KEY), pro)
    with pytest.raises(LinkTampered) as err:
        r.read_message1(i.write_message1(PAYLOAD1))
    assert err.value.kind is TamperKind.FORGED


def test_a_changed_hello_field_fails_the_challenge() -> None:
    """The HELLO is the prologue: a HELLO altered on the way (here its software string,
    unauthenticated in protocol 1) makes the two prologues differ."""
    i = InitiatorHandshake(seal.derive_psk(KEY),
                           seal.prologue(HELLO.encode().replace(b"0.1", b"0.2")))
    r = ResponderHandshake(seal.derive_psk(KEY), seal.prologue(HELLO.encode()))
    with pytest.raises(LinkTampered):
        r.read_message1(i.write_message1(PAYLOAD1))


def test_a_recorded_challenge_fails_for_a_fresh_hello() -> None:
    psk = seal.derive_psk(KEY)
    recorded = InitiatorHandshake(psk, seal.prologue(HELLO.encode())).write_message1(PAYLOAD1)
    fresh_hello = attrs.evolve(HELLO, nonce=bytes(16))
    with pytest.raises(LinkTampered):
        ResponderHandshake(psk, seal.prologue(fresh_hello.encode())).read_message1(recorded)


def test_a_recorded_auth_fails_for_a_fresh_coordinator() -> None:
    """Replaying a whole recorded joiner (HELLO and AUTH) to a coordinator: the AUTH
    was made against another coordinator ephemeral key, so the ee secret differs."""
    psk, pro = seal.derive_psk(KEY), seal.prologue(HELLO.encode())
    old_i, old_r = InitiatorHandshake(psk, pro), ResponderHandshake(psk, pro)
    old_r.read_message1(old_i.write_message1(PAYLOAD1))
    recorded_auth, _ = old_r.write_message2(PAYLOAD2)
    fresh = InitiatorHandshake(psk, pro)
    fresh.write_message1(PAYLOAD1)
    with pytest.raises(LinkTampered) as err:
        fresh.read_message2(recorded_auth)
    assert err.value.kind is TamperKind.FORGED


@pytest.mark.parametrize("position", [0, 31, 32, 40, 49])
def test_an_altered_auth_is_refused(position: int) -> None:
    psk, pro = seal.derive_psk(KEY), seal.prologue(HELLO.encode())
    i, r = InitiatorHandshake(psk, pro), ResponderHandshake(psk, pro)
    r.read_message1(i.write_message1(PAYLOAD1))
    message2 = bytearray(r.write_message2(PAYLOAD2)[0])
    message2[position] ^= 0x01
    with pytest.raises(LinkTampered):
        i.read_message2(bytes(message2))


def test_low_order_ephemeral_key_and_short_messages_are_typed() -> None:
    psk, pro = seal.derive_psk(KEY), seal.prologue(HELLO.encode())
    i = InitiatorHandshake(psk, pro)
    i.write_message1(PAYLOAD1)
    with pytest.raises(LinkTampered) as err:
        i.read_message2(bytes(32) + bytes(18))  # the all-zero point: no shared secret
    assert err.value.kind is TamperKind.FORGED
    with pytest.raises(LinkTampered) as err:
        ResponderHandshake(psk, pro).read_message1(bytes(47))
    assert err.value.kind is TamperKind.MALFORMED


def test_messages_out_of_order_are_our_bug() -> None:
    psk, pro = seal.derive_psk(KEY), seal.prologue(HELLO.encode())
    with pytest.raises(RuntimeError):
        InitiatorHandshake(psk, pro).read_message2(bytes(50))
    with pytest.raises(RuntimeError):
        ResponderHandshake(psk, pro).write_message2(b"")
    with pytest.raises(ValueError):
        InitiatorHandshake(KEY[:16], pro)


# -- sealed frames -----------------------------------------------------------------------


def channel(rekey_interval: int = seal.REKEY_INTERVAL) -> tuple[Sealer, Opener]:
    coordinator, joiner = handshake()
    return (coordinator.sealer(rekey_interval=rekey_interval),
            joiner.opener(peer="rank 0", rekey_interval=rekey_interval))


def test_frames_round_trip_across_rekeys() -> None:
    sealer, opener = channel(rekey_interval=3)
    rng = random.Random(14)
    for n in range(20):
        payload = rng.randbytes(rng.choice([0, 1, 8, 300, 65536]))
        frame = sealer.seal(0x10 + n % 3, payload)
        assert frame[:4] == b"CF\x01\x30"
        assert int.from_bytes(frame[4:8], "big") == len(frame) - 8 == len(payload) + 17
        assert opener.open(frame[8:]) == (0x10 + n % 3, payload)
    assert sealer.frames == opener.frames == 20


def test_rekey_changes_the_key_both_sides_in_step() -> None:
    """After a rekey, a frame under the old key no longer opens at the same counter."""
    coordinator, joiner = handshake()
    rekeyed, plain = coordinator.sealer(rekey_interval=2), coordinator.sealer()
    frames = [(rekeyed.seal(5, b"x"), plain.seal(5, b"x")) for _ in range(3)]
    assert [a == b for a, b in frames] == [True, True, False]
    opener = joiner.opener(rekey_interval=2)
    for a, _ in frames:
        assert opener.open(a[8:]) == (5, b"x")
    stale = joiner.opener(rekey_interval=2)
    stale.open(frames[0][1][8:])
    stale.open(frames[1][1][8:])
    with pytest.raises(LinkTampered):
        stale.open(frames[2][1][8:])  # sealed under the key before the rekey


def _tampered(frames: list[bytes], opener: Opener) -> LinkTampered:
    with pytest.raises(LinkTampered) as err:
        for frame in frames:
            opener.open(frame[8:])
    return err.value


def test_one_flipped_bit_anywhere_in_the_sealed_payload_is_refused() -> None:
    coordinator, joiner = handshake()
    frame = coordinator.sealer().seal(0x05, (42).to_bytes(8, "big"))
    for bit in range((len(frame) - 8) * 8):
        altered = bytearray(frame)
        altered[8 + bit // 8] ^= 1 << (bit % 8)
        err = _tampered([bytes(altered)], joiner.opener())
        assert err.kind is TamperKind.FORGED and err.frame == 0


def test_replayed_reordered_dropped_truncated_and_reflected_frames_are_refused() -> None:
    coordinator, joiner = handshake()
    sealer = coordinator.sealer()
    a, b, c = (sealer.seal(0x05, bytes([n]) * 8) for n in range(3))
    cases = {
        "replayed": [a, a],
        "reordered": [b, a],
        "dropped": [a, c],
        "truncated": [a[:-1]],
        "resent after a drop": [a, c, b],
    }
    for name, frames in cases.items():
        err = _tampered(frames, joiner.opener())
        assert err.kind is TamperKind.FORGED, name
    # A frame sent back to its sender (reflection) does not open in the other direction.
    assert _tampered([a], coordinator.opener()).kind is TamperKind.FORGED
    # Nor a frame of another session (same key, same positions).
    other, _ = handshake()
    assert _tampered([other.sealer().seal(0x05, bytes(8))], joiner.opener()).frame == 0


def test_the_opener_is_poisoned_after_a_failure() -> None:
    coordinator, joiner = handshake()
    sealer, opener = coordinator.sealer(), joiner.opener(peer="10.0.0.1:5000")
    good = sealer.seal(0x05, bytes(8))
    with pytest.raises(LinkTampered) as first:
        opener.open(b"\x00" * 10)
    assert first.value.kind is TamperKind.MALFORMED and first.value.peer == "10.0.0.1:5000"
    with pytest.raises(LinkTampered) as again:
        opener.open(good[8:])
    assert again.value is first.value and opener.error is first.value
    assert "10.0.0.1:5000" in str(first.value)


def test_unsealed_frames_and_oversize_payloads() -> None:
    _, opener = channel()
    err = opener.refuse_unsealed(0x12)
    assert err.kind is TamperKind.UNSEALED and "0x12" in err.detail
    sealer, opener = channel()
    with pytest.raises(LinkTampered) as too_long:
        opener.open(bytes(seal.MAX_SEALED_PAYLOAD + 1))
    assert too_long.value.kind is TamperKind.MALFORMED
    with pytest.raises(ValueError):
        sealer.seal(0x05, bytes(MAX_PAYLOAD + 1))
    with pytest.raises(ValueError):
        Sealer(bytes(32), rekey_interval=0)


def test_the_largest_app_data_frame_seals_and_opens_and_one_byte_more_does_not() -> None:
    """A whole 64 KiB app chunk is one sealed frame that our own decoder and opener take;
    one byte more is refused by the sealer (our bug), never sent for the peer to refuse."""
    sealer, opener = channel()
    msg = AppData(1, 0, False, random.Random(18).randbytes(MAX_APP_CHUNK))
    frame = sealer.seal(msg.TYPE, msg.encode())
    assert len(frame) == HEADER_SIZE + MAX_SEALED_PAYLOAD
    [received] = FrameDecoder().feed(frame)
    assert received.type is ClusterMsgType.SEALED
    type_byte, payload = opener.open(received.payload)
    assert decode_message(Frame(ClusterMsgType(type_byte), payload)) == msg
    for msg_type, size in ((0x20, MAX_APP_PAYLOAD + 1), (0x05, MAX_PAYLOAD + 1),
                           (0x30, MAX_INNER_PAYLOAD + 1), (0x2F, MAX_PAYLOAD + 1)):
        with pytest.raises(ValueError):
            sealer.seal(msg_type, bytes(size))
    assert sealer.frames == 1  # a refused payload spends no counter value


def test_an_authentic_inner_payload_over_its_type_s_limit_is_oversize() -> None:
    """A keyed peer (a bug, not an attack) seals a PING of MAX_INNER_PAYLOAD bytes, which
    our sealer would refuse: it opens, and decoding it is OVERSIZE as it would be in clear."""
    coordinator, joiner = handshake()
    cipher = seal.CipherState(coordinator.send_key)
    header = b"CF\x01\x30" + (MAX_INNER_PAYLOAD + 17).to_bytes(4, "big")
    forged = cipher.encrypt_with_ad(header, b"\x05" + bytes(MAX_INNER_PAYLOAD))
    type_byte, payload = joiner.opener().open(forged)
    with pytest.raises(FrameError) as info:
        decode_message(Frame(ClusterMsgType(type_byte), payload))
    assert info.value.kind is FrameErrorKind.OVERSIZE


def test_the_counter_stops_at_noise_s_limit() -> None:
    coordinator, joiner = handshake()
    sealer = coordinator.sealer()
    sealer._cipher.n = seal.MAX_NONCE
    last = sealer.seal(0x05, bytes(8))
    with pytest.raises(LinkTampered) as err:
        sealer.seal(0x05, bytes(8))
    assert err.value.kind is TamperKind.EXHAUSTED
    opener = joiner.opener()
    opener._cipher = seal.CipherState(coordinator.send_key)
    opener._cipher.n = seal.MAX_NONCE
    assert opener.open(last[8:]) == (0x05, bytes(8))
    with pytest.raises(LinkTampered) as err:
        opener.open(last[8:])
    assert err.value.kind is TamperKind.EXHAUSTED and opener.error is err.value


# -- docs/protocol.md's vectors ---------------------------------------------------------


def _doc_vectors() -> dict[str, bytes]:
    text = PROTOCOL_MD.read_text()
    block = re.search(r"^```text seal vectors\n(.*?)^```", text, re.M | re.S)
    assert block, "docs/protocol.md has no seal vectors block"
    vectors: dict[str, bytes] = {}
    name = ""
    for line in block.group(1).splitlines():
        if m := re.match(r"^([\w >-]+?)\s*=\s*(.*)$", line):
            name = m.group(1)
            vectors[name] = bytes.fromhex(m.group(2))
        elif line.strip():
            vectors[name] += bytes.fromhex(line)
    return vectors


def test_docs_vectors_key_schedule_and_one_sealed_frame() -> None:
    v = _doc_vectors()
    psk = seal.derive_psk(v["cluster key"])
    assert psk == v["psk"]
    assert v["hello payload"] == HELLO.encode()
    assert seal.prologue(v["hello payload"]) == v["prologue"]
    assert (v["e_c private"], v["e_j private"]) == (E_COORDINATOR, E_JOINER)
    coordinator, joiner = handshake(fixed=True)
    i = InitiatorHandshake(psk, v["prologue"], ephemeral=v["e_c private"])
    assert i.write_message1(v["message 1 payload"]) == v["message 1"]
    r = ResponderHandshake(psk, v["prologue"], ephemeral=v["e_j private"])
    assert r.read_message1(v["message 1"]) == v["message 1 payload"]
    message2, keys = r.write_message2(v["message 2 payload"])
    assert message2 == v["message 2"]
    assert keys.handshake_hash == v["handshake hash"] == coordinator.handshake_hash
    assert coordinator.send_key == joiner.receive_key == v["key c->j"]
    assert coordinator.receive_key == joiner.send_key == v["key j->c"]
    welcome = Welcome(SESSION_ID)
    sealed = coordinator.sealer().seal(welcome.TYPE, welcome.encode())
    assert sealed == v["sealed welcome"]
    assert joiner.opener().open(sealed[8:]) == (welcome.TYPE, welcome.encode())


def test_warm_up_runs_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seal, "_warm", False)
    calls: list[bytes] = []
    real = seal.derive_psk
    monkeypatch.setattr(seal, "derive_psk", lambda key: calls.append(key) or real(key))
    seal.warm_up()
    seal.warm_up()
    assert len(calls) == 1 and seal._warm
