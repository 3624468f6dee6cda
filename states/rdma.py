"""The jaccl pre-init checks: what macOS says about RDMA over Thunderbolt, judged.

jaccl crashes or hangs inside MLX when RDMA is off, a device is missing, a port is
down or has no IPv4 address (docs/thunderbolt.md lists what users saw). So before
``init`` every rank asks the system tools and turns each problem into a
:class:`~states.preflight.Finding` with the command the operator runs next; the first
failure stops the rank as :class:`~states.errors.PrecheckFailed` (``clusterfsm doctor``
prints them all). Each check is a field failure seen on real Macs:

- ``rdma_ctl status`` (``tool_missing``: macOS older than 26.2; ``rdma_disabled``).
  MLX's "jaccl is available" is no signal: ``librdma`` loads with RDMA off.
- ``ibv_devices`` lists no ``rdma_`` device although ``rdma_ctl`` says enabled
  (``no_rdma_devices``: a Thunderbolt 4 Mac, or no reboot since enabling; jaccl then
  segfaults in ``ibv_reg_mr``), or not the one this rank's matrix row names
  (``device_missing``).
- ``ibv_devinfo -v -d DEV``: the port is not ``PORT_ACTIVE`` (``port_down``). A port is
  active only when the Macs at *both* ends have RDMA enabled, so the detail says what
  ``system_profiler SPThunderboltDataType -json`` shows of the other end: no cable in
  that receptacle, or a peer without the RDMA service (then: what to run on the peer).
  No IPv4-mapped GID (``no_ipv4_gid``): RTR fails with errno 22. One at an index other
  than 1 (``gid_index``, a warning): an older jaccl always used index 1.
- ``ifconfig enX``: the interface of ``rdma_enX`` has no IPv4 address (``no_ipv4``,
  also RTR errno 22), or is a member of the Thunderbolt Bridge (``bridge_member``).
- The matrix row would open more than 10 queue pairs on one device (``qp_limit``:
  EBUSY on the 11th), or register more than 100 memory regions on one device
  (``mr_limit``: a NULL region, then a segfault on model load).
- The link trained at 40 Gb/s (a TB3/TB4 cable): a warning only.
- A peer reached by two cables (``cable_rails``, doctor, a warning): the rails must be
  the same cables at both ends.
- ``route -n get PEER`` leaves through another interface than the port cabled to that
  peer (``peer_route``: RTR errno 60). The bootstrap checks every cable of its plan:
  the peer's address heard there by discovery, the interface the matrix names for it.
- The init attempts since boot that may still hold protection domains on a device
  (the ledger of :mod:`clusterfsm.states.initledger`), plus this init's, exceed the
  device's ``max_pd`` (``pd_budget``: RTR errno 96 after repeated inits).

Parsing lives in :mod:`clusterfsm.states.macos_output`; running the tools is one
injectable function (:mod:`clusterfsm.states.tools`), so every check is tested on
recorded real output.
"""

from __future__ import annotations

import ipaddress
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import attrs

from clusterfsm.states.errors import PrecheckFailed
from clusterfsm.states.initledger import InitLedger, LedgerUnavailable, NoLedger
from clusterfsm.states.macos_output import (
    RouteLookup,
    ThunderboltReceptacle,
    UnreadableOutput,
    VerbsPort,
    parse_hardware_ports,
    parse_ibv_devices,
    parse_ibv_devinfo,
    parse_ifconfig,
    parse_rdma_ctl_status,
    parse_route_get,
    parse_thunderbolt,
)
from clusterfsm.states.pids import pid_running
from clusterfsm.states.preflight import (
    Finding,
    failed,
    not_applicable,
    passed,
    raise_first_failure,
    warned,
)
from clusterfsm.states.tools import ToolRunner, remembering, run_tool
from clusterfsm.states.topology import (
    RDMA_PREFIX,
    PeerLink,
    Topology,
    check_matrix,
    devices_in_row,
)

