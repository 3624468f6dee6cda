"""A small provider: one mlx-lm model, tensor parallel over a clusterfsm group.

Every rank runs this script. They bootstrap one MLX group with clusterfsm, load the
model sharded over it (``mlx_lm.utils.sharded_load``, which calls ``Model.shard``),
and then serve: rank 0 reads requests from its stdin, one per line, and broadcasts
each on clusterfsm's app channel (``cluster.broadcast``, request_channel.py); the other
ranks take them from ``cluster.messages()``; every rank generates (each holds half of
every layer; the layers' ``all_sum`` joins the halves); rank 0 writes the tokens to
stdout as JSON lines as they come::

    python tiny_llama.py /tmp/tiny                       # a model (no download)
    clusterfsm keygen /tmp/k
    python provider.py --model /tmp/tiny --rank 1 --world-size 2 \\
        --key-file /tmp/k --peer 127.0.0.1:7700 &
    echo '{"id": "a", "prompt": "hello", "max_tokens": 8}' | \\
        python provider.py --model /tmp/tiny --rank 0 --world-size 2 \\
        --key-file /tmp/k --listen 127.0.0.1:7700

``--single`` runs the same loop in one process without a cluster (the reference the
tensor-parallel tokens are compared with). When rank 0's stdin ends, it broadcasts
``Stop``, every rank answers ``Stopped``, leaves the cluster and exits 0. Any failure
(a lost peer, a deadline) exits 1; the group cannot be used again in this process, so
a supervisor starts a new one.

Output lines on rank 0: ``{"id", "token", "text"}`` per token, then ``{"id", "done":
true, "tokens", "finish", "digest", "ttft_s", "tokens_per_s"}``, or ``{"id", "error"}``
for a refused request. The other ranks print one line per request on stderr, with
the same digest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import attrs
import trio
from app_messages import (
    MAX_LINE_BYTES,
    BadMessage,
    BadRequest,
    Generate,
    Message,
    Stop,
    Stopped,
    parse_request,
)
from request_channel import broadcast, checked, tell_rank0, wait_stopped
from tp_generation import GenerationResult, TokenSink, generate_blocking

from clusterfsm.states.api import Cluster
from clusterfsm.states.config import BACKENDS, Address, ClusterConfig
from clusterfsm.states.keys import load_key

#: A generation's deadline: this plus ``PER_TOKEN_DEADLINE`` per requested token.
GENERATION_DEADLINE = 30.0
PER_TOKEN_DEADLINE = 0.25
#: How long loading (and sharding) the model may take.
LOAD_DEADLINE = 120.0
#: Output lines waiting to be written: a slow stdout slows generation, no more.
OUTPUT_BUFFER = 64


@attrs.frozen(auto_exc=True)
class DeadlineExceeded(Exception):
    what: str
    seconds: float

    def __str__(self) -> str:
        return f"{self.what} took longer than {self.seconds:g} s"


@attrs.frozen(auto_exc=True)
class ClusterLost(Exception):
    """The group is no longer whole (a peer lost, or gone before rank 0 said stop)."""

    state: str
    error: BaseException | None

    def __str__(self) -> str:
        return f"the cluster is {self.state}" + (f": {self.error}" if self.error else "")


@attrs.frozen
class Engine:
    """What every rank needs to generate: the (sharded) model, its tokenizer, the
    cluster (``None`` in a one-process run) and this rank's number. ``stopping`` is set
    once rank 0 sends ``Stop`` (or this rank receives it): from then on a peer leaving
    is expected."""

    model: Any
    tokenizer: Any
    cluster: Cluster[Any] | None
    rank: int
    stopping: trio.Event = attrs.field(factory=trio.Event)


async def in_worker(what: str, seconds: float, fn: Callable[..., Any], *args: Any) -> Any:
    """Run blocking MLX work in a trio worker thread, with a deadline.

    A collective cannot be interrupted: on the deadline we stop waiting for it
    (``abandon_on_cancel``) and fail; the caller then ends the process.
    """
    try:
        with trio.fail_after(seconds):
            return await trio.to_thread.run_sync(partial(fn, *args), abandon_on_cancel=True)
    except trio.TooSlowError as exc:
        raise DeadlineExceeded(what, seconds) from exc


async def generate(engine: Engine, request: Generate, since: float,
                   on_token: TokenSink | None = None) -> GenerationResult:
    seconds = GENERATION_DEADLINE + PER_TOKEN_DEADLINE * request.max_tokens
    result: GenerationResult = await in_worker(
        f"generating {request.request_id!r}", seconds, generate_blocking,
        engine.model, engine.tokenizer, request.prompt, request.max_tokens, on_token, since)
    return result


async def announce(engine: Engine, message: Message) -> None:
    """Rank 0: send ``message`` to every other rank (nothing to do in one process).

    The other ranks may start generating a moment later than rank 0: the model's
    first ``all_sum`` waits for them, within the generation's deadline."""
    if isinstance(message, Stop):
        engine.stopping.set()
    if engine.cluster is not None:
        await broadcast(engine.cluster, message)


