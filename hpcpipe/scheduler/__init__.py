"""The one door to the scheduler: a Slurm cluster, or this machine (the local runner).

Both backends differ only in a few hook methods (:class:`~hpcpipe.scheduler.base.Backend`);
:mod:`hpcpipe.scheduler.slurm` is the only module that runs Slurm's commands, and
:mod:`hpcpipe.scheduler.states` the one table of what job states mean.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from hpcpipe.scheduler.base import Backend, JobInfo


def choose_backend(local: bool) -> str:
    """"local" when asked for or where no ``sbatch`` is on PATH; "slurm" otherwise."""
    return "local" if local or shutil.which("sbatch") is None else "slurm"


def get_backend(name: str, run_root: Path) -> Backend:
    """The backend a run uses; the local one keeps its job records inside the run folder."""
    if name == "local":
        from hpcpipe.scheduler.local import LocalBackend

        return LocalBackend(run_root)
    from hpcpipe.scheduler.slurm_backend import SlurmBackend

    return SlurmBackend()


__all__ = ["Backend", "JobInfo", "choose_backend", "get_backend"]
