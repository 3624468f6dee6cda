"""The ``serve`` line protocol: every output line another program reads, in one place.

A rank (``clusterfsm serve``) is watched from outside through its stdout and stderr:
its supervisor (:mod:`clusterfsm.states.supervisor_child` reads a child's lines, and
``serve --supervise`` writes its own), the demo (:mod:`clusterfsm.states.demo`), an
embedding app's own child command (``supervise_ranks(command=...)``) and operators'
scripts. Nothing else passes between a supervisor and its child, apart from the
environment it starts the child with (epoch: :mod:`clusterfsm.states.epochs`; the
lifeline: :mod:`clusterfsm.states.lifeline`). This module is the one owner of those
lines: each kind is a frozen attrs class whose :meth:`format` is what the writers print
and whose :meth:`parse` is what the readers use, so the two cannot drift apart.
docs/design.md section 4 describes where the protocol sits in the architecture;
docs/operations.md shows it in a supervised log.

The lines
---------
A *speaker* starts most lines: ``rank R`` (a rank), ``node ID`` (a ``--rank auto``
node, the first 8 hex digits of its node id: its rank is elected after ``serve`` names
it, and it keeps that name for the run so that every line of one process has one
speaker; the ready line says its rank), ``clusterfsm rank
R`` (the init watchdog, speaking for the rank it killed) or ``supervisor rank R``
(``serve --supervise``). A speaker never contains a colon or a space after the word
``rank``/``node``, so ``SPEAKER: `` always ends at the first ``": "`` of a line.

Each kind, its stream, and its text:

- :class:`TransitionLine` (stdout): ``SPEAKER: SOURCE --EVENT--> DEST (12.3 ms)``, one
  per transition of the speaker's machine (a rank's: not with ``--quiet``), followed by
  `` note: TEXT`` when the step's trace record has a note (``initializing_group``:
  ``MLX ring connect back-off: 1 s (1 refused connect(s), retried by MLX; not a hang)``).
- :class:`ReadyLine` (stdout): ``DistributedGroup ready rank=R size=N backend=B
  session=HEX``, the group works (after ``--verify``'s ``all_sum``). Never prefixed;
  ``session=`` is always last.
- :class:`AllSumLine` (stdout): ``SPEAKER: all_sum = 3 (expected 3)`` (``--verify``).
- :class:`VerifyFailedLine` (stderr): ``SPEAKER: all_sum is wrong`` (then exit 1).
- :class:`ErrorLine` (stderr): ``SPEAKER: state STATE, error TYPE: DETAIL``, the speaker
  ended in error state ``STATE`` with an error of type ``TYPE`` (then exit 1). With
  ``serve --worker``, ``STATE`` is ``worker_failed`` when the app's worker raised
  (:data:`clusterfsm.states.worker.WORKER_FAILED`; its traceback precedes the line).
- :class:`PeerLeftLine` (stdout): ``SPEAKER: state peer_left (a peer closed the cluster
  on purpose; the group is no longer usable)``.
- :class:`StoppedLine` (stderr): ``SPEAKER: stopped by signal``.
- :class:`AdmissionLine` (stdout, supervised rank 0 only): ``admitted rank K epoch E
  from HOST:PORT``, it admitted generation ``E`` of joiner ``K``.
- :class:`UsageLine` (stderr): ``clusterfsm serve: MESSAGE``, bad usage or
  configuration (then exit 2, and a supervisor does not restart the child).
- :class:`EchoLine` (the stream it came from): ``[gen G] LINE``, a supervisor repeating
  generation ``G``'s line.
- :class:`SupervisorNote` (stdout): ``supervisor rank R: TEXT``, the supervisor's own
  log (generation started, restart in N s, recovered after N s, ...).

Rules every writer keeps, and every reader relies on:

- **One line, one event.** Every line ends with ``\\n``; a reader splits on it.
- **Peer text is escaped.** Of these kinds, words a peer chose (a Reject detail, an
  ABORT message) appear only in an :class:`ErrorLine`'s ``DETAIL``, never at the start
  of a line, and :meth:`ErrorLine.format` escapes control characters there
  (:func:`clusterfsm.states.errors.printable`; rank 0's refusal log escapes them the
  same way), so a peer cannot end the line and forge the next one.
- **Anchored.** Every :meth:`parse` matches the whole line from its first character.
  A peer's words quoted *inside* an error line (``... error HandshakeRejected:
  DistributedGroup ready ...``) are never read as a ready line, and an echoed line
  (``[gen 2] rank 0: ...``) is an :class:`EchoLine`, not the rank's own line.
- **Exit codes** go with the lines: 0 ready (``--once``) or stopped on request, 1 an
  error state (an :class:`ErrorLine` was printed), 2 bad usage (the child is then not
  restarted), 130 interrupted before ready (:mod:`clusterfsm.states.exitcodes`).

What a supervisor acts on: a :class:`ReadyLine` (the generation is up), a
:class:`TransitionLine` into ``peer_lost`` or ``peer_left`` (the group is gone), an
:class:`ErrorLine` (how the generation failed) and, from a coordinator's stdout, each
:class:`AdmissionLine` (the epoch floor its next child gets, docs/operations.md). A
child that prints nothing else but these, and exits, keeps the contract.
"""

