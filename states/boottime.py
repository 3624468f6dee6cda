"""When this machine last booted: the key that ties the init ledger to one boot.

Why it matters: RDMA protection domains that a killed or stuck jaccl rank leaves
behind are given back by a reboot (docs/thunderbolt.md, "init attempts since boot"),
so the ledger of init attempts (:mod:`clusterfsm.states.initledger`) starts over
whenever the boot time changes.

Where it comes from: ``sysctl kern.boottime`` on macOS (a ``struct timeval``, parsed
by :func:`~states.macos_output.parse_sysctl_boottime`), the ``btime`` line of
``/proc/stat`` on Linux (whole seconds). Both are derived from the wall clock (the
kernel keeps "boot time = now - uptime"), so a clock step moves them by the step and
Linux's may differ by a second between two reads: :data:`SAME_BOOT_SLACK` says how
far apart two readings may be and still mean the same boot.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import attrs

from clusterfsm.states.errors import PrecheckFailed
from clusterfsm.states.macos_output import UnreadableOutput, parse_sysctl_boottime
from clusterfsm.states.tools import ToolRunner

#: Two boot times at most this many seconds apart are the same boot. A reboot moves
#: the boot time by at least the uptime at the earlier reading plus the reboot itself
#: (tens of seconds at the very least); a clock correction (NTP) moves it by the
#: correction, usually well under a second. A larger clock step reads as a reboot:
#: the ledger then forgets earlier attempts (it errs towards letting a rank try).
SAME_BOOT_SLACK = 10

PROC_STAT = Path("/proc/stat")


@attrs.frozen(auto_exc=True)
class BootTimeUnknown(Exception):
    """The boot time could not be read; ``detail`` says why (the tool, the file)."""

    detail: str

    def __str__(self) -> str:
        return self.detail


def parse_proc_stat_btime(text: str) -> int:
    """The ``btime N`` line of Linux's ``/proc/stat`` (Unix seconds)."""
    for line in text.splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == "btime" and words[1].isdigit():
            return int(words[1])
    raise BootTimeUnknown("/proc/stat has no 'btime' line")


def same_boot(a: int, b: int) -> bool:
    return abs(a - b) <= SAME_BOOT_SLACK


def _read_proc_stat() -> str:
    return PROC_STAT.read_text()


async def boot_time(run: ToolRunner, platform: str = sys.platform,
                    read_proc_stat: Callable[[], str] = _read_proc_stat) -> int:
    """This machine's boot time in Unix seconds; :class:`BootTimeUnknown` if it
    cannot be read (the ``sysctl`` call is bounded by the runner's deadline)."""
    if platform == "darwin":
        try:
            return parse_sysctl_boottime(await run(["sysctl", "kern.boottime"]))
        except PrecheckFailed as exc:
            raise BootTimeUnknown(exc.detail) from None
        except UnreadableOutput as exc:
            raise BootTimeUnknown(str(exc)) from None
    if platform.startswith("linux"):
        try:
            return parse_proc_stat_btime(read_proc_stat())
        except OSError as exc:
            raise BootTimeUnknown(f"cannot read {PROC_STAT}: {exc.strerror or exc}") from None
    raise BootTimeUnknown(f"no boot time source known on {platform}")


__all__ = ["SAME_BOOT_SLACK", "BootTimeUnknown", "boot_time", "parse_proc_stat_btime",
           "same_boot"]
