"""The bootstrap's link activities: wait for the cables before discovery, and end the
group the moment one is pulled.

Why a state of its own (``waiting_for_link``): a rank started with ``--interface`` on a
Mac whose cable is not in yet has nothing wrong with it; it must wait, visibly (the
state is in the trace and the supervisor sees it), for as long as the operator allows
(``--deadline waiting_for_link=S``; unbounded by default). The wait is woken by the
kernel (:mod:`clusterfsm.states.linkwatch`), so discovery starts within milliseconds of the
plug-in, not at the next poll.

And in ``ready`` (or while discovering) a pulled cable is known to the kernel at once,
long before the peers' heartbeats fall silent: :func:`guard_links` turns it into
:class:`~states.errors.LinkLost` naming the interface, within milliseconds.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from clusterfsm.fsm import report_progress
from clusterfsm.states.config import Address
from clusterfsm.states.context import ClusterContext
from clusterfsm.states.linkwatch import wait_for_link, watch_for_loss
from clusterfsm.states.netif import InterfaceStatus
from clusterfsm.states.transport import MultiListener

T = TypeVar("T")


async def waiting_for_link(ctx: ClusterContext) -> str:
    """Wait until every ``--interface`` is up, has carrier and an IPv4 address, then
    open one control listener bound to each (any node may be elected rank 0)."""
    net = ctx.discovery_net

    def waiting(status: InterfaceStatus) -> None:
        report_progress(f"waiting for {status.name}: {status.problem}")

    async with net.link_events() as events:
        infos = await wait_for_link(ctx.config.interfaces, events, probe=net.status,
                                    on_waiting=waiting)
    port = ctx.config.listen.port if ctx.config.listen is not None else 0
    for name in ctx.config.interfaces:
        ctx.listeners_by_interface[name] = await ctx.exits.enter_async_context(
            ctx.transport.listen(Address(infos[name].ipv4, port), interface=name))
    ctx.listener = MultiListener(list(ctx.listeners_by_interface.values()))
    return "link_up"


async def guard_links(ctx: ClusterContext, work: Callable[[], Awaitable[T]]) -> T:
    """``work()``, unless an ``--interface`` goes down first: then
    :class:`~states.errors.LinkLost` naming it (``work`` is cancelled). Without
    ``--interface``, or in a group of one (world size 1: no peer, so no link is used),
    there is no link to guard: just ``work()``."""
    if not ctx.config.interfaces or ctx.world_size == 1:
        return await work()
    net = ctx.discovery_net
    result: list[T] = []
    async with net.link_events() as events, trio.open_nursery() as nursery:
        async def watch() -> None:
            await watch_for_loss(ctx.config.interfaces, events, probe=net.status)

        async def run() -> None:
            result.append(await work())
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        nursery.start_soon(run)
    return result[0]
