"""The jaccl init ledger: which init attempts since boot may still hold RDMA resources.

Why: every jaccl ``init`` opens one connection per device name in the rank's row of
the device matrix, and each connection allocates a protection domain (PD) on that
device. A Thunderbolt RDMA device holds few (one user read ``max_pd 11`` in
``ibv_devinfo -v``), for all processes together. A rank that exits normally gives its
PDs back; field reports say that ranks killed or left running do not, until the owner
is killed or the Mac reboots. Past the limit jaccl fails with "Changing queue pair
to RTR failed with errno 96", and every retry makes it worse. The kernel does not say
how many PDs are in use, so clusterfsm keeps its own count.

What is kept: one small file per init attempt, in ``jaccl-init-ledger/`` in the
default node-id file's directory (per user), written just before the MLX call: the
boot time, the pid, the devices of the row (with repeats: one PD per connection). The
file is removed when its process exits through Python (``atexit``: a normal exit, an
error, SIGINT or SIGTERM handled by ``serve``), since jaccl's connections give their
PDs back then. A rank killed with SIGKILL, crashed or frozen in the driver leaves its
file: it is counted until the Mac reboots. Entries of another boot are ignored when counting and
deleted at the next record, so the count starts over at every boot.

Why a directory of files and not one file: several ranks on one Mac may record at
once; one file per attempt, each written to a temporary name and renamed into place,
is atomic without a lock, and no attempt is lost to a concurrent read-modify-write.

Never in the way of a bootstrap: a ledger that cannot be read or written is a typed
warning (:class:`LedgerUnavailable`), logged and put on the state's trace record,
never an exception out of :meth:`InitLedger.record`.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from pathlib import Path

import attrs
import trio

from clusterfsm.states.boottime import BootTimeUnknown, boot_time, same_boot
from clusterfsm.states.localfiles import LocalFileError, read_small_text
from clusterfsm.states.nodeid import default_node_id_path
from clusterfsm.states.pids import valid_pid
from clusterfsm.states.tools import ToolRunner, run_tool

#: The ledger's directory name, in the default node-id file's directory.
LEDGER_DIR = "jaccl-init-ledger"
#: An entry is a few hundred bytes; anything larger is not one.
MAX_ENTRY_BYTES = 4096
#: Entries read at most (each is one small file): a ledger this full means every
#: device is long out of protection domains anyway.
MAX_ENTRIES = 1024

_PREFIX, _SUFFIX = "attempt-", ".json"
_log = logging.getLogger("clusterfsm.states.initledger")

#: Returns this machine's boot time in Unix seconds, or raises BootTimeUnknown.
BootClock = Callable[[], Awaitable[int]]


def default_ledger_dir() -> Path:
    return default_node_id_path().parent / LEDGER_DIR


@attrs.frozen(auto_exc=True)
class LedgerUnavailable(Exception):
    """The ledger could not be read or written (a typed warning, never fatal)."""

    path: str
    problem: str

    def __str__(self) -> str:
        return f"jaccl init ledger {self.path}: {self.problem}"


@attrs.frozen
class Attempt:
    """One recorded jaccl init attempt."""

    pid: int
    boot_time: int
    devices: tuple[str, ...]  # the row's device names, one per connection
    at: float  # wall clock, Unix seconds

    def to_json(self) -> str:
        return json.dumps({"pid": self.pid, "boot_time": self.boot_time,
                           "devices": list(self.devices), "at": self.at}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Attempt:
        """ValueError for anything that is not an entry this module wrote."""
        obj = json.loads(text)
        if not isinstance(obj, dict):
            raise ValueError("not an object")
        pid, boot, devices, at = (obj.get(k) for k in ("pid", "boot_time", "devices", "at"))
        if not (valid_pid(pid) and type(boot) is int and isinstance(at, float | int)
                and isinstance(devices, list)
                and all(isinstance(d, str) for d in devices)):
            raise ValueError("missing or mistyped fields")
        return cls(pid, boot, tuple(devices), float(at))


@attrs.frozen
class LedgerView:
    """The attempts of this boot that may still hold protection domains."""

    path: str
    boot_time: int
    attempts: tuple[Attempt, ...]
    #: Entries that could not be read (not counted; the doctor says so).
    unreadable: int = 0

    def used(self, device: str) -> int:
        """Protection domains the recorded attempts may hold on ``device``."""
        return sum(a.devices.count(device) for a in self.attempts)

    def pids(self, device: str) -> tuple[int, ...]:
        return tuple(a.pid for a in self.attempts if device in a.devices)


class RecordedAttempt:
    """An entry this process wrote; removed when the process exits through Python.

    Only by the process that wrote it: the ``atexit`` registration is inherited by a
    ``fork()`` (an app's multiprocessing worker), and a child's clean exit must not
    give back protection domains its parent still holds.
    """

    def __init__(self, path: Path, attempt: Attempt) -> None:
        self.path = path
        self.attempt = attempt
        self._owner = os.getpid()
        atexit.register(self.release)

    def release(self) -> None:
        """Remove the entry (its PDs are given back); idempotent, never raises; a
        no-op in a forked child."""
        atexit.unregister(self.release)
        if os.getpid() != self._owner:
            return
        with suppress(OSError):
            self.path.unlink()


class InitLedger:
    """The ledger in ``directory``; ``boot_clock`` says when this machine booted.

    ``directory`` may be a function, asked on first use: the default one depends on
    the home directory, which a service may not have (then the ledger is unavailable,
    a warning, and the bootstrap goes on).
    """

    def __init__(self, directory: Path | Callable[[], Path], boot_clock: BootClock, *,
                 pid: Callable[[], int] = os.getpid,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._directory = directory
        self.boot_clock = boot_clock
        self._pid = pid
        self._wall_clock = wall_clock
        self._boot: int | None = None

    @property
    def directory(self) -> Path:
        """Where the entries are; :class:`LedgerUnavailable` if it cannot be known."""
        if isinstance(self._directory, Path):
            return self._directory
        try:
            return Path(self._directory())
        except RuntimeError as exc:  # Path.home() without a home directory
            raise LedgerUnavailable("~/.config/clusterfsm/" + LEDGER_DIR, str(exc)) from None

    async def boot_time(self) -> int:
        """This boot's time, read once per ledger and then remembered: it cannot
        change while this process lives, and :meth:`record` runs between the barrier's
        go and init, where a ``sysctl`` subprocess would let the ranks drift apart."""
        if self._boot is None:
            try:
                self._boot = await self.boot_clock()
            except BootTimeUnknown as exc:
                raise LedgerUnavailable(self._where(), f"boot time unknown ({exc})") from None
        else:
            await trio.lowlevel.checkpoint()
        return self._boot

    def _where(self) -> str:
        try:
            return str(self.directory)
        except LedgerUnavailable as exc:
            return exc.path

    def _entries(self) -> tuple[list[tuple[Path, Attempt]], int]:
        """Every readable entry, and how many could not be read (bounded)."""
        directory = self.directory
        try:
            names = sorted(n for n in os.listdir(directory)
                           if n.startswith(_PREFIX) and n.endswith(_SUFFIX))
        except FileNotFoundError:
            return [], 0
        except OSError as exc:
            raise LedgerUnavailable(str(directory), exc.strerror or str(exc)) from None
        found: list[tuple[Path, Attempt]] = []
        unreadable = max(0, len(names) - MAX_ENTRIES)
        for name in names[:MAX_ENTRIES]:
            path = directory / name
            try:
                found.append((path, Attempt.from_json(
                    read_small_text(path, limit=MAX_ENTRY_BYTES)[0])))
            except LocalFileError as exc:
                if not exc.missing:  # released meanwhile: not an attempt any more
                    unreadable += 1
            except ValueError:  # bad JSON or fields
                unreadable += 1
        return found, unreadable

    async def view(self) -> LedgerView:
        """The attempts of this boot (read only: doctor uses this too).

        Raises :class:`LedgerUnavailable` when the boot time or the directory cannot
        be read.
        """
        boot = await self.boot_time()
        entries, unreadable = self._entries()
        mine = tuple(a for _p, a in entries if same_boot(a.boot_time, boot))
        return LedgerView(str(self.directory), boot, mine, unreadable)

    async def record(self, devices: Sequence[str]) -> RecordedAttempt | LedgerUnavailable:
        """Write this attempt (just before the MLX call); first forget the attempts of
        earlier boots. A problem is returned as a warning, logged, never raised."""
        try:
            boot = await self.boot_time()
            entries, _unreadable = self._entries()
            for path, attempt in entries:
                if not same_boot(attempt.boot_time, boot):
                    with suppress(OSError):  # gone meanwhile, or not removable: not
                        path.unlink()  # counted anyway (another boot's PDs came back)
            attempt = Attempt(self._pid(), boot, tuple(devices), self._wall_clock())
            path = self._write(attempt)
        except LedgerUnavailable as exc:
            _log.warning("%s; this jaccl init attempt is not counted", exc)
            return exc
        except OSError as exc:
            warning = LedgerUnavailable(self._where(), exc.strerror or str(exc))
            _log.warning("%s; this jaccl init attempt is not counted", warning)
            return warning
        return RecordedAttempt(path, attempt)

    def _write(self, attempt: Attempt) -> Path:
        """Atomically: a private temporary file, synced, renamed into place."""
        directory = self.directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        stem = f"{attempt.pid}-{secrets.token_hex(4)}"
        final = directory / f"{_PREFIX}{stem}{_SUFFIX}"
        temporary = directory / f".{_PREFIX}{stem}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                view = memoryview(attempt.to_json().encode() + b"\n")
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, final)
        except BaseException:
            with suppress(OSError):
                temporary.unlink()
            raise
        return final


class NoLedger:
    """Records nothing (fake ranks in tests: their inits reach no RDMA); the plan
    check reports protection domains as not counted (``pd_budget``)."""

    async def record(self, devices: Sequence[str]) -> None:
        await trio.lowlevel.checkpoint()


def default_ledger(run: ToolRunner = run_tool, platform: str | None = None) -> InitLedger:
    """The per-user ledger in the default node-id file's directory, with the real
    boot time."""

    async def clock() -> int:
        return await boot_time(run) if platform is None else await boot_time(run, platform)

    return InitLedger(default_ledger_dir, clock)


__all__ = ["LEDGER_DIR", "Attempt", "InitLedger", "LedgerUnavailable", "LedgerView",
           "NoLedger", "RecordedAttempt", "default_ledger", "default_ledger_dir"]
