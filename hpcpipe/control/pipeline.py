"""Submitting, cancelling and rerunning the steps of a run (on the login node).

The steps run in the order of :data:`hpcpipe.config.STEPS`, each behind the previous one with an
``afterok`` dependency. ``submit`` and ``rerun`` both build a :class:`~hpcpipe.control.plan.Plan`
and apply it; nothing here stays running: after that the scheduler (or the local runners) own
the jobs, and every other command reads the run's state file and asks the scheduler.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from hpcpipe import files
from hpcpipe.config import STEPS, RunConfig, check_paths
from hpcpipe.control.plan import apply, plan_steps
from hpcpipe.errors import ConfigError, RunError
from hpcpipe.run.folder import Run, new_run_id
from hpcpipe.run.layout import RunLayout
from hpcpipe.scheduler import Backend, get_backend
from hpcpipe.scheduler.states import is_ended
from hpcpipe.users import user_name
from hpcpipe.watch.refresh import adopt_lost_submission, refresh

log = logging.getLogger(__name__)

Echo = Callable[[str], None]


def _check_steps(steps: list[str]) -> None:
    if list(steps) != list(STEPS[: len(steps)]):
        raise ConfigError(
            f"steps {','.join(steps)}: a new run starts at ingest and keeps the order "
            f"{','.join(STEPS)} (e.g. --steps ingest,features). To run one step again in an "
            "existing run, use `hpcpipe rerun STEP`")


def write_config(cfg: RunConfig, layout: RunLayout) -> None:
    files.write_text(layout.config, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ---------------------------------------------------------------------------------------------
# Submit


def submit(cfg: RunConfig, *, backend_name: str, runs_dir: Path, dry_run: bool,
           echo: Echo) -> Run | None:
    """Create a run folder, render every step's script and submit the chain; return the run.

    With ``dry_run`` nothing is created or submitted: the plan is printed.
    """
    _check_steps(cfg.steps)
    check_paths(cfg)
    run_id = new_run_id(cfg.name)
    logs_dir = Path(cfg.logs_dir).resolve() / run_id
    layout = RunLayout((Path(runs_dir) / run_id).resolve())
    backend = get_backend(backend_name, layout.root)
    backend.check(cfg)
    plan = plan_steps(cfg, layout, backend, logs_dir, cfg.steps)
    if dry_run:
        echo(plan.describe(backend))
        echo(f"# dry run: nothing was created or submitted (run id would be {run_id})")
        return None

    run = Run.create(runs_dir, run_id, backend_name, Path(cfg.logs_dir))
    try:
        with run.lock("submit"):
            run.save()  # the state appears only under the lock: no rerun can slip in before it
            write_config(cfg, run.layout)
            logs_dir.mkdir(parents=True, exist_ok=True)
            new = apply(plan, run, backend, verb="submitting")
            run.event("submitted " + ", ".join(f"{s}={j}" for s, j in new.items()))
            run.save()
    except BaseException:
        # Nothing was queued (a full disk, a refused first sbatch): leave no empty run behind,
        # or it would become the "latest" run. A run with jobs on record is kept.
        if not run.all_jobs() and not run.state.submitting:
            shutil.rmtree(run.layout.root, ignore_errors=True)
        raise
    return run


# ---------------------------------------------------------------------------------------------
# Cancel


def downstream_of(run: Run, step: str) -> list[str]:
    return [s for s in STEPS[STEPS.index(step) + 1:] if s in run.state.steps]


def cancel(run: Run, step: str | None) -> list[str]:
    """Cancel the step (and the steps after it), or the whole run, in one scheduler call."""
    if step is not None and step not in run.state.steps:
        raise RunError(f"run {run.run_id} has no step '{step}' (it has {', '.join(run.steps())})")
    steps = run.steps() if step is None else [step, *downstream_of(run, step)]
    with _lock(run, "cancel"):
        adopt_lost_submission(run, get_backend(run.backend_name, run.layout.root))
        refresh(run)
        active = [r for s in steps for r in run.jobs(s) if r.active]
        ids = [r.job_id for r in active]
        if ids:
            get_backend(run.backend_name, run.layout.root).cancel(ids)
            # sacct names the canceller only sometimes ("CANCELLED" or "CANCELLED by 0"), and a
            # job cancelled while pending can look like Slurm's own DependencyNeverSatisfied:
            # hpcpipe knows who cancelled, so it says so.
            for rec in active:
                rec.cancelled_by = user_name()
            run.event(f"cancelled {', '.join(ids)}")
            run.save()
    return ids


def _lock(run: Run, what: str, wait_s: float = 3.0) -> contextlib.ExitStack:
    """The run's lock, waiting a moment for it: watchers (status, logs -f) hold it for the few
    milliseconds of a state save, which must not make a cancel or rerun fail. A command that
    holds it longer (another rerun) still gets the "busy" error after ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(run.lock(what))
            return stack
        except RunError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# Rerun


