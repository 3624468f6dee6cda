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


@pytest.mark.parametrize("forked", [True, False], ids=["forked", "isolated-interpreter"])
async def test_both_starts_run_the_watchdog_program_and_clean_up_at_eof(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, forked: bool) -> None:
    """The program is a real module (watchdog_main): forked, the child calls its main();
    otherwise ``python -I -S watchdog_main.py`` runs it with only the standard library.
    Either way EOF on its pipe (the rank is gone) removes what was registered."""
    if forked and not watchdog._single_threaded_linux():
        pytest.skip("the forked start needs single-threaded Linux")
    monkeypatch.setattr(watchdog, "_single_threaded_linux", lambda: forked)
    registered = tmp_path / "topology"
    (registered / "sub").mkdir(parents=True)
    (registered / "sub" / "hostfile.json").write_text("[]")
    dog = watchdog.InitWatchdog()
    await dog.start()
    await dog.ready()
    await dog.arm(60.0, message="never printed", trace=None, record={}, end={},
                  t_armed=0.0, elapsed_before_ms=0.0)
    await dog.disarm()
    await dog.remove_on_exit([str(registered)])
    process = dog._process
    assert process is not None
    await dog.aclose()  # EOF: the watchdog removes the directory and exits 0
    assert process.returncode == 0
    assert not registered.exists()


def test_the_watchdog_program_needs_only_the_standard_library() -> None:
    """Run isolated and without site-packages, as the non-fork start runs it."""
    done = subprocess.run([sys.executable, "-I", "-S", str(watchdog.WATCHDOG_PROGRAM)],
                          input=b"DISARM\n", capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert watchdog.WATCHDOG_PROGRAM.name == "watchdog_main.py"
