"""The train step: a text + numeric-features forecaster trained with torch DDP.

``run_job`` is the step as its job runs it (``jobs/train.py``, once per rank): the recipe of
``recipe.py`` trains until done or stopped by a signal, and a stop is turned here into what the
job does next, a requeue or an exit code. ``run`` is the same training for callers in a process
of their own (tests, notebooks). ``hpcpipe.steps.train.predict.predict(layout, cfg)`` writes
predictions from a finished run. torch and transformers are imported only when one of them is
called, so importing this package is cheap.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcpipe import files
from hpcpipe.scheduler.states import REQUEUE_EXIT_CODE
from hpcpipe.steps.train.stop import SIGNALS, StopReason

if TYPE_CHECKING:  # jobs/train.py imports this package before it may import anything slow
    from hpcpipe.config import RunConfig
    from hpcpipe.run.layout import RunLayout
    from hpcpipe.run.metrics import MetricsWriter
    from hpcpipe.runtime.env import JobEnvironment
    from hpcpipe.steps.train.recipe import TrainRecipe

__all__ = ["CHECKPOINTS", "EXIT_CODES", "StopReason", "run", "run_job", "set_checkpoints_aside"]

log = logging.getLogger(__name__)

#: Exit code of a job stopped by a signal and not requeued: 128 + the signal number, as a shell
#: reports a process the signal killed (SIGUSR2 is 12 and SIGTERM 15 on Linux).
EXIT_CODES = {StopReason.WARNED: REQUEUE_EXIT_CODE, StopReason.TERMINATED: 128 + 15}

#: The folder of ``last.pt`` and ``best.pt`` under the run's ``train/``.
CHECKPOINTS = "checkpoints"



def run(layout: RunLayout, cfg: RunConfig, metrics: MetricsWriter,
        env: JobEnvironment | None = None) -> dict[str, Any] | None:
    """Train on the run's features (resuming if a checkpoint exists) and write predictions.

    Returns rank 0's summary record (None on other ranks). Stopped early by SIGUSR2 or SIGTERM,
    it saves a checkpoint, logs how to resume and returns None; a job uses :func:`run_job`.
    """
    with _recipe(layout, cfg, metrics, env) as recipe:
        reason = _train(recipe)
        if reason is not StopReason.DONE:
            _log_stopped(recipe, reason)
        return recipe.summary


def run_job(layout: RunLayout, cfg: RunConfig, metrics: MetricsWriter,
            env: JobEnvironment | None = None) -> int | None:
    """The step as its job runs it: None when training finished, else the exit code of a job
    stopped by a signal (its checkpoint saved).

    Inside Slurm, SIGUSR2 (the warning before the time limit) gives ``REQUEUE_EXIT_CODE`` and
    rank 0 writes the job id to ``layout.requeue_request``: the batch script then asks Slurm to
    requeue the job, where Slurm's commands exist (inside a container the ranks usually have no
    ``scontrol``). Otherwise 128 + the signal.
    """
    job = env or _job_environment()
    with _recipe(layout, cfg, metrics, job) as recipe:
        reason = _train(recipe)
        if reason is StopReason.DONE:
            return None
        if reason is StopReason.WARNED and job.in_slurm and job.job_id:
            if recipe.main:
                files.write_text(layout.requeue_request, job.job_id + "\n")
                log.warning("%s at epoch %d step %d: checkpoint saved to %s; exiting %d so that "
                            "the batch script requeues job %s", reason.value, recipe.epoch,
                            recipe.step_in_epoch, _checkpoint_path(recipe), REQUEUE_EXIT_CODE,
                            job.job_id)
            recipe.barrier()  # the first rank to exit makes srun end the others: write it first
            return REQUEUE_EXIT_CODE
        _log_stopped(recipe, reason)
        return EXIT_CODES[reason]


def set_checkpoints_aside(train_dir: Path) -> Path | None:
    """Move ``train/checkpoints`` to ``train/checkpoints.<time>`` so that the next start of
    the step trains from scratch (``hpcpipe rerun train --fresh``); return the new folder, or
    None when there was nothing to move. Nothing is deleted. Cheap: no torch."""
    return files.set_aside(Path(train_dir) / CHECKPOINTS)


def _train(recipe: TrainRecipe) -> StopReason:
    recipe.setup()
    recipe.load_checkpoint()
    reason = recipe.train()
    if reason is StopReason.DONE:
        recipe.summarize()
    return reason


@contextlib.contextmanager
def _recipe(layout: RunLayout, cfg: RunConfig, metrics: MetricsWriter,
            env: JobEnvironment | None) -> Iterator[TrainRecipe]:
    """The recipe, with the stop signals caught; its process group is left at the end."""
    from hpcpipe.steps.train.recipe import TrainRecipe

    # jobs/train.py installs the handlers first thing and keeps them until the process exits: a
    # USR2 that comes after the last step (Slurm's warning while predictions are written) must
    # not kill a run that has finished. Called in-process (tests), we clean up after ourselves.
    owner = not SIGNALS.installed
    recipe = TrainRecipe(layout, cfg, metrics, env or _job_environment(), SIGNALS.install())
    try:
        yield recipe
    finally:
        if owner:
            SIGNALS.uninstall()
        recipe.cleanup()


def _job_environment() -> JobEnvironment:
    """This process's environment, for callers that did not build one (tests)."""
    from hpcpipe.runtime.env import JobEnvironment

    return JobEnvironment.from_environ()


def _log_stopped(recipe: TrainRecipe, reason: StopReason) -> None:
    if recipe.main:
        log.error("stopped by %s at epoch %d step %d; checkpoint saved to %s. The job resumes "
                  "from it if Slurm requeues it (preemption under PreemptMode=REQUEUE); "
                  "otherwise `hpcpipe rerun train` does.", reason.value, recipe.epoch,
                  recipe.step_in_epoch, _checkpoint_path(recipe))


def _checkpoint_path(recipe: TrainRecipe) -> Path:
    from hpcpipe.steps.train import checkpoint

    return checkpoint.last_path(recipe.layout.train)
