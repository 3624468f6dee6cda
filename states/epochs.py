"""A supervised rank's epoch, and the admissions its supervisor remembers.

Kept apart from :mod:`clusterfsm.states.supervisor` (a whole machine, compiled at
import) so that every ``serve`` process can read its epoch without importing the
supervisor. A supervisor hands each child its generation's epoch (:data:`EPOCH_ENV`)
and the newest epoch admitted per joiner rank by earlier children
(:data:`EPOCH_FLOORS_ENV`); a coordinator child reports each admission on stdout
(:func:`report_admissions`) as an admission line, which the supervisor reads back
(:class:`clusterfsm.states.lines.AdmissionLine` owns its text).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TextIO

#: The child's generation epoch is handed to it in this environment variable.
EPOCH_ENV = "CLUSTERFSM_EPOCH"
#: The newest epoch admitted per joiner rank by earlier children: ``RANK=EPOCH,...``.
EPOCH_FLOORS_ENV = "CLUSTERFSM_EPOCH_FLOORS"
#: The logger whose INFO lines are the admission lines (states.activities writes them).
EPOCH_LOGGER = "clusterfsm.states.epochs"


def format_floors(floors: Mapping[int, int]) -> str:
    """``{1: 5, 2: 7}`` -> ``"1=5,2=7"`` (the value of :data:`EPOCH_FLOORS_ENV`)."""
    return ",".join(f"{rank}={epoch}" for rank, epoch in sorted(floors.items()))


def parse_floors(text: str) -> dict[int, int]:
    """The inverse of :func:`format_floors`; ValueError naming the variable if malformed."""
    floors: dict[int, int] = {}
    for item in filter(None, text.split(",")):
        rank, sep, epoch = item.partition("=")
        if not (sep and rank.isdigit() and epoch.isdigit()):
            raise ValueError(f"{EPOCH_FLOORS_ENV}: expected RANK=EPOCH,..., got {text!r}")
        floors[int(rank)] = max(floors.get(int(rank), 0), int(epoch))
    return floors


def parse_epoch(text: str) -> int:
    """The value of :data:`EPOCH_ENV`: a u64 in decimal."""
    if not text.isdigit() or not int(text) < 2**64:
        raise ValueError(f"{EPOCH_ENV} must be an integer in 0..2**64-1, got {text!r}")
    return int(text)


def report_admissions(stream: TextIO) -> None:
    """Print the admission lines (:data:`EPOCH_LOGGER`, INFO) on ``stream``, once.

    Called by a supervised ``serve`` child; its supervisor reads them from stdout.
    """
    logger = logging.getLogger(EPOCH_LOGGER)
    if not any(getattr(h, "_clusterfsm_admissions", False) for h in logger.handlers):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._clusterfsm_admissions = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


__all__ = [
    "EPOCH_ENV",
    "EPOCH_FLOORS_ENV",
    "EPOCH_LOGGER",
    "format_floors",
    "parse_epoch",
    "parse_floors",
    "report_admissions",
]
