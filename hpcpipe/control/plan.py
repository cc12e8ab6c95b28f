"""Plan, then apply: the one submission path of ``submit`` and ``rerun``.

A :class:`Plan` is built first and changes nothing: the rendered script of each step and what it
waits on. ``--dry-run`` prints it; a real run hands the same plan to :func:`apply`, which writes
the scripts, submits the jobs in order (each ``afterok`` on the previous one), records every job
in the run's state file as soon as the scheduler answers, and on a failure cancels what it had
submitted, once, recording what it could not cancel and how to cancel it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hpcpipe import faulthooks, files
from hpcpipe.config import RunConfig
from hpcpipe.control import render
from hpcpipe.errors import SchedulerError, SubmissionError
from hpcpipe.run.folder import Run
from hpcpipe.run.layout import RunLayout
from hpcpipe.run.record import now
from hpcpipe.scheduler.base import Backend


@dataclass
class PlannedJob:
    step: str
    script: Path
    text: str


@dataclass
class Plan:
    """What will be submitted: jobs in order, each behind the one before it.

    The first job waits on ``first_after`` (jobs already queued, e.g. an upstream step that is
    still running when a step is rerun); every later one on the job submitted just before it.
    """

    run_id: str
    jobs: list[PlannedJob]
    first_after: list[str] = field(default_factory=list)

    @property
    def steps(self) -> list[str]:
        return [j.step for j in self.jobs]

    def describe(self, backend: Backend) -> str:
        """The plan as ``--dry-run`` prints it: each script, then the command that submits it."""
        out = []
        after = list(self.first_after)
        for job in self.jobs:
            out += [f"# ---- {job.script}", job.text,
                    "$ " + " ".join(backend.submit_command(job.script, after))]
            after = [f"<job id of {job.step}>"]
        return "\n".join(out)


def plan_steps(cfg: RunConfig, layout: RunLayout, backend: Backend, logs_dir: Path,
               steps: list[str], first_after: Sequence[str] = ()) -> Plan:
    """Render every step's script; a value a script cannot take is refused here, before
    anything exists on disk or in the queue."""
    jobs = [PlannedJob(step, layout.scripts / f"{step}.sbatch",
                       render.render_step(cfg, layout, step, backend, logs_dir))
            for step in steps]
    return Plan(layout.run_id, jobs, list(first_after))


def apply(plan: Plan, run: Run, backend: Backend, *, verb: str = "submitting") -> dict[str, str]:
    """Write the plan's scripts and submit its jobs; return {step: job id}.

    The caller holds the run's lock. Before each submission the state says which job is being
    submitted (its name carries the run id) and after it the job is recorded, so a queued job is
    never lost: a process killed in between leaves the marker, and the next command that reads
    the run finds the job by its name (:func:`hpcpipe.watch.refresh.adopt_lost_submission`).
    On a failure, Ctrl-C or SIGTERM the jobs this call submitted are cancelled (or, if that fails
    too, recorded with how to cancel them) and SubmissionError says what happened.
    """
    for job in plan.jobs:
        files.write_text(job.script, job.text)
    run.state.planned = [*[s for s in run.state.planned if s not in plan.steps], *plan.steps]
    new: dict[str, str] = {}
    after = list(plan.first_after)
    with _interrupts_as_keyboard_interrupt():
        for job in plan.jobs:
            job_id = None
            try:
                run.state.submitting = {"step": job.step, "script": str(job.script),
                                        "job_name": run.layout.job_name(job.step), "since": now()}
                run.save()
                job_id = backend.submit(job.script, after)
                time.sleep(faulthooks.delay_s(faulthooks.AFTER_SUBMIT_DELAY_ENV))
                run.add_job(job.step, job_id, after, job.script)
                run.state.submitting = None
                run.save()
            except SchedulerError as exc:
                run.state.submitting = None
                said = _roll_back(run, backend, list(new.values()), job.step,
                                  (exc.stderr or exc.stdout).strip() or str(exc))
                raise SubmissionError(
                    f"{verb} step {job.step} failed. The scheduler said: "
                    f"{(exc.stderr or exc.stdout).strip() or exc}" + said
                    + f"\nRun folder kept for inspection: {run.layout.root}") from None
            except KeyboardInterrupt:
                if job_id is not None and job.step not in new:
                    run.add_job(job.step, job_id, after, job.script)
                    new[job.step] = job_id
                run.state.submitting = None
                said = _roll_back(run, backend, list(new.values()), job.step, "interrupted")
                never = ", ".join(s for s in plan.steps if s not in new) or "none"
                raise SubmissionError(
                    f"{verb} was interrupted at step {job.step}; steps never submitted: "
                    f"{never}." + said + f"\nRun folder kept: {run.layout.root}; "
                    f"`hpcpipe summarize {run.run_id}` says what to do next") from None
            new[job.step] = job_id
            after = [job_id]
    return new


@contextlib.contextmanager
def _interrupts_as_keyboard_interrupt() -> Iterator[None]:
    """SIGTERM (a closed terminal, a kill) is handled like Ctrl-C while jobs are submitted, so
    the submission is rolled back instead of half done. Only in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _roll_back(run: Run, backend: Backend, submitted: list[str], step: str, why: str) -> str:
    """Cancel the jobs a failed submission left; return what to tell the user about them."""
    run.event(f"submission of {step} failed: {why}")
    said = ""
    try:
        if submitted:
            ids = ", ".join(submitted)
            try:
                backend.cancel(submitted)
            except SchedulerError as cancel_exc:
                run.event(f"could not cancel {ids}: {cancel_exc}; "
                          "they are recorded here, cancel them with `hpcpipe cancel`")
                said = (f"\nJobs already submitted for this run could NOT be cancelled "
                        f"({cancel_exc}); they are recorded in the run: cancel them with "
                        f"`hpcpipe cancel {run.run_id}` once the scheduler answers: {ids}")
            else:
                ended = _ended_on_their_own(backend, submitted)
                cancelled = [j for j in submitted if j not in ended]
                for rec in run.all_jobs():
                    if rec.job_id in ended:
                        rec.update(state=ended[rec.job_id], final=True)
                    elif rec.job_id in submitted:
                        rec.update(state="CANCELLED", reason="SubmissionFailed", final=True)
                if cancelled:
                    run.event(f"cancelled {', '.join(cancelled)} after the failed submission")
                    said = ("\nJobs already submitted for this run were cancelled: "
                            + ", ".join(cancelled))
                if ended:
                    over = ", ".join(f"{j} ({s})" for j, s in ended.items())
                    run.event(f"{over} had ended before the cancel reached them")
                    said += f"\nJobs of this run that had already ended before the cancel: {over}"
        run.state.submit_failed = True
    finally:
        run.save()  # whatever happened above, the jobs stay on record
    return said


def _ended_on_their_own(backend: Backend, job_ids: list[str]) -> dict[str, str]:
    """The jobs among ``job_ids`` that were over before scancel reached them (a short ingest can
    complete while the next step is submitted), with the state they ended in. A job the cancel
    ended reads CANCELLED and is not one of them; when the scheduler does not answer, none is."""
    try:
        info = backend.query(job_ids)
    except SchedulerError:
        return {}
    return {j: i.state for j, i in info.items()
            if j in job_ids and i.terminal and i.state != "CANCELLED"}
