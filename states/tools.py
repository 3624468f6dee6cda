"""Running a system tool (``rdma_ctl``, ``ibv_devinfo``, ``route``, ``sysctl``) with a deadline.

Why one function: every pre-init check and every ``clusterfsm doctor`` line that asks
the operating system something goes through a :data:`ToolRunner`, so that tests
replace it with recorded real output (``tests/field_samples.py``) and production runs
every tool the same way: bounded in time (a tool that hangs is killed and reported,
never waited on), and every way it can fail is one typed
:class:`~states.errors.PrecheckFailed` (``tool_missing``, ``tool_failed``,
``tool_hung``) that the caller turns into a finding with its remedy.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import trio

from clusterfsm.states.errors import PrecheckFailed

#: Seconds one system tool may take before the check reports it as hung
#: (``system_profiler`` takes about a second).
TOOL_TIMEOUT = 5.0

#: Runs ``argv`` and returns its stdout; raises PrecheckFailed as :func:`run_tool` does.
ToolRunner = Callable[[Sequence[str]], Awaitable[str]]


async def run_tool(argv: Sequence[str]) -> str:
    """stdout of a system tool; a missing, failing or hung tool is PrecheckFailed.

    On the deadline trio kills the child before this returns (``run_process`` is
    cancelled), so a hung tool leaves no process behind.
    """
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


def remembering(run: ToolRunner) -> ToolRunner:
    """``run``, answering a command line it already answered from memory.

    For one round of checks: several checks read the same output (``ibv_devinfo -v
    -d DEV`` for the port state and for ``max_pd``; ``system_profiler``, about a
    second each time, for every receptacle). Only answers are remembered; a failure is
    asked again.
    """
    answers: dict[tuple[str, ...], str] = {}

    async def ask(argv: Sequence[str]) -> str:
        key = tuple(argv)
        if key not in answers:
            answers[key] = await run(argv)
        else:
            await trio.lowlevel.checkpoint()
        return answers[key]

    return ask


__all__ = ["TOOL_TIMEOUT", "ToolRunner", "remembering", "run_tool"]
