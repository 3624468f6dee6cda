"""The cost of sealing the control link (states/seal.py), against unsealed in the same run.

- Heartbeat frames (a Ping, 8-byte payload): seal, open and decode one frame at a time,
  against the unsealed path (encode, feed the decoder, decode).
- 64 KiB frames (the largest APP_DATA frame: a whole 65,536-byte app chunk, 65,539
  payload bytes): the same, in MB/s of payload.
- The AEAD choice: AES-256-GCM against ChaCha20-Poly1305 (both from `cryptography`),
  encrypt and decrypt, small and 64 KiB, so the choice in states/seal.py is measured on
  the machine that runs it.
- The handshake: a whole Noise_NNpsk0 handshake (both sides, fresh X25519 keys) against
  protocol 1's cryptographic work per handshake (four HMAC-SHA256).
- The import of the `cryptography` modules the seal uses, in a fresh interpreter that
  has imported trio and attrs (as every rank has), against one that stops there.

Run: python bench/seal_bench.py [--seconds 1.5] [--json OUT]
"""

from __future__ import annotations

import hashlib
import hmac
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from common import emit, row

from clusterfsm.states import seal
from clusterfsm.states.codec import (
    MAX_APP_PAYLOAD,
    MESSAGE_TYPES,
    AppData,
    ClusterMsgType,
    Frame,
    FrameDecoder,
    Hello,
    Ping,
    decode_message,
    encode_message,
)

BIG = MAX_APP_PAYLOAD  # the largest APP_DATA frame: 3 + 65536 payload bytes
HEARTBEAT_TARGET = 50_000
THROUGHPUT_TARGET = 300.0  # MB/s


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``fn`` (best of 3 slices of ``seconds / 3``)."""
    best = 0.0
    for _ in range(3):
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / 3:
            for _ in range(20):
                fn()
            n += 20
        best = max(best, n / elapsed)
    return best


def sealed_pair() -> tuple[seal.Sealer, seal.Opener]:
    psk = seal.derive_psk(bytes(32))
    pro = seal.prologue(b"bench")
    i, r = seal.InitiatorHandshake(psk, pro), seal.ResponderHandshake(psk, pro)
    r.read_message1(i.write_message1(b""))
    message2, joiner = r.write_message2(b"")
    _, coordinator = i.read_message2(message2)
    return coordinator.sealer(), joiner.opener()


def frame_paths(msg: Ping | AppData) -> tuple[Callable[[], object], Callable[[], object]]:
    """(unsealed round trip, sealed round trip) of ``msg``, each ending in the message."""
    decoder = FrameDecoder()
    sealer, opener = sealed_pair()

    def unsealed() -> object:
        (frame,) = decoder.feed(encode_message(msg))
        return decode_message(frame)

    def sealed() -> object:
        wire = sealer.seal(msg.TYPE, msg.encode())
        msg_type, payload = opener.open(wire[8:])
        return MESSAGE_TYPES[ClusterMsgType(msg_type)].decode(payload)

    assert unsealed() == msg and sealed() == msg
    assert decode_message(Frame(msg.TYPE, msg.encode())) == msg
    return unsealed, sealed


def aead_rates(seconds: float) -> dict[tuple[str, int], float]:
    """Encrypt+decrypt per second for each AEAD and size."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    out: dict[tuple[str, int], float] = {}
    for name, cls in (("AES-256-GCM", AESGCM), ("ChaCha20-Poly1305", ChaCha20Poly1305)):
        aead = cls(bytes(32))
        for size in (9, BIG + 1):
            data, ad, counter = bytes(size), bytes(8), [0]

            def go(aead: AESGCM | ChaCha20Poly1305 = aead, data: bytes = data,
                   ad: bytes = ad, counter: list[int] = counter) -> object:
                counter[0] += 1
                nonce = counter[0].to_bytes(12, "big")
                return aead.decrypt(nonce, aead.encrypt(nonce, data, ad), ad)

            out[name, size] = rate(go, seconds / 4)
    return out


def handshake_rates(seconds: float) -> tuple[float, float]:
    """Whole Noise handshakes per second (both sides, fresh X25519 keys), and protocol
    1's cryptographic work per handshake: four HMAC-SHA256 over its 111-byte transcripts
    (each side made one MAC and checked the other's)."""
    key, node_c = bytes(32), bytes(range(16))
    psk = seal.derive_psk(key)
    hello = Hello(2, bytes(range(16, 32)), 1, 2, bytes(16), "clusterfsm/0.1", 0).encode()
    transcript = b"clusterfsm/v1/coordinator" + bytes(86)

    def noise() -> object:
        pro = seal.prologue(hello)  # what a coordinator and a joiner each compute
        i, r = seal.InitiatorHandshake(psk, pro), seal.ResponderHandshake(psk, pro)
        r.read_message1(i.write_message1(node_c + b"\x02"))
        message2, _ = r.write_message2(b"\x17\x70")
        return i.read_message2(message2)

    def hmac_v1() -> object:
        return [hmac.new(key, transcript, hashlib.sha256).digest() for _ in range(4)]

    return rate(noise, seconds), rate(hmac_v1, seconds)


