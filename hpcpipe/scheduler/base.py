"""What a backend must do: submit a rendered step script behind its dependencies, report job
states, cancel jobs, and check a resource layout before anything is queued."""

from __future__ import annotations

from pathlib import Path

from hpcpipe.config import RunConfig
from hpcpipe.scheduler.slurm import JobInfo


class Backend:
    #: Name stored in the run's state file.
    name: str = ""

    def launcher(self, step: str, ntasks: int) -> str:
        """Command prefix that starts the step's processes inside the allocation."""
        raise NotImplementedError

    def submit_command(self, script: Path, depends_on: list[str]) -> list[str]:
        """The command line that submits ``script`` (shown by ``--dry-run``)."""
        raise NotImplementedError

    def submit(self, script: Path, depends_on: list[str]) -> str:
        """Submit ``script`` to start after every job in ``depends_on`` completed; return its id."""
        raise NotImplementedError

    def query(self, job_ids: list[str]) -> dict[str, JobInfo]:
        """Current state of the given jobs (batched: one or two scheduler calls)."""
        raise NotImplementedError

    def cancel(self, job_ids: list[str]) -> None:
        raise NotImplementedError

    def check(self, cfg: RunConfig) -> None:
        """Raise ConfigError if the cluster cannot place the requested layout."""
