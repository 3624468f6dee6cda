"""``serve --verify``: the all_sum after ready ends in a typed failure line, never in a
traceback or a wait without end, when a peer does not take part in it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from clusterfsm.states import serve
from clusterfsm.states.demo import free_port
from tests.test_integration_ring import Ranks, ranks  # noqa: F401 - fixture


@pytest.mark.integration
def test_a_peer_that_skips_the_verify_all_sum_is_a_typed_failure_not_a_traceback(
    ranks: Ranks, tmp_path: Path,  # noqa: F811 - fixture
) -> None:
    """Rank 1 runs without --verify and leaves after ready: rank 0's all_sum fails
    inside MLX ("connection to a peer was lost"). That was a RuntimeError traceback
    through two exception groups; it is an error line and exit 1."""
    key, port = ranks.key(), free_port()
    ranks.start("--rank", "0", "--world-size", "2", "--listen", f"127.0.0.1:{port}",
                "--key-file", str(key), "--verify", "--once", "--quiet")
    ranks.start("--rank", "1", "--world-size", "2", "--peer", f"127.0.0.1:{port}",
                "--key-file", str(key), "--once", "--quiet")
    (c0, out0, err0), (c1, _, err1) = ranks.finish(timeout=60)
    assert c1 == 0, err1
    assert c0 == 1, err0
    assert "Traceback" not in err0 and "ExceptionGroup" not in err0, err0
    assert "error VerifyFailed: --verify: the all_sum failed:" in err0, err0
    assert "DistributedGroup ready" not in out0


def test_the_verify_all_sum_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer that never joins the all_sum (stopped, or without --verify and still
    alive) left serve waiting inside MLX for good; the wait is bounded."""

    async def never_returns(_fn: Callable[[], float], **_kwargs: object) -> float:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    monkeypatch.setattr(trio.to_thread, "run_sync", never_returns)

    async def main() -> None:
        start = trio.current_time()
        with pytest.raises(serve.VerifyFailed) as caught:
            await serve._verify(object())
        assert trio.current_time() - start == pytest.approx(serve.VERIFY_TIMEOUT_S)
        assert "does every rank run with --verify?" in str(caught.value)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
