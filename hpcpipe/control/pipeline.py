"""Submitting, refreshing, cancelling and rerunning the steps of a run.

The steps run in the order of :data:`hpcpipe.config.STEPS`, each behind the previous one with an
``afterok`` dependency. Nothing here stays running: after ``submit`` the scheduler (or the local
runners) own the jobs, and every other command reads the run's state file and asks the scheduler.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from hpcpipe import files
from hpcpipe.config import STEPS, RunConfig, check_paths, load_config
from hpcpipe.control import render
from hpcpipe.errors import ConfigError, RunError, SchedulerError, SubmissionError
from hpcpipe.run.folder import Run, new_run_id
from hpcpipe.run.layout import RunLayout
from hpcpipe.scheduler import get_backend
from hpcpipe.scheduler import slurm as scheduler
from hpcpipe.scheduler.base import Backend
from hpcpipe.scheduler.slurm import TERMINAL_STATES
from hpcpipe.users import user_name

log = logging.getLogger(__name__)

Echo = Callable[[str], None]


def choose_backend(local: bool) -> str:
    """"local" when asked for or where no ``sbatch`` is on PATH; "slurm" otherwise."""
    return "local" if local or not scheduler.available() else "slurm"


def _check_steps(steps: list[str]) -> None:
    if list(steps) != list(STEPS[: len(steps)]):
        raise ConfigError(
            f"steps {','.join(steps)}: a new run starts at ingest and keeps the order "
            f"{','.join(STEPS)} (e.g. --steps ingest,features). To run one step again in an "
            "existing run, use `hpcpipe rerun STEP`")


def write_scripts(cfg: RunConfig, layout: RunLayout, backend: Backend, logs_dir: Path,
                  steps: list[str]) -> dict[str, Path]:
    scripts = {}
    for step in steps:
        path = layout.scripts / f"{step}.sbatch"
        files.write_text(path, render.render_step(cfg, layout, step, backend, logs_dir))
        scripts[step] = path
    return scripts


def write_config(cfg: RunConfig, layout: RunLayout) -> None:
    files.write_text(layout.config, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def submit(cfg: RunConfig, *, backend_name: str, runs_dir: Path, dry_run: bool,
           echo: Echo) -> Run | None:
    """Create a run folder, render every step's script and submit the chain; return the run.

    With ``dry_run`` nothing is created or submitted: the scripts and commands are printed.
    If a submission fails, the jobs already submitted for this run are cancelled.
    """
    _check_steps(cfg.steps)
    check_paths(cfg)
    run_id = new_run_id(cfg.name)
    logs_dir = Path(cfg.logs_dir).resolve() / run_id
    layout = RunLayout((Path(runs_dir) / run_id).resolve())
    backend = get_backend(backend_name, layout.root)
    backend.check(cfg)

    if dry_run:
        prev: list[str] = []
        for i, step in enumerate(cfg.steps):
            script = layout.scripts / f"{step}.sbatch"
            echo(f"# ---- {script}")
            echo(render.render_step(cfg, layout, step, backend, logs_dir))
            echo("$ " + " ".join(backend.submit_command(script, prev)))
            prev = [f"<job id of {cfg.steps[i]}>"]
        echo(f"# dry run: nothing was created or submitted (run id would be {run_id})")
        return None

    # Render every script before anything exists on disk: a value the scripts cannot take is
    # refused without leaving an empty run folder behind.
    texts = {step: render.render_step(cfg, layout, step, backend, logs_dir) for step in cfg.steps}
    run = Run.create(runs_dir, run_id, backend_name, Path(cfg.logs_dir))
    with run.lock("submit"):
        run.save()  # the state appears only under the lock: no rerun can slip in before it
        write_config(cfg, run.layout)
        scripts = {}
        for step, text in texts.items():
            scripts[step] = run.layout.scripts / f"{step}.sbatch"
            files.write_text(scripts[step], text)
        logs_dir.mkdir(parents=True, exist_ok=True)
        submitted: list[str] = []
        for step in cfg.steps:
            deps = submitted[-1:]
            try:
                job_id = backend.submit(scripts[step], deps)
            except SchedulerError as exc:
                undone = _undo_submission(run, backend, submitted, step, exc)
                raise SubmissionError(
                    f"submitting step {step} failed. The scheduler said: "
                    f"{(exc.stderr or exc.stdout).strip() or exc}" + undone
                    + f"\nRun folder kept for inspection: {run.layout.root}") from None
            run.add_job(step, job_id, deps, scripts[step])
            run.save()
            submitted.append(job_id)
        run.event("submitted " + ", ".join(
            f"{s}={j}" for s, j in zip(cfg.steps, submitted, strict=True)))
        run.save()
    return run


def _undo_submission(run: Run, backend: Backend, submitted: list[str], step: str,
                     exc: SchedulerError) -> str:
    """Cancel the jobs a failed submission left; return what to tell the user about them."""
    run.event(f"submission of {step} failed: {(exc.stderr or exc.stdout).strip()}")
    said = ""
    if submitted:
        ids = ", ".join(submitted)
        try:
            backend.cancel(submitted)
            run.event(f"cancelled {ids} after the failed submission")
            for s in run.steps():
                for rec in run.jobs(s):
                    if rec["job_id"] in submitted:
                        rec.update(state="CANCELLED", reason="SubmissionFailed", final=True)
            said = f"\nJobs already submitted for this run were cancelled: {ids}"
        except SchedulerError as cancel_exc:
            run.event(f"could not cancel {ids}: {cancel_exc}; "
                      "they are recorded here, cancel them with `hpcpipe cancel`")
            said = (f"\nJobs already submitted for this run could NOT be cancelled ({cancel_exc}); "
                    f"they are recorded in the run: cancel them with `hpcpipe cancel {run.run_id}` "
                    f"once the scheduler answers: {ids}")
    run.state["submit_failed"] = True
    run.save()
    return said


# ---------------------------------------------------------------------------------------------
# State


def refresh(run: Run) -> str | None:
    """Ask the scheduler about every job not yet known to be over, in one batch.

    Returns None, or a message saying the scheduler could not be reached (the cached states stay).
    The state file is read again first (and again under the lock before saving), so a watcher
    that lives long (``status --watch``, ``logs -f``) sees jobs that a ``rerun`` added meanwhile
    and never writes back a state older than the file's.
    """
    run.reload()
    open_jobs = run.open_jobs()
    if not open_jobs:
        return None
    backend = get_backend(run.backend_name, run.layout.root)
    try:
        infos = backend.query(open_jobs)
    except scheduler.SchedulerUnreachableError as exc:
        return f"the scheduler cannot be reached ({exc}); showing the last known states"
    except SchedulerError as exc:
        return f"the scheduler query failed ({exc}); showing the last known states"
    with run.try_lock() as locked:
        if locked:
            run.reload()
            if run.apply(infos) | _mark_never_satisfied(run):
                try:
                    run.save()
                except OSError as exc:  # only a cache: show the states all the same
                    return f"the states could not be cached in the run folder ({exc})"
        else:  # a command holding the lock will save its own, newer state
            run.apply(infos)
            _mark_never_satisfied(run)
    return None


def _mark_never_satisfied(run: Run) -> bool:
    """Name DependencyNeverSatisfied where the scheduler's reason hides it.

    A job that never started, was not cancelled by a user, and waits ``afterok`` on a job that
    ended without completing can never run, whatever reason squeue showed last (it may read
    ReqNodeNotAvail or Dependency at the moment --kill-on-invalid-dep removes the job).
    """
    ended = {r["job_id"]: r.get("state") for s in run.steps() for r in run.jobs(s)
             if r.get("state") in TERMINAL_STATES}
    changed = False
    for step in run.steps():
        for rec in run.jobs(step):
            if (rec.get("state") in ("CANCELLED", "PENDING") and not rec.get("start")
                    and not rec.get("cancelled_by")
                    and rec.get("reason") != "DependencyNeverSatisfied"
                    and any(ended.get(d, "COMPLETED") != "COMPLETED"
                            for d in rec.get("depends_on", []))):
                rec["reason"] = "DependencyNeverSatisfied"
                changed = True
    return changed


def is_active(rec: dict | None) -> bool:
    return rec is not None and rec.get("state") not in TERMINAL_STATES


def run_finished(run: Run) -> bool:
    return all(not is_active(run.current(s)) for s in run.steps())


def wait(run: Run, echo: Echo, poll_s: float = 2.0) -> bool:
    """Block until every step's current job has ended; return True if all COMPLETED."""
    last = ""
    while True:
        note = refresh(run)
        line = "  ".join(f"{s}:{(run.current(s) or {}).get('state', '-')}" for s in run.steps())
        if line != last:
            echo(f"[{time.strftime('%H:%M:%S')}] {line}" + (f"  ({note})" if note else ""))
            last = line
        if run_finished(run):
            return all((run.current(s) or {}).get("state") == "COMPLETED" for s in run.steps())
        time.sleep(poll_s)