def rerun(run: Run, step: str, *, downstream: bool, cancel_first: bool, overrides: list[str],
          echo: Echo, wait_cancel_s: float = 60, fresh: bool = False) -> dict[str, str]:
    """Resubmit ``step`` in the same run folder; the step resumes its own work.

    Upstream steps that are COMPLETED are not waited on; upstream jobs still queued or running
    become ``afterok`` dependencies. With ``downstream``, later steps that have not completed are
    cancelled if still queued and resubmitted behind the new job. With ``fresh`` (train only)
    the train checkpoints are moved aside once the old job has ended, so training starts over
    (put back if queueing fails). Returns {step: new job id}.
    """
    if step not in STEPS:
        raise RunError(f"unknown step '{step}'; steps are {', '.join(STEPS)}")
    if fresh and step != "train":
        raise RunError(f"--fresh starts training over; it applies to `rerun train`, not {step}")
    with _lock(run, "rerun"):
        backend = get_backend(run.backend_name, run.layout.root)
        adopt_lost_submission(run, backend)
        refresh(run)
        cur = run.current(step)
        if cur is not None and cur.active and not cancel_first:
            raise RunError(
                f"{step} job {cur.job_id} of run {run.run_id} is still {cur.state}; "
                f"cancel it first (`hpcpipe cancel {run.run_id} {step}`) or pass --cancel-first")

        # Every check submit makes, before anything is cancelled or rewritten: the config with
        # the overrides, the paths and the cluster layout (backend.check) of the steps about to
        # be queued, and their rendered scripts.
        cfg = run.load_config(overrides)
        after = _upstream_dependencies(run, step)
        todo = [step, *(_downstream_to_redo(run, step, echo) if downstream else [])]
        check_paths(cfg, todo)
        backend.check(dataclasses.replace(cfg, steps=todo))
        plan = plan_steps(cfg, run.layout, backend, Path(run.state.logs_dir), todo, after)
        # The jobs read config.yaml when they start, so it is written before they are queued;
        # if queueing fails (sbatch refuses, Ctrl-C), the previous config is put back, so that
        # an override that never ran cannot fail every later rerun.
        previous = run.layout.config.read_bytes() if overrides else None
        if overrides:
            write_config(cfg, run.layout)
        aside = None
        try:
            if cur is not None and cur.active:
                _cancel_and_wait(run, backend, [cur.job_id], wait_cancel_s)
            stale = [r.job_id for d in todo[1:] if (r := run.current(d)) is not None and r.active]
            if stale:
                _cancel_and_wait(run, backend, stale, wait_cancel_s)
            if fresh:
                aside = _train_checkpoints_aside(run, echo)
            new = apply(plan, run, backend, verb="resubmitting")
        except BaseException:
            if previous is not None:
                files.write_bytes(run.layout.config, previous)
            if aside is not None:
                aside.rename(run.layout.train / "checkpoints")
            raise
        if overrides:
            run.event(f"config changed for rerun of {step}: {' '.join(overrides)}")
        run.event("rerun " + ", ".join(f"{s}={j}" for s, j in new.items()))
        run.save()
    return new


def _train_checkpoints_aside(run: Run, echo: Echo) -> Path | None:
    aside = files.set_aside(run.layout.checkpoints)
    if aside is None:
        echo("train: no checkpoints to move aside; training starts from scratch")
    else:
        echo(f"train: checkpoints moved aside to {aside}; training starts from scratch")
        run.event(f"train checkpoints moved aside to {aside} (rerun --fresh)")
    return aside


def _upstream_dependencies(run: Run, step: str) -> list[str]:
    """The upstream job a rerun of ``step`` must wait on (one still queued or running), if any."""
    after: list[str] = []
    for up in STEPS[: STEPS.index(step)]:
        rec = run.current(up)
        if rec is None:
            if not (run.layout.root / up).exists():
                raise RunError(f"step {up} never ran in run {run.run_id}; "
                               f"run `hpcpipe rerun {up}` first")
            continue
        if rec.completed:
            continue
        if rec.active:
            after = [rec.job_id]
            continue
        raise RunError(f"upstream step {up} ended {rec.state} (job {rec.job_id}); "
                       f"rerun it first: `hpcpipe rerun {up} {run.run_id}`")
    return after


def _downstream_to_redo(run: Run, step: str, echo: Echo) -> list[str]:
    """The steps after ``step``: all of them, completed ones too. Each checks what its output was
    computed from: one whose input did not change ends at once ("already complete"), one whose
    input the rerun changed recomputes instead of keeping a stale result."""
    todo = downstream_of(run, step)
    for d in todo:
        rec = run.current(d)
        if rec is not None and rec.completed:
            echo(f"{d}: COMPLETED before (job {rec.job_id}); resubmitted behind {step} to check "
                 "its input (it ends at once if that did not change)")
    return todo


def _cancel_and_wait(run: Run, backend: Backend, ids: list[str], timeout: float) -> None:
    backend.cancel(ids)
    deadline = time.time() + timeout
    while True:
        infos = backend.query(ids)
        run.apply(infos)
        if all(i in infos and is_ended(infos[i].state) for i in ids):
            return
        if time.time() > deadline:
            raise RunError(f"jobs {', '.join(ids)} did not stop within {timeout:.0f} s of scancel; "
                           "try again when they have ended")
        time.sleep(0.5)

