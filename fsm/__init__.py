"""fsm: declared finite-state machines that run on trio.

Declare a machine (:func:`machine_spec`), run it (:class:`Runner`), read its trace
(:mod:`clusterfsm.fsm.trace`), draw it (:mod:`clusterfsm.fsm.diagram`), and test it
deterministically (:mod:`clusterfsm.fsm.testing`). This package knows nothing about
clusters, sockets or MLX.
"""

from clusterfsm.fsm.compiled import CompiledMachine, compile_spec
from clusterfsm.fsm.errors import (
    DeadlineOverrideError,
    IllegalTransition,
    MachineCancelled,
    SpecError,
    StateTimeout,
    UnexpectedError,
)
from clusterfsm.fsm.runner import (
    Outcome,
    Runner,
    StateDeadline,
    current_deadline,
    effective_deadlines,
    note_outcome,
    report_progress,
    run_machine,
    time_left,
)
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
from clusterfsm.fsm.trace import (
    TraceEnd,
    TraceRecord,
    TraceWriter,
    deadline_trace,
    read_trace,
    state_totals,
)

__all__ = [
    "CANCEL",
    "CANCELLED_STATE",
    "DEADLINE",
    "UNEXPECTED",
    "UNEXPECTED_STATE",
    "CompiledMachine",
    "DeadlineOverrideError",
    "Edge",
    "ErrorState",
    "IllegalTransition",
    "MachineCancelled",
    "MachineSpec",
    "Outcome",
    "Runner",
    "SpecError",
    "State",
    "StateDeadline",
    "StateTimeout",
    "TraceEnd",
    "TraceRecord",
    "TraceWriter",
    "Transition",
    "UnexpectedError",
    "compile_spec",
    "current_deadline",
    "deadline_trace",
    "effective_deadlines",
    "machine_spec",
    "note_outcome",
    "read_trace",
    "report_progress",
    "run_machine",
    "state_totals",
    "time_left",
]