#: Queue pairs one Thunderbolt RDMA device accepts (the 11th fails with EBUSY).
MAX_QPS_PER_DEVICE = 10
#: Memory regions one Thunderbolt RDMA device accepts (reported on macOS 26.3; past it
#: registration returns a NULL region and jaccl segfaults while the model loads).
MAX_MRS_PER_DEVICE = 100
#: jaccl's send/receive buffers per peer and buffer size (its default; clusterfsm does
#: not change it).
JACCL_NUM_BUFFERS = 4
#: Buffer size classes jaccl registers for each peer.
JACCL_BUFFER_SIZES = 8

ENABLE_RDMA = ("boot into macOS Recovery, run `rdma_ctl enable` in Terminal, reboot "
               "(on every Mac)")

def _tool_finding(exc: PrecheckFailed) -> Finding:
    remedy = {"tool_missing": "update to macOS 26.2 or later (or use --backend ring)",
              "tool_hung": "retry; if it keeps hanging, reboot the Mac"}.get(
                  exc.check, "run the command by hand and read its error")
    return failed(exc.check, exc.detail, remedy)


# -- the checks ---------------------------------------------------------------------


def interface_of(device: str) -> str:
    """``rdma_en2`` -> ``en2`` (MLX names the device ``"rdma_" + interface``)."""
    return device.removeprefix(RDMA_PREFIX)


def qp_budget(topology: Topology, rank: int) -> Finding:
    """Queue pairs this rank's row opens per device, against the device's limit."""
    counts = Counter(devices_in_row(topology, rank))
    over = {d: n for d, n in counts.items() if n > MAX_QPS_PER_DEVICE}
    if over:
        return failed("qp_limit", f"rank {rank} would open {over} queue pairs, more than "
                      f"the {MAX_QPS_PER_DEVICE} a Thunderbolt RDMA device accepts",
                      "use fewer peers per cable")
    return passed("qp_limit", f"at most {max(counts.values(), default=0)} queue pair(s) "
                  f"per device (limit {MAX_QPS_PER_DEVICE})")


def planned_mrs(peers: int, num_buffers: int = JACCL_NUM_BUFFERS) -> int:
    """Memory regions jaccl registers on one device that serves ``peers`` peers.

    Where the formula comes from (a field report, not read from jaccl's source here):
    jaccl registers one region per buffer, with ``JACCL_BUFFER_SIZES`` (8) size classes,
    ``num_buffers`` buffers of each, for sending and for receiving (x 2), for every peer
    on the device. With the default 4 buffers and one peer that is 64 regions; users
    who raised the buffers to 8 reached 128 and crashed on model load, because the
    device accepts only 100. The same report says "2 peers = 64" for the defaults,
    which fits two *nodes* (one peer each way), so a peer here is one other rank.
    """
    return JACCL_BUFFER_SIZES * num_buffers * peers * 2


def mr_budget(topology: Topology, rank: int,
              num_buffers: int = JACCL_NUM_BUFFERS) -> Finding:
    """Memory regions this rank's row registers per device, against the limit."""
    peers: Counter[str] = Counter()
    for cell in topology[rank]:
        names = cell if isinstance(cell, tuple) else (cell,) if cell is not None else ()
        peers.update(set(names))  # one peer counts once per device, whatever the rails
    counts = {d: planned_mrs(n, num_buffers) for d, n in peers.items()}
    over = {d: n for d, n in counts.items() if n > MAX_MRS_PER_DEVICE}
    if over:
        return failed("mr_limit", f"rank {rank} would register {over} memory regions, "
                      f"more than the {MAX_MRS_PER_DEVICE} a Thunderbolt RDMA device "
                      f"accepts ({JACCL_BUFFER_SIZES} x {num_buffers} buffers x peers x 2)",
                      "give each peer its own cable and port, and keep jaccl's default "
                      f"of {JACCL_NUM_BUFFERS} buffers")
    return passed("mr_limit", f"at most {max(counts.values(), default=0)} memory "
                  f"region(s) per device (limit {MAX_MRS_PER_DEVICE})")


