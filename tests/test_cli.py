"""The CLI's contract: keygen, diagram --check, argument errors; README matches CI."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

from clusterfsm.states.cli import main
from clusterfsm.states.keys import KeyFileError, load_key

ROOT = Path(__file__).resolve().parents[1]


def test_keygen_writes_a_private_key_and_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "k"
    assert main(["keygen", str(path)]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(load_key(path)) == 32
    assert main(["keygen", str(path)]) == 2


def test_a_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k"
    main(["keygen", str(path)])
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_key(path)


def test_diagram_check_passes_on_this_checkout_and_fails_on_a_stale_file(
    tmp_path: Path,
) -> None:
    assert main(["diagram", "--check", "--root", str(ROOT)]) == 0
    # a checkout (its README carries the generated diagram), written from scratch
    (tmp_path / "README.md").write_text((ROOT / "README.md").read_text())
    assert main(["diagram", "--root", str(tmp_path)]) == 0
    assert main(["diagram", "--check", "--root", str(tmp_path)]) == 0
    (tmp_path / "diagrams" / "bootstrap.mmd").write_text("stale\n")
    assert main(["diagram", "--check", "--root", str(tmp_path)]) == 1


def test_serve_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "k"
    main(["keygen", str(key)])
    assert main(["serve", "--rank", "1", "--world-size", "2", "--key-file", str(key)]) == 2
    assert "needs at least one peer" in capsys.readouterr().err
    assert main(["serve", "--rank", "0", "--world-size", "2", "--key-file", str(key),
                 "--listen", "127.0.0.1:1", "--deadline", "nope=1"]) == 2
    assert "no such state" in capsys.readouterr().err
    assert main(["serve", "--rank", "0", "--world-size", "2", "--key-file", str(key),
                 "--listen", "127.0.0.1:1", "--deadline", "idle=-1"]) == 2
    assert "positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--rank", "0", "--world-size", "2", "--key-file", str(key),
              "--deadline", "idle=soon"])


@pytest.mark.parametrize("extra", [[], ["--supervise"]])
def test_a_deadline_for_ready_is_a_one_line_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str],
) -> None:
    """``ready`` is steady (no deadline): refused when the flags are parsed, by the
    runner's own rule, never a run that ends in ``unexpected ValueError`` (which a
    supervisor would restart)."""
    key = tmp_path / "k"
    main(["keygen", str(key)])
    capsys.readouterr()
    assert main(["serve", "--rank", "0", "--world-size", "2", "--key-file", str(key),
                 "--listen", "127.0.0.1:1", "--deadline", "ready=1", *extra]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("clusterfsm serve: deadline ready=1.0: state 'ready' declares "
                          "no timeout error")
    assert "unexpected" not in err and "ValueError" not in err


def test_demo_refuses_a_bad_deadline_before_starting_ranks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["demo", "--deadline", "handshaking=inf"]) == 2
    assert capsys.readouterr().err.startswith(
        "clusterfsm demo: deadline handshaking=inf: the deadline must be a positive, finite")


@pytest.mark.parametrize(("flag", "name"), [("--trace-json", "t.jsonl"),
                                           ("--report", "r.html")])
def test_demo_refuses_an_output_in_a_missing_directory_before_starting_ranks(
    flag: str, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--trace-json`` in a missing directory printed "demo OK" with no trace (the
    ranks' traces were silently not written); ``--report`` there ran the whole demo
    and only then refused. Both are usage errors before any rank starts."""
    import clusterfsm.states.demo as demo

    def no_ranks(*_args: object) -> None:
        raise AssertionError("ranks started")

    monkeypatch.setattr(demo, "run_ranks", no_ranks)
    out = tmp_path / "missing" / name
    assert main(["demo", flag, str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"clusterfsm demo: {flag} ") and "does not exist" in err, err


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```sh\n(.*?)\n```", readme, flags=re.S)
    test_command = next(c for c in commands if c.endswith("pytest"))
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_a_supervised_generation_is_bounded_by_the_child_deadlines() -> None:
    """The child's deadlines are the machine's, with its ``--deadline`` overrides."""
    from clusterfsm.states.cli import build_parser
    from clusterfsm.states.supervisor_cli import BOOTSTRAP_MARGIN_S, policy_from

    argv = ["serve", "--rank", "0", "--world-size", "2", "--key-file", "k", "--supervise"]
    default = policy_from(build_parser().parse_args(argv))
    assert default.bootstrap_timeout_s == 90.0 + BOOTSTRAP_MARGIN_S
    shorter = policy_from(build_parser().parse_args([*argv, "--deadline", "handshaking=1"]))
    assert shorter.bootstrap_timeout_s == 90.0 - 14.0 + BOOTSTRAP_MARGIN_S


@pytest.mark.parametrize("size", [15, 16])
def test_the_key_length_rule_is_the_same_for_file_config_and_handshake(
    tmp_path: Path, size: int
) -> None:
    """One rule (states.keys.MIN_KEY_BYTES), applied where a key enters."""
    from clusterfsm.states.config import Address, ClusterConfig
    from clusterfsm.states.handshake import JoinerHandshake
    from clusterfsm.states.keys import MIN_KEY_BYTES, write_key

    key = bytes(range(size))
    path = write_key(tmp_path / "k", key)
    building = [
        lambda: load_key(path),
        lambda: ClusterConfig(rank=1, world_size=2, key=key,
                              peers=(Address("127.0.0.1", 5000),)),
        lambda: JoinerHandshake(key, bytes(16), 1, 2, 5000),
    ]
    for build in building:
        if size >= MIN_KEY_BYTES:
            build()
        else:
            with pytest.raises((KeyFileError, ValueError), match=f"at least {MIN_KEY_BYTES}"):
                build()


@pytest.mark.parametrize(("args", "says"), [
    (["--beacon-port", "70000"], "beacon_port 70000 is out of range"),
    (["--beacon-port", "0"], "beacon_port 0 is out of range"),
    (["--listen-seconds", "inf"], "--listen-seconds must be a finite number"),
    (["--listen-seconds", "nan"], "--listen-seconds must be a finite number"),
    (["--listen-seconds", "-1"], "--listen-seconds must be a finite number"),
])
def test_doctor_refuses_what_serve_would_refuse_and_an_endless_listen(
    args: list[str], says: str, capsys: pytest.CaptureFixture[str],
) -> None:
    """doctor passed a beacon port serve refuses ("a bootstrap could start"), and
    ``--listen-seconds inf`` listened for beacons forever."""
    assert main(["doctor", "--interface", "lo", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clusterfsm doctor: ") and says in err, err


@pytest.mark.parametrize("check", [True, False])
def test_diagram_outside_the_repository_is_a_usage_error_that_writes_nothing(
    check: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """Run from anywhere else, ``diagram --check`` said five files were "out of date"
    and ``diagram`` created diagrams/ and docs/ in that directory."""
    argv = ["diagram", "--root", str(tmp_path), *(["--check"] if check else [])]
    assert main(argv) == 2
    assert "is not a clusterfsm repository" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