# ---------------------------------------------------------------------------------------------
# Cancel and rerun


def downstream_of(run: Run, step: str) -> list[str]:
    return [s for s in STEPS[STEPS.index(step) + 1:] if s in run.state["steps"]]


def cancel(run: Run, step: str | None) -> list[str]:
    """Cancel the step (and the steps after it), or the whole run, in one scheduler call."""
    steps = run.steps() if step is None else [step, *downstream_of(run, step)]
    if step is not None and step not in run.state["steps"]:
        raise RunError(f"run {run.run_id} has no step '{step}' (it has {', '.join(run.steps())})")
    with _lock(run, "cancel"):
        refresh(run)
        active = [r for s in steps for r in run.jobs(s) if is_active(r)]
        ids = [r["job_id"] for r in active]
        if ids:
            get_backend(run.backend_name, run.layout.root).cancel(ids)
            # sacct names the canceller only sometimes ("CANCELLED" or "CANCELLED by 0"), and a
            # job cancelled while pending can look like Slurm's own DependencyNeverSatisfied:
            # hpcpipe knows who cancelled, so it says so.
            for rec in active:
                rec["cancelled_by"] = user_name()
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


def load_run_config(run: Run, overrides: list[str] = ()) -> RunConfig:
    """The run's resolved config, with ``--set`` overrides applied (validated like at submit)."""
    return load_config(run.layout.config, overrides)