async def rdma_enabled(run: ToolRunner) -> Finding:
    try:
        enabled = parse_rdma_ctl_status(await run(["rdma_ctl", "status"]))
    except PrecheckFailed as exc:
        return _tool_finding(exc)
    except UnreadableOutput as exc:
        return failed("rdma_status", str(exc), "run `rdma_ctl status` by hand")
    if not enabled:
        return failed("rdma_disabled", "`rdma_ctl status` says disabled", ENABLE_RDMA)
    return passed("rdma_disabled", "`rdma_ctl status` says enabled")


async def devices_present(wanted: Sequence[str], run: ToolRunner) -> tuple[Finding, set[str]]:
    """Every ``wanted`` device listed by ``ibv_devices`` (RDMA is known enabled)."""
    try:
        present = parse_ibv_devices(await run(["ibv_devices"]))
    except PrecheckFailed as exc:
        return _tool_finding(exc), set()
    if not present:
        return failed(
            "no_rdma_devices", "`rdma_ctl` says enabled but `ibv_devices` lists no rdma_ "
            "device (jaccl would crash in ibv_reg_mr)",
            "this Mac has no Thunderbolt 5 RDMA hardware (TB4 Macs have none) or was not "
            "rebooted since `rdma_ctl enable`: reboot, or use --backend ring"), set()
    missing = [d for d in wanted if d not in present]
    if missing:
        return failed(
            "device_missing", f"needs {', '.join(missing)}, but `ibv_devices` lists "
            f"{', '.join(present)}",
            "use the interface whose device is listed (networksetup "
            "-listallhardwareports maps ports to enN), or check the cable"), set(present)
    return passed("device_missing", f"`ibv_devices` lists {', '.join(present)}"), set(present)


async def _receptacle_of(interface: str, run: ToolRunner) -> ThunderboltReceptacle | None:
    """What system_profiler knows of the receptacle of ``interface`` (None: unknown)."""
    try:
        ports = parse_hardware_ports(await run(["networksetup", "-listallhardwareports"]))
        number = next((p.thunderbolt_number for p in ports if p.device == interface), None)
        if number is None:
            return None
        buses = parse_thunderbolt(await run(["system_profiler", "SPThunderboltDataType",
                                             "-json"]))
    except (PrecheckFailed, UnreadableOutput):
        return None
    return next((b for b in buses if b.receptacle == number), None)


async def port_active(device: str, run: ToolRunner) -> list[Finding]:
    """``PORT_ACTIVE`` and an IPv4-mapped GID; for a down port, why (the peer's end)."""
    try:
        infos = parse_ibv_devinfo(await run(["ibv_devinfo", "-v", "-d", device]))
    except PrecheckFailed as exc:
        return [_tool_finding(exc)]
    info = next((i for i in infos if i.name == device), None)
    if info is None or not info.ports:
        return [failed("port_down", f"`ibv_devinfo -d {device}` shows no port",
                       f"run `ibv_devinfo -v -d {device}` by hand")]
    interface = interface_of(device)
    if not info.active:
        receptacle = await _receptacle_of(interface, run)
        remedy = ("plug the cable in, and enable RDMA on the Mac at the other end "
                  "(a port is active only when both ends have RDMA on)")
        if receptacle is not None and not receptacle.connected:
            remedy = f"no cable in Thunderbolt {receptacle.receptacle} ({interface}): plug it in"
        elif receptacle is not None and receptacle.peers and not any(
                p.offers_rdma for p in receptacle.peers):
            peer = receptacle.peers[0].name
            remedy = (f"the Mac at the other end ({peer}) does not offer RDMA: on that "
                      f"Mac run `rdma_ctl status`; if it says disabled, {ENABLE_RDMA}")
        return [failed("port_down", f"{device} (interface {interface}) is "
                       f"{'/'.join(info.states)}", remedy)]
    found = [passed("port_down", f"{device} is PORT_ACTIVE")]
    gids = [g for port in info.ports for g in port.gids]
    if gids and all(port.ipv4_gid_index is None for port in info.ports):
        found.append(failed(
            "no_ipv4_gid", f"{device} has no IPv4-mapped GID (only {gids[0][1]}...): jaccl "
            "fails with 'Changing queue pair to RTR failed with errno 22'",
            f"give {interface} an IPv4 address: `sudo ifconfig {interface} inet "
            "169.254.0.1 netmask 255.255.0.0 alias` (another last byte per Mac)"))
    else:
        found.extend(gid_index(device, info.ports))
    return found


