"""``clusterfsm doctor``: for real on a veth link (good, down, missing), and its macOS
RDMA checks on output recorded on real Macs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from clusterfsm.states.doctor import DoctorOptions, Host, render_text, run_checks
from clusterfsm.states.keys import write_key
from clusterfsm.states.netif import InterfaceStatus
from clusterfsm.states.preflight import Verdict
from tests.field_samples import FakeTools, sample, with_max_pd
from tests.netns import Namespace, NetnsPair, netns_pair  # noqa: F401 - fixture

CLI = [sys.executable, "-m", "clusterfsm.states.cli"]


def doctor(ns: Namespace, tmp: Path, *interfaces: str) -> tuple[int, dict[str, Any]]:
    argv = [*CLI, "doctor", "--json", "--key-file", str(tmp / "cluster.key"),
            "--node-id-file", str(tmp / "node-doctor"), "--listen-seconds", "1.5"]
    for name in interfaces:
        argv += ["--interface", name]
    done = ns.run(argv)
    return done.returncode, json.loads(done.stdout)


def by_check(report: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {c["check"]: c for c in report["checks"]}


@pytest.fixture
def key(tmp_path: Path) -> Path:
    return write_key(tmp_path / "cluster.key", b"k" * 32)


@pytest.mark.netns
def test_doctor_on_a_good_link_hears_the_peer_and_passes(
        netns_pair: NetnsPair, tmp_path: Path, key: Path) -> None:  # noqa: F811
    pair = netns_pair
    pair.b.popen([*CLI, "serve", "--rank", "auto", "--world-size", "2", "--key-file",
                  str(key), "--interface", pair.b.interface, "--node-id-file",
                  str(tmp_path / "node-b"), "--quiet"],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    code, report = doctor(pair.a, tmp_path, pair.a.interface)
    checks = by_check(report)
    assert code == 0 and report["ok"], report
    for name in ("interface", "interface_up", "carrier", "address", "mtu", "peers",
                 "mlx", "backend_ring", "key_file", "node_id"):
        assert checks[name]["verdict"] == "pass", checks[name]
    assert pair.b.address in checks["peers"]["detail"]
    assert checks["rdma"]["verdict"] == "n/a" and "not applicable" in checks["rdma"]["detail"]
    # the peer's serve shares our process table: a warning, not a failure
    assert checks["leftover_ranks"]["verdict"] == "warn"
    assert not (tmp_path / "node-doctor").exists()  # doctor creates nothing


@pytest.mark.netns
def test_doctor_on_a_pulled_cable_fails_with_the_remedy(
        netns_pair: NetnsPair, tmp_path: Path, key: Path) -> None:  # noqa: F811
    netns_pair.link_down("b")
    code, report = doctor(netns_pair.a, tmp_path, netns_pair.a.interface)
    carrier = by_check(report)["carrier"]
    assert code == 1 and not report["ok"]
    assert carrier["verdict"] == "fail" and "plug the cable in" in carrier["remedy"]
    assert carrier["subject"] == netns_pair.a.interface


@pytest.mark.netns
def test_doctor_on_a_missing_interface_names_the_ones_there_are(
        netns_pair: NetnsPair, tmp_path: Path, key: Path) -> None:  # noqa: F811
    code, report = doctor(netns_pair.a, tmp_path, "nosuch0")
    missing = by_check(report)["interface"]
    assert code == 1 and missing["verdict"] == "fail"
    assert "no such interface" in missing["detail"]
    assert netns_pair.a.interface in missing["detail"]


def test_text_output_gives_each_failure_its_remedy(tmp_path: Path) -> None:
    options = DoctorOptions(key_file=str(tmp_path / "absent.key"))
    host = Host(platform="linux", mlx_version=lambda: "0.0-test",
                backend_check=lambda _backend: None)
    import trio

    findings = trio.run(run_checks, options, host)
    text = render_text(findings, options, "linux")
    assert "FAIL  key_file" in text and "-> `clusterfsm keygen F`" in text
    assert "result: a bootstrap cannot start (1 check(s) failed)" in text


def test_a_key_others_can_read_is_a_failure(tmp_path: Path) -> None:
    path = write_key(tmp_path / "k", b"k" * 32)
    path.chmod(0o644)
    from clusterfsm.states.doctor import key_check

    finding, key = key_check(DoctorOptions(key_file=str(path)))
    assert finding.failed and key is None and finding.remedy == f"`chmod 600 {path}`"


# -- the macOS checks, on recorded output -------------------------------------------

PORTS = "networksetup-listallhardwareports--m5max-mbp-sanitized.txt"
TB_NO_RDMA = ("system_profiler-SPThunderboltDataType-json--"
              "peer-lacks-rdma-service-sanitized.txt")


def mac_host(**answers: str) -> Host:
    """An M5 Max MacBook Pro (osaurus capture) whose en6 is up with an address."""
    tools = FakeTools({
        "rdma_ctl status": sample("rdma_ctl--enabled.txt"),
        "ibv_devices": sample("ibv_devices--three-devices-unsorted-m5max-mbp-sanitized.txt"),
        "ibv_devinfo -v -d rdma_en6": sample(
            "ibv_devinfo--three-ports-down-peer-rdma-disabled-sanitized.txt"),
        "ifconfig en6": sample("ifconfig--en8-self-assigned-169254-mac-mini.txt").replace(
            "en8", "en6"),
        "networksetup -listallhardwareports": sample(PORTS),
        "system_profiler SPThunderboltDataType -json": sample(TB_NO_RDMA),
        **answers,
    })
    return Host(platform="darwin", run=tools,
                probe=lambda name: InterfaceStatus(name, True, 9, True, True,
                                                   "169.254.138.233", 1500),
                backend_check=lambda _backend: None, mlx_version=lambda: "0.32.4")


async def test_doctor_on_a_mac_whose_peer_has_rdma_off_says_what_to_run_there(
        tmp_path: Path, key: Path) -> None:
    options = DoctorOptions(("en6",), "jaccl", str(key), str(tmp_path / "n"),
                            listen_seconds=0.0)
    findings = await run_checks(options, mac_host())
    checks = {f.check: f for f in findings}
    assert checks["rdma_disabled"].verdict is Verdict.PASS
    assert checks["device_missing"].verdict is Verdict.PASS
    down = checks["port_down"]
    assert down.failed and "on that Mac run `rdma_ctl status`" in down.remedy
    assert checks["link_speed"].verdict is Verdict.PASS  # receptacle 2: 80 Gb/s


async def test_doctor_on_a_tb4_mac_with_rdma_enabled_but_no_device(
        tmp_path: Path, key: Path) -> None:
    host = mac_host(ibv_devices=sample(
        "ibv_devices--header-only-rdma-disabled-sanitized.txt"))
    for backend, verdict in (("jaccl", Verdict.FAIL), ("ring", Verdict.WARN)):
        options = DoctorOptions(("en6",), backend, str(key), str(tmp_path / "n"),
                                listen_seconds=0.0)
        checks = {f.check: f for f in await run_checks(options, host)}
        assert checks["no_rdma_devices"].verdict is verdict  # ring does not need RDMA


async def test_doctor_checks_the_route_to_each_peer_heard(
        tmp_path: Path, key: Path) -> None:
    # A peer heard on en6 whose address the kernel routes through en1 (the real
    # `route get` sample): jaccl would fail with RTR errno 60; for ring only a warning.
    from clusterfsm.states.doctor import rdma_checks

    host = mac_host(**{"route -n get 192.0.43.10": sample(
        "route-get--default-route-via-en1-macpro-real-world-systems.txt")})
    for backend, verdict in (("jaccl", Verdict.FAIL), ("ring", Verdict.WARN)):
        options = DoctorOptions(("en6",), backend, str(key), str(tmp_path / "n"),
                                listen_seconds=0.0)
        found = await rdma_checks(options, host, backend == "jaccl",
                                  {"en6": ("192.0.43.10",)})
        (route,) = [f for f in found if f.check == "peer_route"]
        assert route.verdict is verdict and route.subject == "en6"
        assert "-interface en6" in route.remedy


async def test_doctor_counts_init_attempts_since_boot_against_max_pd(
        tmp_path: Path, key: Path) -> None:
    # Field failure: RTR errno 96 after repeated inits. The boot time is the recorded
    # `sysctl kern.boottime`; max_pd is synthesized onto the recorded device block
    # (no recorded macOS output shows it: tests/field_samples.with_max_pd).
    import attrs

    from clusterfsm.states.initledger import InitLedger, default_ledger

    devinfo = with_max_pd(sample(
        "ibv_devinfo--three-ports-down-peer-rdma-disabled-sanitized.txt"), "rdma_en6", 11)
    base = mac_host(**{"ibv_devinfo -v -d rdma_en6": devinfo, "sysctl kern.boottime":
                       sample("sysctl-kern.boottime--os-x-2015-darwin-uptime-fact.txt")})
    ledger = InitLedger(tmp_path / "ledger", default_ledger(base.run, "darwin").boot_clock)
    host = attrs.evolve(base, ledger=ledger)
    options = DoctorOptions(("en6",), "jaccl", str(key), str(tmp_path / "n"),
                            listen_seconds=0.0)
    checks = {f.check: f for f in await run_checks(options, host)}
    assert checks["pd_budget"].verdict is Verdict.PASS
    assert "of its 11 protection domains" in checks["pd_budget"].detail
    attempts = [await ledger.record(["rdma_en6"]) for _ in range(11)]
    checks = {f.check: f for f in await run_checks(options, host)}
    budget = checks["pd_budget"]
    assert budget.failed and budget.subject == "rdma_en6"
    assert "11 jaccl init attempt(s) since boot" in budget.detail
    assert "reboot" in budget.remedy
    assert len(list((tmp_path / "ledger").iterdir())) == 11  # doctor changed nothing
    for attempt in attempts:
        assert not isinstance(attempt, Exception)
        attempt.release()
    # without a boot time (no sysctl answer) it cannot count: a warning
    checks = {f.check: f for f in await run_checks(options, mac_host())}
    assert checks["pd_budget"].verdict is Verdict.WARN
    assert "boot time unknown" in checks["pd_budget"].detail


async def test_leftover_mlx_ranks_are_a_warning_with_the_remedy() -> None:
    # Field failure: RTR errno 96 the morning after; leaked ranks hold the RDMA
    # resources. No real process table was recorded: these lines are written by hand.
    import os

    from clusterfsm.states.doctor import leftover_ranks

    table = ("  101 /usr/bin/python3 -m mlx_lm.server --model m\n"
             "  102 /opt/venv/bin/mlx.launch --backend jaccl run.py\n"
             "  103 /opt/venv/bin/clusterfsm serve --world-size 2\n"
             "  104 vim mlx-notes.txt\n"
             "  105 /opt/venv/bin/clusterfsm doctor\n")
    ps = f"ps -U {os.getuid()} -o pid=,args="
    finding = await leftover_ranks(Host(run=FakeTools({ps: table})))
    assert finding.verdict is Verdict.WARN
    assert all(pid in finding.detail for pid in ("101", "102", "103"))
    assert "104" not in finding.detail and "105" not in finding.detail
    assert finding.remedy.startswith("kill leftover ranks (`kill PID`) or reboot; do not "
                                     "loop init")
    clean = await leftover_ranks(Host(run=FakeTools({ps: "  105 clusterfsm doctor\n"})))
    assert clean.verdict is Verdict.PASS


def test_a_name_no_interface_can_have_is_a_failure_not_a_crash() -> None:
    import trio

    options = DoctorOptions(("x" * 20,), listen_seconds=0.0)
    findings = trio.run(run_checks, options, Host(mlx_version=lambda: "0",
                                                  backend_check=lambda _b: None))
    (bad,) = [f for f in findings if f.check == "interface"]
    assert bad.failed and "1..15 bytes" in bad.detail
