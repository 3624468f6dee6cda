"""One request's generation on one rank, leaving no MLX work in flight behind it.

The hazard this module exists for (docs/embedding.md, "Collectives from your app"):
mlx-lm's ``generate_step`` keeps one step ahead. Before it hands out token ``n`` it has
already queued step ``n + 1`` on its own stream (``mlx_lm.generate.generation_stream``)
with ``mx.async_eval``. When the caller stops (``max_tokens`` reached, ``</s>``, a
client gone), that extra step is still in flight, and in a tensor-parallel model it
contains collectives (an ``all_sum`` per sharded layer). The app's next collective, say
the broadcast of the next request on another stream, can then run while that step's
collectives run, and the two pair up differently on each rank: rank 0's broadcast meets
rank 1's ``all_sum`` of activations. The result is wrong logits, a broadcast that
decodes to garbage, or a ``std::bad_cast`` out of MLX. ``stream_generate`` synchronizes
that stream when it ends only where the device reports a wired-memory limit (Metal),
never on a CPU-only machine, and only when the generator is run to its end.

The fix is one line: ``mx.synchronize(generation_stream)`` before this job returns,
whatever way it ends. ``generation_stream`` is a thread-local stream, so that must
run in the thread that generated, which is why it is here and not in the caller.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

import attrs

#: Called in the worker thread for every token: (token id, text segment).
TokenSink = Callable[[int, str], None]


@attrs.frozen
class GenerationResult:
    tokens: tuple[int, ...]
    finish_reason: str
    #: Seconds from ``since`` to the first token (broadcast, prefill and one step).
    first_token_s: float
    #: Decoding rate after the first token (tokens per second; 0 for one token).
    tokens_per_s: float

    @property
    def digest(self) -> str:
        """A short hash of the token ids, for comparing ranks and runs."""
        data = b"".join(t.to_bytes(4, "little") for t in self.tokens)
        return hashlib.sha256(data).hexdigest()[:16]


def generate_blocking(model: Any, tokenizer: Any, prompt: str, max_tokens: int,
                      on_token: TokenSink | None = None,
                      since: float | None = None) -> GenerationResult:
    """Greedy generation of up to ``max_tokens`` tokens; run it in a worker thread.

    ``since`` (a ``time.perf_counter()`` value, default now) is where the time to the
    first token is counted from: rank 0 passes the moment it took the request."""
    import mlx.core as mx
    from mlx_lm.generate import generation_stream, stream_generate

    tokens: list[int] = []
    finish = "length"
    started = time.perf_counter() if since is None else since
    first_at = last_at = started
    try:
        for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
            if response.finish_reason == "stop":  # the final response repeats </s>
                finish = "stop"
                break
            now = time.perf_counter()
            if not tokens:
                first_at = now
            last_at = now
            tokens.append(response.token)
            if on_token is not None:
                on_token(response.token, response.text)
    finally:
        # The step generate_step queued ahead is still running, with its collectives.
        # Wait for it here, in this thread (generation_stream is per thread), so the
        # next collective of any rank pairs with the same collective everywhere.
        mx.synchronize(generation_stream)
    rate = (len(tokens) - 1) / (last_at - first_at) if len(tokens) > 1 else 0.0
    return GenerationResult(tuple(tokens), finish, first_at - started, rate)
