"""Sealing the control link: a Noise handshake, then every frame under an AEAD.

Sans-IO, like the codec and the handshake: bytes in, bytes out, no socket or trio.

Pattern: **Noise_NNpsk0_25519_AESGCM_SHA256**, followed exactly (Noise Protocol
Framework, revision 34: ``NNpsk0`` is ``-> psk, e`` / ``<- e, ee``; X25519, AES-256-GCM,
SHA-256). WireGuard uses ``IKpsk2`` and libp2p ``XX``, which authenticate per-host static
keys that a clusterfsm cluster does not have (it has one pre-shared cluster key); the
``psk`` patterns without static keys are the ones that fit, and ``psk0`` lets the joiner
refuse a Challenge without the key at once. How it maps onto the control-link
handshake (``docs/protocol.md`` section 5)::

    joiner (Noise responder)                       coordinator (Noise initiator)
      HELLO (cleartext, unchanged layout) ->       prologue = label || HELLO payload
                                   <- CHALLENGE = version || e_c || AEAD(node id, N)   psk, e
      AUTH = e_j || AEAD(data port) ->                                                  e, ee
                                   <- WELCOME and every later frame: SEALED
      every later frame: SEALED ->

Why the coordinator is the initiator: the HELLO is the version negotiation, so it keeps
the layout every version can decode; a peer of another version then answers it with a
clear ``VERSION_MISMATCH`` refusal instead of failing to decode a new layout. The HELLO
enters the handshake as its prologue, so its fields (nonce, epoch, software, ...) are in
the handshake hash and both AEAD tags cover them.

Keys: the Noise PSK is ``HKDF-SHA256(cluster key, info="clusterfsm/v2 noise psk")``
(:func:`derive_psk`; Noise needs exactly 32 bytes, and the cluster key also keys the
discovery beacons' HMAC, so the handshake gets its own). The chaining key mixes the PSK,
both ephemeral public keys and their X25519 shared secret; ``Split`` then gives one key
per direction. So a key that leaks later opens no recorded session (the ephemeral
secrets are gone), and no two sessions or directions share a key.

Sealed frames (:class:`Sealer`, :class:`Opener`): a frame of type ``SEALED`` (0x30)
whose payload is ``AES-256-GCM(k, nonce=0^32 || counter (u64, big-endian), ad=the
8-byte frame header, plaintext=inner type byte || inner payload)``. The counter is
implicit (never on the wire) and per direction, so a frame opens only at its own
position in its own direction: a replayed, reordered, dropped-then-resent, truncated or
altered frame fails authentication and the opener raises :class:`LinkTampered` (and
stays poisoned). Every ``REKEY_INTERVAL`` frames both sides replace the key by Noise's
``Rekey()``; the counter stops at ``2**64 - 2`` (Noise reserves ``2**64 - 1``).

Why AES-256-GCM rather than ChaCha20-Poly1305 (Noise allows both): measured in
``bench/seal_bench.py`` on the same run, OpenSSL's AES-GCM is 2-4x faster here, small
frames and 64 KiB alike, because the CPUs clusterfsm runs on (Apple Silicon, x86
servers) have AES and carry-less-multiply instructions, with which it is also constant
time. ChaCha20-Poly1305 is the better choice only without them.
"""

from __future__ import annotations

import hashlib
import struct
from typing import TYPE_CHECKING, Final

import attrs

from clusterfsm.states.codec import (
    FRAME_VERSION,
    HEADER_SIZE,
    MAGIC,
    MAX_INNER_PAYLOAD,
    MAX_PAYLOAD,
    MAX_SEALED_PAYLOAD,
    SEAL_OVERHEAD,
    ClusterMsgType,
    payload_limit,
)
from clusterfsm.states.errors import LinkTampered, TamperKind

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "DH_SIZE",
    "MAX_NONCE",
    "MAX_SEALED_PAYLOAD",
    "PROLOGUE_LABEL",
    "PROTOCOL_NAME",
    "REKEY_INTERVAL",
    "SEALED_TYPE",
    "TAG_SIZE",
    "CipherState",
    "InitiatorHandshake",
    "Opener",
    "ResponderHandshake",
    "Sealer",
    "SessionKeys",
    "derive_psk",
    "prologue",
    "warm_up",
]

