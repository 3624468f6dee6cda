"""What the macOS tools print about Thunderbolt and RDMA, parsed: text in, values out.

Why a module of its own: every pre-init check of the jaccl path (:mod:`clusterfsm.states.rdma`)
and every ``clusterfsm doctor`` line (:mod:`clusterfsm.states.doctor`) reads these outputs, and
real Macs print them differently from the documentation. The parsers are tested on
outputs recorded on real Macs (``tests/samples/``, each with its source in a header).
What they had to learn from those recordings:

- ``ibv_devinfo`` says ``transport: Thunderbolt (100)`` and ``link_layer: Thunderbolt``
  (not InfiniBand or Ethernet); pasted output is often filtered with ``grep`` (no
  ``port:`` lines) or elided (``[...]``), and tabs may have become spaces.
- ``ibv_devices`` lists devices in port order, not sorted, and with no device prints
  only its two header lines (and exits 0). A device is a line whose first token starts
  with ``rdma_`` followed by a GUID, as MLX's own tools detect them; never a line count.
- ``en`` numbers are not in port order (Thunderbolt 1/2/3 = en1/en6/en2), so the port
  number comes from ``networksetup -listallhardwareports``, never from the name.
- ``rdma_ctl status`` prints one word; read the last line.
- ``ibv_devinfo -v`` gives the device's limits (``max_pd``, protection domains the
  device holds at once for every process together) above its port blocks.
- ``sysctl kern.boottime`` prints a ``struct timeval`` (``{ sec = S, usec = U }``)
  and then the date; a listing of the whole ``kern`` tree adds a second
  ``kern.boottime = <date>`` line without the seconds.
- ``route -n get ADDR`` prints ``key: value`` lines (``interface: en1``), a gateway line
  may carry more words after the address, and the metrics table has no colon.
- ``system_profiler SPThunderboltDataType`` nests a peer behind a hub one or more
  levels down; the peer offers RDMA when it lists protocol id 64087 (0xFA57) among its
  services (``Service Key: rdma`` in text; the JSON key is mojibake, so match the id).

Pasted transcripts (``$ command`` prompt lines, ``[...]`` elisions) are tolerated:
those lines are skipped.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs

#: Thunderbolt XDomain protocol id of Apple's RDMA service (0xFA57).
RDMA_PROTOCOL_ID = 64087

_PROMPT = re.compile(r"^\s*(\$|\[\.\.\.\]|\.\.\.)")


def _content_lines(text: str) -> Iterator[str]:
    """The lines of ``text`` that are tool output, not a pasted prompt or elision."""
    for line in text.splitlines():
        if not _PROMPT.match(line):
            yield line


# -- rdma_ctl status ----------------------------------------------------------------


class UnreadableOutput(ValueError):
    """A tool printed something its parser cannot read; the message quotes it."""


def parse_rdma_ctl_status(text: str) -> bool:
    """True for ``enabled``, False for ``disabled`` (the last non-blank line)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    word = lines[-1].lower() if lines else ""
    if word in ("enabled", "disabled"):
        return word == "enabled"
    raise UnreadableOutput(f"`rdma_ctl status` said {text.strip()[:80]!r}, expected "
                           "'enabled' or 'disabled'")


# -- ibv_devices --------------------------------------------------------------------

_DEVICE_LINE = re.compile(r"^\s*(rdma_[A-Za-z0-9_.]+)\s+([0-9A-Fa-fXx:]+)\s*$")


def parse_ibv_devices(text: str) -> tuple[str, ...]:
    """Device names from ``ibv_devices``, in the order listed (port order, unsorted);
    ``()`` for the header-only output of a Mac without RDMA devices."""
    names: list[str] = []
    for line in _content_lines(text):
        match = _DEVICE_LINE.match(line)
        if match:
            names.append(match.group(1))
    return tuple(names)


# -- ibv_devinfo --------------------------------------------------------------------


