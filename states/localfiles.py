"""Reading the small files an operator points us at (the key file, the node-id file).

Why this exists: a path on the command line can name anything. A FIFO blocks ``open``
until a writer comes (forever), ``/dev/zero`` never ends (a read of it exhausts memory),
and a file of another encoding fails to decode with an error that names no file. Each
of those must be a one-line usage error naming the file, never a hang or a traceback.
:func:`read_small_text` is the one reader both files go through: it opens without
blocking, accepts only a regular file, reads at most ``limit`` bytes and decodes
UTF-8, and every problem it finds is a :class:`LocalFileError` naming the path.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import attrs


@attrs.frozen(auto_exc=True)
class LocalFileError(ValueError):
    """The file cannot be what we read: not a regular file, too large, not UTF-8,
    or the system refused it. ``missing`` tells "no such file" apart (the node-id
    file is created then)."""

    path: str
    problem: str
    missing: bool = False

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def read_small_text(path: str | os.PathLike[str], *, limit: int) -> tuple[str, int]:
    """The text of the regular file ``path`` (at most ``limit`` bytes) and its mode.

    Opened with ``O_NONBLOCK`` so a FIFO cannot block the open; the type is checked on
    the open file (``fstat``), so what is read is what was checked.
    """
    target = Path(path)
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise LocalFileError(str(target), exc.strerror or str(exc),
                             missing=isinstance(exc, FileNotFoundError)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise LocalFileError(str(target), f"is not a regular file ({_kind(mode)})")
        data = b""
        while len(data) <= limit:
            chunk = os.read(fd, limit + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise LocalFileError(str(target), exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise LocalFileError(str(target), f"is larger than {limit} bytes")
    try:
        return data.decode("utf-8"), mode
    except UnicodeDecodeError as exc:
        raise LocalFileError(str(target), f"is not UTF-8 text (byte {exc.start})") from None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


__all__ = ["LocalFileError", "read_small_text"]
