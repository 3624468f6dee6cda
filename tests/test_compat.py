"""Compatibility across ranks: every difference named, hostile objects refused."""

from __future__ import annotations

import pytest

from clusterfsm.states.compat import Compatibility, differences, resolve_any

RANK0 = Compatibility("0.32.4", 3, ("jaccl", "ring"), 2, {"model": "llama-70b"})


def test_a_matching_rank_has_no_difference() -> None:
    same = Compatibility.from_json(RANK0.to_json())
    assert same == RANK0 and differences(RANK0, same, 1, "jaccl") == []


def test_every_difference_is_named() -> None:
    other = Compatibility("0.31.2", 2, ("ring",), 3, {"model": "qwen", "plan": "tp2"})
    found = differences(RANK0, other, 1, "jaccl")
    assert found == [
        "rank 1 has mlx 0.31.2, rank 0 has 0.32.4",
        "rank 1 speaks wire version 2, rank 0 3",
        "rank 1 expects world size 3, rank 0 2",
        "rank 1 cannot run jaccl (it has ring)",
        "rank 1 has model='qwen', rank 0 has 'llama-70b'",
        "rank 1 has plan='tp2', rank 0 has '(unset)'",
    ]


def test_any_is_jaccl_only_if_every_rank_has_it() -> None:
    ring_only = Compatibility("0.32.4", 3, ("ring",), 2, {"model": "llama-70b"})
    assert resolve_any(RANK0, [RANK0]) == "jaccl"
    assert resolve_any(RANK0, [ring_only]) == "ring"
    assert differences(RANK0, ring_only, 1, "any") == []


@pytest.mark.parametrize("text", [
    "", "[]", "{}", '{"mlx":1,"wire":1,"backends":[],"world":2,"extra":{}}',
    '{"mlx":"x","wire":-1,"backends":[],"world":2,"extra":{}}',
    '{"mlx":"x","wire":1,"backends":["nccl"],"world":2,"extra":{}}',
    '{"mlx":"x","wire":true,"backends":[],"world":2,"extra":{}}',
    '{"mlx":"x","wire":1,"backends":[],"world":2,"extra":{"a":1}}',
    '{"mlx":"' + "x" * 200 + '","wire":1,"backends":[],"world":2,"extra":{}}',
    '{"mlx":"x","wire":1,"backends":[],"world":2,"extra":{' + ",".join(
        f'"k{i}":"v"' for i in range(17)) + "}}",
])
def test_a_malformed_object_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        Compatibility.from_json(text)