@attrs.frozen
class VerbsPort:
    """One port of a verbs device (macOS devices have one)."""

    number: int
    state: str  # "PORT_ACTIVE", "PORT_DOWN", ...
    link_layer: str = ""
    active_mtu: str = ""
    #: ``(index, address)`` of the GID table (``ibv_devinfo -v`` only), addresses
    #: normalised (``::ffff:169.254.1.2`` for an IPv4-mapped GID).
    gids: tuple[tuple[int, str], ...] = ()

    @property
    def active(self) -> bool:
        return self.state == "PORT_ACTIVE"

    @property
    def ipv4_gid_index(self) -> int | None:
        """Index of the first IPv4-mapped GID (jaccl needs one), None if there is none."""
        for index, address in self.gids:
            try:
                if ipaddress.IPv6Address(address).ipv4_mapped is not None:
                    return index
            except ValueError:
                continue
        return None


@attrs.frozen
class VerbsDevice:
    """One ``hca_id:`` block of ``ibv_devinfo``."""

    name: str
    transport: str = ""
    ports: tuple[VerbsPort, ...] = ()
    #: ``max_pd:`` of ``ibv_devinfo -v`` (protection domains the device can hold at
    #: once, all processes together); None when the output does not say.
    max_pd: int | None = None

    @property
    def active(self) -> bool:
        return any(port.active for port in self.ports)

    @property
    def states(self) -> tuple[str, ...]:
        return tuple(port.state for port in self.ports)


_GID = re.compile(r"^GID\[\s*(\d+)\]$")


def _normal_gid(value: str) -> str:
    text = value.split(",")[0].strip()
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        return text
    mapped = address.ipv4_mapped
    return f"::ffff:{mapped}" if mapped is not None else str(address)


def parse_ibv_devinfo(text: str) -> tuple[VerbsDevice, ...]:
    """Every device of ``ibv_devinfo [-v] [-d DEV]``, also when grep-filtered (a
    ``state:`` line with no ``port:`` line before it belongs to port 1)."""
    devices: list[VerbsDevice] = []
    name: str | None = None
    transport = ""
    max_pd: int | None = None
    ports: list[dict[str, Any]] = []

    def flush() -> None:
        if name is not None:
            devices.append(VerbsDevice(name, transport, tuple(
                VerbsPort(p["number"], p.get("state", ""), p.get("link_layer", ""),
                          p.get("active_mtu", ""), tuple(p.get("gids", ())))
                for p in ports), max_pd))

    for line in _content_lines(text):
        key, sep, value = line.strip().partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "hca_id":
            flush()
            name, transport, max_pd, ports = value.split()[0] if value else "", "", None, []
            continue
        if name is None:
            continue
        if key == "transport":
            transport = value
        elif key == "max_pd" and value.split() and value.split()[0].isdigit():
            max_pd = int(value.split()[0])
        elif key == "port" and value.split() and value.split()[0].isdigit():
            ports.append({"number": int(value.split()[0])})
        elif key in ("state", "link_layer", "active_mtu", "GID") or _GID.match(key):
            if not ports:
                ports.append({"number": 1})
            gid = _GID.match(key)
            if gid:
                ports[-1].setdefault("gids", []).append((int(gid.group(1)),
                                                          _normal_gid(value)))
            elif key == "state":
                ports[-1]["state"] = value.split()[0] if value else ""
            else:
                ports[-1][key] = value
    flush()
    return tuple(devices)


# -- sysctl kern.boottime ------------------------------------------------------------

_BOOTTIME = re.compile(r"\{\s*sec\s*=\s*(\d+)\s*,\s*usec\s*=\s*(\d+)\s*\}")


