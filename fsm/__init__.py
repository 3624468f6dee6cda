"""fsm: declared finite-state machines that run on trio.

Declare a machine (:func:`machine_spec`), run it (:class:`Runner`), read its trace
(:mod:`clusterfsm.fsm.trace`), draw it (:mod:`clusterfsm.fsm.diagram`), and test it
deterministically (:mod:`clusterfsm.fsm.testing`). This package knows nothing about
clusters, sockets or MLX.
"""

from clusterfsm.fsm.compiled import CompiledMachine, compile_spec
from clusterfsm.fsm.errors import (
    IllegalTransition,
    MachineCancelled,
    SpecError,
    StateTimeout,
    UnexpectedError,
)
from clusterfsm.fsm.runner import Outcome, Runner, report_progress, run_machine
from clusterfsm.fsm.spec import (
    CANCEL,
    CANCELLED_STATE,
    DEADLINE,
    UNEXPECTED,
    UNEXPECTED_STATE,
    Edge,
    ErrorState,
    MachineSpec,
    State,
    Transition,
    machine_spec,
)
from clusterfsm.fsm.trace import TraceEnd, TraceRecord, TraceWriter, read_trace, state_totals

__all__ = [
    "CANCEL",
    "CANCELLED_STATE",
    "DEADLINE",
    "UNEXPECTED",
    "UNEXPECTED_STATE",
    "CompiledMachine",
    "Edge",
    "ErrorState",
    "IllegalTransition",
    "MachineCancelled",
    "MachineSpec",
    "Outcome",
    "Runner",
    "SpecError",
    "State",
    "StateTimeout",
    "TraceEnd",
    "TraceRecord",
    "TraceWriter",
    "Transition",
    "UnexpectedError",
    "compile_spec",
    "machine_spec",
    "read_trace",
    "report_progress",
    "run_machine",
    "state_totals",
]
