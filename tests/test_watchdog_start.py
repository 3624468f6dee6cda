"""A watchdog that cannot start is a typed failure where it is needed, not a crash."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from clusterfsm.states import watchdog
from clusterfsm.states.errors import PrecheckFailed


async def test_a_watchdog_that_cannot_start_fails_typed_in_ready(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_processes(*_: Any, **__: Any) -> Any:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(watchdog, "_single_threaded_linux", lambda: False)
    monkeypatch.setattr(watchdog.trio.lowlevel, "open_process", no_processes)
    dog = watchdog.InitWatchdog()
    await dog.start()  # a background task: must not raise
    with pytest.raises(PrecheckFailed) as info:
        await dog.ready()
    assert info.value.check == "watchdog"
    await dog.aclose()


_BOTH_STARTS = r"""
import sys, trio
from pathlib import Path
from clusterfsm.states import watchdog

forked = sys.argv[1] == "forked"
registered = Path(sys.argv[2])
if forked:
    assert watchdog._single_threaded_linux(), "a fresh interpreter is single-threaded"
else:
    watchdog._single_threaded_linux = lambda: False

async def main() -> None:
    dog = watchdog.InitWatchdog()
    await dog.start()
    await dog.ready()
    await dog.remove_on_exit([str(registered)])
    process = dog._process
    assert process is not None
    await dog.aclose()  # EOF: the watchdog removes the directory and exits 0
    assert process.returncode == 0, process.returncode
    assert not registered.exists()

trio.run(main)
"""


@pytest.mark.parametrize("forked", [True, False], ids=["forked", "isolated-interpreter"])
def test_both_starts_run_the_watchdog_program_and_clean_up_at_eof(
        tmp_path: Path, forked: bool) -> None:
    """The program is a real module (watchdog_main): forked, the child calls its main();
    otherwise ``python -I -S watchdog_main.py`` runs it with only the standard library.
    Either way EOF on its pipe (the rank is gone) removes what was registered.

    Each start runs in a fresh interpreter: the forked start is taken only by a
    single-threaded process, which the test process (MLX, trio's worker threads) is
    not, so testing it here would depend on which tests ran before.
    """
    if forked and not sys.platform.startswith("linux"):
        pytest.skip("the forked start is Linux's")
    registered = tmp_path / "topology"
    (registered / "sub").mkdir(parents=True)
    (registered / "sub" / "hostfile.json").write_text("[]")
    done = subprocess.run(
        [sys.executable, "-c", _BOTH_STARTS, "forked" if forked else "isolated",
         str(registered)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not registered.exists()


def test_the_watchdog_program_needs_only_the_standard_library() -> None:
    """Run isolated and without site-packages, as the non-fork start runs it."""
    done = subprocess.run([sys.executable, "-I", "-S", str(watchdog.WATCHDOG_PROGRAM)],
                          input=b"DISARM\n", capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert watchdog.WATCHDOG_PROGRAM.name == "watchdog_main.py"


async def test_a_watchdog_that_died_is_a_typed_failure_and_disarm_is_harmless(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A watchdog killed before init (an operator's kill, the OOM killer) made arm()
    raise a bare BrokenResourceError, so the run ended in ``unexpected``; and disarm()
    in initializing_group's finally replaced a successful init with the same error."""
    monkeypatch.setattr(watchdog, "_single_threaded_linux", lambda: False)
    dog = watchdog.InitWatchdog()
    await dog.start()
    await dog.ready()
    process = dog._process
    assert process is not None
    process.kill()
    await process.wait()
    with pytest.raises(PrecheckFailed) as info:
        await dog.remove_on_exit(["/nonexistent"])
        await dog.arm(1.0, message="m", trace=None, record={}, end={}, t_armed=0.0,
                      elapsed_before_ms=0.0)
    assert info.value.check == "watchdog" and "gone" in info.value.detail
    await dog.disarm()  # nothing left to disarm: no error
    await dog.aclose()