def gid_index(device: str, ports: Sequence[VerbsPort]) -> list[Finding]:
    """Where the IPv4-mapped GID sits: older jaccl always used index 1.

    On some ports (``rdma_en3``/``en4`` of an M4 Pro Mac mini) the IPv4-mapped GID is at
    index 2, and index 0 may hold an address that routes elsewhere: an mlx from before
    jaccl scanned the GID table then fails with RTR errno 22 or 60. The field reports
    name no mlx version for the scan, so this warns whenever the index is not 1.
    """
    found = []
    for port in ports:
        index = port.ipv4_gid_index
        if index is None:
            continue
        if index != 1:
            found.append(warned(
                "gid_index", f"{device} has its IPv4-mapped GID at index {index}, not 1: "
                "an mlx whose jaccl does not scan the GID table fails with 'Changing "
                "queue pair to RTR failed with errno 22' (or 60)",
                "use an mlx whose jaccl scans the GID table (the version that does is "
                "not known here: if init fails with RTR errno 22 or 60, upgrade mlx)"))
        else:
            found.append(passed("gid_index", f"{device} has its IPv4-mapped GID at index 1"))
    return found


async def interface_addressed(interface: str, run: ToolRunner) -> list[Finding]:
    """The interface of an RDMA device has IPv4 and is not in the Thunderbolt Bridge."""
    found: list[Finding] = []
    try:
        blocks = parse_ifconfig(await run(["ifconfig", interface]))
    except PrecheckFailed as exc:
        return [_tool_finding(exc)]
    block = next((b for b in blocks if b.name == interface), None)
    if block is None or not block.inet:
        found.append(failed(
            "no_ipv4", f"{interface} has no IPv4 address: jaccl fails with 'Changing queue "
            "pair to RTR failed with errno 22'",
            f"give {interface} its own network service with IPv4 (remove it from the "
            f"Thunderbolt Bridge), or `sudo ifconfig {interface} inet 169.254.0.1 netmask "
            "255.255.0.0 alias` (another last byte per Mac)"))
    else:
        found.append(passed("no_ipv4", f"{interface} has IPv4 {', '.join(block.inet)}"))
    try:
        bridges = parse_ifconfig(await run(["ifconfig", "bridge0"]))
    except PrecheckFailed:
        bridges = ()  # exit status != 0: there is no bridge0, so nothing is in it
    if any(interface in b.members for b in bridges):
        found.append(failed(
            "bridge_member", f"{interface} is a member of the Thunderbolt Bridge (bridge0): "
            "it has no address of its own, and 3+ Macs in a loop make a broadcast storm",
            f"`sudo ifconfig bridge0 deletem {interface}`, or delete the Thunderbolt "
            "Bridge service in System Settings -> Network"))
    else:
        found.append(passed("bridge_member", f"{interface} is not in a Thunderbolt Bridge"))
    return found


#: What BSD ``route -n get`` writes (to stderr, exit 1) when no route matches.
NO_ROUTE = "not in table"