# -- rank 0 -----------------------------------------------------------------------------

async def read_lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[bytes | BadRequest]:
    """Lines of ``stream`` without their newline; a line over ``MAX_LINE_BYTES`` is
    skipped whole and given as a ``BadRequest`` (never buffered beyond the limit)."""
    buffer = bytearray()
    skipping = False
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            if buffer and not skipping:
                yield bytes(buffer)
            return
        buffer += chunk
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                if len(buffer) > MAX_LINE_BYTES:
                    buffer.clear()
                    if not skipping:
                        skipping = True
                        yield BadRequest(f"line longer than {MAX_LINE_BYTES} bytes")
                break
            line = bytes(buffer[:end])
            del buffer[:end + 1]
            if skipping:
                skipping = False
            elif len(line) > MAX_LINE_BYTES:
                yield BadRequest(f"line longer than {MAX_LINE_BYTES} bytes")
            elif line.strip():
                yield line


async def take_requests(stream: trio.abc.ReceiveStream,
                        requests: trio.MemorySendChannel[Generate],
                        output: trio.MemorySendChannel[dict[str, Any]]) -> None:
    """Parse input lines; refuse bad ones on the output, pass good ones on."""
    async with requests:
        async for item in read_lines(stream):
            try:
                if isinstance(item, BadRequest):
                    raise item
                request = parse_request(item)
            except BadRequest as bad:
                await output.send({"id": bad.request_id, "error": bad.problem})
                continue
            await requests.send(request)


async def write_output(lines: trio.MemoryReceiveChannel[dict[str, Any]]) -> None:
    async with lines:
        async for line in lines:
            sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()


async def serve_rank0(engine: Engine, stdin: trio.abc.ReceiveStream) -> None:
    """Take requests, broadcast each, generate, stream the tokens out; at EOF
    broadcast ``Stop`` and wait for every rank's ``Stopped``."""
    request_in, request_out = trio.open_memory_channel[Generate](0)
    output_in, output_out = trio.open_memory_channel[dict[str, Any]](OUTPUT_BUFFER)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(take_requests, stdin, request_in, output_in.clone())
        nursery.start_soon(write_output, output_out)
        async with output_in:
            # Waiting for input needs no deadline: rank 0 serves until its stdin ends,
            # and a lost peer ends the process (run_rank's wait_lost watcher).
            async for request in request_out:
                since = time.perf_counter()
                await announce(engine, request)
                await serve_one(engine, request, since, output_in)
        await announce(engine, Stop())
        if engine.cluster is not None:
            await wait_stopped(engine.cluster)
        nursery.cancel_scope.cancel()


async def serve_one(engine: Engine, request: Generate, since: float,
                    output: trio.MemorySendChannel[dict[str, Any]]) -> None:
    def on_token(token: int, text: str) -> None:  # in the worker thread
        trio.from_thread.run(output.send, {"id": request.request_id, "token": token,
                                           "text": text})

    result = await generate(engine, request, since, on_token)
    await output.send({"id": request.request_id, "done": True, "tokens": len(result.tokens),
                       "finish": result.finish_reason, "digest": result.digest,
                       "ttft_s": round(result.first_token_s, 6),
                       "tokens_per_s": round(result.tokens_per_s, 1)})


# -- the other ranks --------------------------------------------------------------------

