"""What a backend must do: submit a rendered step script behind its dependencies, report job
states, cancel jobs, and check a resource layout before anything is queued."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hpcpipe.config import RunConfig
from hpcpipe.scheduler.states import meaning


@dataclass
class JobInfo:
    """What the scheduler says of one job; fields a source does not know stay empty."""

    job_id: str
    state: str
    reason: str = ""
    elapsed: str = ""
    time_limit: str = ""
    nodes: str = ""
    exit_code: str = ""
    restarts: int = 0
    submit: str = ""
    start: str = ""
    end: str = ""
    source: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        """The job is over (for now: see :mod:`hpcpipe.scheduler.states`)."""
        return meaning(self.state).ended


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

    def find(self, job_name: str, script: Path) -> list[str]:
        """Ids of jobs named ``job_name`` (submitted from ``script``) that the scheduler knows."""
        raise NotImplementedError

    def accounting(self, job_ids: list[str]) -> dict[str, JobInfo]:
        """Accounting figures (CPU time, peak memory...) of ended jobs; {} where there are none."""
        return {}

    def check(self, cfg: RunConfig) -> None:
        """Raise ConfigError if the cluster cannot place the requested layout."""
