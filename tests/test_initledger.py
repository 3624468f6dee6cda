"""Field failure row 7: "Changing queue pair to RTR failed with errno 96" after
repeated inits (protection domains leaked by killed or leftover ranks).

The boot time parsers run on recorded output (``sysctl kern.boottime`` from a Mac,
``/proc/stat`` from this project's Linux machine); ``max_pd`` is added to a recorded
``ibv_devinfo -v`` block (no recorded macOS paste shows it: see
``tests/field_samples.with_max_pd``). The ledger runs on real files in a temporary
directory with a fake boot time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from clusterfsm.states.boottime import (
    SAME_BOOT_SLACK,
    BootTimeUnknown,
    boot_time,
    parse_proc_stat_btime,
)
from clusterfsm.states.errors import PrecheckFailed
from clusterfsm.states.initledger import Attempt, InitLedger, LedgerUnavailable, RecordedAttempt
from clusterfsm.states.macos_output import (
    UnreadableOutput,
    parse_ibv_devinfo,
    parse_sysctl_boottime,
)
from clusterfsm.states.pids import pid_running
from clusterfsm.states.preflight import Verdict
from clusterfsm.states.rdma import check_jaccl_plan, pd_budget
from clusterfsm.states.topology import Topology
from tests.field_samples import (
    DEVINFO_EN4_ACTIVE,
    FakeTools,
    m4pro_mac,
    sample,
    transcript_output,
    with_max_pd,
)

BOOTTIME = "sysctl-kern.boottime--os-x-2015-darwin-uptime-fact.txt"
PROC_STAT = "proc-stat--linux-vm-2-cpus-btime.txt"
ROW_EN4: Topology = ((None, "rdma_en4"), ("rdma_en5", None))
BOOT = 1_426_005_997


class FakeBoot:
    """A boot clock a test can move (a reboot)."""

    def __init__(self, now: int = BOOT) -> None:
        self.now = now

    async def __call__(self) -> int:
        await trio.lowlevel.checkpoint()
        return self.now


def ledger_in(path: Path, boot: FakeBoot | None = None, pid: int = 4242) -> InitLedger:
    return InitLedger(path / "ledger", boot or FakeBoot(), pid=lambda: pid)


async def fill(ledger: InitLedger, n: int, devices: Sequence[str] = ("rdma_en4",)
               ) -> list[RecordedAttempt]:
    done = []
    for _ in range(n):
        outcome = await ledger.record(devices)
        assert isinstance(outcome, RecordedAttempt), outcome
        done.append(outcome)
    return done


def release_all(attempts: list[RecordedAttempt]) -> None:
    for attempt in attempts:
        attempt.release()  # and off this process's atexit list


# -- boot time ----------------------------------------------------------------------


def test_sysctl_boottime_reads_the_timeval_not_the_date_line() -> None:
    text = sample(BOOTTIME)  # the prompt line, the timeval line, a `= <date>` line
    assert parse_sysctl_boottime(text) == BOOT
    timeval, date_only = text.splitlines()[1:3]
    with pytest.raises(UnreadableOutput):
        parse_sysctl_boottime(date_only + "\n")
    # `sysctl -n kern.boottime` prints the same line without the name
    assert parse_sysctl_boottime(timeval.partition(": ")[2]) == BOOT


def test_proc_stat_btime_on_the_recorded_linux_file() -> None:
    text = transcript_output(PROC_STAT, "cat /proc/stat")
    assert parse_proc_stat_btime(text) == 1_796_142_057
    with pytest.raises(BootTimeUnknown):
        parse_proc_stat_btime("cpu  1 2 3\n")


async def test_boot_time_asks_sysctl_on_macos_and_proc_stat_on_linux() -> None:
    mac = FakeTools({"sysctl kern.boottime": sample(BOOTTIME)})
    assert await boot_time(mac, "darwin") == BOOT
    linux = await boot_time(FakeTools({}), "linux",
                            lambda: transcript_output(PROC_STAT, "cat /proc/stat"))
    assert linux == 1_796_142_057
    with pytest.raises(BootTimeUnknown, match="exited 1"):
        await boot_time(FakeTools({}), "darwin")  # sysctl failing
    with pytest.raises(BootTimeUnknown, match="win32"):
        await boot_time(FakeTools({}), "win32")
    if sys.platform.startswith("linux"):
        assert await boot_time(FakeTools({}), "linux") > 0  # the real /proc/stat


# -- max_pd -------------------------------------------------------------------------


def test_max_pd_is_read_from_the_device_block() -> None:
    text = with_max_pd(sample(DEVINFO_EN4_ACTIVE), "rdma_en4", 11)
    devices = {d.name: d for d in parse_ibv_devinfo(text)}
    assert devices["rdma_en4"].max_pd == 11 and devices["rdma_en4"].active
    assert devices["rdma_en2"].max_pd is None  # not given for it
    assert parse_ibv_devinfo(sample(DEVINFO_EN4_ACTIVE))[0].max_pd is None


# -- the ledger ---------------------------------------------------------------------


async def test_an_attempt_is_one_private_file_written_atomically(tmp_path: Path) -> None:
    ledger = ledger_in(tmp_path)
    (attempt,) = await fill(ledger, 1, ("rdma_en4", "rdma_en4", "rdma_en5"))
    files = sorted(os.listdir(tmp_path / "ledger"))
    assert files == [attempt.path.name]  # no temporary file left behind
    assert attempt.path.stat().st_mode & 0o777 == 0o600
    assert json.loads(attempt.path.read_text()) == {
        "pid": 4242, "boot_time": BOOT, "devices": ["rdma_en4", "rdma_en4", "rdma_en5"],
        "at": attempt.attempt.at}
    view = await ledger.view()
    assert view.used("rdma_en4") == 2 and view.used("rdma_en5") == 1  # one per connection
    assert view.pids("rdma_en5") == (4242,)
    attempt.release()
    assert not attempt.path.exists() and (await ledger.view()).attempts == ()
    attempt.release()  # idempotent


async def test_the_ledger_starts_over_after_a_reboot(tmp_path: Path) -> None:
    boot = FakeBoot()
    ledger = ledger_in(tmp_path, boot)
    before = await fill(ledger, 3)
    assert len((await ledger.view()).attempts) == 3
    boot.now += SAME_BOOT_SLACK  # a clock correction is still the same boot
    assert len((await ledger_in(tmp_path, boot).view()).attempts) == 3
    boot.now = BOOT + 86_400  # rebooted: the old attempts hold nothing any more
    ledger = ledger_in(tmp_path, boot)  # a process of the new boot (a ledger reads it once)
    view = await ledger.view()
    assert view.attempts == () and view.boot_time == BOOT + 86_400
    assert len(os.listdir(tmp_path / "ledger")) == 3  # viewing changes nothing (doctor)
    after = await fill(ledger, 1)  # the next record forgets the earlier boot
    assert os.listdir(tmp_path / "ledger") == [after[0].path.name]
    assert (await ledger.view()).used("rdma_en4") == 1
    release_all(before + after)


async def test_a_ledger_without_a_home_directory_is_a_warning(tmp_path: Path) -> None:
    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    ledger = InitLedger(no_home, FakeBoot())
    outcome = await ledger.record(["rdma_en4"])
    assert isinstance(outcome, LedgerUnavailable) and "home directory" in outcome.problem
    with pytest.raises(LedgerUnavailable):
        await ledger.view()


async def test_an_unwritable_ledger_is_a_typed_warning_never_a_crash(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    ledger = InitLedger(tmp_path / "file" / "ledger", FakeBoot())
    outcome = await ledger.record(["rdma_en4"])
    assert isinstance(outcome, LedgerUnavailable) and "file/ledger" in outcome.path
    with pytest.raises(LedgerUnavailable):
        await ledger.view()
    unknown = InitLedger(tmp_path / "ledger", _no_boot)
    assert isinstance(await unknown.record(["rdma_en4"]), LedgerUnavailable)
    (finding,) = await pd_budget({"rdma_en4": 1}, m4pro_mac(), ledger)
    assert finding.verdict is Verdict.WARN and finding.check == "pd_budget"


async def _no_boot() -> int:
    await trio.lowlevel.checkpoint()
    raise BootTimeUnknown("`sysctl kern.boottime` exited 1")


async def test_an_unreadable_entry_is_named_not_counted(tmp_path: Path) -> None:
    ledger = ledger_in(tmp_path)
    done = await fill(ledger, 1)
    (tmp_path / "ledger" / "attempt-1-deadbeef.json").write_text("{garbage")
    view = await ledger.view()
    assert view.used("rdma_en4") == 1 and view.unreadable == 1
    tools = m4pro_mac(**{"ibv_devinfo -v -d rdma_en4": with_max_pd(
        sample(DEVINFO_EN4_ACTIVE), "rdma_en4", 11)})
    (finding,) = await pd_budget({"rdma_en4": 1}, tools, ledger)
    assert "1 ledger entr(ies)" in finding.detail and "unreadable" in finding.detail
    release_all(done)


RECORD = """
import sys, trio
from pathlib import Path
from clusterfsm.states.initledger import InitLedger