#: The Noise protocol name; exactly 32 bytes, so it is the initial handshake hash as is.
PROTOCOL_NAME: Final = b"Noise_NNpsk0_25519_AESGCM_SHA256"
#: Starts the prologue, before the HELLO payload: the generation of this handshake's
#: construction (unchanged since protocol 2; the HELLO payload that follows carries the
#: protocol version itself).
PROLOGUE_LABEL: Final = b"clusterfsm/v2 hello"
_PSK_INFO: Final = b"clusterfsm/v2 noise psk"
DH_SIZE: Final = 32
KEY_SIZE: Final = 32
TAG_SIZE: Final = 16
#: The message type byte of a sealed frame.
SEALED_TYPE: Final = int(ClusterMsgType.SEALED)
#: Both directions replace their key (Noise ``Rekey()``) after this many frames, so one
#: AES-GCM key seals at most 2**20 frames of at most 64 KiB (2**32 blocks).
REKEY_INTERVAL: Final = 1 << 20
#: Noise reserves nonce 2**64 - 1 (for ``Rekey``): the last frame of a session is
#: number 2**64 - 2 (at a million frames a second, after 580,000 years).
MAX_NONCE: Final = (1 << 64) - 2

_HEADER = struct.Struct(">2sBBI")
_NONCE = struct.Struct(">4xQ")  # AESGCM in Noise: 32 zero bits, then the big-endian counter
_REKEY_NONCE: Final = b"\x00\x00\x00\x00" + b"\xff" * 8
_ZEROS32: Final = bytes(32)


# -- primitives, all from `cryptography`, imported on first use (bench/seal_bench.py) --


_warm = False


def warm_up() -> None:
    """Run one throwaway handshake and one sealed frame, once per process.

    The first use of X25519, HKDF and AES-GCM in a process costs 5-15 ms (importing
    `cryptography` and faulting in OpenSSL's code); done here, off the handshake's
    critical path (each rank calls it in ``idle``; the demo before it forks its ranks,
    which then share the warm pages). Later calls return at once.
    """
    global _warm
    if _warm:
        return
    psk = derive_psk(bytes(32))
    initiator, responder = InitiatorHandshake(psk, b""), ResponderHandshake(psk, b"")
    responder.read_message1(initiator.write_message1(b""))
    message2, keys = responder.write_message2(b"")
    initiator.read_message2(message2)
    Opener(keys.send_key).open(keys.sealer().seal(SEALED_TYPE - 1, b"")[HEADER_SIZE:])
    _warm = True


def _aead(key: bytes) -> AESGCM:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def _hkdf(chaining_key: bytes, ikm: bytes, outputs: int) -> list[bytes]:
    """Noise's ``HKDF(ck, ikm, n)``: RFC 5869 HKDF-SHA256, salt ``ck``, empty info."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    out = HKDF(algorithm=hashes.SHA256(), length=32 * outputs, salt=chaining_key,
               info=b"").derive(ikm)
    return [out[i : i + 32] for i in range(0, 32 * outputs, 32)]


def _generate_keypair() -> X25519PrivateKey:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return X25519PrivateKey.generate()


def _private_key(raw: bytes) -> X25519PrivateKey:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return X25519PrivateKey.from_private_bytes(raw)


def _public_bytes(key: X25519PrivateKey) -> bytes:
    # public_bytes_raw, not public_bytes(Encoding.Raw, ...): importing `serialization`
    # pulls in its SSH key support, 2-10 ms of import time for nothing.
    return key.public_key().public_bytes_raw()


def _dh(key: X25519PrivateKey, peer_public: bytes) -> bytes:
    """X25519; ``cryptography`` refuses an all-zero shared secret (a low-order point)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    return key.exchange(X25519PublicKey.from_public_bytes(peer_public))


def _invalid_tag() -> type[Exception]:
    from cryptography.exceptions import InvalidTag

    return InvalidTag


