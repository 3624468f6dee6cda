"""Whether a process still exists, for the files that record their creator's PID.

Two owners of local state name a process by its PID and must tell a live one from a
gone one: the jaccl init ledger (:mod:`clusterfsm.states.initledger`: which recorded
attempts' processes still run) and the topology-directory sweep
(:func:`clusterfsm.states.groupinit.sweep_stale_topology_dirs`). One rule for both:
a PID read from disk may be anything, and ``os.kill`` treats 0 and negative numbers
as process *groups* and raises OverflowError on huge ones, so only ``0 < pid <
MAX_PID`` can name a process at all.
"""

from __future__ import annotations

import os
from typing import Final, TypeGuard

#: Above every PID a supported system hands out (Linux's pid_max is at most 2**22,
#: macOS's 99,998); PIDs are C ints.
MAX_PID: Final = 2**31


def valid_pid(value: object) -> TypeGuard[int]:
    """Whether ``value`` (read from a file) can be a process id: an int, not a bool,
    in ``1 .. MAX_PID - 1``."""
    return type(value) is int and 0 < value < MAX_PID


def pid_running(pid: int) -> bool:
    """Whether process ``pid`` exists; one of another user counts as running, and a
    number that cannot be a PID never runs."""
    if not valid_pid(pid):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["MAX_PID", "pid_running", "valid_pid"]