def parse_sysctl_boottime(text: str) -> int:
    """When the Mac booted (Unix seconds), from ``sysctl kern.boottime``.

    The value is a ``struct timeval`` printed as ``{ sec = S, usec = U }`` followed by
    the date (``kern.boottime: { sec = 1426005997, usec = 0 } Tue Mar 10 11:46:37
    2015``; ``-n`` drops the name). Only that form is read: ``sysctl`` of a whole
    subtree also prints a ``kern.boottime = <date>`` line, which has no seconds.
    """
    for line in _content_lines(text):
        match = _BOOTTIME.search(line)
        if match:
            return int(match.group(1))
    raise UnreadableOutput(f"no '{{ sec = ..., usec = ... }}' in sysctl output: "
                           f"{text.strip()[:120]!r}")


# -- route -n get ADDR ---------------------------------------------------------------


@attrs.frozen
class RouteLookup:
    """What ``route -n get ADDR`` says about the route the kernel picks for ADDR."""

    interface: str
    destination: str = ""
    gateway: str = ""  # "" when ADDR is on a directly attached network


def parse_route_get(text: str) -> RouteLookup:
    """The ``key: value`` lines of ``route -n get``; one without ``interface:`` (no
    route, or not route's output) is :class:`UnreadableOutput`."""
    fields: dict[str, str] = {}
    for line in _content_lines(text):
        key, sep, value = line.strip().partition(":")
        if sep and key in ("interface", "destination", "gateway") and value.split():
            fields.setdefault(key, value.split()[0])
    if "interface" not in fields:
        raise UnreadableOutput(f"no 'interface:' line in route output: {text.strip()[:120]!r}")
    return RouteLookup(fields["interface"], fields.get("destination", ""),
                       fields.get("gateway", ""))


# -- networksetup -listallhardwareports ---------------------------------------------


@attrs.frozen
class HardwarePort:
    """One block of ``networksetup -listallhardwareports``."""

    name: str  # "Thunderbolt 1", "Thunderbolt Bridge", "Wi-Fi"
    device: str  # "en2", "bridge0"
    address: str  # MAC, "N/A" for some virtual ports

    @property
    def thunderbolt_number(self) -> int | None:
        """N of ``Thunderbolt N`` (the receptacle number system_profiler uses)."""
        match = re.fullmatch(r"Thunderbolt (\d+)", self.name)
        return int(match.group(1)) if match else None

    @property
    def is_thunderbolt(self) -> bool:
        """A Thunderbolt port itself (the bridge over them is not an RDMA path)."""
        return self.thunderbolt_number is not None


def parse_hardware_ports(text: str) -> tuple[HardwarePort, ...]:
    """The blocks of ``networksetup -listallhardwareports``."""
    ports: list[HardwarePort] = []
    current: dict[str, str] = {}

    def flush() -> None:
        if "Hardware Port" in current and "Device" in current:
            ports.append(HardwarePort(current["Hardware Port"], current["Device"],
                                      current.get("Ethernet Address", "")))
        current.clear()

    for line in _content_lines(text):
        key, sep, value = line.partition(":")
        if not sep:
            if not line.strip():
                flush()
            continue
        if key.strip() == "Hardware Port" and current:
            flush()
        current[key.strip()] = value.strip()
    flush()
    return tuple(ports)


# -- ifconfig -----------------------------------------------------------------------


@attrs.frozen
class IfconfigInterface:
    """One interface block of macOS ``ifconfig`` (``-a``, ``-v`` or one interface)."""

    name: str
    flags: frozenset[str]
    mtu: int | None = None
    inet: tuple[str, ...] = ()
    inet6: tuple[str, ...] = ()
    status: str | None = None  # "active", "inactive"; None when not printed
    members: tuple[str, ...] = ()  # a bridge's member interfaces
    kind: str | None = None  # "IP over Thunderbolt" (ifconfig -v)

    @property
    def up(self) -> bool:
        return "UP" in self.flags

    @property
    def carrier(self) -> bool:
        """RUNNING, and not reported ``status: inactive`` (cable out)."""
        return "RUNNING" in self.flags and self.status != "inactive"

    @property
    def link_local_ipv4(self) -> tuple[str, ...]:
        return tuple(a for a in self.inet if ipaddress.IPv4Address(a).is_link_local)


