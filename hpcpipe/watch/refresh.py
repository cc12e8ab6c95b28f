"""Bringing a run's job states up to date: one batched scheduler query, cached in the state file.

Watching commands (status, logs -f, summarize, submit --wait) call :func:`refresh`; it never
submits or cancels anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from hpcpipe.errors import PartialAnswer, SchedulerError, SchedulerUnreachableError
from hpcpipe.run.folder import Run
from hpcpipe.scheduler import Backend, get_backend
from hpcpipe.scheduler.states import is_ended

Echo = Callable[[str], None]


def refresh(run: Run) -> str | None:
    """Ask the scheduler about every job not yet known to be over, in one batch.

    Returns None, or a message saying the scheduler could not be reached (the cached states stay).
    The state file is read again first (and again under the lock before saving), so a watcher
    that lives long (``status --watch``, ``logs -f``) sees jobs that a ``rerun`` added meanwhile
    and never writes back a state older than the file's.
    """
    run.reload()
    backend = get_backend(run.backend_name, run.layout.root)
    if run.state.submitting:
        with run.try_lock() as free:
            if free:  # no submit holds the run: the one that left the marker is gone
                adopt_lost_submission(run, backend)
    open_jobs = run.open_jobs()
    if not open_jobs:
        return None
    note = None
    try:
        infos = backend.query(open_jobs)
    except PartialAnswer as exc:
        infos = exc.infos
        note = (f"the scheduler could not say what became of job(s) {', '.join(exc.unknown)} "
                f"({_short(exc)}); their last known state is shown")
    except SchedulerUnreachableError as exc:
        return f"the scheduler cannot be reached ({exc}); showing the last known states"
    except SchedulerError as exc:
        return f"the scheduler query failed ({exc}); showing the last known states"
    with run.try_lock() as locked:
        if locked:
            run.reload()
            if run.apply(infos) | mark_never_satisfied(run):
                try:
                    run.save()
                except OSError as exc:  # only a cache: show the states all the same
                    return f"the states could not be cached in the run folder ({exc})"
        else:  # a command holding the lock will save its own, newer state
            run.apply(infos)
            mark_never_satisfied(run)
    return note


def _short(exc: SchedulerError) -> str:
    lines = [ln for ln in (exc.stderr or exc.stdout or str(exc)).strip().splitlines() if ln]
    return f"`{exc.cmd[0]}` said: {lines[-1]}" if lines else f"`{exc.cmd[0]}` failed"


def adopt_lost_submission(run: Run, backend: Backend) -> list[str]:
    """Record the job(s) that a submit killed between the scheduler's answer and its record left
    in the queue, found by their name; the caller holds the run's lock. Returns their ids."""
    run.reload()
    marker = run.state.submitting
    if not marker:
        return []
    step, script = marker.get("step", ""), Path(marker.get("script", ""))
    try:
        found = backend.find(marker.get("job_name", ""), script)
    except SchedulerError:
        return []  # try again at the next refresh
    known = {j.job_id for j in run.all_jobs()}
    adopted = [j for j in found if j not in known]
    for job_id in adopted:
        run.add_job(step, job_id, [], script)
        run.event(f"job {job_id} of step {step} was queued by a submission that was killed "
                  "before it recorded it; recorded now")
    if not adopted:
        run.event(f"a submission of step {step} was killed before the scheduler answered; "
                  "no job of it is queued")
    run.state.submitting = None
    run.state.submit_failed = True
    run.save()
    return adopted


def mark_never_satisfied(run: Run) -> bool:
    """Name DependencyNeverSatisfied where the scheduler's reason hides it.

    A job that never started, was not cancelled by a user, and waits ``afterok`` on a job that
    ended without completing can never run, whatever reason squeue showed last (it may read
    ReqNodeNotAvail or Dependency at the moment --kill-on-invalid-dep removes the job).
    """
    ended = {r.job_id: r.state for r in run.all_jobs() if is_ended(r.state)}
    changed = False
    for rec in run.all_jobs():
        if (rec.state in ("CANCELLED", "PENDING") and not rec.start and not rec.cancelled_by
                and rec.reason != "DependencyNeverSatisfied"
                and any(ended.get(d, "COMPLETED") != "COMPLETED" for d in rec.depends_on)):
            rec.reason = "DependencyNeverSatisfied"
            changed = True
    return changed


def run_finished(run: Run) -> bool:
    """Every step's current job is over."""
    return all(not rec.active for s in run.steps() if (rec := run.current(s)) is not None)


#: How long ``submit --wait`` goes on while the scheduler cannot say how the run stands.
UNSURE_LIMIT_S = 600.0


def wait(run: Run, echo: Echo, poll_s: float = 2.0, unsure_limit_s: float = UNSURE_LIMIT_S) -> bool:
    """Block until every step's current job has ended; return True if all COMPLETED.

    While the scheduler cannot say (unreachable, or some jobs unknown), the last known states
    are shown; after ``unsure_limit_s`` of that without a change, give up and say so (False).
    """
    last, unsure_since = "", None
    while True:
        note = refresh(run)
        line = "  ".join(f"{s}:{_state(run, s)}" for s in run.steps())
        if line != last:
            echo(f"[{time.strftime('%H:%M:%S')}] {line}" + (f"  ({note})" if note else ""))
            last, unsure_since = line, None
        if run_finished(run):
            return all(_state(run, s) == "COMPLETED" for s in run.steps())
        if note is None:
            unsure_since = None
        elif unsure_since is None:
            unsure_since = time.monotonic()
        elif time.monotonic() - unsure_since > unsure_limit_s:
            echo(f"stopped waiting: for {unsure_limit_s:.0f} s the scheduler could not say how "
                 f"run {run.run_id} stands ({note}). The jobs go on without this command: "
                 f"`hpcpipe status {run.run_id}` shows them once the scheduler answers")
            return False
        time.sleep(poll_s)


def _state(run: Run, step: str) -> str:
    rec = run.current(step)
    return rec.state if rec is not None else "-"