def derive_psk(cluster_key: bytes) -> bytes:
    """The Noise PSK (32 bytes) for a cluster key of any length >= 16."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=_PSK_INFO).derive(cluster_key)


def prologue(hello_payload: bytes) -> bytes:
    """The Noise prologue: the label, then the HELLO's payload bytes as sent."""
    return PROLOGUE_LABEL + hello_payload


# -- Noise CipherState and SymmetricState ---------------------------------------------


class CipherState:
    """Noise's CipherState for AESGCM: a key and a counter nonce (section 5.1)."""

    __slots__ = ("_aead", "_key", "n")

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError("a cipher key is 32 bytes")
        self._key = key
        self._aead = _aead(key)
        self.n = 0

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        if self.n > MAX_NONCE:
            raise LinkTampered(TamperKind.EXHAUSTED, "this direction sealed its last frame",
                               frame=self.n)
        out = self._aead.encrypt(_NONCE.pack(self.n), plaintext, ad)
        self.n += 1
        return out

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        """The plaintext; ``InvalidTag`` if it does not authenticate (n unchanged)."""
        if self.n > MAX_NONCE:
            raise LinkTampered(TamperKind.EXHAUSTED, "the peer sent past the last frame",
                               frame=self.n)
        out = self._aead.decrypt(_NONCE.pack(self.n), ciphertext, ad)
        self.n += 1
        return out

    def rekey(self) -> None:
        """Noise ``Rekey()``: k = ENCRYPT(k, 2**64 - 1, empty, 32 zero bytes)[:32]."""
        self._key = self._aead.encrypt(_REKEY_NONCE, _ZEROS32, b"")[:KEY_SIZE]
        self._aead = _aead(self._key)


class _SymmetricState:
    """Noise's SymmetricState (section 5.2), SHA-256."""

    __slots__ = ("ck", "h", "k")

    def __init__(self, prologue_bytes: bytes) -> None:
        # len(PROTOCOL_NAME) == HASHLEN: h is the name itself, unpadded, unhashed.
        self.h = PROTOCOL_NAME
        self.ck = PROTOCOL_NAME
        self.k: CipherState | None = None
        self.mix_hash(prologue_bytes)

    def mix_hash(self, data: bytes) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = _hkdf(self.ck, ikm, 2)
        self.k = CipherState(temp_k)

    def mix_key_and_hash(self, ikm: bytes) -> None:
        self.ck, temp_h, temp_k = _hkdf(self.ck, ikm, 3)
        self.mix_hash(temp_h)
        self.k = CipherState(temp_k)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        assert self.k is not None  # NNpsk0 has a key before every payload
        ciphertext = self.k.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        assert self.k is not None
        plaintext = self.k.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        first, second = _hkdf(self.ck, b"", 2)
        return first, second


@attrs.frozen
class SessionKeys:
    """What a finished handshake leaves one side: a key per direction, and the
    handshake hash (the same on both sides; a channel binding, never a key)."""

    send_key: bytes = attrs.field(repr=False)
    receive_key: bytes = attrs.field(repr=False)
    handshake_hash: bytes

    def sealer(self, *, rekey_interval: int = REKEY_INTERVAL) -> Sealer:
        return Sealer(self.send_key, rekey_interval=rekey_interval)

    def opener(self, *, peer: str = "", rekey_interval: int = REKEY_INTERVAL) -> Opener:
        return Opener(self.receive_key, peer=peer, rekey_interval=rekey_interval)


