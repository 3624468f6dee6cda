"""One finding of a pre-init check: what was checked, the verdict, the one-line remedy.

Why a value and not only an exception: the same checks serve two callers. Before
``mx.distributed.init`` a rank stops at the first failure
(:class:`~states.errors.PrecheckFailed`, via :func:`raise_first_failure`);
``clusterfsm doctor`` runs them all and prints every verdict with its remedy. One list
of findings feeds both, so the doctor never says "pass" to something the bootstrap
refuses.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import attrs

from clusterfsm.states.errors import PrecheckFailed


class Verdict(enum.Enum):
    PASS = "pass"
    FAIL = "fail"  # a bootstrap would stop here
    WARN = "warn"  # it may work; the detail says what to watch
    NOT_APPLICABLE = "n/a"  # e.g. the RDMA checks on Linux


@attrs.frozen
class Finding:
    """``check`` is a stable name (``rdma_disabled``, ``no_ipv4``, ...): the
    ``PrecheckFailed.check`` of a failure, and the key in ``doctor --json``."""

    check: str
    verdict: Verdict
    detail: str
    remedy: str = ""
    #: What was checked when there are several (an interface name); "" otherwise.
    subject: str = ""

    @property
    def failed(self) -> bool:
        return self.verdict is Verdict.FAIL

    def as_dict(self) -> dict[str, str]:
        return {"check": self.check, "subject": self.subject,
                "verdict": self.verdict.value, "detail": self.detail, "remedy": self.remedy}


def passed(check: str, detail: str) -> Finding:
    return Finding(check, Verdict.PASS, detail)


def failed(check: str, detail: str, remedy: str) -> Finding:
    return Finding(check, Verdict.FAIL, detail, remedy)


def warned(check: str, detail: str, remedy: str) -> Finding:
    return Finding(check, Verdict.WARN, detail, remedy)


def not_applicable(check: str, detail: str) -> Finding:
    return Finding(check, Verdict.NOT_APPLICABLE, detail)


def raise_first_failure(findings: Iterable[Finding]) -> None:
    """The first failed finding as :class:`PrecheckFailed` (detail, then remedy)."""
    for finding in findings:
        if finding.failed:
            text = f"{finding.detail}: {finding.remedy}" if finding.remedy else finding.detail
            raise PrecheckFailed(finding.check, text)
