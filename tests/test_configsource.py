"""ClusterConfig from CLUSTERFSM_* variables and from TOML: every problem names the
variable or key to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from clusterfsm.states.config import Address, ClusterConfig
from clusterfsm.states.configsource import (
    SETTINGS,
    ConfigError,
    config_from_env,
    config_from_toml,
)
from clusterfsm.states.keys import write_key


@pytest.fixture
def key_file(tmp_path: Path) -> str:
    return str(write_key(tmp_path / "cluster.key"))


def test_from_env_reads_every_kind_of_setting(key_file: str) -> None:
    config = config_from_env({
        "CLUSTERFSM_RANK": "1", "CLUSTERFSM_WORLD_SIZE": "3",
        "CLUSTERFSM_KEY_FILE": key_file, "CLUSTERFSM_PEERS": "10.0.0.1:7700, [::1]:7701",
        "CLUSTERFSM_BACKEND": "any",
        "CLUSTERFSM_DEADLINES": "handshaking=20, initializing_group=60",
        "CLUSTERFSM_HEARTBEAT_INTERVAL": "0.2", "CLUSTERFSM_PEER_LOST_AFTER": "5",
        "CLUSTERFSM_VERIFY": "yes", "CLUSTERFSM_EPOCH": "7",
        "CLUSTERFSM_EPOCH_FLOORS": "1=3", "CLUSTERFSM_UNRELATED": "ignored",
    })
    assert config.rank == 1 and config.world_size == 3 and config.backend == "any"
    assert config.peers == (Address("10.0.0.1", 7700), Address("::1", 7701))
    assert config.deadlines == {"handshaking": 20.0, "initializing_group": 60.0}
    assert (config.heartbeat_interval, config.peer_lost_after) == (0.2, 5.0)
    assert config.verify and config.epoch == 7 and dict(config.epoch_floors) == {1: 3}


@pytest.mark.parametrize(("env", "names", "says"), [
    ({"CLUSTERFSM_RANK": None}, ("CLUSTERFSM_RANK",), "required"),
    ({"CLUSTERFSM_RANK": "one"}, ("CLUSTERFSM_RANK",), "integer or 'auto'"),
    ({"CLUSTERFSM_WORLD_SIZE": "2.5"}, ("CLUSTERFSM_WORLD_SIZE",), "integer"),
    ({"CLUSTERFSM_WORLD_SIZE": "9" * 5000}, ("CLUSTERFSM_WORLD_SIZE",), "5000 digits"),
    ({"CLUSTERFSM_PEERS": "nohost"}, ("CLUSTERFSM_PEERS",), "HOST:PORT"),
    ({"CLUSTERFSM_BACKEND": "mpi"}, ("CLUSTERFSM_BACKEND",), "ring, jaccl, any"),
    ({"CLUSTERFSM_DEADLINES": "ready=3"}, ("CLUSTERFSM_DEADLINES",), "steady"),
    ({"CLUSTERFSM_DEADLINES": "handshaking"}, ("CLUSTERFSM_DEADLINES",), "STATE=SECONDS"),
    ({"CLUSTERFSM_VERIFY": "maybe"}, ("CLUSTERFSM_VERIFY",), "true or false"),
    ({"CLUSTERFSM_KEY_FILE": "/nonexistent/k"}, ("CLUSTERFSM_KEY_FILE",), "key file"),
    ({"CLUSTERFSM_EPOCH": "-1"}, ("CLUSTERFSM_EPOCH",), "0..2**64-1"),
    ({"CLUSTERFSM_RANK": "3"}, ("CLUSTERFSM_RANK", "CLUSTERFSM_WORLD_SIZE"), "rank must be"),
    ({"CLUSTERFSM_LISTEN": None}, ("CLUSTERFSM_RANK", "CLUSTERFSM_LISTEN"), "listen address"),
    ({"CLUSTERFSM_LISTEN": "[fe80::1%lo]:7700"},
     ("CLUSTERFSM_RANK", "CLUSTERFSM_LISTEN", "CLUSTERFSM_PEERS", "CLUSTERFSM_INTERFACES"),
     "IPv4 only"),
    ({"CLUSTERFSM_PEER_LOST_AFTER": "0.1"},
     ("CLUSTERFSM_HEARTBEAT_INTERVAL", "CLUSTERFSM_PEER_LOST_AFTER"), "two heartbeat"),
])
def test_from_env_errors_name_the_variable(key_file: str, env: dict[str, str | None],
                                           names: tuple[str, ...], says: str) -> None:
    base: dict[str, str | None] = {
        "CLUSTERFSM_RANK": "0", "CLUSTERFSM_WORLD_SIZE": "2",
        "CLUSTERFSM_KEY_FILE": key_file, "CLUSTERFSM_LISTEN": "127.0.0.1:7700"}
    base.update(env)
    environ = {k: v for k, v in base.items() if v is not None}
    with pytest.raises(ConfigError) as caught:
        config_from_env(environ)
    assert caught.value.names == names
    assert says in str(caught.value) and all(n in str(caught.value) for n in names)
    assert isinstance(caught.value, ValueError)


def test_from_toml_reads_a_file_and_a_table(tmp_path: Path, key_file: str) -> None:
    path = tmp_path / "app.toml"
    path.write_text(f"""
