"""A supervised rank's epoch, and the admissions its supervisor remembers.

Kept apart from :mod:`clusterfsm.states.supervisor` (a whole machine, compiled at
import) so that every ``serve`` process can read its epoch without importing the
supervisor. A supervisor hands each child its generation's epoch (:data:`EPOCH_ENV`)
and the newest epoch admitted per joiner rank by earlier children
(:data:`EPOCH_FLOORS_ENV`); a coordinator child reports each admission on stdout
(:func:`report_admissions`) as an admission line, which the supervisor reads back
(:class:`clusterfsm.states.lines.AdmissionLine` owns its text).

A child that builds its own :class:`~clusterfsm.states.config.ClusterConfig` (rather
than ``serve`` flags) applies what its supervisor handed it with
:func:`supervised_config`, which is what ``serve`` does.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, TextIO

import attrs

if TYPE_CHECKING:
    from clusterfsm.states.config import ClusterConfig

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


def supervised_config(config: ClusterConfig, environ: Mapping[str, str] | None = None,
                      *, admissions: TextIO | None = None) -> ClusterConfig:
    """``config`` with the epoch and epoch floors its supervisor set in ``environ``.

    Outside a supervisor (no :data:`EPOCH_ENV`) ``config`` comes back unchanged. A
    child with an epoch also reports its admissions on stdout (``admissions``, default
    ``sys.stdout``; :func:`report_admissions`), from which the supervisor learns the
    floors for the next generation. ValueError names a malformed variable.
    """
    env = os.environ if environ is None else environ
    if EPOCH_ENV in env:
        config = attrs.evolve(config, epoch=parse_epoch(env[EPOCH_ENV]))
    if EPOCH_FLOORS_ENV in env:
        config = attrs.evolve(config, epoch_floors=parse_floors(env[EPOCH_FLOORS_ENV]))
    if config.epoch:
        report_admissions(admissions or sys.stdout)
    return config


__all__ = [
    "EPOCH_ENV",
    "EPOCH_FLOORS_ENV",
    "EPOCH_LOGGER",
    "format_floors",
    "parse_epoch",
    "parse_floors",
    "report_admissions",
    "supervised_config",
]