class _Noise:
    __slots__ = ("_e", "_peer", "_psk", "_ss", "done")

    def __init__(self, psk: bytes, prologue_bytes: bytes, ephemeral: bytes | None,
                 peer: str) -> None:
        if len(psk) != 32:
            raise ValueError("the Noise PSK is 32 bytes (see derive_psk)")
        self._psk = psk
        self._ss = _SymmetricState(prologue_bytes)
        self._e = _generate_keypair() if ephemeral is None else _private_key(ephemeral)
        self._peer = peer
        self.done = False

    def _write_e(self) -> bytes:
        e_pub = _public_bytes(self._e)
        self._ss.mix_hash(e_pub)
        self._ss.mix_key(e_pub)  # the PSK rule: "e" also mixes the key
        return e_pub

    def _read_e(self, message: bytes, where: str) -> tuple[bytes, bytes]:
        if len(message) < DH_SIZE + TAG_SIZE:
            raise LinkTampered(TamperKind.MALFORMED, f"{where}: {len(message)} bytes", self._peer)
        re = message[:DH_SIZE]
        self._ss.mix_hash(re)
        self._ss.mix_key(re)
        return re, message[DH_SIZE:]

    def _ee(self, peer_e: bytes, where: str) -> None:
        try:
            shared = _dh(self._e, peer_e)
        except ValueError as exc:  # a low-order point: no shared secret
            raise LinkTampered(TamperKind.FORGED, f"{where}: bad ephemeral key ({exc})",
                               self._peer) from None
        self._ss.mix_key(shared)

    def _decrypt(self, ciphertext: bytes, where: str) -> bytes:
        try:
            return self._ss.decrypt_and_hash(ciphertext)
        except _invalid_tag():
            raise LinkTampered(TamperKind.FORGED, f"{where} does not authenticate "
                               "(another key, or altered)", self._peer) from None

    def _finish(self, initiator: bool) -> SessionKeys:
        first, second = self._ss.split()  # first: initiator -> responder
        self.done = True
        send, receive = (first, second) if initiator else (second, first)
        return SessionKeys(send, receive, self._ss.h)


class InitiatorHandshake(_Noise):
    """The coordinator's side: :meth:`write_message1` (the CHALLENGE's sealed part),
    then :meth:`read_message2` (the AUTH's), which returns the session keys."""

    __slots__ = ("_step",)

    def __init__(self, psk: bytes, prologue_bytes: bytes, *, ephemeral: bytes | None = None,
                 peer: str = "") -> None:
        super().__init__(psk, prologue_bytes, ephemeral, peer)
        self._step = 1

    def write_message1(self, payload: bytes) -> bytes:
        """``-> psk, e``: our ephemeral key, then the payload under the PSK-derived key."""
        if self._step != 1:
            raise RuntimeError("message 1 is written once")
        self._step = 2
        self._ss.mix_key_and_hash(self._psk)
        e_pub = self._write_e()
        return e_pub + self._ss.encrypt_and_hash(payload)

    def read_message2(self, message: bytes) -> tuple[bytes, SessionKeys]:
        """``<- e, ee``: the responder's payload and the session keys, or
        :class:`LinkTampered` (it does not hold the key, or the message was altered)."""
        if self._step != 2:
            raise RuntimeError("message 2 is read once, after message 1")
        self._step = 3
        re, rest = self._read_e(message, "message 2")
        self._ee(re, "message 2")
        payload = self._decrypt(rest, "message 2")
        return payload, self._finish(initiator=True)


class ResponderHandshake(_Noise):
    """The joiner's side: :meth:`read_message1`, then :meth:`write_message2`."""

    __slots__ = ("_re", "_step")

    def __init__(self, psk: bytes, prologue_bytes: bytes, *, ephemeral: bytes | None = None,
                 peer: str = "") -> None:
        super().__init__(psk, prologue_bytes, ephemeral, peer)
        self._step = 1
        self._re = b""

    def read_message1(self, message: bytes) -> bytes:
        """``-> psk, e``: the initiator's payload, or :class:`LinkTampered`."""
        if self._step != 1:
            raise RuntimeError("message 1 is read once")
        self._step = 2
        self._ss.mix_key_and_hash(self._psk)
        self._re, rest = self._read_e(message, "message 1")
        return self._decrypt(rest, "message 1")

    def write_message2(self, payload: bytes) -> tuple[bytes, SessionKeys]:
        """``<- e, ee``: the message to send and our session keys."""
        if self._step != 2:
            raise RuntimeError("message 2 is written once, after message 1")
        self._step = 3
        e_pub = self._write_e()
        self._ee(self._re, "message 2")
        ciphertext = self._ss.encrypt_and_hash(payload)
        return e_pub + ciphertext, self._finish(initiator=False)


# -- sealed frames --------------------------------------------------------------------


def _check_interval(rekey_interval: int) -> int:
    if not 1 <= rekey_interval <= REKEY_INTERVAL:
        raise ValueError(f"rekey_interval must be in 1..{REKEY_INTERVAL}")
    return rekey_interval


