"""Waiting for a link and noticing its loss: the logic on fakes, then for real.

The real test runs a small program in one end of a namespace pair (a process in its own
network stack: rtnetlink is per namespace) while the test plugs and pulls the veth.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from clusterfsm.states.errors import InterfaceUnavailable, LinkLost
from clusterfsm.states.linkwatch import PollEvents, wait_for_link, watch_for_loss
from clusterfsm.states.netif import InterfaceStatus
from tests.lines import Lines
from tests.netns import NetnsPair, netns_pair  # noqa: F401 - fixture

GOOD = InterfaceStatus("tb0", True, 7, True, True, "169.254.0.1", 1500)
NO_CARRIER = InterfaceStatus("tb0", True, 7, True, False, None, 1500)
DOWN = InterfaceStatus("tb0", True, 7, False, False, None, 1500)
MISSING = InterfaceStatus("tb0", False)


class Script:
    """A probe that returns the next status of a scripted sequence on each read."""

    def __init__(self, *statuses: InterfaceStatus) -> None:
        self.statuses: Iterator[InterfaceStatus] = iter(statuses)
        self.last = statuses[0]

    def __call__(self, _name: str) -> InterfaceStatus:
        self.last = next(self.statuses, self.last)
        return self.last


async def test_waits_through_down_and_no_carrier_then_returns_the_address(
        autojump_clock: Any) -> None:
    heard: list[InterfaceStatus] = []
    probe = Script(DOWN, DOWN, NO_CARRIER, GOOD)
    info = await wait_for_link(["tb0"], PollEvents(), probe=probe, on_waiting=heard.append)
    assert info["tb0"].ipv4 == "169.254.0.1" and info["tb0"].index == 7
    assert heard == [DOWN, NO_CARRIER]  # once per change, not once per read


async def test_a_missing_interface_is_not_waited_for(autojump_clock: Any) -> None:
    with pytest.raises(InterfaceUnavailable) as info:
        await wait_for_link(["tb0"], PollEvents(), probe=Script(MISSING))
    assert "no such interface" in info.value.reason


@pytest.mark.parametrize(("after", "words"), [
    (NO_CARRIER, "no carrier"), (DOWN, "down"), (MISSING, "no such interface"),
    (InterfaceStatus("tb0", True, 7, True, True, None, 1500), "no IPv4"),
])
async def test_loss_names_the_interface_and_why(autojump_clock: Any, after: InterfaceStatus,
                                                words: str) -> None:
    with pytest.raises(LinkLost) as info:
        await watch_for_loss(["tb0"], PollEvents(), probe=Script(GOOD, GOOD, GOOD, after))
    assert info.value.interface == "tb0" and words in info.value.reason


# -- for real, in a namespace -------------------------------------------------------

WATCHER = textwrap.dedent("""
    import sys, trio
    from clusterfsm.states.errors import LinkLost
    from clusterfsm.states.linkwatch import open_link_events, wait_for_link, watch_for_loss

    async def main(name):
        async with open_link_events() as events:
            print("events", events.kind, flush=True)
            info = await wait_for_link([name], events,
                                       on_waiting=lambda s: print("waiting", s.problem,
                                                                  flush=True))
            print("usable", info[name].ipv4, flush=True)
            try:
                await watch_for_loss([name], events)
            except LinkLost as exc:
                print("lost", exc.interface, exc.reason, flush=True)

    trio.run(main, sys.argv[1])
""")


@pytest.mark.netns
def test_rtnetlink_wakes_on_plug_in_and_on_pull(netns_pair: NetnsPair) -> None:  # noqa: F811
    pair = netns_pair
    pair.link_down()
    lines = Lines(pair.a.popen([sys.executable, "-c", WATCHER, pair.a.interface],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    assert lines.next("events") == "events rtnetlink"
    assert "down" in lines.next("waiting")
    pair.link_up("a")  # our end up; the peer's end still down: no carrier
    assert "no carrier" in lines.next("waiting")
    pair.link_up("b")
    assert lines.next("usable") == f"usable {pair.a.address}"
    pair.link_down("b")  # the cable pulled at the other end
    lost = lines.next("lost")
    assert lost.startswith(f"lost {pair.a.interface} no carrier")
    lines.proc.wait(timeout=10)