async def route_to_peer(peer: str, interface: str, run: ToolRunner,
                        who: str = "") -> Finding:
    """The kernel's route to ``peer`` leaves through ``interface``, the RDMA port
    cabled to it. If it leaves elsewhere (another port, the default route), jaccl
    cannot reach the peer's GID: 'RTR failed with errno 60' or 'Couldn't connect,
    error 60'. ``who`` names the peer in the detail (``rank 1``).

    macOS only (``route -n get`` of Linux's net-tools means something else: the
    caller says "not applicable" there, see :func:`peer_routes`). IPv4 only: an IPv6
    peer would need ``route -n get -inet6``, and discovery's beacons are IPv4 anyway,
    so one is reported as not checked. No ``route`` tool at all: not checked either.
    """
    name = f"{who} at {peer}" if who else peer
    if ":" in peer:
        return attrs.evolve(not_applicable(
            "peer_route", f"the route to {name} is not checked: IPv6 needs "
            f"`route -n get -inet6 {peer}`"), subject=interface)
    try:
        ipaddress.IPv4Address(peer)
    except ValueError:
        return attrs.evolve(not_applicable(
            "peer_route", f"the route to {name} is not checked: not an IPv4 address"),
            subject=interface)
    try:
        route: RouteLookup = parse_route_get(await run(["route", "-n", "get", peer]))
    except PrecheckFailed as exc:
        if exc.check == "tool_missing":
            return attrs.evolve(not_applicable(
                "peer_route", f"the route to {name} is not checked: no `route` tool"),
                subject=interface)
        if exc.check == "tool_failed" and NO_ROUTE in exc.detail:
            # BSD route(8) exits 1 with "not in table" when no route matches at all
            return attrs.evolve(failed(
                "peer_route", f"no route to {name}: jaccl would fail with RTR errno 60",
                f"`sudo route -n add -host {peer} -interface {interface}`"),
                subject=interface)
        return attrs.evolve(_tool_finding(exc), subject=interface)
    except UnreadableOutput as exc:
        return attrs.evolve(failed("peer_route", str(exc), f"run `route -n get {peer}` "
                                   "by hand"), subject=interface)
    if route.interface != interface:
        via = f" via {route.gateway}" if route.gateway else ""
        return attrs.evolve(failed(
            "peer_route", f"the route to {name} leaves through {route.interface}{via}, "
            f"not {interface} (the port cabled to it): jaccl would fail with RTR errno 60",
            f"`sudo route -n add -host {peer} -interface {interface}` (or `sudo route -n "
            f"change -host {peer} -interface {interface}` if a host route exists)"),
            subject=interface)
    return attrs.evolve(passed("peer_route", f"the route to {name} leaves through "
                               f"{interface}"), subject=interface)


async def peer_routes(links: Sequence[PeerLink], run: ToolRunner,
                      platform: str = sys.platform) -> list[Finding]:
    """:func:`route_to_peer` for every cable of this rank's plan (the peer's address
    heard on it, the interface the device matrix uses for it); not applicable off
    macOS."""
    if platform != "darwin":
        return [not_applicable("peer_route", f"not applicable on {platform}: the route "
                               "check reads macOS's `route -n get`")]
    return [await route_to_peer(link.address, link.interface, run, f"rank {link.rank}")
            for link in links]


# -- protection domains (the init ledger) ---------------------------------------------

#: After this init, fewer protection domains than this left on a device: a warning.
PD_WARN_HEADROOM = 2
PD_REMEDY = ("reboot (the count starts over at boot); first kill leftover rank "
             "processes (`clusterfsm doctor` lists them); do not loop init retries")


def _whose(pids: Sequence[int], running: Callable[[int], bool]) -> str:
    """Which of the attempts' processes still run (kill those first)."""
    alive = sorted({p for p in pids if running(p)})
    gone = sorted(set(pids) - set(alive))
    parts = [f"still running: pid {', '.join(map(str, alive))}"] if alive else []
    if gone:
        parts.append(f"ended without a clean exit: pid {', '.join(map(str, gone))}")
    return "; ".join(parts)


