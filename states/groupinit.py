"""Group init: one path for every backend, with a small backend-specific part.

What this module guarantees (docs/design.md section 3):

- **Checked before MLX can hang or crash**: a backend MLX lacks here (``jaccl`` on
  Linux, or a macOS wheel without ``librdma``) is :class:`BackendUnavailable` naming
  what is missing, raised before ``init`` is called.
- **Environment set only around the call** and restored exactly (values that were
  there come back; values that were not are removed); the ``JACCL_*`` twins, which
  would win over our ``MLX_*`` values, are cleared for the call.
- **Topology file private**: created exclusively (``O_EXCL``), mode 0600, in a fresh
  0700 directory, removed with the directory when the cluster closes (or by the
  watchdog when the rank dies); one a killed process group left behind is swept by
  the next rank that starts (:func:`sweep_stale_topology_dirs`).
- **One group per process**: MLX keeps the first group it makes for a backend and
  returns it from every later ``init`` in the process, dead or not. The initializer
  records each group it got (:class:`InitializedGroups`, one per process), and a
  second bootstrap in the same process fails before the barrier with
  :class:`GroupAlreadyInitialized` instead of confirming a dead group.
- ``mx.distributed.init(strict=False, backend=<explicit>)`` runs in a worker thread;
  a raised error is :class:`GroupInitFailed`, and a group whose size is not the world
  size (MLX's silent size-1 answer to a bad config) is :class:`GroupSizeMismatch`.

``init`` holds the GIL for its whole duration, so the trio loop of this process is
frozen while it runs; the barrier that precedes it and the hard deadline that bounds
it live in :mod:`clusterfsm.states.activities` and :mod:`clusterfsm.states.watchdog`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

from clusterfsm.fsm import note_outcome
from clusterfsm.states.codec import WireBackend
from clusterfsm.states.errors import (
    BackendUnavailable,
    GroupAlreadyInitialized,
    GroupInitFailed,
    GroupSizeMismatch,
    PrecheckFailed,
)
from clusterfsm.states.pids import pid_running
from clusterfsm.states.ringwindow import (
    VERBOSE_ENV,
    ConnectBackoff,
    await_ring_listeners,
    capture_active,
    no_wakeup_preemption,
    read_backoff,
    ring_log_capture,
    runs_first,
    wants_no_preemption,
)
from clusterfsm.states.sidechannel import AllGatherFactory, JacclSideChannel
from clusterfsm.states.tools import ToolRunner, run_tool
from clusterfsm.states.topology import PeerLink, Topology, devices_in_row

if TYPE_CHECKING:
    from mlx.core.distributed import Group as MlxGroup

    from clusterfsm.states.initledger import InitLedger, NoLedger

#: Fault injection for tests (``never-init``): see GroupInitializer.initialize.
FAULT_ENV = "CLUSTERFSM_FAULT"

#: jaccl also reads these twins of its ``MLX_*`` variables, and they win: cleared
#: before init so a stale one in the environment cannot override the plan.
JACCL_TWINS = ("JACCL_RANK", "JACCL_IBV_DEVICES", "JACCL_COORDINATOR", "JACCL_RING")


class Group(Protocol):
    """What the machine uses of a group: its rank and size.

    ``mlx.core.distributed.Group`` satisfies it, and so does a test's stand-in
    (:class:`clusterfsm.states.testing.FakeGroup`). The app gets the precise type:
    ``bootstrap_cluster`` with the real initializer yields a cluster whose ``group``
    is typed ``mlx.core.distributed.Group`` (see :mod:`clusterfsm.states.api`).
    """

    def rank(self) -> int: ...

    def size(self) -> int: ...


@attrs.frozen
class InitPlan:
    """Everything one rank needs to call init; identical topology on every rank."""

    backend: str  # "ring" or "jaccl" (never "any": resolved before the plan is made)
    rank: int
    world_size: int
    topology: Topology
    session_id: bytes
    coordinator: str | None = None
    #: jaccl: this rank's cables (peer rank, our interface, the peer's address on it),
    #: whose routes are checked before init; () for ring.
    peer_links: tuple[PeerLink, ...] = ()

    @property
    def wire_backend(self) -> WireBackend:
        return WireBackend.RING if self.backend == "ring" else WireBackend.JACCL


# -- environment and files ----------------------------------------------------------


class _EnvWindow:
    """One open :func:`patched_env`: the values its names had before it."""

    __slots__ = ("saved",)

    def __init__(self, saved: dict[str, str | None]) -> None:
        self.saved = saved


#: The open windows of this process, oldest first (several fake ranks in one process
#: in the tests; one in a real rank), and the lock their bookkeeping takes (init runs
#: in a worker thread).
_open_windows: list[_EnvWindow] = []
_windows_lock = threading.Lock()


@contextmanager
def patched_env(values: Mapping[str, str], clear: tuple[str, ...] = ()) -> Iterator[None]:
    """Set ``values`` and remove ``clear`` for the block; restore exactly afterwards.

    Exactly even when windows close out of order (fake ranks in one process): a window
    that closes under a later one still open hands its saved values to the first later
    window that changed the same name, which saved *our* values as its "before", and
    restores only the names no later window touched. So the env is as it was once the
    last window closes, whatever the interleaving.
    """
    names = tuple(values) + tuple(n for n in clear if n not in values)
    window = _EnvWindow({n: os.environ.get(n) for n in names})
    with _windows_lock:
        _open_windows.append(window)
    try:
        for n in clear:
            os.environ.pop(n, None)
        os.environ.update(values)
        yield
    finally:
        with _windows_lock:
            at = next(i for i, w in enumerate(_open_windows) if w is window)
            del _open_windows[at]
            later = _open_windows[at:]
            for n, old in window.saved.items():
                heir = next((w for w in later if n in w.saved), None)
                if heir is not None:
                    heir.saved[n] = old
                elif old is None:
                    os.environ.pop(n, None)
                else:
                    os.environ[n] = old


#: A topology directory's name: ``clusterfsm-<pid of its creator>-<mkdtemp suffix>``
#: (the supervisor's ``clusterfsm-gen<N>-`` directories never match).
_TOPOLOGY_DIR = re.compile(r"clusterfsm-(\d+)-[A-Za-z0-9_]+")
#: A topology directory is swept only when its creator is gone *and* it is at least this
#: old. The age guards a rank in another PID namespace sharing the temp directory (its
#: PID means nothing here): MLX reads the files only during init, which is bounded far
#: below this.
STALE_AFTER_S = 600.0
_swept = False


def sweep_stale_topology_dirs(root: Path | None = None, *, now: float | None = None
                              ) -> list[Path]:
    """Remove the topology directories of processes that are gone; the ones removed.

    Why: the rank removes its directory when the cluster closes, and its watchdog does
    when the rank dies; but a whole process group killed at once (``kill -9 -PGID``, a
    service manager's final SIGKILL) takes the watchdog too, and the directory stays.
    So a starting rank sweeps, once per process: a directory of this user, named for a
    PID that no longer exists, older than :data:`STALE_AFTER_S`. Housekeeping only: an
    entry that cannot be examined or removed is left for a later sweep, never an error
    for the bootstrap.
    """
    base = Path(tempfile.gettempdir()) if root is None else root
    limit = (time.time() if now is None else now) - STALE_AFTER_S
    removed: list[Path] = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed  # no readable temp directory: nothing of ours to sweep
    for name in names:
        match = _TOPOLOGY_DIR.fullmatch(name)
        if match is None or int(match[1]) == os.getpid():
            continue
        path = base / name
        try:
            info = path.lstat()
            if (not path.is_dir() or path.is_symlink() or info.st_uid != os.getuid()
                    or info.st_mtime > limit or pid_running(int(match[1]))):
                continue
            shutil.rmtree(path)
        except OSError:
            continue  # gone meanwhile, or not ours to remove: a later sweep retries
        removed.append(path)
    return removed


class TopologyDir:
    """A private directory (0700) for this session's topology files; removed on close.

    Few system calls on purpose (the scale bench makes 2,000 of these; on a journaled
    disk each metadata call costs 0.1-0.3 ms): a file is one ``open`` and one
    ``write``, and close unlinks the files this object wrote and removes the
    directory, falling back to ``rmtree`` only if something else was put there.
    """

    def __init__(self) -> None:
        global _swept
        if not _swept:
            _swept = True
            sweep_stale_topology_dirs()
        self.path = Path(tempfile.mkdtemp(prefix=f"clusterfsm-{os.getpid()}-"))
        os.chmod(self.path, 0o700)
        self._written: list[Path] = []

    def write(self, name: str, obj: Any) -> Path:
        target = self.path / name
        data = json.dumps(obj).encode()
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._written.append(target)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        return target

    def open_private(self, name: str) -> tuple[Path, int]:
        """A new private file (0600, created exclusively) for writing; removed on close."""
        target = self.path / name
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._written.append(target)
        return target, fd

    def close(self) -> None:
        """Remove the directory and everything in it (idempotent)."""
        for target in self._written:
            with suppress(FileNotFoundError):
                os.unlink(target)
        try:
            os.rmdir(self.path)
        except FileNotFoundError:
            return  # already removed (the watchdog does it for a rank that died)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            shutil.rmtree(self.path)  # something else was put there: remove it too


# -- backends -----------------------------------------------------------------------


def _mlx_distributed() -> Any:
    import mlx.core as mx

    return mx.distributed


def check_backend_available(backend: str) -> None:
    """Raise :class:`BackendUnavailable` if MLX cannot run ``backend`` here."""
    try:
        dist = _mlx_distributed()
    except ImportError as exc:
        raise BackendUnavailable(backend, f"mlx cannot be imported: {exc}") from exc
    if backend == "jaccl" and sys.platform != "darwin":
        raise BackendUnavailable(
            "jaccl",
            f"jaccl needs macOS 26.2+ with Thunderbolt RDMA; this is {sys.platform}, "
            "where MLX compiles jaccl out (use --backend ring)",
        )
    if not dist.is_available(backend):
        missing = ("librdma.dylib (MLX's jaccl backend is only in macOS 26.2+ wheels)"
                   if backend == "jaccl" else f"the {backend} backend in this MLX build")
        raise BackendUnavailable(backend, missing)


def resolve_backend(requested: str) -> str:
    """``any`` becomes the best available backend; MLX never sees ``any``."""
    if requested != "any":
        return requested
    try:
        check_backend_available("jaccl")
    except BackendUnavailable:
        return "ring"
    return "jaccl"


#: Every variable by which MLX's backends learn a multi-rank group.
BACKEND_VARS = ("MLX_RANK", "MLX_HOSTFILE", "MLX_IBV_DEVICES", "MLX_JACCL_COORDINATOR",
                "MLX_JACCL_RING", *JACCL_TWINS)


def backend_env(plan: InitPlan, files: TopologyDir) -> tuple[dict[str, str], tuple[str, ...]]:
    """The env vars to set and to clear for ``plan``; writes the topology file.

    World size 1 sets none and clears them all: the backend's non-strict init then
    finds no group to join and MLX hands back its own single-process group (rank 0,
    size 1). That is the same object as MLX's silent answer to a broken multi-rank
    configuration, which is why this is the only plan for which size 1 is right:
    for any other world size, :meth:`GroupInitializer.initialize` refuses a size-1
    group as :class:`GroupSizeMismatch`.
    """
    if plan.world_size == 1:
        return {}, BACKEND_VARS
    if plan.backend == "ring":
        hostfile = files.write(f"hostfile-{plan.session_id.hex()[:8]}.json",
                               [list(entry) for entry in plan.topology])
        return {"MLX_RANK": str(plan.rank), "MLX_HOSTFILE": str(hostfile)}, ()
    if plan.backend == "jaccl":
        devices = files.write(f"devices-{plan.session_id.hex()[:8]}.json",
                              [list(row) for row in plan.topology])
        env = {"MLX_RANK": str(plan.rank), "MLX_IBV_DEVICES": str(devices)}
        if plan.coordinator:
            env["MLX_JACCL_COORDINATOR"] = plan.coordinator
        return env, (*JACCL_TWINS, "MLX_JACCL_RING")
    raise BackendUnavailable(plan.backend, "unknown backend")


def release_delay(backend: str, rank: int, world_size: int, base_delay: float) -> float:
    """How long ``rank`` waits after the go signal before calling init.

    ring: every rank but the last listens first; the last connects first. If its
    connect reaches rank 0 before rank 0 listens, MLX sleeps 1 s (then 2, 4, ...), so
    the last rank starts ``base_delay`` after the others.
    """
    if backend == "ring" and world_size > 1 and rank == world_size - 1:
        return base_delay
    return 0.0


async def check_plan(plan: InitPlan, *, run: ToolRunner = run_tool,
                     ledger: InitLedger | NoLedger | None = None,
                     platform: str = sys.platform) -> None:
    """Checks of the plan that need the system (jaccl: RDMA on, devices present, the
    route to each peer, protection domains left against ``ledger``). Tests bind
    ``run`` to recorded output and ``platform`` to ``"darwin"``
    (``functools.partial``)."""
    if plan.backend == "jaccl" and plan.world_size > 1:
        from clusterfsm.states.rdma import check_jaccl_plan

        await check_jaccl_plan(plan.topology, plan.rank, plan.world_size, run,
                               peer_links=plan.peer_links, ledger=ledger,
                               platform=platform)


def installed_mlx_version() -> str:
    """The installed MLX's version, ``"none"`` if it cannot be imported."""
    try:
        import mlx.core as mx
    except ImportError:
        return "none"
    return str(getattr(mx, "__version__", "unknown"))


def supports_all_gather_factory() -> bool:
    """Whether this MLX's ``init`` takes ``all_gather_factory`` (mlx >= 0.32.1).

    Read from the binding's signature (nanobind puts it in ``__doc__``), never
    assumed from a version number.
    """
    try:
        init = _mlx_distributed().init
    except ImportError:
        return False
    return "all_gather_factory" in (getattr(init, "__doc__", "") or "")


# -- the call -----------------------------------------------------------------------

#: ``init_fn(backend, all_gather_factory)``; the factory is only given for jaccl.
InitFn = Callable[[str, AllGatherFactory | None], Group]


async def _await_ring_listeners(plan: InitPlan) -> None:
    await await_ring_listeners(plan.backend, plan.rank, plan.world_size, plan.topology)


def _import_mlx() -> None:
    _mlx_distributed()


def mlx_init(backend: str, all_gather_factory: AllGatherFactory | None = None) -> MlxGroup:
    dist = _mlx_distributed()
    if all_gather_factory is not None:
        group: MlxGroup = dist.init(strict=False, backend=backend,
                                    all_gather_factory=all_gather_factory)
    else:
        group = dist.init(strict=False, backend=backend)
    return group


class InitializedGroups:
    """The backends a process already got a group for from ``init``.

    MLX has no call that says whether it holds a group; this record is kept where
    every init passes (:meth:`GroupInitializer.initialize`). A group is recorded when
    ``init`` returns at all, even one of the wrong size: that errs on the side of a
    new process, never of a dead group.
    """

    def __init__(self) -> None:
        self._backends: set[str] = set()

    def check_fresh(self, backend: str) -> None:
        """Raise :class:`GroupAlreadyInitialized` if ``backend`` already has a group here."""
        if backend in self._backends:
            raise GroupAlreadyInitialized(backend)

    def record(self, backend: str) -> None:
        self._backends.add(backend)


#: This process's record, used by the real initializer. A test that runs several
#: fake ranks in one process gives each its own (:func:`~states.testing.fake_initializer`).
PROCESS_GROUPS = InitializedGroups()


async def _in_worker_thread(fn: Callable[[], Group]) -> Group:
    return await trio.to_thread.run_sync(fn)


class GroupInitializer:
    """Runs ``init`` for a plan. Tests inject ``init_fn`` and ``run_blocking``.

    The default calls the real ``mx.distributed.init`` in a trio worker thread.
    Under a ``MockClock`` tests pass a direct call instead of a thread (virtual time
    would otherwise jump while the thread runs).
    """

    def __init__(
        self,
        init_fn: InitFn = mlx_init,
        run_blocking: Callable[[Callable[[], Group]], Any] = _in_worker_thread,
        precheck: Callable[[str], None] = check_backend_available,
        prepare: Callable[[], None] | None = None,
        plan_check: Callable[[InitPlan], Awaitable[None]] | None = None,
        side_channel_supported: Callable[[], bool] = supports_all_gather_factory,
        groups: InitializedGroups = PROCESS_GROUPS,
        mlx_version: Callable[[], str] | None = None,
        first_listener: Callable[[InitPlan], Awaitable[None]] | None = None,
        ledger: InitLedger | NoLedger | None = None,
    ) -> None:
        self.init_fn = init_fn
        self.run_blocking = run_blocking
        self.precheck = precheck
        self._ledger = ledger
        #: Runs on every rank before init (jaccl: rdma_ctl, ibv_devices, the matrix,
        #: routes, protection domains).
        self.plan_check: Callable[[InitPlan], Awaitable[None]] = (
            plan_check or self._check_plan)
        self.side_channel_supported = side_channel_supported
        #: The groups this process already has (MLX keeps one per backend per process).
        self.groups = groups
        #: The MLX version every rank must share (compared before init).
        self.mlx_version: Callable[[], str] = mlx_version or installed_mlx_version
        #: Called in ``idle``: imports MLX (~80 ms) long before the timed init.
        self.prepare: Callable[[], None] = prepare or _import_mlx
        #: ring's last rank: waits for the other ranks' listeners where it sees them.
        self.first_listener = first_listener or _await_ring_listeners
        #: What MLX's ring logged of its connect back-off in the last ``initialize``.
        self.backoff: ConnectBackoff | None = None

    async def initialize(self, plan: InitPlan, files: TopologyDir,
                         side_channel: JacclSideChannel | None = None,
                         before_call: Callable[[], Awaitable[None]] | None = None) -> Group:
        """Init for ``plan``; ``before_call`` is awaited right before the blocking call
        (rank 0 releases the ring's last rank there: the least time between that go
        and rank 0's own listen)."""
        if os.environ.get(FAULT_ENV) == "never-init":
            if before_call is not None:
                await before_call()
            # Fault injection for tests: pass the barrier, then never call init (the
            # peer that hangs everyone else's init). Documented in docs/states.md.
            await trio.sleep_forever()
        try:
            env, clear = backend_env(plan, files)
        except OSError as exc:  # disk full, directory gone
            raise PrecheckFailed("topology_file", f"cannot write the {plan.backend} "
                                 f"topology file in {files.path}: {exc}") from exc
        factory = side_channel.factory if side_channel is not None else None
        self.groups.check_fresh(plan.backend)  # checked before the barrier too
        self.backoff = None
        await self.first_listener(plan)
        if plan.backend == "jaccl" and plan.world_size > 1:
            # before the env is patched: the env is the process's, and nothing may run
            # between patching it and the call (fake ranks in one process share it)
            await self._record_attempt(plan)
        calm = wants_no_preemption(plan.backend, plan.rank, plan.world_size)

        def call() -> Group:
            last = plan.backend == "ring" and not calm and plan.world_size > 1
            # in the thread that calls init
            with no_wakeup_preemption(calm), runs_first(last):
                return self.init_fn(plan.backend, factory)

        # MLX's log of a refused dial, on the ranks whose dial races (not the last
        # rank: its log line would sit between its dial and its listen, the race).
        observe = calm
        keep_verbose = VERBOSE_ENV in os.environ
        if observe:
            env = {**env, VERBOSE_ENV: os.environ.get(VERBOSE_ENV, "1")}
        if before_call is not None:
            # Before the env is patched, like the ledger: the env is the process's, and
            # no other task may run between patching it and the call (fake ranks in one
            # process share it; a task switch here let one rank read another's
            # MLX_RANK and hostfile). Patching costs microseconds, so rank 0 still
            # calls init right after releasing the ring's last rank.
            await before_call()
        with patched_env(env, clear), self._ring_log(observe, plan, files, keep_verbose):
            try:
                group: Group = await self.run_blocking(call)
            except RuntimeError as exc:
                # A round cut short because this state was cancelled (its deadline,
                # the app): the cancellation wins, not the side channel's note of it.
                await trio.lowlevel.checkpoint_if_cancelled()
                if side_channel is not None and side_channel.failure is not None:
                    raise side_channel.failure from exc
                raise GroupInitFailed(plan.backend, str(exc)) from exc
        self.groups.record(plan.backend)
        if group.size() != plan.world_size:
            raise GroupSizeMismatch(plan.world_size, group.size())
        return group

    @property
    def ledger(self) -> InitLedger | NoLedger:
        """jaccl init attempts since boot (this user's ledger unless one was given):
        recorded right before each jaccl init, counted by the default plan check.
        Made on first use: a ring rank never needs it, and the ledger's modules (the
        macOS output parsers among them) cost ~9 ms of start-up."""
        if self._ledger is None:
            from clusterfsm.states.initledger import default_ledger

            self._ledger = default_ledger()
        return self._ledger

    @ledger.setter
    def ledger(self, ledger: InitLedger | NoLedger) -> None:
        self._ledger = ledger

    async def _check_plan(self, plan: InitPlan) -> None:
        """The default plan check, against the ledger this initializer records in
        (read when it runs: the ledger may be replaced after construction)."""
        await check_plan(plan, ledger=self.ledger)

    async def _record_attempt(self, plan: InitPlan) -> None:
        """Put this jaccl init in the ledger (one protection domain per connection of
        the row) right before MLX allocates them; a ledger that cannot be written is
        a warning on the trace, never a reason not to init."""
        from clusterfsm.states.initledger import LedgerUnavailable

        outcome = await self.ledger.record(devices_in_row(plan.topology, plan.rank))
        if isinstance(outcome, LedgerUnavailable):
            note_outcome(f"{outcome}; this init attempt is not counted")

    @contextmanager
    def _ring_log(self, observe: bool, plan: InitPlan, files: TopologyDir,
                  keep_verbose: bool) -> Iterator[None]:
        """MLX's log of the call goes to a private file and is read afterwards
        (:mod:`clusterfsm.states.ringwindow`); ``self.backoff`` names a back-off."""
        if not observe or capture_active():
            # fd 2 is the process's: a second bootstrap in this process (tests, the
            # scale bench) must not capture over the first one's capture
            yield
            return
        try:
            path, fd = files.open_private(f"mlx-init-{plan.session_id.hex()[:8]}.log")
        except OSError:
            yield  # no private file: init runs unobserved rather than not at all
            return
        try:
            with ring_log_capture(fd):
                yield
        finally:
            os.close(fd)
            self.backoff = read_backoff(path, keep_verbose)