_IFCONFIG_HEAD = re.compile(
    r"^([A-Za-z][A-Za-z0-9_.]*): flags=[0-9a-fA-F]+<([^>]*)>(?:.*?\bmtu (\d+))?")


def parse_ifconfig(text: str) -> tuple[IfconfigInterface, ...]:
    """Every interface block; lines before the first block (a fragment) are skipped."""
    blocks: list[IfconfigInterface] = []
    fields: dict[str, Any] | None = None

    def flush() -> None:
        if fields is not None:
            blocks.append(IfconfigInterface(
                fields["name"], frozenset(fields["flags"]), fields["mtu"],
                tuple(fields["inet"]), tuple(fields["inet6"]), fields["status"],
                tuple(fields["members"]), fields["kind"]))

    for line in _content_lines(text):
        head = _IFCONFIG_HEAD.match(line)
        if head:
            flush()
            fields = {"name": head.group(1),
                      "flags": [f for f in head.group(2).split(",") if f],
                      "mtu": int(head.group(3)) if head.group(3) else None,
                      "inet": [], "inet6": [], "status": None, "members": [], "kind": None}
            continue
        if fields is None or not line[:1].isspace():
            continue
        words = line.split()
        if not words:
            continue
        if words[0] == "inet" and len(words) > 1:
            fields["inet"].append(words[1])
        elif words[0] == "inet6" and len(words) > 1:
            fields["inet6"].append(words[1].split("%")[0])
        elif words[0] == "status:" and len(words) > 1:
            fields["status"] = words[1]
        elif words[0] == "member:" and len(words) > 1:
            fields["members"].append(words[1])
        elif words[0] == "type:":
            fields["kind"] = " ".join(words[1:])
    flush()
    return tuple(blocks)


# -- system_profiler SPThunderboltDataType ------------------------------------------


@attrs.frozen
class ThunderboltPeer:
    """Another Mac on a Thunderbolt receptacle (directly, or behind hubs)."""

    name: str
    domain_uuid: str
    #: It lists the RDMA service (protocol 64087): RDMA is enabled on *that* Mac.
    offers_rdma: bool
    via: tuple[str, ...] = ()  # hubs/docks in between, nearest first


@attrs.frozen
class ThunderboltReceptacle:
    """One Thunderbolt bus of this Mac (one receptacle) and who is on it."""

    bus: str
    receptacle: int | None
    speed: str  # "80 Gb/s", "40 Gb/s", "Up to 120 Gb/s" (idle TB5)
    connected: bool
    peers: tuple[ThunderboltPeer, ...] = ()


def _json_peers(items: Sequence[Mapping[str, Any]], via: tuple[str, ...]
                ) -> Iterator[ThunderboltPeer]:
    for item in items:
        if not isinstance(item, Mapping):
            continue
        name = str(item.get("_name", ""))
        if "domain_uuid_key" in item:
            services = item.get("services_title", [])
            rdma = any(isinstance(s, Mapping) and s.get("protocol_id_key") == RDMA_PROTOCOL_ID
                       for s in services if isinstance(services, list))
            yield ThunderboltPeer(name, str(item["domain_uuid_key"]), rdma, via)
        children = item.get("_items", [])
        if isinstance(children, list):
            # A host behind a hub (or a daisy chain) sits one or more levels down.
            hop = via if "domain_uuid_key" in item else (*via, name)
            yield from _json_peers(children, hop)


