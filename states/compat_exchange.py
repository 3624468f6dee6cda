"""The cross-rank compatibility check, run at the start of the bootstrap exchange.

Every joiner sends rank 0 a COMPAT message (what it brings:
:class:`~states.compat.Compatibility`); rank 0 compares each with its own and stops
the bootstrap with :class:`~states.errors.IncompatiblePeer` naming every difference,
before anyone builds on a group that would hang or crash in init. Its ABORT tells the
joiners (``peer_aborted``, with the same text). It is also where ``--backend any`` is
resolved: ``jaccl`` only if every rank can run it.
"""

from __future__ import annotations

from clusterfsm.fsm import report_progress
from clusterfsm.states.codec import Compat
from clusterfsm.states.compat import KNOWN_BACKENDS, Compatibility, differences, resolve_any
from clusterfsm.states.context import ClusterContext
from clusterfsm.states.errors import (
    BackendUnavailable,
    FrameError,
    FrameErrorKind,
    IncompatiblePeer,
)
from clusterfsm.states.handshake import PROTOCOL_VERSION
from clusterfsm.states.link import check_session, unexpected_message


def local_compatibility(ctx: ClusterContext) -> Compatibility:
    """What this rank brings: its MLX, wire version, backends, world size, app fields."""
    backends = []
    for backend in KNOWN_BACKENDS:
        try:
            ctx.initializer.precheck(backend)
        except BackendUnavailable:
            continue
        backends.append(backend)
    return Compatibility(ctx.initializer.mlx_version(), PROTOCOL_VERSION, tuple(backends),
                         ctx.world_size, ctx.config.compat)


async def send_compatibility(ctx: ClusterContext) -> None:
    """Joiner: tell rank 0 what this rank brings."""
    assert ctx.session_id is not None
    await ctx.links[0].send(Compat(ctx.session_id, local_compatibility(ctx).to_json()))


async def check_compatibility(ctx: ClusterContext, requested: str) -> str:
    """Rank 0: every joiner's COMPAT against ours; the backend to use (``any``
    resolved across ranks). A difference is :class:`IncompatiblePeer`."""
    ours = local_compatibility(ctx)
    theirs: list[Compatibility] = []
    found: list[str] = []
    for rank, link in sorted(ctx.links.items()):
        report_progress(f"waiting for rank {rank}'s compatibility report")
        msg = await link.next_message()
        if not isinstance(msg, Compat):
            raise unexpected_message(msg, "exchanging_bootstrap", link.peer)
        assert ctx.session_id is not None
        check_session(msg, ctx.session_id, "compatibility report", link.peer)
        try:
            info = Compatibility.from_json(msg.info)
        except ValueError as exc:
            raise FrameError(FrameErrorKind.BAD_PAYLOAD, f"COMPAT: {exc}", link.peer) from None
        theirs.append(info)
        found.extend(differences(ours, info, rank, requested))
    if found:
        raise IncompatiblePeer(tuple(found))
    return resolve_any(ours, theirs) if requested == "any" else requested
