"""What macOS says about RDMA over Thunderbolt, parsed; and the jaccl pre-init checks.

jaccl crashes or hangs inside MLX when RDMA is off, a device is missing or the
matrix is wrong (docs/design.md section 3). So before ``init`` every rank asks the
system tools and turns each problem into :class:`~states.errors.PrecheckFailed`
with the command the operator runs next:

- ``rdma_ctl status``: prints ``enabled`` or ``disabled`` (RDMA is off until
  ``rdma_ctl enable`` is run once from macOS Recovery);
- ``ibv_devices``: a two-line header, then one ``rdma_<interface>  <GUID>`` per line;
- ``ibv_devinfo -d DEV``: per port, ``state: PORT_ACTIVE (4)`` when a cable is in;
- ``networksetup -listallhardwareports``: blocks of ``Hardware Port:``, ``Device:``,
  ``Ethernet Address:`` lines (to find the Thunderbolt interfaces).

The parsers are pure (text in, values out) and tested on recorded samples in
``tests/samples/``; running the tools is one injectable function.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio

from clusterfsm.states.errors import PrecheckFailed
from clusterfsm.states.topology import RDMA_PREFIX, Topology, check_matrix, devices_in_row

#: Seconds one system tool may take before the check reports it as hung.
TOOL_TIMEOUT = 5.0


@attrs.frozen
class HardwarePort:
    """One block of ``networksetup -listallhardwareports``."""

    name: str  # "Thunderbolt 1", "Thunderbolt Bridge", "Wi-Fi"
    device: str  # "en2", "bridge0"
    address: str  # MAC, "N/A" for a bridge

    @property
    def is_thunderbolt(self) -> bool:
        return self.name.startswith("Thunderbolt") and not self.device.startswith("bridge")


def parse_rdma_ctl_status(text: str) -> bool:
    """True for ``enabled``, False for ``disabled``; anything else is a failed check."""
    word = text.strip().lower()
    if word == "enabled":
        return True
    if word == "disabled":
        return False
    raise PrecheckFailed("rdma_status", f"`rdma_ctl status` said {text.strip()[:80]!r}, "
                         "expected 'enabled' or 'disabled'")


def parse_ibv_devices(text: str) -> tuple[str, ...]:
    """Device names from ``ibv_devices`` (header lines and blanks skipped)."""
    names: list[str] = []
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0] in ("device", "------") or set(fields[0]) == {"-"}:
            continue
        names.append(fields[0])
    return tuple(names)


def parse_ibv_devinfo_states(text: str) -> tuple[str, ...]:
    """Port states (``PORT_ACTIVE``, ``PORT_DOWN``, ...) from ``ibv_devinfo -d DEV``."""
    states: list[str] = []
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep and key.strip() == "state" and value.split():
            states.append(value.split()[0])
    return tuple(states)


def parse_hardware_ports(text: str) -> tuple[HardwarePort, ...]:
    """The blocks of ``networksetup -listallhardwareports``."""
    ports: list[HardwarePort] = []
    current: dict[str, str] = {}

    def flush() -> None:
        if "Hardware Port" in current and "Device" in current:
            ports.append(HardwarePort(current["Hardware Port"], current["Device"],
                                      current.get("Ethernet Address", "")))
        current.clear()

    for line in text.splitlines():
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


# -- running the tools --------------------------------------------------------------

ToolRunner = Callable[[Sequence[str]], Awaitable[str]]


async def run_tool(argv: Sequence[str]) -> str:
    """stdout of a system tool; a missing, failing or hung tool is PrecheckFailed."""
    try:
        with trio.fail_after(TOOL_TIMEOUT):
            done = await trio.run_process(list(argv), capture_stdout=True,
                                          capture_stderr=True, check=False)
    except FileNotFoundError:
        raise PrecheckFailed("tool_missing", f"`{argv[0]}` is not installed: jaccl needs "
                             "macOS 26.2+ with RDMA over Thunderbolt") from None
    except OSError as exc:  # not executable, no processes left, ...
        raise PrecheckFailed("tool_failed", f"cannot run `{argv[0]}`: {exc}") from None
    except trio.TooSlowError:
        raise PrecheckFailed("tool_hung", f"`{' '.join(argv)}` did not answer in "
                             f"{TOOL_TIMEOUT:g} s") from None
    out = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()
        raise PrecheckFailed("tool_failed", f"`{' '.join(argv)}` exited "
                             f"{done.returncode}: {(err or out)[:200]}")
    return out


async def check_jaccl_plan(topology: Topology, rank: int, world_size: int,
                           run: ToolRunner = run_tool) -> None:
    """Everything about this rank's jaccl setup that can be known before ``init``."""
    check_matrix(topology, world_size)
    if not parse_rdma_ctl_status(await run(["rdma_ctl", "status"])):
        raise PrecheckFailed("rdma_disabled", "RDMA over Thunderbolt is disabled: boot "
                             "into macOS Recovery, run `rdma_ctl enable`, reboot")
    present = set(parse_ibv_devices(await run(["ibv_devices"])))
    for device in devices_in_row(topology, rank):
        if device not in present:
            raise PrecheckFailed(
                "device_missing", f"rank {rank} needs {device}, but ibv_devices lists "
                f"{sorted(present) or 'none'}: is the cable in, and is the interface "
                "out of the Thunderbolt Bridge?")
        states = parse_ibv_devinfo_states(await run(["ibv_devinfo", "-d", device]))
        if states and "PORT_ACTIVE" not in states:
            interface = device.removeprefix(RDMA_PREFIX)
            raise PrecheckFailed("interface_down", f"{device} (interface {interface}) is "
                                 f"{'/'.join(states)}: check the cable and that the peer "
                                 "is up")
