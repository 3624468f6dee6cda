"""Building a :class:`~states.config.ClusterConfig` from ``CLUSTERFSM_*`` variables or a
TOML file (docs/embedding.md, "Configuration").

One table (:data:`SETTINGS`) declares every setting once: its TOML key, its variable
(``CLUSTERFSM_`` + the key in capitals), how its text or TOML value is read, and a
line of help. Every problem is a :class:`ConfigError` naming the variable or key to
fix, including the config's own cross-field rules (``rank 0 ... needs a listen
address`` names ``CLUSTERFSM_LISTEN``). The supervisor's two per-process variables,
``CLUSTERFSM_EPOCH`` and ``CLUSTERFSM_EPOCH_FLOORS`` (:mod:`clusterfsm.states.epochs`),
are read from the environment in both cases: they are never written in a file.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from clusterfsm.states.config import BACKENDS, Address, ClusterConfig
from clusterfsm.states.epochs import EPOCH_ENV, EPOCH_FLOORS_ENV, parse_epoch, parse_floors
from clusterfsm.states.localfiles import LocalFileError, read_small_text

ENV_PREFIX = "CLUSTERFSM_"
#: A config file is a few hundred bytes; anything this large is not one.
MAX_CONFIG_FILE_BYTES = 1 << 20


@attrs.frozen(auto_exc=True)
class ConfigError(ValueError):
    """A setting is missing or wrong; ``names`` are the variables (or TOML keys) to fix."""

    names: tuple[str, ...]
    problem: str

    def __str__(self) -> str:
        return f"{', '.join(self.names)}: {self.problem}"


class _Bad(ValueError):
    """A value that does not parse (the caller adds the name)."""


# -- reading one value (text from a variable, or a TOML value) ------------------------


def _int(value: object) -> int:
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        try:
            return int(value)
        except ValueError:  # more digits than int() converts (sys.int_info)
            raise _Bad(f"expected an integer, got {len(value.strip())} digits") from None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _Bad(f"expected an integer, got {value!r}")


def _float(value: object) -> float:
    if isinstance(value, bool):
        raise _Bad(f"expected a number of seconds, got {value!r}")
    try:
        number = float(value) if isinstance(value, (str, int, float)) else math.nan
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise _Bad(f"expected a number of seconds, got {value!r}")
    return number


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise _Bad(f"expected true or false (1/0, yes/no), got {value!r}")


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise _Bad(f"expected a string, got {value!r}")
    return value


def _list(value: object) -> list[str]:
    """A TOML array of strings, or comma-separated text."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise _Bad(f"expected a list of strings (or comma-separated text), got {value!r}")


def _rank(value: object) -> int | None:
    if value == "auto":
        return None
    try:
        return _int(value)
    except _Bad:
        raise _Bad(f"expected an integer or 'auto', got {value!r}") from None


def _address(value: object) -> Address:
    try:
        return Address.parse(_text(value))
    except ValueError as exc:
        raise _Bad(str(exc)) from None


def _addresses(value: object) -> tuple[Address, ...]:
    return tuple(_address(item) for item in _list(value))


def _backend(value: object) -> str:
    text = _text(value)
    if text not in BACKENDS:
        raise _Bad(f"expected one of {', '.join(BACKENDS)}, got {text!r}")
    return text


def _deadlines(value: object) -> dict[str, float]:
    """A TOML table ``{state = seconds}``, or ``STATE=SECONDS,...`` text; checked by
    the runner's own rule (:func:`clusterfsm.fsm.effective_deadlines`)."""
    from clusterfsm.fsm import DeadlineOverrideError, effective_deadlines
    from clusterfsm.states.machine import BOOTSTRAP

    deadlines: dict[str, float] = {}
    if isinstance(value, Mapping):
        items = [(str(k), v) for k, v in value.items()]
    else:
        items = []
        for item in _list(value):
            state, sep, seconds = item.partition("=")
            if not sep:
                raise _Bad(f"expected STATE=SECONDS,..., got {item!r}")
            items.append((state.strip(), seconds))
    for state, seconds in items:
        deadlines[state] = _float(seconds)
    try:
        effective_deadlines(BOOTSTRAP, deadlines)
    except DeadlineOverrideError as exc:
        raise _Bad(str(exc)) from None
    return deadlines


def _key(value: object) -> bytes:
    from clusterfsm.states.keys import KeyFileError, load_key

    try:
        return load_key(_text(value))
    except KeyFileError as exc:
        raise _Bad(str(exc)) from None


def _node_id(value: object) -> bytes:
    from clusterfsm.states.nodeid import load_or_create_node_id

    try:
        return load_or_create_node_id(_text(value))
    except (OSError, ValueError) as exc:
        raise _Bad(f"cannot read or create the node-id file: {exc}") from None


