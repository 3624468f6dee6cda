"""IPv6 control links: addresses with scope ids, the ring's IPv4 data plane, refusals.

The control link works over IPv6 (link-local ``fe80::...%iface`` included); MLX's ring
data plane is IPv4 only (states/dataplane.py): over ``::1`` it runs on ``127.0.0.1``,
and a remote IPv6 control link with the ring is refused when the config is built.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from clusterfsm.states.config import Address, ClusterConfig
from clusterfsm.states.context import PortReservation
from clusterfsm.states.dataplane import reservation_host, ring_host, ring_refusal
from clusterfsm.states.errors import PeerAborted, PrecheckFailed
from clusterfsm.states.groupinit import InitPlan
from clusterfsm.states.testing import MemoryNetwork, fake_initializer
from tests.cluster_harness import KEY, RankResult, config, run_rank
from tests.netns import NetnsPair, netns_pair  # noqa: F401 - the fixture
from tests.processes import kill_and_reap

CLI = [sys.executable, "-m", "clusterfsm.states.cli"]


# -- addresses ------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "host", "port"), [
    ("[::1]:7000", "::1", 7000),
    ("[fe80::1%en2]:7000", "fe80::1%en2", 7000),
    ("[::]:0", "::", 0),
    ("10.0.0.1:1", "10.0.0.1", 1),
    ("mac-mini.local:5", "mac-mini.local", 5),
])
def test_address_parses_ipv6_with_scope_and_prints_it_back(text: str, host: str,
                                                            port: int) -> None:
    address = Address.parse(text)
    assert (address.host, address.port) == (host, port)
    assert Address.parse(str(address)) == address
    assert str(address) == text


@pytest.mark.parametrize("text", ["fe80::1:7000", "::1:7000", "[10.0.0.1]:5", "[]:5",
                                  "[::1:5", "::1]:5"])
def test_address_refuses_ipv6_without_brackets_and_stray_brackets(text: str) -> None:
    with pytest.raises(ValueError):
        Address.parse(text)


def test_cli_refuses_an_unbracketed_ipv6_peer_with_exit_2(tmp_path: Path) -> None:
    done = subprocess.run([*CLI, "serve", "--rank", "1", "--world-size", "2", "--peer",
                           "fe80::1:7000", "--key-file", str(tmp_path / "k")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "write an IPv6 address in brackets" in done.stderr
    assert "Traceback" not in done.stderr


# -- which IPv4 address the ring uses ---------------------------------------------------


@pytest.mark.parametrize(("control", "ring"), [
    ("10.0.0.2", "10.0.0.2"),
    ("::1", "127.0.0.1"),
    ("::ffff:10.0.0.2", "10.0.0.2"),
    ("fe80::1%en2", None),
    ("fe80::1", None),
    ("2001:db8::1", None),
    ("node0", "node0"),
])
def test_ring_host_of_a_control_host(control: str, ring: str | None) -> None:
    assert ring_host(control) == ring
    assert reservation_host(control) == (ring or "0.0.0.0")


def test_ring_refusal_names_why_and_what_works() -> None:
    assert ring_refusal(["::1", "::", "::ffff:10.0.0.1", "10.0.0.1", "node0"]) is None
    why = ring_refusal(["fe80::1%en2"])
    assert why is not None
    assert "IPv4 only" in why and "AF_INET" in why and "--interface" in why


def _cfg(**kw: Any) -> ClusterConfig:
    return ClusterConfig(**{"rank": 1, "world_size": 2, "key": KEY, **kw})


def test_config_refuses_the_ring_over_a_remote_ipv6_control_link() -> None:
    link_local = Address("fe80::1%en2", 7000)
    for backend in ("ring", "any"):
        with pytest.raises(ValueError, match="IPv4 only"):
            _cfg(peers=(link_local,), backend=backend)
        with pytest.raises(ValueError, match="IPv4 only"):
            _cfg(rank=0, listen=link_local, backend=backend)
    # jaccl has no IP data plane; a group of one has no data plane at all.
    assert _cfg(peers=(link_local,), backend="jaccl").peers == (link_local,)
    assert _cfg(rank=0, world_size=1, listen=link_local).world_size == 1
    # Loopback, v4-mapped and "every address" are fine for the ring.
    _cfg(peers=(Address("::1", 7000),))
    _cfg(peers=(Address("::ffff:10.0.0.1", 7000),))
    _cfg(rank=0, listen=Address("::", 7000))


def test_cli_refuses_the_ring_over_link_local_with_exit_2(tmp_path: Path) -> None:
    key = tmp_path / "k"
    subprocess.run([*CLI, "keygen", str(key)], check=True, capture_output=True)
    done = subprocess.run([*CLI, "serve", "--rank", "1", "--world-size", "2", "--peer",
                           "[fe80::1%lo]:7000", "--key-file", str(key)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.startswith("clusterfsm serve: fe80::1%lo is an IPv6 address")
    assert len(done.stderr.strip().splitlines()) == 1


def test_port_reservation_holds_the_port_on_ipv4() -> None:
    for host, bound in (("::1", "127.0.0.1"), ("127.0.0.1", "127.0.0.1"),
                        ("fe80::1%lo", "0.0.0.0")):
        reservation = PortReservation(host)
        try:
            sock = reservation._sock
            assert sock is not None and sock.family == socket.AF_INET
            assert sock.getsockname() == (bound, reservation.port)
        finally:
            reservation.release()


# -- the machine, in memory ---------------------------------------------------------


def _capturing(plans: list[InitPlan]) -> Any:
    async def capture(plan: InitPlan) -> None:
        plans.append(plan)

    return fake_initializer(plan_check=capture)


async def _two_ranks(host0: str, host1: str, plans: list[InitPlan]
                     ) -> tuple[RankResult, RankResult]:
    import trio

    network = MemoryNetwork()
    listen = Address(host0, 7700)
    r0, r1 = RankResult(0), RankResult(1)

    async def hold(cluster: Any) -> None:
        await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: run_rank(network, config(0, listen=listen), r0,
                                            initializer=_capturing(plans), host=host0,
                                            in_ready=hold))
        nursery.start_soon(lambda: run_rank(network, config(1, peers=(listen,)), r1,
                                            initializer=_capturing(plans), host=host1,
                                            in_ready=hold))
    return r0, r1


async def test_ring_over_ipv6_loopback_puts_the_ipv4_loopback_in_the_hostfile(
    autojump_clock: Any,
) -> None:
    plans: list[InitPlan] = []
    r0, r1 = await _two_ranks("::1", "::1", plans)
    assert r0.state == r1.state == "closed", (r0.error, r1.error)
    hosts = {entry.rpartition(":")[0] for plan in plans for row in plan.topology
             for entry in row}
    assert hosts == {"127.0.0.1"}


async def test_a_name_that_reached_rank_0_over_remote_ipv6_is_refused_before_init(
    autojump_clock: Any,
) -> None:
    # The config named rank 0 by a host name (not refusable up front); the joiner's
    # connection came from a link-local address: rank 0 refuses the ring topology.
    plans: list[InitPlan] = []
    r0, r1 = await _two_ranks("node0", "fe80::2%en0", plans)
    assert isinstance(r0.error, PrecheckFailed) and r0.error.check == "data_plane_address"
    assert "IPv4 only" in r0.error.detail
    assert isinstance(r1.error, PeerAborted)
    assert plans == []


# -- real processes -------------------------------------------------------------------


def _free_ipv6_port() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        return int(s.getsockname()[1])


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.integration
@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_real_ring_all_sum_with_the_control_link_over_ipv6_loopback(tmp_path: Path) -> None:
    key = tmp_path / "k"
    subprocess.run([*CLI, "keygen", str(key)], check=True, capture_output=True)
    port = _free_ipv6_port()
    common = ["--world-size", "2", "--key-file", str(key), "--once", "--verify"]
    procs = [
        subprocess.Popen([*CLI, "serve", "--rank", "0", "--listen", f"[::1]:{port}",
                          *common], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True),
        subprocess.Popen([*CLI, "serve", "--rank", "1", "--peer", f"[::1]:{port}", *common],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
    ]
    try:
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        kill_and_reap(procs)
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert "all_sum = 3 (expected 3)" in out
        assert "size=2 backend=ring" in out


def _wait_link_local(ns: Any, timeout: float = 10.0) -> str:
    """The veth end's fe80:: address once it is usable (past duplicate detection)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = ns.run(["ip", "-6", "-o", "addr", "show", "dev", ns.interface,
                      "scope", "link"]).stdout
        if "inet6 fe80" in out and "tentative" not in out:
            return str(out.split("inet6 ")[1].split("/")[0])
        time.sleep(0.05)
    pytest.skip("no usable IPv6 link-local address on the veth pair")


