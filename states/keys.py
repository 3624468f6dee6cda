"""The pre-shared cluster key: generated, stored 0600, checked on load, never printed.

This module owns the key-length rule (:data:`MIN_KEY_BYTES`, :func:`check_key_length`):
the key file, the config and the handshake all apply this one check.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

import attrs

from clusterfsm.states.localfiles import LocalFileError, read_small_text

#: What ``clusterfsm keygen`` writes: the full HMAC-SHA256 output size.
KEY_BYTES = 32
#: The shortest key accepted anywhere: a shorter one is a configuration mistake (a
#: truncated key file), not a key.
MIN_KEY_BYTES = 16
#: A key file is 64 hex digits and a newline; anything this large is not one.
MAX_KEY_FILE_BYTES = 4096


@attrs.frozen(auto_exc=True)
class KeyFileError(Exception):
    """The key file is missing, unreadable, malformed or readable by others."""

    path: str
    problem: str

    def __str__(self) -> str:
        return f"key file {self.path}: {self.problem}"


def check_key_length(key: bytes) -> None:
    """Raise ValueError (with the fix) if ``key`` is too short to be a cluster key."""
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the cluster key must be at least {MIN_KEY_BYTES} bytes "
                         "(use `clusterfsm keygen`)")


def generate_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def write_key(path: str | os.PathLike[str], key: bytes | None = None) -> Path:
    """Create ``path`` exclusively, mode 0600, holding a new key as hex.

    Refuses to overwrite an existing file: replacing a cluster key by accident
    locks every other rank out.
    """
    key = generate_key() if key is None else key
    target = Path(path)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise KeyFileError(str(target), "already exists; refusing to overwrite") from exc
    except OSError as exc:
        raise KeyFileError(str(target), exc.strerror or str(exc)) from exc
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return target


def load_key(path: str | os.PathLike[str]) -> bytes:
    """Read a key written by :func:`write_key`; refuse one others can read, and
    anything that is not a small regular UTF-8 file (:mod:`clusterfsm.states.localfiles`)."""
    target = Path(path)
    try:
        text, mode = read_small_text(target, limit=MAX_KEY_FILE_BYTES)
    except LocalFileError as exc:
        raise KeyFileError(exc.path, exc.problem) from None
    text = text.strip()
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(str(target), f"mode {stat.S_IMODE(mode):o} lets others read it; "
                                        "chmod 600 it")
    try:
        key = bytes.fromhex(text)
    except ValueError as exc:
        raise KeyFileError(str(target), "is not a hex key") from exc
    try:
        check_key_length(key)
    except ValueError as exc:
        raise KeyFileError(str(target), str(exc)) from None
    return key