@attrs.frozen
class Setting:
    """One setting: TOML ``key``, variable ``CLUSTERFSM_<KEY>``, the config ``field``
    it fills, how a value is read, and its help line (docs/embedding.md)."""

    key: str
    field: str
    read: Callable[[object], Any]
    help: str
    required: bool = False

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("rank", "rank", _rank, "this rank: N, or auto (elected; needs interfaces)",
            required=True),
    Setting("world_size", "world_size", _int, "number of ranks, 1..255", required=True),
    Setting("key_file", "key", _key, "path of the cluster key (`clusterfsm keygen`, 0600)",
            required=True),
    Setting("listen", "listen", _address, "rank 0's control address, HOST:PORT"),
    Setting("peers", "peers", _addresses, "rank 0's address(es), HOST:PORT (a list)"),
    Setting("backend", "backend", _backend, "ring, jaccl or any (default ring)"),
    Setting("interfaces", "interfaces", _list,
            "discover peers by beacons on these interfaces (a list)"),
    Setting("node_id_file", "node_id", _node_id,
            "node-id file (created if missing; default: the per-user one, with interfaces)"),
    Setting("beacon_port", "beacon_port", _int, "UDP port of the discovery beacons"),
    Setting("deadlines", "deadlines", _deadlines,
            "per-state deadline overrides: a table, or STATE=SECONDS,..."),
    Setting("heartbeat_interval", "heartbeat_interval", _float,
            "seconds between heartbeats (default 0.1)"),
    Setting("peer_lost_after", "peer_lost_after", _float,
            "after ready, seconds of silence before a peer is lost (default 3.0)"),
    Setting("release_delay_s", "release_delay_s", _float,
            "ring: the last rank's delay after the go signal (default 0.005)"),
    Setting("verify", "verify", _bool,
            "serve only: all_sum over the group before its ready line (true/false)"),
)

_BY_KEY = {s.key: s for s in SETTINGS}
#: Set per process by a supervisor: read from the environment only.
_SUPERVISOR_ENV = (EPOCH_ENV, EPOCH_FLOORS_ENV)


def config_from_env(environ: Mapping[str, str] | None = None) -> ClusterConfig:
    """A config from the ``CLUSTERFSM_*`` variables of ``environ`` (``os.environ``)."""
    env = os.environ if environ is None else environ
    values = {s.key: env[s.env] for s in SETTINGS if s.env in env}
    return _build(values, env, lambda s: s.env)


def config_from_toml(path: str | os.PathLike[str], *, table: str | None = None,
              environ: Mapping[str, str] | None = None) -> ClusterConfig:
    """A config from the TOML file at ``path`` (its top level, or ``[table]``).

    The file is read like the key file (:mod:`clusterfsm.states.localfiles`): a small
    regular UTF-8 file, so a FIFO or a device is a ``ConfigError`` naming it, never a
    hang or a read without end.

    Keys are the settings' names (``world_size = 2``, ``peers = ["10.0.0.1:7700"]``,
    ``[deadlines]``); an unknown key is an error, not ignored. The supervisor's
    epoch variables still come from ``environ`` (``os.environ``).
    """
    import tomllib  # here, not at the top: only a --config start reads TOML (~2.5 ms)

    where = str(path)
    try:
        text = read_small_text(path, limit=MAX_CONFIG_FILE_BYTES)[0]
    except LocalFileError as exc:
        raise ConfigError((where,), f"cannot read the file: {exc.problem}") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError((where,), f"not valid TOML: {exc}") from None
    prefix = f"{where}: "
    if table is not None:
        section = document.get(table)
        if not isinstance(section, dict):
            raise ConfigError((f"{where}: [{table}]",), "no such table")
        document, prefix = section, f"{where}: [{table}] "
    unknown = sorted(set(document) - set(_BY_KEY))
    if unknown:
        raise ConfigError(tuple(prefix + k for k in unknown),
                          f"not a setting (known: {', '.join(_BY_KEY)})")
    env = os.environ if environ is None else environ
    return _build(dict(document), env, lambda s: prefix + s.key)


def _build(values: Mapping[str, object], env: Mapping[str, str],
           name_of: Callable[[Setting], str]) -> ClusterConfig:
    kwargs: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.key not in values:
            if setting.required:
                raise ConfigError((name_of(setting),), "required, and not set")
            continue
        try:
            kwargs[setting.field] = setting.read(values[setting.key])
        except _Bad as exc:
            raise ConfigError((name_of(setting),), str(exc)) from None
    if kwargs.get("interfaces") and "node_id" not in kwargs:
        # As `serve --interface`: elections need a stable id per machine.
        kwargs["node_id"] = _node_id_default(name_of(_BY_KEY["node_id_file"]))
    for name, field, read in ((EPOCH_ENV, "epoch", parse_epoch),
                              (EPOCH_FLOORS_ENV, "epoch_floors", parse_floors)):
        if name in env:
            try:
                kwargs[field] = read(env[name])
            except ValueError as exc:
                raise ConfigError((name,), str(exc)) from None
    try:
        return ClusterConfig(**kwargs)
    except ValueError as exc:
        raise ConfigError(_names_in(str(exc), name_of), str(exc)) from None


def _node_id_default(name: str) -> bytes:
    from clusterfsm.states.nodeid import load_or_create_node_id

    try:
        return load_or_create_node_id(None)
    except (OSError, ValueError) as exc:
        raise ConfigError((name,), f"cannot read or create the default node-id file: "
                          f"{exc}") from None


def _names_in(message: str, name_of: Callable[[Setting], str]) -> tuple[str, ...]:
    """The settings a config rule's message talks about: the config's rules name the
    fields they check (``rank``, ``world_size``, ``listen``, a ``peer``...)."""
    words = set(re.findall(r"[a-z_]+", message))
    named = tuple(name_of(s) for s in SETTINGS
                  if s.field in words or s.field.removesuffix("s") in words)
    return named or tuple(name_of(s) for s in SETTINGS if s.required)


__all__ = ["ENV_PREFIX", "SETTINGS", "ConfigError", "Setting", "config_from_env",
           "config_from_toml"]