from __future__ import annotations

import re
from typing import ClassVar, Literal

import attrs

from clusterfsm.states.errors import printable

Stream = Literal["stdout", "stderr"]

# Each line's pattern is kept as text and compiled by ``re`` on its first match (its
# cache keeps it): only readers of lines (a supervisor, the demo) match them, and a
# rank that only prints lines would otherwise compile all of them at every start.

#: Who speaks: ``rank R``, ``node ID``, ``clusterfsm rank R``, ``supervisor rank R``.
_SPEAKER = r"(?:clusterfsm |supervisor )?(?:rank|node) [^\s:]+"


def rank_speaker(rank: int | None, node_id: bytes) -> str:
    """A rank's speaker: ``rank R``, or ``node ID`` for ``--rank auto`` (the whole run:
    the rank is elected later, and one process keeps one speaker)."""
    return f"rank {rank}" if rank is not None else f"node {node_id.hex()[:8]}"


@attrs.frozen
class TransitionLine:
    """The speaker's machine moved from ``source`` to ``dest`` by ``event``."""

    stream: ClassVar[Stream] = "stdout"
    _PATTERN: ClassVar[str] = (
        rf"^({_SPEAKER}): (\w+) --(\w+)--> (\w+) \((\d+(?:\.\d+)?) ms\)"
        r"(?: note: ([^\x00-\x1f\x7f]+))?$")

    speaker: str
    source: str
    event: str
    dest: str
    elapsed_ms: float
    #: The step's trace note (our own words, e.g. "MLX ring connect back-off: 1 s ...").
    note: str | None = None

    def format(self) -> str:
        text = (f"{self.speaker}: {self.source} --{self.event}--> {self.dest} "
                f"({self.elapsed_ms:.1f} ms)")
        return text if self.note is None else f"{text} note: {printable(self.note)}"

    @classmethod
    def parse(cls, line: str) -> TransitionLine | None:
        m = re.match(cls._PATTERN, line)
        return None if m is None else cls(m[1], m[2], m[3], m[4], float(m[5]), m[6])


@attrs.frozen
class ReadyLine:
    """The group is up. Only ``session`` is needed by a reader (a supervisor names the
    generation's session with it); a custom child may print fewer fields."""

    stream: ClassVar[Stream] = "stdout"
    PREFIX: ClassVar[str] = "DistributedGroup ready"
    _PATTERN: ClassVar[str] = (
        r"^DistributedGroup ready\b(.*?)(?: session=(\w+))?\s*$")
    _FIELD: ClassVar[str] = r"\b(rank|size|backend)=(\S+)"

    rank: int | None = None
    size: int | None = None
    backend: str = ""
    session: str = ""

    def format(self) -> str:
        fields = [("rank", self.rank), ("size", self.size), ("backend", self.backend),
                  ("session", self.session)]
        return " ".join([self.PREFIX, *(f"{k}={v}" for k, v in fields if v not in (None, ""))])

    @classmethod
    def parse(cls, line: str) -> ReadyLine | None:
        m = re.match(cls._PATTERN, line)
        if m is None:
            return None
        found = dict(re.findall(cls._FIELD, m[1]))
        rank, size = found.get("rank", ""), found.get("size", "")
        return cls(int(rank) if rank.isdigit() else None,
                   int(size) if size.isdigit() else None,
                   found.get("backend", ""), m[2] or "")


