"""``clusterfsm doctor``: every check a bootstrap makes before init, on this machine, now.

An operator runs it on each Mac before ``serve``. Each check prints pass, fail, warn or
"n/a" and, when it is not a pass, the one-line remedy. It exits 0 only if a bootstrap
could start here (no check failed). The checks are the bootstrap's own: the interface
facts of :mod:`clusterfsm.states.netif`, the beacons of :mod:`clusterfsm.states.discovery`, the
RDMA findings of :mod:`clusterfsm.states.rdma` (the same ones that stop a rank as
``precheck_failed``), the backend check of :mod:`clusterfsm.states.groupinit`, the key
and node-id files. Doctor changes nothing: it sends no beacon (a listening doctor must
not look like a node to a discovering peer) and creates no file.

What one Mac cannot check (the peer's RDMA, its key) is said as what to run on the
peer: a port is active only when both ends have RDMA on, so a down port's remedy names
the command for the other Mac.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import attrs
import trio

from clusterfsm.states.config import Address, check_beacon_port
from clusterfsm.states.discovery import (
    DEFAULT_BEACON_PORT,
    BeaconIgnored,
    UdpDiscoveryNet,
    decode_beacon,
)
from clusterfsm.states.errors import BackendUnavailable, InterfaceUnavailable, PrecheckFailed
from clusterfsm.states.exitcodes import EXIT_FAILED, EXIT_OK
from clusterfsm.states.initledger import InitLedger, NoLedger, default_ledger
from clusterfsm.states.keys import KeyFileError, load_key
from clusterfsm.states.localfiles import LocalFileError
from clusterfsm.states.netif import InterfaceStatus, interface_status
from clusterfsm.states.nodeid import NodeIdFileInvalid, default_node_id_path, read_node_id
from clusterfsm.states.preflight import (
    Finding,
    Verdict,
    failed,
    not_applicable,
    passed,
    warned,
)
from clusterfsm.states.rdma import (
    cable_rails,
    devices_listed,
    pd_budget,
    rdma_findings,
    route_to_peer,
)
from clusterfsm.states.tools import ToolRunner, remembering, run_tool
from clusterfsm.states.topology import device_name

#: How long doctor listens for the peers' beacons on each interface (they beacon
#: every 0.1 s while discovering).
DEFAULT_LISTEN_SECONDS = 1.5


def _beacon_port(_inst: object, _attr: object, port: int) -> None:
    check_beacon_port(port)


def _listen_seconds(_inst: object, _attr: object, seconds: float) -> None:
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"--listen-seconds must be a finite number of seconds >= 0, "
                         f"got {seconds}")


@attrs.frozen
class DoctorOptions:
    """What to check; the same port rule as ``serve``, and a bounded listen (an
    infinite one would never end)."""

    interfaces: tuple[str, ...] = ()
    backend: str = "ring"
    key_file: str | None = None
    node_id_file: str | None = None
    beacon_port: int = attrs.field(default=DEFAULT_BEACON_PORT, validator=_beacon_port)
    listen: Address | None = None
    listen_seconds: float = attrs.field(default=DEFAULT_LISTEN_SECONDS,
                                        validator=_listen_seconds)


@attrs.frozen
class Host:
    """What doctor asks of the machine; tests replace parts of it."""

    platform: str = sys.platform
    run: ToolRunner = run_tool
    probe: Callable[[str], InterfaceStatus] = interface_status
    backend_check: Callable[[str], None] | None = None  # default: groupinit's
    mlx_version: Callable[[], str] | None = None  # default: import mlx
    #: The jaccl init ledger (read only here); default: this user's, with the boot
    #: time asked through ``run``.
    ledger: InitLedger | NoLedger = attrs.field(default=attrs.Factory(
        lambda self: default_ledger(self.run, self.platform), takes_self=True))

    @property
    def macos(self) -> bool:
        return self.platform == "darwin"


# -- interfaces ---------------------------------------------------------------------


def interface_findings(status: InterfaceStatus, macos: bool) -> list[Finding]:
    """Exists, up, carrier, IPv4 (link-local or not), MTU: stop at the first failure."""
    name = status.name

    def f(finding: Finding) -> Finding:
        return attrs.evolve(finding, subject=name)

    if not status.exists:
        where = "`networksetup -listallhardwareports`" if macos else "`ip link`"
        return [f(failed("interface", status.problem or "missing",
                         f"check the name: {where} lists the interfaces"))]
    found = [f(passed("interface", f"{name} exists (index {status.index})"))]
    if not status.up:
        up = f"sudo ifconfig {name} up" if macos else f"sudo ip link set {name} up"
        return [*found, f(failed("interface_up", f"{name} is down", f"`{up}`"))]
    found.append(f(passed("interface_up", f"{name} is up")))
    if not status.carrier:
        return [*found, f(failed(
            "carrier", f"{name} has no carrier", "plug the cable in, and check that the "
            "machine at the other end is on with its end up"))]
    found.append(f(passed("carrier", f"{name} has carrier")))
    if status.ipv4 is None:
        add = (f"sudo ifconfig {name} inet 169.254.0.1 netmask 255.255.0.0 alias" if macos
               else f"sudo ip addr add 169.254.0.1/16 dev {name}")
        return [*found, f(failed(
            "address", f"{name} has no IPv4 address", "macOS assigns 169.254.x.y a few "
            f"seconds after a peer is plugged in; or set one: `{add}` (another last byte "
            "per machine)"))]
    kind = "link-local" if status.ipv4.startswith("169.254.") else "static"
    found.append(f(passed("address", f"{name} has IPv4 {status.ipv4} ({kind})")))
    found.append(f(passed("mtu", f"{name} MTU {status.mtu}" if status.mtu else
                          f"{name} MTU unknown")))
    return found


async def peers_heard(interface: str, options: DoctorOptions, key: bytes | None
                      ) -> tuple[Finding, tuple[str, ...]]:
    """Listen (never send) for beacons on ``interface`` for a moment; the finding and
    the addresses of the nodes heard."""
    heard: dict[str, str] = {}
    ignored: dict[str, str] = {}
    try:
        async with UdpDiscoveryNet().beacon_socket(interface, options.beacon_port) as sock:
            with trio.move_on_after(options.listen_seconds):
                while True:
                    data, source = await sock.receive()
                    if key is None:
                        if data[:4] == b"CFB1":
                            heard.setdefault(source, "a clusterfsm node (key not checked)")
                        continue
                    try:
                        beacon = decode_beacon(data, key)
                    except BeaconIgnored as exc:
                        ignored[source] = str(exc)
                        continue
                    claim = "auto" if beacon.rank_claim == 255 else str(beacon.rank_claim)
                    heard[source] = (f"node {beacon.node_id.hex()[:8]} world size "
                                     f"{beacon.world_size} rank {claim}")
    except InterfaceUnavailable as exc:
        return attrs.evolve(failed("ports", str(exc), "stop the process holding the "
                                   "beacon port, or pick another --beacon-port"),
                            subject=interface), ()
    if heard:
        text = "; ".join(f"{host}: {what}" for host, what in sorted(heard.items()))
        return attrs.evolve(passed("peers", f"heard on {interface}: {text}"),
                            subject=interface), tuple(sorted(heard))
    why = "".join(f"; ignored {host}: {what}" for host, what in sorted(ignored.items()))
    return attrs.evolve(warned(
        "peers", f"no clusterfsm node heard on {interface} in "
        f"{options.listen_seconds:g} s{why}",
        "start `clusterfsm serve` on the peer (it beacons while it looks for peers) "
        "with the same key file and --world-size"), subject=interface), ()


# -- RDMA, MLX, files, ports --------------------------------------------------------


async def rdma_checks(options: DoctorOptions, host: Host, jaccl_wanted: bool,
                      heard: Mapping[str, Sequence[str]] | None = None) -> list[Finding]:
    """The RDMA findings of the interfaces, and for each peer heard on one of them,
    whether the route to it leaves through that interface."""
    if not host.macos:
        return [not_applicable(
            "rdma", f"not applicable on {host.platform}: RDMA over Thunderbolt "
            "(rdma_ctl, ibv_devices, jaccl) exists only on macOS 26.2+")]
    run = remembering(host.run)  # system_profiler and ibv_devinfo serve several checks
    devices = [device_name(name) for name in options.interfaces]
    found = await rdma_findings(devices, run, speed=True)
    if devices and devices_listed(found):
        # RDMA is on and every device is there: count the init attempts since boot
        # against each device's max_pd (one connection per device: a peer per port)
        found.extend(await pd_budget(dict.fromkeys(devices, 1), run, host.ledger))
    for interface, peers in (heard or {}).items():
        found.extend([await route_to_peer(peer, interface, run) for peer in peers])
    rails = await cable_rails(run)
    if rails is not None:
        found.append(rails)
    if not jaccl_wanted:  # ring does not need RDMA: say it, do not fail on it
        found = [attrs.evolve(f, verdict=Verdict.WARN) if f.failed else f for f in found]
    return found


def backend_checks(options: DoctorOptions, host: Host) -> tuple[list[Finding], bool]:
    """MLX importable, its version, ring and jaccl availability; and whether the
    requested backend means jaccl (``any`` does when jaccl is available)."""
    from clusterfsm.states.groupinit import check_backend_available, supports_all_gather_factory

    check = host.backend_check or check_backend_available
    found: list[Finding] = []
    try:
        version = (host.mlx_version or _mlx_version)()
        found.append(passed("mlx", f"mlx {version}"))
    except ImportError as exc:
        return [failed("mlx", f"mlx cannot be imported: {exc}",
                       "`pip install mlx` (on Linux: `pip install 'mlx[cpu]'`)")], False
    available: dict[str, bool] = {}
    for backend in ("ring", "jaccl"):
        try:
            check(backend)
            available[backend] = True
            found.append(passed(f"backend_{backend}", f"{backend} is available"))
        except BackendUnavailable as exc:
            available[backend] = False
            wanted = options.backend in (backend, "any" if backend == "ring" else "")
            if backend == "jaccl" and not host.macos:
                found.append(not_applicable("backend_jaccl", f"not applicable on "
                                            f"{host.platform}: {exc.missing}"))
            elif wanted:
                found.append(failed(f"backend_{backend}", str(exc),
                                    "install an mlx wheel with it, or choose another "
                                    "--backend"))
            else:
                found.append(warned(f"backend_{backend}", str(exc), "needed only for "
                                    f"--backend {backend}"))
    jaccl = options.backend == "jaccl" or (options.backend == "any" and available["jaccl"])
    if jaccl and available["jaccl"]:
        if supports_all_gather_factory():
            found.append(passed("side_channel", "mlx init takes all_gather_factory: "
                                "jaccl's metadata goes over the authenticated links"))
        else:
            found.append(warned("side_channel", "this mlx lacks all_gather_factory: jaccl "
                                "falls back to its own unauthenticated coordinator",
                                "install mlx >= 0.32.1 on every Mac"))
    return found, jaccl


def _mlx_version() -> str:
    import mlx.core as mx

    return str(getattr(mx, "__version__", "unknown version"))


def key_check(options: DoctorOptions) -> tuple[Finding, bytes | None]:
    if options.key_file is None:
        return failed("key_file", "no --key-file given (serve needs one)",
                      "pass the key file serve will use; `clusterfsm keygen F` makes one "
                      "(copy it to every machine)"), None
    try:
        key = load_key(options.key_file)
    except KeyFileError as exc:
        remedy = ("`chmod 600 " + options.key_file + "`" if "mode" in exc.problem
                  else "`clusterfsm keygen F` on one machine and copy F to every one")
        return failed("key_file", str(exc), remedy), None
    return passed("key_file", f"{options.key_file}: {len(key)}-byte key, mode 600"), key


def node_id_check(options: DoctorOptions) -> Finding:
    """The node-id file through serve's own reader (:func:`read_node_id`): a FIFO or a
    device is refused without being opened for a blocking read, and only a file that
    holds no id is one to delete."""
    path = Path(options.node_id_file) if options.node_id_file else default_node_id_path()
    try:
        node_id = read_node_id(path)
    except LocalFileError as exc:
        return failed("node_id", f"node-id file {exc}",
                      "pass --node-id-file naming a regular file (serve creates it if "
                      "it does not exist)")
    except NodeIdFileInvalid as exc:
        return failed("node_id", str(exc), f"delete {path} to make a new id")
    if node_id is None:
        parent = next((p for p in path.parents if p.exists()), Path("/"))
        if not parent.is_dir() or not _writable(parent):
            return failed("node_id", f"{path} does not exist and {parent} is not writable",
                          "pass --node-id-file in a writable directory")
        return passed("node_id", f"{path} will be created on the first serve")
    return passed("node_id", f"{path}: node {node_id.hex()[:8]}")


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def _is_rank(args: str) -> bool:
    """A ``clusterfsm serve`` or an MLX program (``mlx.launch``, ``mlx_lm.server``...)."""
    words = args.split()
    if "clusterfsm" in args and "serve" in words:
        return True
    return any(w.rsplit("/", 1)[-1].startswith(("mlx.", "mlx_")) for w in words)


async def leftover_ranks(host: Host) -> Finding:
    """Other ``clusterfsm serve`` or MLX processes of this user on this machine: a rank
    left over from an earlier run keeps its RDMA protection domains and queue pairs
    until it exits (one user measured 11 of each per device; jaccl then fails with "RTR errno 96"
    after an idle night, and retrying ``init`` only leaks more), and holds the beacon
    and data ports. A process that merely mentions MLX may be no rank: a warning.
    (``pd_budget`` counts clusterfsm's own init attempts since boot against
    ``max_pd``; this check also sees other MLX programs.)"""
    try:
        table = await host.run(["ps", "-U", str(os.getuid()), "-o", "pid=,args="])
    except PrecheckFailed as exc:
        return warned("leftover_ranks", f"cannot list processes: {exc.detail}",
                      "check by hand: `pgrep -fl 'clusterfsm.*serve|mlx'`")
    me = os.getpid()
    found = []
    for line in table.splitlines():
        pid, _, args = line.strip().partition(" ")
        if pid.isdigit() and int(pid) != me and _is_rank(args.strip()):
            found.append(f"{pid} {args.strip()[:60]}")
    if found:
        return warned("leftover_ranks", f"rank processes already run here: "
                      f"{'; '.join(found)}", "kill leftover ranks (`kill PID`) or reboot; "
                      "do not loop init (each try can leak RDMA resources)")
    return passed("leftover_ranks", "no other clusterfsm serve or MLX process of this "
                  "user runs here")


def listen_port_check(listen: Address) -> Finding:
    with socket.socket(socket.AF_INET6 if ":" in listen.host else socket.AF_INET,
                       socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((listen.host, listen.port))
        except OSError as exc:
            return failed("ports", f"cannot listen on {listen}: {exc.strerror or exc}",
                          "stop the process holding it, or pick another --listen")
    return passed("ports", f"{listen} is free")


# -- the whole run ------------------------------------------------------------------


async def run_checks(options: DoctorOptions, host: Host | None = None) -> list[Finding]:
    host = host or Host()
    found: list[Finding] = []
    heard: dict[str, tuple[str, ...]] = {}
    key_finding, key = key_check(options)
    for name in options.interfaces:
        try:
            status = host.probe(name)
        except InterfaceUnavailable as exc:  # a name no interface can have
            found.append(attrs.evolve(failed("interface", str(exc), "check the name"),
                                      subject=name))
            continue
        facts = interface_findings(status, host.macos)
        found.extend(facts)
        if not any(f.failed for f in facts) and options.listen_seconds > 0:
            finding, heard[name] = await peers_heard(name, options, key)
            found.append(finding)
    backend_found, jaccl = backend_checks(options, host)
    found.extend(backend_found)
    if options.interfaces or jaccl:
        found.extend(await rdma_checks(options, host, jaccl, heard))
    found.append(key_finding)
    if options.interfaces:
        found.append(node_id_check(options))
    found.append(await leftover_ranks(host))
    if options.listen is not None:
        found.append(listen_port_check(options.listen))
    return found


def render_text(findings: Sequence[Finding], options: DoctorOptions, platform: str) -> str:
    lines = [f"clusterfsm doctor ({platform}, backend {options.backend}, interfaces "
             f"{', '.join(options.interfaces) or 'none'})"]
    for finding in findings:
        label = finding.verdict.value.upper()
        lines.append(f"{label:<5} {finding.check:<14} {finding.detail}")
        if finding.remedy and finding.verdict is not Verdict.PASS:
            lines.append(f"{'':<20} -> {finding.remedy}")
    bad = [f for f in findings if f.failed]
    lines.append("result: a bootstrap could start" if not bad else
                 f"result: a bootstrap cannot start ({len(bad)} check(s) failed)")
    lines.append("run `clusterfsm doctor` on every peer too: a port is active only when "
                 "both ends are ready")
    return "\n".join(lines)


def run_doctor(options: DoctorOptions, *, as_json: bool, host: Host | None = None) -> int:
    host = host or Host()
    try:
        findings = trio.run(run_checks, options, host)
    except PrecheckFailed as exc:  # a tool that cannot even be run
        findings = [failed(exc.check, exc.detail, "run the tool by hand")]
    ok = not any(f.failed for f in findings)
    if as_json:
        print(json.dumps({"ok": ok, "platform": host.platform, "backend": options.backend,
                          "checks": [f.as_dict() for f in findings]}, indent=1))
    else:
        print(render_text(findings, options, host.platform))
    return EXIT_OK if ok else EXIT_FAILED