async def pd_budget(need: Mapping[str, int], run: ToolRunner,
                    ledger: InitLedger | NoLedger | None,
                    running: Callable[[int], bool] = pid_running) -> list[Finding]:
    """Protection domains per device: the attempts since boot that may still hold
    some (:mod:`clusterfsm.states.initledger`), plus what this init needs (one per
    connection: ``need``), against ``max_pd`` from ``ibv_devinfo -v``.

    Fails only when this init would not fit (used + need > max_pd): the ledger counts
    a killed rank until reboot, so it may count more than is really held, and refusing
    earlier would stop a Mac that can still start. Warns when fewer than
    ``PD_WARN_HEADROOM`` would be left, so an operator sees it coming (other programs'
    protection domains, such as an ``mlx.launch`` job's, are not in the ledger).
    """
    if ledger is None or isinstance(ledger, NoLedger):
        return [not_applicable("pd_budget", "no init ledger is kept here: protection "
                               "domains are not counted")]
    try:
        view = await ledger.view()
    except LedgerUnavailable as exc:
        return [warned("pd_budget", f"{exc}: protection domains are not counted",
                       "check that the directory is writable and `sysctl kern.boottime` "
                       "answers")]
    found: list[Finding] = []
    for device, n in need.items():
        try:
            infos = parse_ibv_devinfo(await run(["ibv_devinfo", "-v", "-d", device]))
        except PrecheckFailed as exc:
            found.append(attrs.evolve(_tool_finding(exc), subject=device))
            continue
        info = next((i for i in infos if i.name == device), None)
        if info is None or info.max_pd is None:
            found.append(attrs.evolve(warned(
                "pd_budget", f"`ibv_devinfo -v -d {device}` shows no max_pd: protection "
                "domains are not counted", f"run `ibv_devinfo -v -d {device}` by hand"),
                subject=device))
            continue
        used, limit = view.used(device), info.max_pd
        pids = view.pids(device)
        held = (f"{len(pids)} jaccl init attempt(s) since boot ({_whose(pids, running)}) "
                f"may still hold {used}" if pids else
                "no jaccl init attempt since boot holds any")
        unreadable = (f"; {view.unreadable} ledger entr(ies) in {view.path} unreadable"
                      if view.unreadable else "")
        detail = (f"{device}: {held} of its {limit} protection domains (max_pd); this "
                  f"init needs {n}{unreadable} (ledger: {view.path})")
        remedy = (f"{PD_REMEDY}; an entry in {view.path} whose process is known to have "
                  "given its protection domains back may be deleted by hand")
        if used + n > limit:
            found.append(attrs.evolve(failed(
                "pd_budget", f"{detail}: jaccl would fail with 'Changing queue pair to "
                "RTR failed with errno 96'", remedy), subject=device))
        elif limit - used - n < PD_WARN_HEADROOM:
            found.append(attrs.evolve(warned("pd_budget", detail, remedy),
                                      subject=device))
        else:
            found.append(attrs.evolve(passed("pd_budget", detail), subject=device))
    return found


