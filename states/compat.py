"""What must match across ranks before init, compared: a typed refusal, never a hang.

Two ranks with different MLX versions, wire versions or world sizes, or a backend one
of them lacks, do not fail cleanly inside ``mx.distributed.init``: they hang in it, or
crash, or build a group that computes garbage. So every joiner sends rank 0 its
:class:`Compatibility` before the bootstrap frame, and rank 0 compares each with its own
(:func:`differences`). Any difference is :class:`~states.errors.IncompatiblePeer` naming
it (``rank 2: mlx 0.31.2, rank 0 has 0.32.4``), and every rank learns of it by ABORT.

An app adds its own fields (``extra``: the model id, the shard plan) that must match
too; clusterfsm compares them as opaque strings.

``any`` is resolved here as well: rank 0 picks ``jaccl`` only if *every* rank has it,
so the backend in the bootstrap frame (and in the ready line) is the one that runs.

On the wire it is one JSON object (a string field of the control message), checked
field by field on decode: a hostile or broken peer gets a ``ValueError`` that the
caller turns into a typed frame error, never an exception from deep inside.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import attrs

#: Limits on what a peer may send (the whole object stays far below a frame's limit).
MAX_EXTRA_FIELDS = 16
MAX_FIELD_CHARS = 128
KNOWN_BACKENDS = ("ring", "jaccl")


def _extra(value: Mapping[str, str] | Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    return tuple(sorted((str(k), str(v)) for k, v in items))


@attrs.frozen
class Compatibility:
    """What one rank brings to the group."""

    mlx_version: str
    wire_version: int
    backends: tuple[str, ...]  # the backends this rank's MLX can run
    world_size: int
    extra: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_extra)

    def to_json(self) -> str:
        return json.dumps({"mlx": self.mlx_version, "wire": self.wire_version,
                           "backends": list(self.backends), "world": self.world_size,
                           "extra": dict(self.extra)}, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Compatibility:
        """Parse a peer's object; ``ValueError`` says what is wrong with it."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc.msg}") from None
        if not isinstance(data, dict) or set(data) != {"mlx", "wire", "backends", "world",
                                                       "extra"}:
            raise ValueError("expected the keys mlx, wire, backends, world, extra")
        mlx, wire, backends, world, extra = (data["mlx"], data["wire"], data["backends"],
                                             data["world"], data["extra"])
        if not isinstance(mlx, str) or len(mlx) > MAX_FIELD_CHARS:
            raise ValueError("mlx must be a short string")
        for name, number in (("wire", wire), ("world", world)):
            if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number < 2**16:
                raise ValueError(f"{name} must be an integer in 0..65535")
        if not isinstance(backends, list) or not all(b in KNOWN_BACKENDS for b in backends):
            raise ValueError(f"backends must be a list of {KNOWN_BACKENDS}")
        if (not isinstance(extra, dict) or len(extra) > MAX_EXTRA_FIELDS
                or not all(isinstance(k, str) and isinstance(v, str) and len(k) <= MAX_FIELD_CHARS
                           and len(v) <= MAX_FIELD_CHARS for k, v in extra.items())):
            raise ValueError(f"extra must map at most {MAX_EXTRA_FIELDS} short strings to "
                             "short strings")
        return cls(mlx, wire, tuple(sorted(set(backends))), world, extra)


def differences(ours: Compatibility, theirs: Compatibility, rank: int,
                backend: str) -> list[str]:
    """Every way rank ``rank`` (``theirs``) does not fit rank 0 (``ours``) for ``backend``
    (``any`` needs ring at least)."""
    out: list[str] = []
    if theirs.mlx_version != ours.mlx_version:
        out.append(f"rank {rank} has mlx {theirs.mlx_version}, rank 0 has {ours.mlx_version}")
    if theirs.wire_version != ours.wire_version:
        out.append(f"rank {rank} speaks wire version {theirs.wire_version}, rank 0 "
                   f"{ours.wire_version}")
    if theirs.world_size != ours.world_size:
        out.append(f"rank {rank} expects world size {theirs.world_size}, rank 0 "
                   f"{ours.world_size}")
    needed = "ring" if backend == "any" else backend
    if needed not in theirs.backends:
        out.append(f"rank {rank} cannot run {needed} (it has "
                   f"{', '.join(theirs.backends) or 'no backend'})")
    mine, yours = dict(ours.extra), dict(theirs.extra)
    for key in sorted(set(mine) | set(yours)):
        if mine.get(key) != yours.get(key):
            out.append(f"rank {rank} has {key}={yours.get(key, '(unset)')!r}, rank 0 has "
                       f"{mine.get(key, '(unset)')!r}")
    return out


def resolve_any(ours: Compatibility, theirs: Sequence[Compatibility]) -> str:
    """``any`` becomes jaccl only if every rank can run it, else ring."""
    everyone = [ours, *theirs]
    return "jaccl" if all("jaccl" in c.backends for c in everyone) else "ring"
