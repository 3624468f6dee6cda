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


def load_or_create_node_id(path: str | Path | None = None) -> bytes:
    """The 16-byte node id stored at ``path``; a new one is written if absent.

    A file that is not 32 hex digits (or not a small regular UTF-8 file) is a
    ValueError naming it (never silently replaced: that would change this node's rank
    behind the operator's back).
    """
    target = Path(path) if path is not None else default_node_id_path()
    try:
        text = read_small_text(target, limit=MAX_NODE_ID_FILE_BYTES)[0].strip()
    except LocalFileError as exc:
        if not exc.missing:
            raise ValueError(f"node-id file {exc}") from None
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        node_id = secrets.token_bytes(16)
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it meanwhile: use theirs
            return load_or_create_node_id(target)
        with os.fdopen(fd, "w") as f:
            f.write(node_id.hex() + "\n")
        return node_id
    try:
        node_id = bytes.fromhex(text)
    except ValueError:
        node_id = b""
    if len(node_id) != 16:
        raise ValueError(f"node-id file {target} must hold 32 hex digits; delete it to "
                         "make a new id")
    return node_id
