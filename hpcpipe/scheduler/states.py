"""What each job state means: the one table used by the code and by the tests.

Slurm's states (``squeue``/``sacct``/``scontrol`` print them, the local runner uses the same
names) are mapped to what hpcpipe needs to know: is the job waiting, running, or over, and if
over, can it still come back (Slurm may requeue a preempted or node-failed job)?
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum


class Phase(Enum):
    WAITING = "waiting"  # queued, not (yet again) running
    RUNNING = "running"  # holds nodes: starting, running, finishing or suspended
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"  # a state this table does not know: keep asking


@dataclass(frozen=True)
class Meaning:
    phase: Phase
    #: The job will never change again: its state can be cached and never asked for again.
    final: bool = False

    @property
    def ended(self) -> bool:
        """The job is over for now (it may still be requeued if not ``final``)."""
        return self.phase in (Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED)

    @property
    def active(self) -> bool:
        return not self.ended


_WAIT, _RUN = Meaning(Phase.WAITING), Meaning(Phase.RUNNING)
_FAILED_FINAL, _FAILED_MAY_RETURN = Meaning(Phase.FAILED, True), Meaning(Phase.FAILED)

STATES: Mapping[str, Meaning] = {
    "PENDING": _WAIT,
    "REQUEUED": _WAIT,
    "REQUEUE_HOLD": _WAIT,
    "REQUEUE_FED": _WAIT,
    "RESV_DEL_HOLD": _WAIT,
    "CONFIGURING": _RUN,
    "RUNNING": _RUN,
    "COMPLETING": _RUN,  # 25.11 shows it between RUNNING and the end while the epilog runs
    "SIGNALING": _RUN,
    "STAGE_OUT": _RUN,
    "RESIZING": _RUN,
    "SUSPENDED": _RUN,
    "STOPPED": _RUN,
    "COMPLETED": Meaning(Phase.SUCCEEDED, True),
    "FAILED": _FAILED_FINAL,
    "TIMEOUT": _FAILED_FINAL,
    "OUT_OF_MEMORY": _FAILED_FINAL,
    "BOOT_FAIL": _FAILED_FINAL,
    "DEADLINE": _FAILED_FINAL,
    "SPECIAL_EXIT": _FAILED_FINAL,
    # Slurm may requeue these by itself: over for now, but keep asking.
    "PREEMPTED": _FAILED_MAY_RETURN,
    "NODE_FAIL": _FAILED_MAY_RETURN,
    "CANCELLED": Meaning(Phase.CANCELLED, True),
    "REVOKED": Meaning(Phase.CANCELLED, True),
}

_UNKNOWN = Meaning(Phase.UNKNOWN)


def meaning(state: str) -> Meaning:
    """The meaning of a state as Slurm prints it (``CANCELLED by 0`` reads as CANCELLED)."""
    return STATES.get(state.split()[0] if state else "", _UNKNOWN)


def is_ended(state: str) -> bool:
    return meaning(state).ended


def is_final(state: str) -> bool:
    return meaning(state).final


#: Every state after which a job is over (for now).
ENDED_STATES = frozenset(s for s, m in STATES.items() if m.ended)

#: Exit code with which a train job's ranks say "checkpoint saved after Slurm's time-limit warning,
#: requeue me": 128 + SIGUSR2 (12 on Linux), as a shell reports a process that signal ended. The
#: batch script (sbatch/train.sbatch) then asks Slurm for the requeue, where ``scontrol`` exists.
REQUEUE_EXIT_CODE = 128 + 12
