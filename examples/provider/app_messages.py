"""What rank 0 tells the other ranks, and how a request line becomes one.

The messages of the app channel (request_channel.py), as compact JSON:

- ``Generate`` (rank 0 to every rank): a request; every rank runs the same generation
  (tensor parallel);
- ``Stop`` (rank 0 to every rank): rank 0's input ended; every rank leaves the
  cluster (GOODBYE) and exits;
- ``Stopped`` (every other rank to rank 0): the answer to ``Stop``; rank 0 leaves the
  cluster once every rank has sent it.

Requests come to rank 0 one per line: a JSON object
``{"id": "a", "prompt": "...", "max_tokens": 64}`` (``id`` and ``max_tokens``
optional) or a plain line, which is the prompt. Input is hostile until checked: a
line that is too long, not UTF-8, bad JSON or out of range is a ``BadRequest``
(answered on rank 0, never broadcast).
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import attrs

MAX_LINE_BYTES = 16 * 1024
MAX_PROMPT_CHARS = 4096
MAX_TOKENS_LIMIT = 4096
DEFAULT_MAX_TOKENS = 64
MAX_ID_CHARS = 64


@attrs.frozen
class Generate:
    request_id: str
    prompt: str
    max_tokens: int


@attrs.frozen
class Stop:
    pass


@attrs.frozen
class Stopped:
    pass


Message = Generate | Stop | Stopped


@attrs.frozen(auto_exc=True)
class BadRequest(Exception):
    """A request line rank 0 refuses; ``request_id`` when it could be read."""

    problem: str
    request_id: str | None = None

    def __str__(self) -> str:
        return self.problem


@attrs.frozen(auto_exc=True)
class BadMessage(Exception):
    """A message that is not one of ours: the ranks disagree about the protocol."""

    problem: str

    def __str__(self) -> str:
        return f"bad app message: {self.problem}"


def encode(message: Message) -> bytes:
    body: dict[str, Any]
    if isinstance(message, Generate):
        body = {"kind": "generate", "id": message.request_id, "prompt": message.prompt,
                "max_tokens": message.max_tokens}
    elif isinstance(message, Stop):
        body = {"kind": "stop"}
    else:
        body = {"kind": "stopped"}
    return json.dumps(body, separators=(",", ":")).encode()


def decode(data: bytes) -> Message:
    try:
        body = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadMessage(f"not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadMessage("not an object")
    kind = body.get("kind")
    if kind == "stop":
        return Stop()
    if kind == "stopped":
        return Stopped()
    if kind == "generate":
        try:
            return _checked(body.get("id"), body.get("prompt"), body.get("max_tokens"))
        except BadRequest as exc:
            raise BadMessage(exc.problem) from exc
    raise BadMessage(f"unknown kind {kind!r}")


_ids = itertools.count(1)


def parse_request(line: bytes) -> Generate:
    """One input line (without its newline) as a request, or ``BadRequest``."""
    try:
        text = line.decode()
    except UnicodeDecodeError as exc:
        raise BadRequest("the line is not UTF-8") from exc
    if not text.lstrip().startswith("{"):
        return _checked(None, text, None)
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"bad JSON: {exc.msg}") from exc
    if not isinstance(body, dict):
        raise BadRequest("a JSON request must be an object")
    return _checked(body.get("id"), body.get("prompt"), body.get("max_tokens"))


def _checked(request_id: object, prompt: object, max_tokens: object) -> Generate:
    if request_id is None:
        request_id = f"r{next(_ids)}"
    if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_ID_CHARS:
        raise BadRequest(f"id must be a string of 1-{MAX_ID_CHARS} characters")
    if not isinstance(prompt, str) or not 0 < len(prompt) <= MAX_PROMPT_CHARS:
        raise BadRequest(f"prompt must be a string of 1-{MAX_PROMPT_CHARS} characters",
                         request_id)
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
            or not 1 <= max_tokens <= MAX_TOKENS_LIMIT):
        raise BadRequest(f"max_tokens must be an integer in 1..{MAX_TOKENS_LIMIT}", request_id)
    return Generate(request_id, prompt, max_tokens)