@attrs.frozen
class AllSumLine:
    """``--verify``: the ``all_sum`` of ``rank + 1`` over the group, and what it should be."""

    stream: ClassVar[Stream] = "stdout"
    _PATTERN: ClassVar[str] = (
        rf"^({_SPEAKER}): all_sum = (\S+) \(expected (\S+)\)$")

    speaker: str
    total: float
    expected: float

    def result(self) -> str:
        """The line without its speaker: ``all_sum = 3 (expected 3)``."""
        return f"all_sum = {self.total:g} (expected {self.expected:g})"

    def format(self) -> str:
        return f"{self.speaker}: {self.result()}"

    @classmethod
    def parse(cls, line: str) -> AllSumLine | None:
        m = re.match(cls._PATTERN, line)
        if m is None:
            return None
        try:
            return cls(m[1], float(m[2]), float(m[3]))
        except ValueError:
            return None


@attrs.frozen
class VerifyFailedLine:
    """``--verify``: the ``all_sum`` came back wrong (the rank then exits 1)."""

    stream: ClassVar[Stream] = "stderr"
    _PATTERN: ClassVar[str] = rf"^({_SPEAKER}): all_sum is wrong$"

    speaker: str

    def format(self) -> str:
        return f"{self.speaker}: all_sum is wrong"

    @classmethod
    def parse(cls, line: str) -> VerifyFailedLine | None:
        m = re.match(cls._PATTERN, line)
        return None if m is None else cls(m[1])


@attrs.frozen
class ErrorLine:
    """The speaker ended in error state ``state`` with an error of type ``error``.

    ``detail`` is the error's message; :meth:`format` escapes it (peer text).
    """

    stream: ClassVar[Stream] = "stderr"
    _PATTERN: ClassVar[str] = (
        rf"^({_SPEAKER}): state (\w+), error (\w+): ?(.*)$")

    speaker: str
    state: str
    error: str
    detail: str

    def format(self) -> str:
        return f"{self.speaker}: state {self.state}, error {self.error}: {printable(self.detail)}"

    @classmethod
    def parse(cls, line: str) -> ErrorLine | None:
        m = re.match(cls._PATTERN, line)
        return None if m is None else cls(m[1], m[2], m[3], m[4])


@attrs.frozen
class PeerLeftLine:
    """A peer closed its cluster on purpose: this rank's group is no longer usable."""

    stream: ClassVar[Stream] = "stdout"
    TEXT: ClassVar[str] = ("state peer_left (a peer closed the cluster on purpose; "
                           "the group is no longer usable)")

    speaker: str

    def format(self) -> str:
        return f"{self.speaker}: {self.TEXT}"

    @classmethod
    def parse(cls, line: str) -> PeerLeftLine | None:
        speaker, sep, text = line.partition(": ")
        ok = sep and text == cls.TEXT and re.fullmatch(_SPEAKER, speaker)
        return cls(speaker) if ok else None


@attrs.frozen
class StoppedLine:
    """SIGINT or SIGTERM stopped the rank (exit 130 before ready, or a clean close)."""

    stream: ClassVar[Stream] = "stderr"
    _PATTERN: ClassVar[str] = rf"^({_SPEAKER}): stopped by signal$"

    speaker: str

    def format(self) -> str:
        return f"{self.speaker}: stopped by signal"

    @classmethod
    def parse(cls, line: str) -> StoppedLine | None:
        m = re.match(cls._PATTERN, line)
        return None if m is None else cls(m[1])


