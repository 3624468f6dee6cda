"""The macOS parsers and the jaccl pre-init checks on output recorded on real Macs.

Each check test names the field failure it catches (what users saw, before it became
a crash or hang inside MLX): see docs/thunderbolt.md, "Field failures and their checks".
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
import trio

from clusterfsm.states.errors import PrecheckFailed
from clusterfsm.states.macos_output import (
    UnreadableOutput,
    parse_hardware_ports,
    parse_ibv_devices,
    parse_ibv_devinfo,
    parse_ifconfig,
    parse_rdma_ctl_status,
    parse_route_get,
    parse_thunderbolt,
    parse_thunderbolt_json,
)
from clusterfsm.states.preflight import Verdict
from clusterfsm.states.rdma import (
    cable_rails,
    check_jaccl_plan,
    gid_index,
    interface_addressed,
    link_speed,
    mr_budget,
    peer_routes,
    planned_mrs,
    port_active,
    qp_budget,
    rdma_findings,
    route_to_peer,
    run_tool,
)
from clusterfsm.states.topology import PeerLink, Topology, peer_links
from tests.field_samples import SAMPLES, FakeTools, m4pro_mac, sample, transcript_output

DEVICES_M4PRO = "ibv_devices--three-devices-m4pro-mini-guids-redacted.txt"
DEVICES_M5MAX = "ibv_devices--three-devices-unsorted-m5max-mbp-sanitized.txt"
DEVICES_NONE = "ibv_devices--header-only-rdma-disabled-sanitized.txt"
DEVINFO_DOWN = "ibv_devinfo--three-ports-down-peer-rdma-disabled-sanitized.txt"
DEVINFO_EN4_ACTIVE = "ibv_devinfo-v-grep--tb4-patched-two-down-one-active.txt"
PORTS_M5MAX = "networksetup-listallhardwareports--m5max-mbp-sanitized.txt"
TB_JSON = "system_profiler-SPThunderboltDataType-json--"
TB_PEER_NO_RDMA = TB_JSON + "peer-lacks-rdma-service-sanitized.txt"
TB_PEER_RDMA = TB_JSON + "peer-advertises-rdma-0xFA57-sanitized.txt"
TB_TEXT = "system_profiler-SPThunderboltDataType--mac-mini-to-mac-studio-80g-rdma-service.txt"
IFCONFIG_DOWN = "ifconfig--tb-ports-down-no-address-mac-mini.txt"
IFCONFIG_APIPA = "ifconfig--en8-self-assigned-169254-mac-mini.txt"
BRIDGE = "ifconfig-bridge0--members-en2-en3-en4-mtu9000.txt"
ENABLED = "rdma_ctl--enabled.txt"
ROUTE_EN1 = "route-get--default-route-via-en1-macpro-real-world-systems.txt"
DISABLED = "rdma_ctl--disabled-word-quoted-no-paste.txt"


def test_every_sample_keeps_its_source_header() -> None:
    names = sorted(p.name for p in SAMPLES.iterdir() if p.suffix == ".txt")
    assert len(names) >= 28
    for name in names:
        sample(name)  # asserts the three header lines


# -- parsers ------------------------------------------------------------------------


def test_ibv_devices_keeps_port_order_and_is_empty_when_header_only() -> None:
    assert parse_ibv_devices(sample(DEVICES_M5MAX)) == ("rdma_en1", "rdma_en6", "rdma_en2")
    # the pasted command line ("ibv_devices") and redacted GUIDs do not confuse it
    assert parse_ibv_devices(sample(DEVICES_M4PRO)) == ("rdma_en2", "rdma_en3", "rdma_en4")
    assert parse_ibv_devices(sample(DEVICES_NONE)) == ()
    tb4 = "ibv_devices--header-only-tb4-after-rdma_ctl-enable.txt"
    assert parse_ibv_devices(transcript_output(tb4, "ibv_devices")) == ()
    assert parse_ibv_devices(sample(tb4)) == ()  # "$ rdma_ctl status" is not a device
    assert parse_rdma_ctl_status(transcript_output(tb4, "rdma_ctl status"))


def test_rdma_ctl_status_reads_the_last_line() -> None:
    assert parse_rdma_ctl_status(sample(ENABLED))  # "rdma_ctl status" pasted above it
    assert not parse_rdma_ctl_status(sample(DISABLED))
    kext = "rdma_ctl--enabled-tb4-mac-no-effect.txt"
    assert parse_rdma_ctl_status(transcript_output(kext, "rdma_ctl status"))


def test_ibv_devinfo_says_thunderbolt_transport_and_reads_filtered_output() -> None:
    down = parse_ibv_devinfo(sample(DEVINFO_DOWN))
    assert [d.name for d in down] == ["rdma_en1", "rdma_en6", "rdma_en2"]
    assert {d.transport for d in down} == {"Thunderbolt (100)"}
    assert {p.link_layer for d in down for p in d.ports} == {"Thunderbolt"}
    assert not any(d.active for d in down)
    grep = parse_ibv_devinfo(sample(DEVINFO_EN4_ACTIVE))  # no port: lines, spaces
    assert [(d.name, d.states) for d in grep] == [
        ("rdma_en2", ("PORT_DOWN",)), ("rdma_en3", ("PORT_DOWN",)),
        ("rdma_en4", ("PORT_ACTIVE",))]
    elided = parse_ibv_devinfo(sample("ibv_devinfo-v-grep--tb5-peer-rdma_en9-active-elided.txt"))
    assert [(d.name, d.active) for d in elided] == [("rdma_en9", True)]


def test_gid_table_finds_the_ipv4_mapped_entry() -> None:
    # No unelided `ibv_devinfo -v` from macOS was found; this GID block is written in
    # rdma-core's format onto the real device block.
    text = sample(DEVINFO_EN4_ACTIVE) + (
        "\t\t\tGID[  0]:\t\tfe80:0000:0000:0000:08ad:a6c6:6857:65f6\n"
        "\t\t\tGID[  1]:\t\t0000:0000:0000:0000:0000:ffff:a9fe:0102\n")
    port = parse_ibv_devinfo(text)[-1].ports[0]
    assert port.gids[1] == (1, "::ffff:169.254.1.2") and port.ipv4_gid_index == 1


def test_a_gid_index_other_than_1_is_a_warning() -> None:
    # Field failure: older jaccl hard-coded GID index 1; on some M4 Pro ports the
    # IPv4-mapped GID is at index 2. No real macOS GID table was found: the block is
    # written in rdma-core's format onto the real device block (as above).
    text = sample(DEVINFO_EN4_ACTIVE) + (
        "\t\t\tGID[  0]:\t\tfe80:0000:0000:0000:08ad:a6c6:6857:65f6\n"
        "\t\t\tGID[  1]:\t\tfe80:0000:0000:0000:1c2a:0bff:fe33:0001\n"
        "\t\t\tGID[  2]:\t\t0000:0000:0000:0000:0000:ffff:a9fe:0102\n")
    port = parse_ibv_devinfo(text)[-1].ports[0]
    assert port.ipv4_gid_index == 2
    (finding,) = gid_index("rdma_en4", [port])
    assert finding.verdict is Verdict.WARN and "index 2" in finding.detail
    assert finding.remedy


async def test_port_active_reports_the_gid_index() -> None:
    good = sample(DEVINFO_EN4_ACTIVE) + (
        "\t\t\tGID[  0]:\t\tfe80:0000:0000:0000:08ad:a6c6:6857:65f6\n"
        "\t\t\tGID[  1]:\t\t0000:0000:0000:0000:0000:ffff:a9fe:0102\n")
    found = await port_active("rdma_en4", mac(**{"ibv_devinfo -v -d rdma_en4": good}))
    assert [(f.check, f.verdict) for f in found] == [
        ("port_down", Verdict.PASS), ("gid_index", Verdict.PASS)]


def test_en_numbers_are_not_in_port_order() -> None:
    ports = parse_hardware_ports(sample(PORTS_M5MAX))
    assert [(p.thunderbolt_number, p.device) for p in ports if p.is_thunderbolt] == [
        (1, "en1"), (2, "en6"), (3, "en2")]
    old = parse_hardware_ports(sample(
        "networksetup-listallhardwareports--macbook-2020-thunderbolt-bridge.txt"))
    assert [p.device for p in old if p.is_thunderbolt] == ["en1", "en2"]  # not bridge0


def test_ifconfig_blocks() -> None:
    (apipa,) = parse_ifconfig(sample(IFCONFIG_APIPA))
    assert apipa.up and apipa.carrier and apipa.link_local_ipv4 == ("169.254.138.233",)
    down = parse_ifconfig(sample(IFCONFIG_DOWN))
    assert [(b.name, b.up, b.carrier, b.inet) for b in down] == [
        ("en2", False, False, ()), ("en3", False, False, ()), ("en4", False, False, ())]
    (bridge,) = parse_ifconfig(sample(BRIDGE))
    assert bridge.members == ("en2", "en3", "en4") and bridge.mtu == 9000
    fragment = parse_ifconfig(sample(
        "ifconfig-a-v--ip-over-thunderbolt-member-and-bridge0-fragment.txt"))
    assert [b.name for b in fragment] == ["en2", "bridge0"]  # the leading fragment skipped
    assert fragment[0].kind == "IP over Thunderbolt" and "PROMISC" in fragment[0].flags
    grep = "ifconfig-bridge0-grep-inet6--default-thunderbolt-bridge.txt"
    assert parse_ifconfig(sample(grep)) == ()  # no block header: nothing to claim


def test_system_profiler_json_finds_the_peers_rdma_service_by_protocol_id() -> None:
    on = {b.receptacle: b for b in parse_thunderbolt(sample(TB_PEER_RDMA))}
    assert on[2].connected and on[2].speed == "80 Gb/s"
    assert [(p.name, p.offers_rdma) for p in on[2].peers] == [("MacBook Pro", True)]
    assert on[1].speed == "Up to 120 Gb/s" and not on[1].connected
    assert on[3].peers == ()  # a hub with nothing behind it is not a peer
    off = {b.receptacle: b for b in parse_thunderbolt(sample(TB_PEER_NO_RDMA))}
    assert [(p.name, p.offers_rdma) for p in off[2].peers] == [("MacBook Pro", False)]
    assert off[3].speed == "40 Gb/s"


def test_a_peer_behind_a_hub_is_found() -> None:
    data = json.loads(sample(TB_PEER_RDMA))
    buses = data["SPThunderboltDataType"]
    peer = buses[1].pop("_items")[0]
    buses[0]["_items"][0]["_items"] = [peer]  # the Mac now sits behind the Sabrent hub
    on = {b.receptacle: b for b in parse_thunderbolt_json(json.dumps(data))}
    assert [(p.name, p.offers_rdma, p.via) for p in on[3].peers] == [
        ("MacBook Pro", True, ("SB-XTM5",))]


def test_system_profiler_text() -> None:
    buses = parse_thunderbolt(sample(TB_TEXT))
    first = buses[0]
    assert (first.receptacle, first.speed, first.connected) == (3, "80 Gb/s", True)
    assert [(p.name, p.offers_rdma) for p in first.peers] == [("Mac Studio", True)]
    assert buses[1].peers == ()  # the paste ends mid-bus


# -- the checks, one per field failure ----------------------------------------------


mac = m4pro_mac


ROW_EN4: Topology = ((None, "rdma_en4"), ("rdma_en5", None))


async def test_a_good_mac_passes() -> None:
    await check_jaccl_plan(ROW_EN4, 0, 2, run=mac())


async def test_rdma_enabled_but_no_device_stops_before_the_ibv_reg_mr_segfault() -> None:
    tools = mac(ibv_devices=sample(DEVICES_NONE))
    with pytest.raises(PrecheckFailed) as info:
        await check_jaccl_plan(ROW_EN4, 0, 2, run=tools)
    assert info.value.check == "no_rdma_devices"
    assert "reboot" in info.value.detail and "--backend ring" in info.value.detail


async def test_rdma_disabled_and_a_missing_rdma_ctl() -> None:
    with pytest.raises(PrecheckFailed) as info:
        await check_jaccl_plan(ROW_EN4, 0, 2, run=mac(**{"rdma_ctl status": sample(DISABLED)}))
    assert info.value.check == "rdma_disabled" and "Recovery" in info.value.detail
    with pytest.raises(PrecheckFailed) as info:
        await check_jaccl_plan(ROW_EN4, 0, 2, run=run_tool)  # Linux: no rdma_ctl
    assert info.value.check == "tool_missing" and "26.2" in info.value.detail


async def test_a_device_the_matrix_names_but_ibv_devices_lacks() -> None:
    with pytest.raises(PrecheckFailed) as info:
        await check_jaccl_plan(((None, "rdma_en9"), ("rdma_en5", None)), 0, 2, run=mac())
    assert info.value.check == "device_missing"
    assert "rdma_en2, rdma_en3, rdma_en4" in info.value.detail  # in ibv_devices' order


async def test_port_down_because_the_peer_has_rdma_off_says_what_to_run_on_the_peer() -> None:
    # One osaurus capture: rdma_en6 = Thunderbolt 2 = receptacle 2, whose peer does not
    # list the RDMA service (protocol 64087).
    tools = FakeTools({
        "ibv_devinfo -v -d rdma_en6": sample(DEVINFO_DOWN),
        "networksetup -listallhardwareports": sample(PORTS_M5MAX),
        "system_profiler SPThunderboltDataType -json": sample(TB_PEER_NO_RDMA),
    })
    (finding,) = await port_active("rdma_en6", tools)
    assert finding.check == "port_down" and finding.failed
    assert "PORT_DOWN" in finding.detail
    assert "on that Mac run `rdma_ctl status`" in finding.remedy
    # rdma_en1 = Thunderbolt 1 = receptacle 1: nothing plugged in there
    (finding,) = await port_active("rdma_en1", FakeTools({
        **tools.answers, "ibv_devinfo -v -d rdma_en1": sample(DEVINFO_DOWN)}))
    assert "no cable in Thunderbolt 1 (en1)" in finding.remedy


async def test_no_ipv4_on_the_port_and_bridge_membership() -> None:
    tools = mac(**{"ifconfig bridge0": sample(BRIDGE)})
    found = {f.check: f for f in await interface_addressed("en2", tools)}
    assert found["no_ipv4"].failed and "errno 22" in found["no_ipv4"].detail
    assert found["bridge_member"].failed
    assert "deletem en2" in found["bridge_member"].remedy
    ok = {f.check: f for f in await interface_addressed("en4", mac())}  # no bridge0
    assert not ok["no_ipv4"].failed and not ok["bridge_member"].failed


async def test_a_40_gbps_link_is_a_warning() -> None:
    tools = FakeTools({
        "networksetup -listallhardwareports": sample(PORTS_M5MAX),
        "system_profiler SPThunderboltDataType -json": sample(TB_PEER_NO_RDMA),
    })
    slow = await link_speed("en2", tools)  # Thunderbolt 3 = receptacle 3: a TB3 dock
    assert slow is not None and slow.verdict is Verdict.WARN and "40 Gb/s" in slow.detail
    fast = await link_speed("en6", tools)
    assert fast is not None and fast.verdict is Verdict.PASS


def test_more_queue_pairs_than_a_device_accepts() -> None:
    topology: Topology = ((None, ("rdma_en2",) * 11), ("rdma_en3", None))
    assert qp_budget(topology, 0).check == "qp_limit" and qp_budget(topology, 0).failed
    assert not qp_budget(ROW_EN4, 0).failed


async def test_more_memory_regions_than_a_device_accepts() -> None:
    # 8 x 4 buffers x 1 peer x 2 = 64 (jaccl's defaults, one peer per port) passes;
    # raised buffers (8 -> 128) or one port serving two peers (128) do not.
    assert planned_mrs(1) == 64 and planned_mrs(1, num_buffers=8) == 128
    assert not mr_budget(ROW_EN4, 0).failed and "64" in mr_budget(ROW_EN4, 0).detail
    assert mr_budget(ROW_EN4, 0, num_buffers=8).failed
    two_rails: Topology = ((None, ("rdma_en2", "rdma_en3"), "rdma_en4"),
                           ("rdma_en5", None, "rdma_en6"), ("rdma_en7", "rdma_en8", None))
    assert not mr_budget(two_rails, 0).failed
    shared: Topology = ((None, "rdma_en2", "rdma_en2"), ("rdma_en5", None, "rdma_en6"),
                        ("rdma_en7", "rdma_en8", None))
    finding = mr_budget(shared, 0)
    assert finding.check == "mr_limit" and finding.failed and "rdma_en2': 128" in finding.detail
    with pytest.raises(PrecheckFailed) as caught:
        await check_jaccl_plan(shared, 0, 3, mac())
    assert caught.value.check == "mr_limit"


def test_route_get_names_the_interface_and_gateway() -> None:
    route = parse_route_get(sample(ROUTE_EN1))
    assert (route.interface, route.destination, route.gateway) == (
        "en1", "default", "192.168.1.1")  # the author's "(shows a gateway)" is dropped
    with pytest.raises(UnreadableOutput):
        parse_route_get("route: writing to routing socket: not in table\n")


async def test_a_route_to_the_peer_through_another_interface_fails() -> None:
    # Field failure: RTR errno 60 when the route to the peer's address leaves through
    # another interface than the port cabled to it. The only real `route get` found is
    # a default route through en1 (not Thunderbolt); the peer address is the sample's.
    tools = mac(**{"route -n get 192.0.43.10": sample(ROUTE_EN1)})
    wrong = await route_to_peer("192.0.43.10", "en4", tools)
    assert wrong.check == "peer_route" and wrong.failed and wrong.subject == "en4"
    assert "leaves through en1 via 192.168.1.1, not en4" in wrong.detail
    assert wrong.remedy.startswith("`sudo route -n add -host 192.0.43.10 -interface en4`")
    assert not (await route_to_peer("192.0.43.10", "en1", tools)).failed
    with pytest.raises(PrecheckFailed) as caught:
        await check_jaccl_plan(ROW_EN4, 0, 2, tools, platform="darwin",
                               peer_links=[PeerLink(1, "en4", "192.0.43.10")])
    assert caught.value.check == "peer_route"
    assert "rank 1 at 192.0.43.10 leaves through en1" in caught.value.detail
    assert "route -n change -host 192.0.43.10 -interface en4" in caught.value.detail
    await check_jaccl_plan(ROW_EN4, 0, 2, tools, platform="darwin",
                           peer_links=[PeerLink(1, "en1", "192.0.43.10")])


async def test_no_route_to_the_peer_at_all_is_a_route_failure_with_the_add_remedy() -> None:
    # BSD route(8) writes "route: writing to routing socket: not in table" and exits 1
    # when no route matches (the message is the one the parser test above uses; no
    # recorded Mac shows it): that is the route problem, not a broken tool.
    async def no_route(argv: Sequence[str]) -> str:
        await trio.lowlevel.checkpoint()
        raise PrecheckFailed("tool_failed", f"`{' '.join(argv)}` exited 1: route: "
                             "writing to routing socket: not in table")

    finding = await route_to_peer("169.254.7.9", "en4", no_route, "rank 2")
    assert finding.check == "peer_route" and finding.failed and finding.subject == "en4"
    assert finding.detail.startswith("no route to rank 2 at 169.254.7.9")
    assert finding.remedy == "`sudo route -n add -host 169.254.7.9 -interface en4`"


async def test_a_peer_on_two_cables_is_a_warning_naming_both_ports() -> None:
    # Field failure: two cables between one pair, each end chose a different cable for
    # rail 0 and the model load stalled. The real capture has one cable to the peer
    # (receptacle 2 = en6); the same peer is copied onto receptacle 3 (en2, behind the
    # Sabrent hub's bus) as a second cable.
    ports = sample(PORTS_M5MAX)
    one = await cable_rails(FakeTools({
        "networksetup -listallhardwareports": ports,
        "system_profiler SPThunderboltDataType -json": sample(TB_PEER_RDMA)}))
    assert one is not None and one.verdict is Verdict.PASS
    data = json.loads(sample(TB_PEER_RDMA))
    buses = data["SPThunderboltDataType"]
    buses[0]["_items"].append(dict(buses[1]["_items"][0]))
    two = await cable_rails(FakeTools({
        "networksetup -listallhardwareports": ports,
        "system_profiler SPThunderboltDataType -json": json.dumps(data)}))
    assert two is not None and two.check == "cable_rails" and two.verdict is Verdict.WARN
    assert "Thunderbolt 3 (en2), Thunderbolt 2 (en6)" in two.detail
    assert "00000003-0000-4000-8000-000000000003" in two.detail
    assert "on both Macs run" in two.remedy
    assert await cable_rails(FakeTools({})) is None  # the tools cannot tell


async def test_findings_list_every_check_for_the_doctor() -> None:
    checks = [f.check for f in await rdma_findings(["rdma_en4"], mac(), speed=True)]
    assert checks[:4] == ["rdma_disabled", "device_missing", "no_ipv4", "bridge_member"]
    assert "port_down" in checks


async def test_the_route_check_is_not_applicable_off_macos_or_without_route() -> None:
    # Linux's `route` (net-tools) has no `get`: the check says so instead of failing.
    (linux,) = await peer_routes([PeerLink(1, "en4", "169.254.0.2")], FakeTools({}), "linux")
    assert linux.verdict is Verdict.NOT_APPLICABLE and "linux" in linux.detail
    missing = await route_to_peer("169.254.0.2", "en4", run_tool_missing)
    assert missing.verdict is Verdict.NOT_APPLICABLE and "no `route` tool" in missing.detail
    # IPv6 needs `route -n get -inet6`: not checked (discovery's beacons are IPv4)
    six = await route_to_peer("fe80::1", "en4", FakeTools({}))
    assert six.verdict is Verdict.NOT_APPLICABLE and "-inet6" in six.detail


async def run_tool_missing(argv: Sequence[str]) -> str:
    await trio.lowlevel.checkpoint()
    raise PrecheckFailed("tool_missing", f"`{argv[0]}` is not installed")


def test_each_cable_of_the_row_with_the_address_heard_on_it() -> None:
    # rank 0 reaches rank 1 by two cables (en2, en3) and rank 2 by one (en5)
    matrix: Topology = ((None, ("rdma_en2", "rdma_en3"), "rdma_en5"),
                        ("rdma_en6", None, "rdma_en7"), ("rdma_en8", "rdma_en9", None))
    heard = {1: {"en2": "169.254.1.2", "en3": "169.254.2.2"}, 2: {"en5": "169.254.3.2"}}
    assert peer_links(matrix, 0, heard) == (
        PeerLink(1, "en2", "169.254.1.2"), PeerLink(1, "en3", "169.254.2.2"),
        PeerLink(2, "en5", "169.254.3.2"))
    with pytest.raises(PrecheckFailed) as caught:
        peer_links(matrix, 0, {1: heard[1]})
    assert caught.value.check == "peer_route" and "never heard rank 2" in caught.value.detail