@pytest.mark.integration
def test_control_link_over_ipv6_link_local_with_a_scope_id(netns_pair: NetnsPair,  # noqa: F811
                                                           tmp_path: Path) -> None:
    """Two namespaces joined by a veth pair, the control link over ``fe80::...%veth``.

    jaccl (no IP data plane) is the backend that may use such a link; on Linux MLX
    has no jaccl, so rank 0 stops at its backend check, after the handshake and the
    first heartbeats went over the link-local addresses. The ring over the same link
    is refused up front (exit 2).
    """
    pair = netns_pair
    for ns in (pair.a, pair.b):
        ns.run(["sysctl", "-qw", f"net.ipv6.conf.{ns.interface}.disable_ipv6=0"])
    a_addr = _wait_link_local(pair.a)
    _wait_link_local(pair.b)
    key = tmp_path / "k"
    subprocess.run([*CLI, "keygen", str(key)], check=True, capture_output=True)
    port = 47000 + (hash(pair.a.name) % 2000)
    common = ["--world-size", "2", "--key-file", str(key), "--once", "--backend", "jaccl"]
    r0 = pair.a.popen([*CLI, "serve", "--rank", "0", "--listen",
                       f"[{a_addr}%{pair.a.interface}]:{port}", *common],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    r1 = pair.b.popen([*CLI, "serve", "--rank", "1", "--peer",
                       f"[{a_addr}%{pair.b.interface}]:{port}", *common],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out0, err0 = r0.communicate(timeout=60)
    out1, err1 = r1.communicate(timeout=60)
    # Both authenticated over link-local, and rank 0 had its heartbeat answered; rank 1
    # may hear rank 0's ABORT before its own answer, so its last step is not asserted.
    for out in (out0, out1):
        assert "handshaking --authenticated--> awaiting_session" in out
    assert "awaiting_session --session_ready--> exchanging_bootstrap" in out0
    assert "state backend_unavailable" in err0
    assert "state peer_aborted" in err1 and "backend_unavailable" in err1
    ring = pair.b.run([*CLI, "serve", "--rank", "1", "--world-size", "2", "--key-file",
                       str(key), "--peer", f"[{a_addr}%{pair.b.interface}]:{port}"])
    assert ring.returncode == 2 and "IPv4 only" in ring.stderr