@attrs.frozen
class AdmissionLine:
    """A supervised coordinator admitted joiner ``rank`` at generation ``epoch``.

    Logged at INFO on :data:`clusterfsm.states.epochs.EPOCH_LOGGER` and printed on
    stdout by a supervised ``serve`` (:func:`clusterfsm.states.epochs.report_admissions`).
    :meth:`parse` refuses a rank outside 1..254 or an epoch outside 1..2**64-1.
    """

    stream: ClassVar[Stream] = "stdout"
    _PATTERN: ClassVar[str] = (
        r"^admitted rank (\d{1,3}) epoch (\d{1,20}) from (\S+)$")

    rank: int
    epoch: int
    host: str

    def format(self) -> str:
        return f"admitted rank {self.rank} epoch {self.epoch} from {self.host}"

    @classmethod
    def parse(cls, line: str) -> AdmissionLine | None:
        m = re.match(cls._PATTERN, line)
        if m is None:
            return None
        rank, epoch = int(m[1]), int(m[2])
        if not 1 <= rank <= 254 or not 0 < epoch < 2**64:
            return None
        return cls(rank, epoch, m[3])


@attrs.frozen
class UsageLine:
    """``command`` refused its flags or configuration (exit 2) before running."""

    stream: ClassVar[Stream] = "stderr"
    _PATTERN: ClassVar[str] = r"^clusterfsm (serve): (.*)$"

    command: str
    message: str

    def format(self) -> str:
        return f"clusterfsm {self.command}: {self.message}"

    @classmethod
    def parse(cls, line: str) -> UsageLine | None:
        m = re.match(cls._PATTERN, line)
        return None if m is None else cls(m[1], m[2])


@attrs.frozen
class EchoLine:
    """A supervisor repeats its child's line, on the stream it came from."""

    _PATTERN: ClassVar[str] = r"^\[gen (\d+)\] (.*)$"

    generation: int
    line: str

    def format(self) -> str:
        return f"[gen {self.generation}] {self.line}"

    @classmethod
    def parse(cls, line: str) -> EchoLine | None:
        m = re.match(cls._PATTERN, line)
        return None if m is None else cls(int(m[1]), m[2])


@attrs.frozen
class SupervisorNote:
    """A line of the supervisor's own log (its transitions are :class:`TransitionLine`,
    its final error an :class:`ErrorLine`, both with the same speaker)."""

    stream: ClassVar[Stream] = "stdout"
    _PATTERN: ClassVar[str] = r"^(supervisor rank [^\s:]+): (.*)$"

    speaker: str
    text: str

    def format(self) -> str:
        return f"{self.speaker}: {self.text}"

    @classmethod
    def parse(cls, line: str) -> SupervisorNote | None:
        m = re.match(cls._PATTERN, line)
        return None if m is None else cls(m[1], m[2])


def supervisor_speaker(rank: object) -> str:
    """The speaker of ``serve --supervise --rank R``'s own lines."""
    return f"supervisor rank {rank}"


#: The lines a rank (``serve`` without ``--supervise``) writes, each on its ``stream``.
RankLine = (TransitionLine | ReadyLine | AllSumLine | VerifyFailedLine | ErrorLine
            | PeerLeftLine | StoppedLine | AdmissionLine | UsageLine)
LineKind = RankLine | EchoLine | SupervisorNote

#: Tried in this order; the patterns are anchored and exclusive, except that a
#: supervisor's transition or error line is read as such before as a note.
_KINDS: tuple[type[LineKind], ...] = (
    TransitionLine, ReadyLine, AllSumLine, VerifyFailedLine, ErrorLine, PeerLeftLine,
    StoppedLine, AdmissionLine, UsageLine, EchoLine, SupervisorNote)


def parse_line(line: str) -> LineKind | None:
    """The kind of ``line`` (without its ``\\n``), or None for any other line."""
    for kind in _KINDS:
        parsed = kind.parse(line)
        if parsed is not None:
            return parsed
    return None


__all__ = [
    "AdmissionLine",
    "AllSumLine",
    "EchoLine",
    "ErrorLine",
    "LineKind",
    "PeerLeftLine",
    "RankLine",
    "ReadyLine",
    "StoppedLine",
    "SupervisorNote",
    "TransitionLine",
    "UsageLine",
    "VerifyFailedLine",
    "parse_line",
    "rank_speaker",
    "supervisor_speaker",
]