def parse_thunderbolt_json(text: str) -> tuple[ThunderboltReceptacle, ...]:
    """``system_profiler SPThunderboltDataType -json``: one entry per bus."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UnreadableOutput(f"system_profiler printed no JSON: {exc}") from exc
    buses = data.get("SPThunderboltDataType", []) if isinstance(data, dict) else []
    out: list[ThunderboltReceptacle] = []
    for bus in buses if isinstance(buses, list) else []:
        if not isinstance(bus, Mapping):
            continue
        tag = bus.get("receptacle_1_tag", {})
        tag = tag if isinstance(tag, Mapping) else {}
        receptacle = str(tag.get("receptacle_id_key", ""))
        items = bus.get("_items", [])
        out.append(ThunderboltReceptacle(
            bus=str(bus.get("_name", "")),
            receptacle=int(receptacle) if receptacle.isdigit() else None,
            speed=str(tag.get("current_speed_key", "")),
            connected=tag.get("receptacle_status_key") == "receptacle_connected",
            peers=tuple(_json_peers(items if isinstance(items, list) else [], ()))))
    return tuple(out)


@attrs.define
class _Node:
    name: str
    indent: int
    fields: dict[str, str] = attrs.field(factory=dict)
    children: list[_Node] = attrs.field(factory=list)


def _outline(text: str) -> _Node:
    """system_profiler's indented text as a tree of sections (``Name:``) and fields."""
    root = _Node("", -1)
    stack = [root]
    for line in _content_lines(text):
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        key, sep, value = line.strip().partition(": ")
        while len(stack) > 1 and stack[-1].indent >= indent:
            stack.pop()
        if sep and value and not line.rstrip().endswith(":"):
            stack[-1].fields[key] = value.strip()
        else:
            node = _Node(line.strip().rstrip(":"), indent)
            stack[-1].children.append(node)
            stack.append(node)
    return root


def _text_peers(node: _Node, via: tuple[str, ...]) -> Iterator[ThunderboltPeer]:
    for child in node.children:
        if "Domain UUID" in child.fields:
            yield ThunderboltPeer(child.name, child.fields["Domain UUID"],
                                  _offers_rdma(child), via)
            yield from _text_peers(child, via)
        elif "Vendor Name" in child.fields or "Device Name" in child.fields:
            yield from _text_peers(child, (*via, child.name))  # a hub or dock
        else:
            yield from _text_peers(child, via)  # "Port:", "Services:" ...


def _offers_rdma(node: _Node) -> bool:
    if node.fields.get("Protocol ID") == str(RDMA_PROTOCOL_ID):
        return True
    return any(_offers_rdma(c) for c in node.children
               if "Domain UUID" not in c.fields)


def _find(node: _Node, name: str) -> _Node | None:
    return next((c for c in node.children if c.name == name), None)


def parse_thunderbolt_text(text: str) -> tuple[ThunderboltReceptacle, ...]:
    """``system_profiler SPThunderboltDataType`` (text): one entry per bus.

    system_profiler indents a bus's ``Port:`` fields deeper than the peer that
    follows, so the peer can land under ``Port:`` in the outline; peers are searched
    in the whole bus subtree.
    """
    out: list[ThunderboltReceptacle] = []

    def buses(node: _Node) -> Iterator[_Node]:
        for child in node.children:
            if re.match(r"Thunderbolt(/USB4)? Bus \d+", child.name):
                yield child
            else:
                yield from buses(child)

    for bus in buses(_outline(text)):
        port = _find(bus, "Port")
        fields = port.fields if port is not None else {}
        receptacle = fields.get("Receptacle", "")
        out.append(ThunderboltReceptacle(
            bus=bus.name, receptacle=int(receptacle) if receptacle.isdigit() else None,
            speed=fields.get("Speed", ""),
            connected=fields.get("Status", "") == "Device connected",
            peers=tuple(_text_peers(bus, ()))))
    return tuple(out)


def parse_thunderbolt(text: str) -> tuple[ThunderboltReceptacle, ...]:
    """Either form of ``system_profiler SPThunderboltDataType`` (JSON if it is JSON)."""
    if text.lstrip().startswith("{"):
        return parse_thunderbolt_json(text)
    return parse_thunderbolt_text(text)
