"""The app's own code in a rank: ``serve --worker MODULE:FUNCTION``.

A supervised rank's group lives in a child process per generation (docs/design.md
section 3.1: a lost or hung group cannot be recovered in its process), so the app's
work that needs the group has to run there too. A *worker* is an async function of
the ready cluster::

    async def all_sum_loop(cluster: clusterfsm.states.api.Cluster) -> None:
        while True:
            ...  # MLX calls through trio.to_thread.run_sync, on cluster.group

``serve --worker mymodule:all_sum_loop`` (and so ``serve --supervise --worker ...`` and
``supervise_ranks(..., worker=all_sum_loop)``, which pass it to each generation's
child) imports it in the rank process and, once the group is ready, runs
``await worker(cluster)`` while it watches for a lost peer and for SIGINT/SIGTERM:

- a lost peer, or a peer that left, cancels the worker; the rank reports it as
  without a worker (``peer_lost`` error line, or ``peer_left``) and the supervisor
  starts a new generation;
- a worker that raises ends the generation: its traceback goes to stderr, then the
  error line ``rank R: state worker_failed, error TYPE: MESSAGE``
  (:class:`clusterfsm.states.lines.ErrorLine`, state :data:`WORKER_FAILED`); exit 1;
- a worker that returns ends the rank cleanly (its peers see ``peer_left``); exit 0.
  Under a supervisor that is a generation's end like any other exit: a provider's
  worker is expected to run until it is cancelled.

A worker is named ``MODULE:FUNCTION`` (``FUNCTION`` may be dotted,
``pkg.mod:Class.method``) or ``PATH.py:FUNCTION`` for a script that is not importable
as a module (it is loaded under its file name, so its ``if __name__ == "__main__"``
block does not run again).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from clusterfsm.states.api import Cluster

#: An async function run with the ready cluster in every generation.
Worker = Callable[["Cluster[Any]"], Awaitable[Any]]

#: The error line's state when the worker raised (not a bootstrap machine state: the
#: machine was in ``ready``; the worker, the app's code, failed).
WORKER_FAILED = "worker_failed"


class WorkerSpecError(ValueError):
    """A worker name that cannot be loaded (bad syntax, import error, not async)."""


def _load_module(where: str) -> Any:
    if where.endswith(".py"):
        path = Path(where)
        spec = importlib.util.spec_from_file_location(f"_clusterfsm_worker_{path.stem}", path)
        if spec is None or spec.loader is None or not path.is_file():
            raise WorkerSpecError(f"--worker {where}: no such file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(where)


def load_worker(spec: str) -> Worker:
    """The async function named ``spec`` (``MODULE:FUNCTION`` or ``PATH.py:FUNCTION``)."""
    where, sep, name = spec.rpartition(":")
    if not (sep and where and name):
        raise WorkerSpecError(f"--worker expects MODULE:FUNCTION, got {spec!r}")
    try:
        target: Any = _load_module(where)
    except WorkerSpecError:
        raise
    except Exception as exc:  # any import-time failure is a usage error
        raise WorkerSpecError(f"--worker {spec}: cannot import {where}: "
                              f"{type(exc).__name__}: {exc}") from exc
    for part in name.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise WorkerSpecError(f"--worker {spec}: {where} has no {name}")
    if not inspect.iscoroutinefunction(target):
        raise WorkerSpecError(f"--worker {spec}: not an async function")
    worker: Worker = target
    return worker


def worker_spec(worker: Worker | str) -> str:
    """The ``--worker`` value that names ``worker`` in a child process.

    A function must be importable by name from a new process: a module-level (or
    class-level) ``async def``; one defined in a script run as ``__main__`` is named
    by the script's path. Lambdas, closures and local functions cannot be.
    """
    if isinstance(worker, str):
        return worker
    module = getattr(worker, "__module__", None)
    qualname = getattr(worker, "__qualname__", "")
    if not inspect.iscoroutinefunction(worker):
        raise WorkerSpecError(f"worker {worker!r} is not an async function")
    if not module or "<" in qualname:
        raise WorkerSpecError(f"worker {qualname or worker!r} is not importable by name "
                              f"(a local function or lambda): define it at module level")
    if module == "__main__":
        path = getattr(sys.modules["__main__"], "__file__", None)
        if not path:
            raise WorkerSpecError(f"worker {qualname} is in an interactive __main__: "
                                  f"define it in a module")
        return f"{Path(path).resolve()}:{qualname}"
    return f"{module}:{qualname}"


async def hold_group(cluster: Cluster[Any], stop: trio.Event, worker: Worker | None
                     ) -> Exception | None:
    """Hold the ready group until it is lost, ``stop`` is set, or ``worker`` ends.

    Runs ``await worker(cluster)`` meanwhile (cancelled by the first two). Returns the
    exception the worker raised, or None (``cluster.error`` says whether the group was
    lost, which the caller reports first: a worker's error is then often its echo).
    """
    failed: Exception | None = None
    async with trio.open_nursery() as waiters:
        async def lost() -> None:
            await cluster.wait_lost()
            waiters.cancel_scope.cancel()

        async def work(worker: Worker) -> None:
            nonlocal failed
            try:
                await worker(cluster)
            except Exception as exc:  # noqa: BLE001 - the app's error, returned to report
                failed = exc
            waiters.cancel_scope.cancel()

        waiters.start_soon(lost)
        if worker is not None:
            waiters.start_soon(work, worker)
        await stop.wait()
        waiters.cancel_scope.cancel()
    return failed


__all__ = [
    "WORKER_FAILED",
    "Worker",
    "WorkerSpecError",
    "hold_group",
    "load_worker",
    "worker_spec",
]