async def boot():
    return 1426005997

async def main():
    attempt = await InitLedger(Path(sys.argv[1]), boot).record(["rdma_en4"])
    print(attempt.path, flush=True)

trio.run(main)
if sys.argv[2] == "killed":
    import os, signal
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_clean_exit_gives_its_attempt_back_a_killed_rank_does_not(tmp_path: Path) -> None:
    # jaccl's connections free their protection domains when the process ends
    # normally; one killed (or frozen in the driver) stays counted until reboot.
    directory = tmp_path / "ledger"
    clean = subprocess.run([sys.executable, "-c", RECORD, str(directory), "clean"],
                           capture_output=True, text=True, timeout=60, check=True)
    assert not Path(clean.stdout.strip()).exists()
    killed = subprocess.run([sys.executable, "-c", RECORD, str(directory), "killed"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert Path(killed.stdout.strip()).exists()


# -- the check ----------------------------------------------------------------------


def devinfo_max_pd(max_pd: int = 11) -> FakeTools:
    return m4pro_mac(**{"ibv_devinfo -v -d rdma_en4": with_max_pd(
        sample(DEVINFO_EN4_ACTIVE), "rdma_en4", max_pd)})


async def test_init_attempts_since_boot_against_max_pd(tmp_path: Path) -> None:
    ledger = ledger_in(tmp_path)
    (fresh,) = await pd_budget({"rdma_en4": 1}, devinfo_max_pd(), ledger)
    assert fresh.verdict is Verdict.PASS and "no jaccl init attempt" in fresh.detail
    done = await fill(ledger, 9)
    (close,) = await pd_budget({"rdma_en4": 1}, devinfo_max_pd(), ledger)
    assert close.verdict is Verdict.WARN  # 10 of 11 after this init: 1 left
    done += await fill(ledger, 1)
    (last,) = await pd_budget({"rdma_en4": 1}, devinfo_max_pd(), ledger)
    assert last.verdict is Verdict.WARN  # this init takes the 11th
    done += await fill(ledger, 1)
    (over,) = await pd_budget({"rdma_en4": 1}, devinfo_max_pd(), ledger,
                              running=lambda pid: pid == 4242)
    assert over.verdict is Verdict.FAIL and over.subject == "rdma_en4"
    assert ("11 jaccl init attempt(s) since boot (still running: pid 4242) may still "
            "hold 11 of its 11 protection domains (max_pd); this init needs 1") in over.detail
    assert "errno 96" in over.detail and str(tmp_path / "ledger") in over.detail
    assert over.remedy.startswith("reboot") and "do not loop init retries" in over.remedy
    (killed,) = await pd_budget({"rdma_en4": 1}, devinfo_max_pd(), ledger,
                                running=lambda pid: False)
    assert "(ended without a clean exit: pid 4242)" in killed.detail
    with pytest.raises(PrecheckFailed) as caught:
        await check_jaccl_plan(ROW_EN4, 0, 2, devinfo_max_pd(), ledger=ledger)
    assert caught.value.check == "pd_budget"
    # two connections on one device need two
    (two,) = await pd_budget({"rdma_en4": 2}, devinfo_max_pd(12), ledger)
    assert two.verdict is Verdict.FAIL
    release_all(done)
    await check_jaccl_plan(ROW_EN4, 0, 2, devinfo_max_pd(), ledger=ledger)


async def test_no_max_pd_in_the_output_is_a_warning_not_a_refusal(tmp_path: Path) -> None:
    ledger = ledger_in(tmp_path)
    (finding,) = await pd_budget({"rdma_en4": 1}, m4pro_mac(), ledger)  # real, no max_pd
    assert finding.verdict is Verdict.WARN and "shows no max_pd" in finding.detail
    await check_jaccl_plan(ROW_EN4, 0, 2, m4pro_mac(), ledger=ledger)


async def test_the_boot_time_is_read_once_per_ledger(tmp_path: Path) -> None:
    """``record`` runs between the barrier's go and init: it must not start a ``sysctl``
    there (the plan check's ``view`` already read the boot time)."""
    asked = 0

    async def clock() -> int:
        nonlocal asked
        asked += 1
        await trio.lowlevel.checkpoint()
        return BOOT

    ledger = InitLedger(tmp_path / "ledger", clock)
    await ledger.view()
    attempt = await ledger.record(["rdma_en4"])
    assert isinstance(attempt, RecordedAttempt)
    attempt.release()
    assert asked == 1


def test_an_entry_with_a_pid_no_process_can_have_is_unreadable_not_a_crash(
        tmp_path: Path) -> None:
    for pid in (0, -1, True, 10**30, "12"):
        text = json.dumps({"pid": pid, "boot_time": BOOT, "devices": ["rdma_en4"],
                           "at": 1.0})
        with pytest.raises(ValueError):
            Attempt.from_json(text)
    assert not pid_running(0) and not pid_running(-1) and not pid_running(10**30)


def test_a_forked_child_does_not_give_back_its_parent_s_attempt(tmp_path: Path) -> None:
    entry = tmp_path / "attempt-1.json"
    entry.write_text("{}")
    recorded = RecordedAttempt(entry, Attempt(os.getpid(), BOOT, ("rdma_en4",), 1.0))
    child = os.fork()
    if child == 0:  # the child exits "cleanly" through its inherited release
        recorded.release()
        os._exit(0)
    _pid, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert entry.exists()
    recorded.release()
    assert not entry.exists()