BASE_IMPORTS = "import trio, attrs"
IMPORTS = ("from cryptography.hazmat.primitives.ciphers.aead import AESGCM; "
           "from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey; "
           "from cryptography.hazmat.primitives.kdf.hkdf import HKDF; "
           "from cryptography.hazmat.primitives import hashes; "
           "from cryptography.exceptions import InvalidTag")


def import_ms(runs: int) -> tuple[float, float]:
    """Median wall ms of a fresh interpreter that imports trio and attrs (as every rank
    does) and then the seal's modules, and of one that stops after trio and attrs
    (interleaved, same run)."""
    with_crypto, bare = [], []
    for _ in range(runs):
        for code, out in ((f"{BASE_IMPORTS}; {IMPORTS}", with_crypto), (BASE_IMPORTS, bare)):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            out.append((time.perf_counter() - start) * 1000)
    return statistics.median(with_crypto), statistics.median(bare)


def measure(seconds: float, import_runs: int) -> list[dict[str, object]]:
    rows = []
    for label, msg, unit in (("heartbeat frames (Ping, 8-byte payload)", Ping(123456), "f"),
                             ("64 KiB frames (APP_DATA)",
                              AppData(0, 1, False, bytes(BIG - 3)), "MB")):
        unsealed, sealed = frame_paths(msg)
        r_plain, r_sealed = rate(unsealed, seconds), rate(sealed, seconds)
        if unit == "f":
            print(f"{label:<40} sealed {r_sealed:10,.0f} frames/s ({1e6 / r_sealed:5.2f} us); "
                  f"unsealed {r_plain:10,.0f}/s; ratio {r_sealed / r_plain:.2f}x")
            rows.append(row(f"Seal: {label}, seal+open+decode", f"{r_sealed:,.0f} frames/s",
                            f"unsealed {r_plain:,.0f}/s", f"{r_sealed / r_plain:.2f}x",
                            f">= {HEARTBEAT_TARGET:,} frames/s",
                            r_sealed >= HEARTBEAT_TARGET))
        else:
            mb_sealed, mb_plain = r_sealed * BIG / 1e6, r_plain * BIG / 1e6
            print(f"{label:<40} sealed {mb_sealed:10,.0f} MB/s; unsealed {mb_plain:10,.0f} MB/s;"
                  f" ratio {mb_sealed / mb_plain:.2f}x")
            rows.append(row(f"Seal: {label}, seal+open+decode", f"{mb_sealed:,.0f} MB/s",
                            f"unsealed {mb_plain:,.0f} MB/s", f"{mb_sealed / mb_plain:.2f}x",
                            f">= {THROUGHPUT_TARGET:.0f} MB/s", mb_sealed >= THROUGHPUT_TARGET))

    aead = aead_rates(seconds)
    for size, what in ((9, "9-byte"), (BIG + 1, "64 KiB")):
        gcm, chacha = aead["AES-256-GCM", size], aead["ChaCha20-Poly1305", size]
        print(f"AEAD {what:<8} encrypt+decrypt: AES-256-GCM {gcm:10,.0f}/s, "
              f"ChaCha20-Poly1305 {chacha:10,.0f}/s; ratio {gcm / chacha:.2f}x")
        rows.append(row(f"Seal: AEAD, {what} encrypt+decrypt, AES-256-GCM (chosen)",
                        f"{gcm:,.0f}/s", f"ChaCha20-Poly1305 {chacha:,.0f}/s",
                        f"{gcm / chacha:.2f}x", "(measured, no target)", None))

    noise, hmac_v1 = handshake_rates(seconds)
    print(f"handshake, both sides: Noise_NNpsk0 {1e3 / noise:.3f} ms; protocol 1's 4 HMAC "
          f"{1e3 / hmac_v1:.3f} ms; ratio {hmac_v1 / noise:.2f}x the time")
    rows.append(row("Seal: handshake, both sides (Noise_NNpsk0, X25519)",
                    f"{1e3 / noise:.3f} ms", f"protocol 1's 4 HMAC {1e3 / hmac_v1:.3f} ms",
                    f"{hmac_v1 / noise:.2f}x the time", "(counts in time to group)", None))

    with_crypto, bare = import_ms(import_runs)
    extra = with_crypto - bare
    print(f"import of the seal's cryptography modules: {extra:.1f} ms "
          f"(after trio and attrs: {with_crypto:.1f} ms, without: {bare:.1f} ms)")
    rows.append(row("Seal: import of cryptography (AESGCM, X25519, HKDF)", f"{extra:.1f} ms",
                    f"python -c 'import trio, attrs' {bare:.1f} ms",
                    f"+{extra / bare * 100:.0f}%",
                    "(counts in time to group)", None))
    return rows


def main(argv: list[str]) -> None:
    seconds = float(argv[argv.index("--seconds") + 1]) if "--seconds" in argv else 1.5
    runs = int(argv[argv.index("--import-runs") + 1]) if "--import-runs" in argv else 7
    emit(measure(seconds, runs), argv)


if __name__ == "__main__":
    main(sys.argv[1:])
