"""Stop signals of the train step: SIGUSR2 (Slurm's warning ``train.signal_seconds`` before the
time limit) and SIGTERM (scancel, or the limit itself).

A handler only sets a flag; the training loop acts on it at the next optimizer-step boundary,
where all ranks agree on it through one all-reduce (``dist.agreed_stop``), saves a checkpoint and
returns a :class:`StopReason`; the job entry decides what that means for the job (exit code,
requeue). ``jobs/train.py``
installs the handlers before torch is imported: Slurm may send USR2 while a (requeued) job is
still starting, and USR2's default action would kill the rank with nothing saved. This module
imports nothing heavy for that reason.
"""

from __future__ import annotations

import enum
import signal
from typing import Any

from hpcpipe.errors import HpcpipeError


class StopReason(enum.Enum):
    """Why training returned."""

    DONE = "done"  # every epoch trained: predictions follow
    WARNED = "SIGUSR2"  # Slurm's warning before the time limit: checkpoint, then requeue
    TERMINATED = "SIGTERM"  # scancel or the time limit itself: checkpoint, then exit non-zero


class StopSignals:
    """Remembers SIGUSR2 and SIGTERM until the training loop looks."""

    def __init__(self) -> None:
        self.usr2 = False
        self.term = False
        self._previous: dict[int, Any] = {}

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> StopSignals:
        """Catch the signals from now on, with cleared flags (a second call changes nothing)."""
        if not self._previous:
            self.usr2 = self.term = False
            for sig in (signal.SIGUSR2, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Give the signals back to the handlers they had before ``install``."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def ignore_warnings(self) -> None:
        """From now on USR2 does nothing: for a step that is over. (At exit Python gives the
        signals it handles back to their default action, which for USR2 is to die; an ignored
        signal stays ignored.)"""
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        self._previous.pop(signal.SIGUSR2, None)

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGUSR2:
            self.usr2 = True
        else:
            self.term = True


#: The process's one set of flags: installed early by jobs/train.py, read by the training loop.
SIGNALS = StopSignals()


class DivergedError(HpcpipeError):
    """A loss, gradient or validation score is not a finite number: the training failed.

    Raised on every rank at the same point (the ranks agree on it like on a stop signal), so the
    job ends FAILED with the message, and no checkpoint or best model of the diverged weights is
    written."""


class CheckpointMismatchError(HpcpipeError):
    """``last.pt`` was computed from other feature data or other training settings than this run
    now has: continuing from it would silently mix the two."""