class Sealer:
    """One direction's sending half: message type and payload in, a whole frame out."""

    __slots__ = ("_cipher", "_interval")

    def __init__(self, key: bytes, *, rekey_interval: int = REKEY_INTERVAL) -> None:
        self._cipher = CipherState(key)
        self._interval = _check_interval(rekey_interval)

    @property
    def frames(self) -> int:
        """Frames sealed so far (the next frame's counter)."""
        return self._cipher.n

    def seal(self, msg_type: int, payload: bytes) -> bytes:
        """The SEALED frame (header and sealed payload) carrying ``msg_type``/``payload``.

        ValueError for a payload above its type's limit (``codec.payload_limit``, and
        never above ``MAX_INNER_PAYLOAD``, so the sealed frame stays within
        ``MAX_SEALED_PAYLOAD``) or a type outside a byte (our bug, never the peer's).
        """
        n = len(payload)
        if n > MAX_PAYLOAD and n > min(payload_limit(msg_type), MAX_INNER_PAYLOAD):
            raise ValueError(f"payload of {n} bytes exceeds the limit of type "
                             f"0x{msg_type:02x}")
        header = _HEADER.pack(MAGIC, FRAME_VERSION, SEALED_TYPE, n + 1 + TAG_SIZE)
        cipher = self._cipher
        sealed = cipher.encrypt_with_ad(header, msg_type.to_bytes(1, "big") + payload)
        if cipher.n % self._interval == 0:
            cipher.rekey()
        return header + sealed


class Opener:
    """One direction's receiving half: a SEALED frame's payload in, the inner type and
    payload out, or :class:`LinkTampered`, after which it is poisoned."""

    __slots__ = ("_cipher", "_error", "_interval", "_invalid_tag", "peer")

    def __init__(self, key: bytes, *, peer: str = "",
                 rekey_interval: int = REKEY_INTERVAL) -> None:
        self._cipher = CipherState(key)
        self._interval = _check_interval(rekey_interval)
        self._error: LinkTampered | None = None
        self._invalid_tag = _invalid_tag()
        self.peer = peer

    @property
    def frames(self) -> int:
        """Frames opened so far (the counter the next frame must carry)."""
        return self._cipher.n

    @property
    def error(self) -> LinkTampered | None:
        return self._error

    def open(self, sealed_payload: bytes) -> tuple[int, bytes]:
        """``(inner type byte, inner payload)`` of the next frame in this direction."""
        if self._error is not None:
            raise self._error
        cipher = self._cipher
        size = len(sealed_payload)
        if not 1 + TAG_SIZE <= size <= MAX_SEALED_PAYLOAD:
            raise self._fail(TamperKind.MALFORMED, f"sealed payload of {size} bytes")
        header = _HEADER.pack(MAGIC, FRAME_VERSION, SEALED_TYPE, size)
        try:
            plain = cipher.decrypt_with_ad(header, sealed_payload)
        except self._invalid_tag:
            raise self._fail(TamperKind.FORGED, "does not authenticate here: altered, "
                             "replayed, reordered, dropped, truncated or foreign") from None
        except LinkTampered as exc:
            self._error = attrs.evolve(exc, peer=self.peer)
            raise self._error from None
        if cipher.n % self._interval == 0:
            cipher.rekey()
        return plain[0], plain[1:]

    def refuse_unsealed(self, msg_type: int) -> LinkTampered:
        """Poison and return the error for a cleartext frame where a sealed one is due."""
        return self._fail(TamperKind.UNSEALED, f"cleartext frame of type 0x{msg_type:02x} "
                          "after the handshake")

    def _fail(self, kind: TamperKind, detail: str) -> LinkTampered:
        if self._error is None:
            self._error = LinkTampered(kind, detail, self.peer, self._cipher.n)
        return self._error


assert _HEADER.size == HEADER_SIZE and SEAL_OVERHEAD == 1 + TAG_SIZE
assert MAX_SEALED_PAYLOAD == MAX_INNER_PAYLOAD + SEAL_OVERHEAD