async def serve_worker(engine: Engine) -> None:
    """Follow rank 0: generate what it sends, until ``Stop`` (answered ``Stopped``).

    The wait for rank 0's next message has no deadline of its own and needs none: no
    collective is pending, heartbeats keep both ranks alive (their own thread), and if
    rank 0 goes away the cluster leaves ``ready`` within ``peer_lost_after``, which
    ends the process (run_rank's ``wait_lost`` watcher)."""
    cluster = engine.cluster
    assert cluster is not None
    async for sender, data in cluster.messages():
        message = checked(sender, data)
        if isinstance(message, Stop):
            engine.stopping.set()
            await tell_rank0(cluster, Stopped())
            return
        if not isinstance(message, Generate):
            raise BadMessage(f"rank 0 sent {type(message).__name__}")
        result = await generate(engine, message, time.perf_counter())
        sys.stderr.write(f"rank {engine.rank}: {message.request_id}: "
                         f"{len(result.tokens)} tokens ({result.finish_reason}), "
                         f"digest {result.digest}\n")
    raise ClusterLost(cluster.state, cluster.error)


# -- setup --------------------------------------------------------------------------------

def load_single(path: str) -> tuple[Any, Any]:
    from mlx_lm import load

    model, tokenizer = load(path)[:2]
    return model, tokenizer


def load_sharded(path: str, group: Any) -> tuple[Any, Any]:
    """``sharded_load`` loads lazily, calls ``model.shard(group)``, then evaluates only
    this rank's part; it ends with an ``all_sum`` across the group (a barrier)."""
    from mlx_lm.utils import sharded_load

    model, tokenizer = sharded_load(path, tensor_group=group,
                                    tokenizer_config={"trust_remote_code": False})[:2]
    return model, tokenizer


async def serve(engine: Engine) -> None:
    if engine.rank == 0:
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        async with stdin:
            await serve_rank0(engine, stdin)
    else:
        await serve_worker(engine)


async def run_single(model_path: str) -> None:
    model, tokenizer = await in_worker("loading the model", LOAD_DEADLINE, load_single,
                                       model_path)
    await serve(Engine(model, tokenizer, None, 0))


async def run_rank(config: ClusterConfig, model_path: str) -> None:
    from clusterfsm.states.api import bootstrap_cluster

    stopping = trio.Event()
    async with bootstrap_cluster(config) as cluster:
        sys.stderr.write(f"rank {cluster.rank}: ready, {cluster.size} ranks, "
                         f"session {cluster.session_id.hex()[:8]}\n")
        async with trio.open_nursery() as nursery:
            async def stop_if_lost() -> None:
                error = await cluster.wait_lost()
                if not stopping.is_set():
                    raise ClusterLost(cluster.state, error)

            nursery.start_soon(stop_if_lost)
            model, tokenizer = await in_worker("loading the sharded model", LOAD_DEADLINE,
                                               load_sharded, model_path, cluster.group)
            await serve(Engine(model, tokenizer, cluster, cluster.rank, stopping))
            nursery.cancel_scope.cancel()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an mlx-lm model folder")
    parser.add_argument("--single", action="store_true",
                        help="one process, no cluster (the reference run)")
    parser.add_argument("--rank", type=int)
    parser.add_argument("--world-size", type=int)
    parser.add_argument("--key-file")
    parser.add_argument("--listen", type=Address.parse, help="rank 0: HOST:PORT")
    parser.add_argument("--peer", type=Address.parse, help="other ranks: rank 0's HOST:PORT")
    parser.add_argument("--backend", choices=BACKENDS, default="ring")
    args = parser.parse_args(argv)
    if not args.single and (args.rank is None or args.world_size is None
                            or args.key_file is None):
        parser.error("give --single, or --rank, --world-size and --key-file")
    return args


def leaves(exc: BaseException) -> list[BaseException]:
    """The errors inside trio's exception groups (a nursery wraps what a task raised)."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        if args.single:
            trio.run(run_single, args.model)
        else:
            config = ClusterConfig(
                rank=args.rank, world_size=args.world_size, key=load_key(args.key_file),
                listen=args.listen, peers=(args.peer,) if args.peer else (),
                backend=args.backend)
            trio.run(run_rank, config, args.model)
    except Exception as exc:  # noqa: BLE001 - the app's one place that reports a failure
        for leaf in leaves(exc):
            sys.stderr.write(f"provider: {type(leaf).__name__}: {leaf}\n")
        sys.stderr.flush()
        sys.stdout.flush()
        # MLX may still be blocked in a collective of a broken group; a normal
        # interpreter exit could wait for it. The process is done with the group.
        os._exit(1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
