"""Codec throughput: frames encoded and decoded per second.

For the bootstrap frame (0x07, ``BootstrapPayload`` with a 4-rank ring topology)
and the heartbeats (``Ping``/``Pong``): ``encode_message`` then ``FrameDecoder.feed``
and ``decode_message``, one frame at a time. Baseline, same run and same content:
``json.dumps`` + ``json.loads`` of an equivalent dict (what a naive wire format does).

Run: python bench/codec_bench.py [--seconds 0.5] [--json OUT]
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

from common import emit, row

from clusterfsm.states.codec import (
    BootstrapPayload,
    FrameDecoder,
    Ping,
    Pong,
    WireBackend,
    decode_message,
    encode_message,
)


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``fn`` (best of 3 slices of ``seconds / 3``)."""
    best = 0.0
    for _ in range(3):
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / 3:
            for _ in range(100):
                fn()
            n += 100
        best = max(best, n / elapsed)
    return best


def measure(seconds: float) -> list[dict[str, object]]:
    sid = bytes(range(16))
    topology = tuple((f"10.0.0.{r + 1}:{50000 + r}",) for r in range(4))
    boot = BootstrapPayload(coordinator_port=0, session_id=sid, backend=WireBackend.RING,
                                 world_size=4, topology=topology)
    boot_dict = {"type": 7, "coordinator_port": 0, "session_id": sid.hex(), "backend": "ring",
                 "world_size": 4, "topology": [list(t) for t in topology]}
    decoder = FrameDecoder()

    def roundtrip(msg: object) -> Callable[[], object]:
        def go() -> object:
            (frame,) = decoder.feed(encode_message(msg))  # type: ignore[arg-type]
            return decode_message(frame)
        return go

    def json_roundtrip(obj: object) -> Callable[[], object]:
        return lambda: json.loads(json.dumps(obj))

    assert roundtrip(boot)() == boot and roundtrip(Ping(7))() == Ping(7)
    rows = []
    for name, ours, base in (
        ("bootstrap frame 0x07 (4-rank ring)", roundtrip(boot), json_roundtrip(boot_dict)),
        ("heartbeat Ping", roundtrip(Ping(123456)), json_roundtrip({"type": 5, "seq": 123456})),
        ("heartbeat Pong", roundtrip(Pong(123456)), json_roundtrip({"type": 6, "seq": 123456})),
    ):
        r_ours, r_base = rate(ours, seconds), rate(base, seconds)
        size = len(encode_message(boot if "0x07" in name else Ping(123456)))
        print(f"{name:<36} {r_ours:12,.0f} encode+decode/s ({1e6 / r_ours:6.2f} us, "
              f"{size} B on the wire); json.dumps+loads {r_base:12,.0f}/s; "
              f"ratio {r_ours / r_base:.2f}x")
        rows.append(row(f"Codec: {name}, encode+decode", f"{r_ours:,.0f} frames/s",
                        f"json dumps+loads {r_base:,.0f}/s", f"{r_ours / r_base:.2f}x",
                        "(measured, no target)", None))
    return rows


def main(argv: list[str]) -> None:
    seconds = float(argv[argv.index("--seconds") + 1]) if "--seconds" in argv else 1.5
    emit(measure(seconds), argv)


if __name__ == "__main__":
    main(sys.argv[1:])
