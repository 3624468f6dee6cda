"""The provider example: 2-rank tensor-parallel generation against one process.

Builds the tiny random-weight llama of examples/provider (4 layers, hidden size 128),
then alternates A B A B ...: A = two ranks bootstrapped by clusterfsm over the loopback
ring, the model sharded over them; B = one process with the whole model (``--single``,
no cluster). Each run gets one warm-up request (16 tokens, not counted) and then
``--requests`` requests of ``--tokens`` greedy tokens. Reported per request, from
rank 0's output: the decode rate after the first token and the time to the first
token (from rank 0 taking the request: the broadcast to every rank, the prefill and
one step). A run's tokens must equal the other configuration's, or the bench fails.

Run: python bench/provider_tp.py [--runs 3] [--tokens 256] [--requests 3] [--json OUT]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import ROOT, emit, median, row

from clusterfsm.states.demo import free_port
from clusterfsm.states.keys import write_key

EXAMPLE = ROOT / "examples" / "provider"
TIMEOUT = 300


def _requests(count: int, tokens: int) -> bytes:
    items = [{"id": "warm-up", "prompt": "warm up", "max_tokens": 16}]
    items += [{"id": f"q{i}", "prompt": f"request number {i}: tell me more",
               "max_tokens": tokens} for i in range(count)]
    return "".join(json.dumps(item) + "\n" for item in items).encode()


def _run(argvs: list[list[str]], stdin: bytes, env: dict[str, str]) -> str:
    """Start every argv at once, feed ``stdin`` to the first; its stdout."""
    procs = [subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env) for argv in argvs]
    try:
        outs = [b""] * len(procs)
        outs[0], err0 = procs[0].communicate(stdin, timeout=TIMEOUT)
        for i, proc in enumerate(procs[1:], 1):
            outs[i], _ = proc.communicate(timeout=TIMEOUT)
        for proc in procs:
            if proc.returncode != 0:
                raise RuntimeError(f"provider failed: {err0.decode()}")
        return outs[0].decode()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _results(stdout: str) -> tuple[list[dict[str, Any]], list[str]]:
    ends = [item for item in map(json.loads, stdout.splitlines()) if item.get("done")]
    counted = [item for item in ends if item["id"] != "warm-up"]
    return counted, [item["digest"] for item in ends]


def measure(runs: int, tokens: int, requests: int) -> list[dict[str, Any]]:
    tp: list[dict[str, Any]] = []
    single: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-provider-") as tmp:
        env = dict(os.environ, TMPDIR=tmp, HF_HUB_OFFLINE="1")
        model = Path(tmp) / "tiny-llama"
        subprocess.run([sys.executable, str(EXAMPLE / "tiny_llama.py"), str(model)],
                       check=True, capture_output=True, env=env, timeout=TIMEOUT)
        key = write_key(Path(tmp) / "cluster.key")
        base = [sys.executable, str(EXAMPLE / "provider.py"), "--model", str(model)]
        stdin = _requests(requests, tokens)
        reference: list[str] | None = None
        for run in range(runs):
            port = free_port()
            ring = ["--world-size", "2", "--key-file", str(key)]
            for name, argvs in (
                ("2-rank TP", [[*base, "--rank", "0", *ring, "--listen", f"127.0.0.1:{port}"],
                               [*base, "--rank", "1", *ring, "--peer", f"127.0.0.1:{port}"]]),
                ("1 process", [[*base, "--single"]]),
            ):
                counted, digests = _results(_run(argvs, stdin, env))
                if reference is None:
                    reference = digests
                if digests != reference:
                    raise RuntimeError(f"{name} run {run}: tokens differ: {digests} "
                                       f"!= {reference}")
                (tp if name == "2-rank TP" else single).extend(counted)
                rate = median([item["tokens_per_s"] for item in counted])
                ttft = median([item["ttft_s"] for item in counted]) * 1e3
                print(f"run {run} {name}: {rate:.0f} tokens/s, "
                      f"time to first token {ttft:.1f} ms", flush=True)

    def rate(items: list[dict[str, Any]]) -> float:
        return median([item["tokens_per_s"] for item in items])

    def ttft_ms(items: list[dict[str, Any]]) -> float:
        return median([item["ttft_s"] for item in items]) * 1e3

    n = len(tp)
    print(f"2-rank TP: {rate(tp):.0f} tokens/s, first token {ttft_ms(tp):.1f} ms "
          f"(median of {n} requests of {tokens} tokens)")
    print(f"1 process: {rate(single):.0f} tokens/s, first token {ttft_ms(single):.1f} ms")
    print("tokens identical in every run: yes")
    what = f"tiny llama (4 layers, d=128), {tokens} greedy tokens, median of {n} requests"
    return [
        row(f"Provider example: decode rate, 2-rank tensor parallel on loopback ring, {what}",
            f"{rate(tp):,.0f} tokens/s", f"1 process {rate(single):,.0f} tokens/s",
            f"{rate(tp) / rate(single):.2f}x", "(measured, no target; tokens identical)",
            None),
        row(f"Provider example: time to first token (broadcast + prefill + 1 step), {what}",
            f"{ttft_ms(tp):.1f} ms", f"1 process {ttft_ms(single):.1f} ms",
            f"{ttft_ms(tp) / ttft_ms(single):.2f}x", "(measured, no target)", None),
    ]


def main(argv: list[str]) -> None:
    def arg(name: str, default: int) -> int:
        return int(argv[argv.index(name) + 1]) if name in argv else default

    emit(measure(arg("--runs", 3), arg("--tokens", 256), arg("--requests", 3)), argv)


if __name__ == "__main__":
    main(sys.argv[1:])
