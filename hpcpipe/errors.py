"""The exceptions hpcpipe raises.

Library code raises these; only the CLI turns them into messages for a person. Every message says
what is wrong, where, and how to fix it.
"""

from __future__ import annotations


class HpcpipeError(Exception):
    """Base class of every error hpcpipe raises on purpose."""


class ConfigError(HpcpipeError):
    """A configuration file or ``--set`` override is invalid (unknown key, wrong type, bad value)."""


class InputError(HpcpipeError):
    """An input file is missing, unreadable or not in the expected layout."""


class RunError(HpcpipeError):
    """A run folder is missing, locked by another command, or in a state that forbids the request."""


class SchedulerError(HpcpipeError):
    """A scheduler command failed. Carries the command, its exit code and its output."""

    def __init__(self, cmd: list[str], returncode: int | None, stdout: str, stderr: str) -> None:
        self.cmd = cmd
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        shown = " ".join(cmd[:6]) + (" ..." if len(cmd) > 6 else "")
        detail = (stderr or stdout).strip() or "(no output)"
        if returncode is None:
            msg = f"could not run `{shown}`: {detail}"
        else:
            msg = f"`{shown}` failed with exit code {returncode}: {detail}"
        super().__init__(msg)


class SchedulerUnreachableError(SchedulerError):
    """The scheduler's controller did not answer (slurmctld down, network partition)."""


class PartialAnswer(SchedulerError):
    """One scheduler source answered and another did not (e.g. slurmctld answers, sacct does not
    because slurmdbd is down): ``infos`` holds what is known, ``unknown`` the job ids nobody
    could say anything about. Unknown is not finished: callers keep the last known state."""

    def __init__(self, infos: dict, unknown: list[str], cause: SchedulerError) -> None:
        super().__init__(cause.cmd, cause.returncode, cause.stdout, cause.stderr)
        self.infos = infos
        self.unknown = unknown


class SubmissionError(HpcpipeError):
    """Submitting a run failed; jobs already submitted for it were cancelled."""