def rerun(run: Run, step: str, *, downstream: bool, cancel_first: bool, overrides: list[str],
          echo: Echo, wait_cancel_s: float = 60) -> dict[str, str]:
    """Resubmit ``step`` in the same run folder; the step resumes its own work.

    Upstream steps that are COMPLETED are not waited on; upstream jobs still queued or running
    become ``afterok`` dependencies. With ``downstream``, later steps that have not completed are
    cancelled if still queued and resubmitted behind the new job. Returns {step: new job id}.
    """
    if step not in STEPS:
        raise RunError(f"unknown step '{step}'; steps are {', '.join(STEPS)}")
    with _lock(run, "rerun"):
        refresh(run)
        backend = get_backend(run.backend_name, run.layout.root)
        cur = run.current(step)
        if is_active(cur):
            if not cancel_first:
                raise RunError(
                    f"{step} job {cur['job_id']} of run {run.run_id} is still {cur['state']}; "
                    f"cancel it first (`hpcpipe cancel {run.run_id} {step}`) or pass --cancel-first")
            backend.cancel([cur["job_id"]])
            _wait_terminal(run, backend, [cur["job_id"]], wait_cancel_s)

        cfg = load_run_config(run, overrides)
        if overrides:
            write_config(cfg, run.layout)
            run.event(f"config changed for rerun of {step}: {' '.join(overrides)}")

        deps: list[str] = []
        for up in STEPS[: STEPS.index(step)]:
            rec = run.current(up)
            if rec is None:
                if not (run.layout.root / up).exists():
                    raise RunError(f"step {up} never ran in run {run.run_id}; "
                                   f"run `hpcpipe rerun {up}` first")
                continue
            if rec["state"] == "COMPLETED":
                continue
            if is_active(rec):
                deps = [rec["job_id"]]
                continue
            raise RunError(f"upstream step {up} ended {rec['state']} (job {rec['job_id']}); "
                           f"rerun it first: `hpcpipe rerun {up} {run.run_id}`")

        todo = [step]
        if downstream:
            for d in downstream_of(run, step):
                rec = run.current(d)
                if rec is not None and rec["state"] == "COMPLETED":
                    echo(f"{d}: already COMPLETED (job {rec['job_id']}), not resubmitted")
                    continue
                todo.append(d)
        stale = [run.current(d)["job_id"] for d in todo[1:] if is_active(run.current(d))]
        if stale:
            backend.cancel(stale)
            _wait_terminal(run, backend, stale, wait_cancel_s)

        logs_dir = Path(run.state["logs_dir"])
        scripts = write_scripts(cfg, run.layout, backend, logs_dir, todo)
        new: dict[str, str] = {}
        for s in todo:
            try:
                job_id = backend.submit(scripts[s], deps)
            except SchedulerError as exc:
                if new:
                    backend.cancel(list(new.values()))
                run.event(f"rerun of {s} failed: {exc}")
                run.save()
                raise SubmissionError(
                    f"resubmitting {s} failed. The scheduler said: "
                    f"{(exc.stderr or exc.stdout).strip() or exc}") from None
            run.add_job(s, job_id, deps, scripts[s])
            new[s] = job_id
            deps = [job_id]
        run.event("rerun " + ", ".join(f"{s}={j}" for s, j in new.items()))
        run.save()
    return new


def _wait_terminal(run: Run, backend: Backend, ids: list[str], timeout: float) -> None:
    deadline = time.time() + timeout
    while True:
        infos = backend.query(ids)
        run.apply(infos)
        if all(i in infos and infos[i].state in TERMINAL_STATES for i in ids):
            return
        if time.time() > deadline:
            raise RunError(f"jobs {', '.join(ids)} did not stop within {timeout:.0f} s of scancel; "
                           "try again when they have ended")
        time.sleep(0.5)
