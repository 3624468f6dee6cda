"""examples/provider's input handling: request lines are hostile until checked, and the
app-channel messages survive a round trip and come only from the expected rank (no
MLX, no processes)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import trio
import trio.testing

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "provider"


@pytest.fixture
def ex() -> Iterator[tuple[ModuleType, ModuleType]]:
    """The example's app_messages and provider modules (they import each other by
    plain name, as when run as a script)."""
    sys.path.insert(0, str(EXAMPLE))
    try:
        import app_messages
        import provider

        yield app_messages, provider
    finally:
        sys.path.remove(str(EXAMPLE))


def test_request_lines(ex: tuple[ModuleType, Any]) -> None:
    m, _ = ex
    req = m.parse_request(b'{"id": "a", "prompt": "hi", "max_tokens": 3}')
    assert req == m.Generate("a", "hi", 3)
    plain = m.parse_request("just words \u00e9".encode())
    assert plain.prompt == "just words \u00e9"
    assert plain.max_tokens == m.DEFAULT_MAX_TOKENS
    bad_lines = {
        b"\xff\xfe": "not UTF-8",
        b"{nope": "bad JSON",
        b'{"prompt": "x"': "bad JSON",
        b"{}": "prompt must be",
        b'{"prompt": 5}': "prompt must be",
        b'{"prompt": "x", "max_tokens": true}': "max_tokens must be",
        b'{"prompt": "x", "max_tokens": 0}': "max_tokens must be",
        b'{"prompt": "x", "max_tokens": 99999}': "max_tokens must be",
        b'{"prompt": "x", "max_tokens": 1.5}': "max_tokens must be",
        b'{"id": 7, "prompt": "x"}': "id must be",
        b'{"id": "' + b"i" * 65 + b'", "prompt": "x"}': "id must be",
        b'{"prompt": "' + b"p" * 4097 + b'"}': "prompt must be",
    }
    for line, problem in bad_lines.items():
        with pytest.raises(m.BadRequest, match=problem):
            m.parse_request(line)
    with pytest.raises(m.BadRequest) as refused:
        m.parse_request(b'{"id": "b", "prompt": ""}')
    assert refused.value.request_id == "b"


def test_broadcast_messages_round_trip(ex: tuple[ModuleType, Any]) -> None:
    m, _ = ex
    for message in (m.Generate("a", "p\u00e9\n\"", 9), m.Stop(), m.Stopped()):
        assert m.decode(m.encode(message)) == message
    for data in (b"\x90\xbb", b"[1]", b'{"kind": "dance"}',
                 b'{"kind": "generate", "id": "a", "prompt": "x", "max_tokens": -1}',
                 b'{"kind": "idle"}'):
        with pytest.raises(m.BadMessage):
            m.decode(data)


def test_requests_come_from_rank0_only(ex: tuple[ModuleType, Any]) -> None:
    m, _ = ex
    import request_channel

    stop = m.encode(m.Stop())
    assert request_channel.checked(0, stop) == m.Stop()
    with pytest.raises(m.BadMessage, match="from rank 2, expected rank 0"):
        request_channel.checked(2, stop)
    assert request_channel.checked(2, m.encode(m.Stopped()), None) == m.Stopped()


@pytest.mark.parametrize("piece", [1000, 10**6])  # pieces smaller than a line, or all at once
async def test_read_lines_bounds_every_line(ex: tuple[ModuleType, Any], piece: int) -> None:
    m, provider = ex
    limit = m.MAX_LINE_BYTES
    send, receive = trio.testing.memory_stream_one_way_pair()
    data = (b"first\n\n   \n" + b"x" * (3 * limit) + b"\nsecond\n" + b"y" * (limit + 1)
            + b"\nlast without newline")

    async def feed() -> None:
        for at in range(0, len(data), piece):
            await send.send_all(data[at:at + piece])
        await send.aclose()

    got: list[Any] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        async for item in provider.read_lines(receive):
            got.append(item)
    assert got[0] == b"first"
    assert isinstance(got[1], m.BadRequest)
    assert got[2] == b"second"
    assert isinstance(got[3], m.BadRequest)
    assert got[4:] == [b"last without newline"]