async def cable_rails(run: ToolRunner) -> Finding | None:
    """Peers reached by more than one cable (one domain UUID on several receptacles).

    jaccl pairs the rails between two ranks by index, and the device matrix lists each
    Mac's cables to a peer sorted by interface name; when rail k is not the same cable
    at both ends, loading a model stalls forever (a field report). One Mac cannot see
    which of its cables ends where on the peer, so this is a warning with what to
    compare on both Macs. None when the tools cannot tell.
    """
    try:
        ports = parse_hardware_ports(await run(["networksetup", "-listallhardwareports"]))
        buses = parse_thunderbolt(await run(["system_profiler", "SPThunderboltDataType",
                                             "-json"]))
    except (PrecheckFailed, UnreadableOutput):
        return None
    interface = {p.thunderbolt_number: p.device for p in ports
                 if p.thunderbolt_number is not None}
    cables: dict[str, list[str]] = {}
    names: dict[str, str] = {}
    for bus in buses:
        for peer in bus.peers:
            port = (f"Thunderbolt {bus.receptacle} ({interface.get(bus.receptacle, '?')})"
                    if bus.receptacle is not None else bus.bus)
            cables.setdefault(peer.domain_uuid, []).append(port)
            names[peer.domain_uuid] = peer.name
    several = {uuid: where for uuid, where in cables.items() if len(where) > 1}
    if not several:
        return passed("cable_rails", "no peer is reached by more than one cable")
    text = "; ".join(f"{names[uuid]} (domain {uuid}) by {', '.join(where)}"
                     for uuid, where in sorted(several.items()))
    return warned(
        "cable_rails", f"two-cable rails: {text}; jaccl pairs rails by index, and the "
        "matrix orders each Mac's cables by interface name",
        "on both Macs run `networksetup -listallhardwareports` and `system_profiler "
        "SPThunderboltDataType`, and cable so that rail k (the k-th enX by name) is the "
        "same cable at both ends; or use one cable")


async def link_speed(interface: str, run: ToolRunner) -> Finding | None:
    """40 Gb/s on an RDMA link means a TB3/TB4 cable or dock (warning only)."""
    receptacle = await _receptacle_of(interface, run)
    if receptacle is None or not receptacle.connected:
        return None
    if receptacle.speed.startswith("40"):
        return warned("link_speed", f"{interface} (Thunderbolt {receptacle.receptacle}) "
                      f"runs at {receptacle.speed}", "use a Thunderbolt 5 cable (80 Gb/s)")
    return passed("link_speed", f"{interface} runs at {receptacle.speed}")


def devices_listed(found: Sequence[Finding]) -> bool:
    """Whether :func:`rdma_findings` found RDMA enabled and every device listed (its
    first two findings, which stop it when they fail): then ``ibv_devinfo`` can be
    asked about each device."""
    return len(found) > 1 and not (found[0].failed or found[1].failed)


async def rdma_findings(devices: Sequence[str], run: ToolRunner,
                        *, speed: bool = False) -> list[Finding]:
    """Every RDMA check for ``devices``, in the order a failure stops the rank: RDMA
    enabled, the devices listed (:func:`devices_listed`), then each device's."""
    first = await rdma_enabled(run)
    if first.failed:
        return [first]
    present_finding, _present = await devices_present(devices, run)
    found = [first, present_finding]
    if present_finding.failed:
        return found
    for device in devices:
        interface = interface_of(device)
        found.extend(await interface_addressed(interface, run))
        found.extend(await port_active(device, run))
        if speed:
            finding = await link_speed(interface, run)
            if finding is not None:
                found.append(finding)
    return found


async def check_jaccl_plan(topology: Topology, rank: int, world_size: int,
                           run: ToolRunner = run_tool,
                           peer_links: Sequence[PeerLink] = (),
                           ledger: InitLedger | NoLedger | None = None,
                           platform: str = sys.platform) -> None:
    """Everything about this rank's jaccl setup that can be known before ``init``.

    ``peer_links`` are this rank's cables as its plan uses them (each peer's address
    heard on the interface the matrix names for it): each route is checked with
    ``route -n get``. ``ledger`` counts the init attempts since boot against the
    devices' ``max_pd`` (None: not counted)."""
    check_matrix(topology, world_size)
    raise_first_failure([qp_budget(topology, rank), mr_budget(topology, rank)])
    run = remembering(run)  # ibv_devinfo serves the port check and max_pd
    row = devices_in_row(topology, rank)
    devices = list(dict.fromkeys(row))
    raise_first_failure(await rdma_findings(devices, run))
    raise_first_failure(await pd_budget(Counter(row), run, ledger))
    raise_first_failure(await peer_routes(peer_links, run, platform))
