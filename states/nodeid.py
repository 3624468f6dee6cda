"""A node's identity: random per installation, kept in a private file.

With ``--interface`` discovery the ranks are elected from node ids, so an id must be
stable across restarts (the same Mac keeps its rank) and distinct between machines.
It is created on first use with 16 random bytes, hex, mode 0600. A copied file (a
cloned disk or config) makes two machines share an id; discovery sees the same id
from two running instances and stops with ``DuplicateNodeId`` instead of splitting.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from clusterfsm.states.localfiles import LocalFileError, read_small_text

#: A node-id file is 32 hex digits and a newline; anything this large is not one.
MAX_NODE_ID_FILE_BYTES = 4096


def default_node_id_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "clusterfsm" / "node-id"


class NodeIdFileInvalid(ValueError):
    """The node-id file was read but holds no id (deleting it makes a new one)."""


def read_node_id(path: str | Path | None = None) -> bytes | None:
    """The 16-byte node id stored at ``path``, or None if no file is there.

    The one rule for what a node-id file must be, shared by ``serve`` (which then
    creates a missing one) and ``doctor`` (which only reports): a small regular UTF-8
    file (:func:`~clusterfsm.states.localfiles.read_small_text`, so a FIFO or a device
    is refused at once, never read) holding 32 hex digits. A file that cannot be read
    is a :class:`~clusterfsm.states.localfiles.LocalFileError`; one that does not hold
    an id is a :class:`NodeIdFileInvalid`; both are ValueErrors naming the file.
    """
    target = Path(path) if path is not None else default_node_id_path()
    try:
        text = read_small_text(target, limit=MAX_NODE_ID_FILE_BYTES)[0].strip()
    except LocalFileError as exc:
        if exc.missing:
            return None
        raise
    try:
        node_id = bytes.fromhex(text)
    except ValueError:
        node_id = b""
    if len(node_id) != 16:
        raise NodeIdFileInvalid(f"node-id file {target} must hold 32 hex digits; delete "
                                "it to make a new id")
    return node_id


def load_or_create_node_id(path: str | Path | None = None) -> bytes:
    """The 16-byte node id stored at ``path``; a new one is written if absent.

    A file that is not 32 hex digits (or not a small regular UTF-8 file) is a
    ValueError naming it (never silently replaced: that would change this node's rank
    behind the operator's back).
    """
    target = Path(path) if path is not None else default_node_id_path()
    try:
        stored = read_node_id(target)
    except LocalFileError as exc:
        raise ValueError(f"node-id file {exc}") from None
    if stored is not None:
        return stored
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    node_id = secrets.token_bytes(16)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it meanwhile: use theirs
        return load_or_create_node_id(target)
    with os.fdopen(fd, "w") as f:
        f.write(node_id.hex() + "\n")
    return node_id
