"""A watchdog that cannot start is a typed failure where it is needed, not a crash."""

from __future__ import annotations

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
