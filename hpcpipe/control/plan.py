"""Plan, then apply: the one submission path of ``submit`` and ``rerun``.

A :class:`Plan` is built first and changes nothing: the rendered script of each step and what it
waits on. ``--dry-run`` prints it; a real run hands the same plan to :func:`apply`, which writes
the scripts, submits the jobs in order (each ``afterok`` on the previous one), records every job
in the run's state file as soon as the scheduler answers, and on a failure cancels what it had
submitted, once, recording what it could not cancel and how to cancel it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hpcpipe import files
from hpcpipe.config import RunConfig
from hpcpipe.control import render
from hpcpipe.errors import SchedulerError, SubmissionError
from hpcpipe.run.folder import Run
from hpcpipe.run.layout import RunLayout
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

    The caller holds the run's lock. The state is saved after every job, so a queued job is
    never left unrecorded; on a failure the jobs this call submitted are cancelled (or, if that
    fails too, recorded with how to cancel them) and SubmissionError carries the scheduler's words.
    """
    for job in plan.jobs:
        files.write_text(job.script, job.text)
    new: dict[str, str] = {}
    after = list(plan.first_after)
    for job in plan.jobs:
        try:
            job_id = backend.submit(job.script, after)
        except SchedulerError as exc:
            said = _roll_back(run, backend, list(new.values()), job.step, exc)
            raise SubmissionError(
                f"{verb} step {job.step} failed. The scheduler said: "
                f"{(exc.stderr or exc.stdout).strip() or exc}" + said
                + f"\nRun folder kept for inspection: {run.layout.root}") from None
        run.add_job(job.step, job_id, after, job.script)
        run.save()
        new[job.step] = job_id
        after = [job_id]
    return new


def _roll_back(run: Run, backend: Backend, submitted: list[str], step: str,
               exc: SchedulerError) -> str:
    """Cancel the jobs a failed submission left; return what to tell the user about them."""
    run.event(f"submission of {step} failed: {(exc.stderr or exc.stdout).strip() or exc}")
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
                run.event(f"cancelled {ids} after the failed submission")
                for rec in run.all_jobs():
                    if rec.job_id in submitted:
                        rec.update(state="CANCELLED", reason="SubmissionFailed", final=True)
                said = f"\nJobs already submitted for this run were cancelled: {ids}"
        run.state.submit_failed = True
    finally:
        run.save()  # whatever happened above, the jobs stay on record
    return said
