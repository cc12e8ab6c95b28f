"""Where jobs run: a Slurm cluster, or this machine. Both differ only in a few hook methods."""

from __future__ import annotations

from pathlib import Path

from hpcpipe.scheduler.base import Backend
from hpcpipe.scheduler.local import LocalBackend
from hpcpipe.scheduler.slurm_backend import SlurmBackend

BACKENDS: dict[str, type[Backend]] = {"slurm": SlurmBackend, "local": LocalBackend}


def get_backend(name: str, run_root: Path) -> Backend:
    """The backend a run uses; the local one keeps its job records inside the run folder."""
    if name == "local":
        return LocalBackend(run_root)
    return SlurmBackend()


__all__ = ["BACKENDS", "Backend", "LocalBackend", "SlurmBackend", "get_backend"]