[clusterfsm]
rank = 0
world_size = 2
key_file = "{key_file}"
listen = "127.0.0.1:7700"
heartbeat_interval = 0.05
peer_lost_after = 1
[clusterfsm.deadlines]
handshaking = 30
""")
    config = config_from_toml(path, table="clusterfsm", environ={})
    assert config.rank == 0 and config.listen == Address("127.0.0.1", 7700)
    assert config.deadlines == {"handshaking": 30.0} and config.peer_lost_after == 1.0
    assert config.epoch == 0
    supervised = config_from_toml(path, table="clusterfsm",
                                         environ={"CLUSTERFSM_EPOCH": "4"})
    assert supervised.epoch == 4  # the supervisor's variable, never in the file


@pytest.mark.parametrize(("text", "names", "says"), [
    ("rank = 0\nworld_size = 2\nkey_file = '{k}'\nlisten = '127.0.0.1:1'\nworldsize = 2\n",
     ("{p}: worldsize",), "not a setting"),
    ("rank = 'zero'\nworld_size = 2\nkey_file = '{k}'\n", ("{p}: rank",), "'auto'"),
    ("rank = 1\nworld_size = 2\nkey_file = '{k}'\n", ("{p}: rank", "{p}: peers"),
     "needs at least one"),
    ("rank = 0\nworld_size = 2\nkey_file = '{k}'\nverify = 'si'\n", ("{p}: verify",),
     "true or false"),
    ("rank = 0\nworld_size = [2]\n", ("{p}: world_size",), "integer"),
    ("rank = 0\nworld_size = \n", ("{p}",), "not valid TOML"),
])
def test_from_toml_errors_name_the_key(tmp_path: Path, key_file: str, text: str,
                                       names: tuple[str, ...], says: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text.format(k=key_file))
    with pytest.raises(ConfigError) as caught:
        config_from_toml(path, environ={})
    assert caught.value.names == tuple(n.format(p=path) for n in names)
    assert says in str(caught.value)


@pytest.mark.parametrize("kind", ["fifo", "zero", "latin", "folder", "missing"])
def test_from_toml_reads_only_a_small_regular_utf8_file(tmp_path: Path, kind: str) -> None:
    """A FIFO hung config_from_toml, /dev/zero was read without end, and a file in
    another encoding escaped as a bare UnicodeDecodeError: each is a ConfigError
    naming the file."""
    import os

    path = {"zero": Path("/dev/zero"), "missing": tmp_path / "absent.toml"}.get(
        kind, tmp_path / kind)
    if kind == "fifo":
        os.mkfifo(path, 0o600)
    elif kind == "latin":
        path.write_bytes(b"rank = 0\nworld_size = '\xff'\n")
    elif kind == "folder":
        path.mkdir()
    with pytest.raises(ConfigError) as caught:
        config_from_toml(path, environ={})
    assert caught.value.names == (str(path),)
    assert "cannot read the file" in str(caught.value)


def test_every_setting_is_a_config_field_and_documented() -> None:
    import attrs

    fields = {f.name for f in attrs.fields(ClusterConfig)}
    doc = (Path(__file__).resolve().parents[1] / "docs" / "embedding.md").read_text()
    for setting in SETTINGS:
        assert setting.field in fields
        assert f"`{setting.env}`" in doc and f"`{setting.key}`" in doc, setting.key
