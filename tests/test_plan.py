"""Plan, then apply: the one submission path of submit and rerun, against an in-memory backend
that fails the n-th submit and/or the cancel. Whatever fails, no queued job is left unrecorded.

The backend here is a stand-in for what a real cluster cannot produce on demand (a scheduler that
stops answering at one exact submission); tests/test_faults.py does the same on the real cluster
with a PATH shim.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpcpipe.config import RunConfig
from hpcpipe.control import pipeline
from hpcpipe.control.plan import apply, plan_steps
from hpcpipe.errors import SchedulerError, SubmissionError
from hpcpipe.run.folder import Run
from hpcpipe.scheduler.base import Backend, JobInfo
from hpcpipe.scheduler.states import STATES, Phase


class MemoryBackend(Backend):
    """Keeps jobs in a dict; ``fail_submit=n`` makes the n-th submit (1-based) fail,
    ``fail_cancel`` makes every cancel fail, as a scheduler that stopped answering."""

    name = "memory"

    def __init__(self, fail_submit: int | None = None, fail_cancel: bool = False) -> None:
        self.fail_submit = fail_submit
        self.fail_cancel = fail_cancel
        self.queue: dict[str, str] = {}  # job id -> state
        self.submits = 0

    def launcher(self, step: str, ntasks: int) -> str:
        return ""

    def submit_command(self, script: Path, depends_on: list[str]) -> list[str]:
        return ["submit", str(script), *depends_on]

    def submit(self, script: Path, depends_on: list[str]) -> str:
        self.submits += 1
        if self.submits == self.fail_submit:
            raise SchedulerError(["sbatch", str(script)], 1, "",
                                 "sbatch: error: Batch job submission failed: Socket timed out")
        job_id = str(100 + self.submits)
        self.queue[job_id] = "PENDING"
        return job_id

    def query(self, job_ids: list[str]) -> dict[str, JobInfo]:
        return {j: JobInfo(j, self.queue[j]) for j in job_ids if j in self.queue}

    def find(self, job_name: str, script: Path) -> list[str]:
        return [j for j in self.queue if self.queue[j] == "PENDING"]

    def cancel(self, job_ids: list[str]) -> None:
        if self.fail_cancel:
            raise SchedulerError(["scancel", *job_ids], 1, "", "Unable to contact slurm controller")
        for j in job_ids:  # as scancel: a job already over stays as it ended
            if self.queue[j] in ("PENDING", "RUNNING"):
                self.queue[j] = "CANCELLED"

    def check(self, cfg: RunConfig) -> None:
        pass


def _new_run(tmp_path: Path) -> Run:
    run = Run.create(tmp_path / "runs", "run-plan", "memory", tmp_path / "logs")
    run.save()
    return run


def _on_disk(run: Run) -> dict[str, str]:
    """{job id: recorded state} as the state file on disk holds it."""
    state = json.loads(run.layout.state.read_text())
    return {j["job_id"]: j["state"] for s in state["steps"].values() for j in s["jobs"]}


def _plan(run: Run, backend: Backend, steps: list[str], after: list[str] = ()):  # noqa: ANN202
    return plan_steps(RunConfig(), run.layout, backend, Path(run.state.logs_dir), steps, after)


def test_a_plan_changes_nothing_and_apply_submits_exactly_it(tmp_path: Path) -> None:
    run = _new_run(tmp_path)
    backend = MemoryBackend()
    plan = _plan(run, backend, ["ingest", "features", "train"])
    text = plan.describe(backend)
    assert not backend.queue and not run.layout.scripts.exists()
    assert "# ---- " in text and "<job id of ingest>" in text and "<job id of features>" in text
    new = apply(plan, run, backend)
    assert new == {"ingest": "101", "features": "102", "train": "103"}
    assert [run.job(s).depends_on for s in run.steps()] == [[], ["101"], ["102"]]
    for job in plan.jobs:  # the submitted scripts are the planned ones, byte for byte
        assert job.script.read_text() == job.text
    assert _on_disk(run) == {"101": "PENDING", "102": "PENDING", "103": "PENDING"}


@pytest.mark.parametrize("fail_at", [1, 2, 3])
@pytest.mark.parametrize("cancel_fails", [False, True])
def test_a_failed_submit_never_leaves_a_queued_job_unrecorded(tmp_path: Path, fail_at: int,
                                                              cancel_fails: bool) -> None:
    run = _new_run(tmp_path)
    backend = MemoryBackend(fail_submit=fail_at, fail_cancel=cancel_fails)
    plan = _plan(run, backend, ["ingest", "features", "train"])
    with pytest.raises(SubmissionError) as err:
        apply(plan, run, backend)
    step = plan.jobs[fail_at - 1].step
    assert f"step {step} failed" in str(err.value) and "Socket timed out" in str(err.value)
    recorded = _on_disk(run)
    queued = {j for j, s in backend.queue.items() if s == "PENDING"}
    assert queued <= set(recorded), "a job is queued that the run never recorded"
    assert json.loads(run.layout.state.read_text())["submit_failed"] is True
    if cancel_fails and fail_at > 1:
        assert queued == set(recorded) and all(s == "PENDING" for s in recorded.values())
        assert "could NOT be cancelled" in str(err.value)
        assert any("could not cancel" in e["text"] for e in run.state.events)
    else:
        assert not queued
        assert all(s == "CANCELLED" for s in recorded.values())
        assert len(recorded) == fail_at - 1


def test_a_job_that_completed_before_the_roll_back_is_recorded_as_it_ended(
        tmp_path: Path) -> None:
    """A short ingest can complete while features is being submitted (seen on Slurm 25.11 with
    the built-in sample): the roll-back must not record it as cancelled, nor say so."""
    run = _new_run(tmp_path)

    class CompletesFirst(MemoryBackend):
        def submit(self, script: Path, depends_on: list[str]) -> str:
            if self.submits == 1:  # ingest ends while features is submitted
                self.queue["101"] = "COMPLETED"
            return super().submit(script, depends_on)

    backend = CompletesFirst(fail_submit=3)
    with pytest.raises(SubmissionError) as err:
        apply(_plan(run, backend, ["ingest", "features", "train"]), run, backend)
    assert _on_disk(run) == {"101": "COMPLETED", "102": "CANCELLED"}
    said = str(err.value)
    assert "were cancelled: 102\n" in said, said
    assert "already ended before the cancel: 101 (COMPLETED)" in said, said
    assert any("101 (COMPLETED) had ended" in e["text"] for e in run.state.events)


def test_rerun_uses_the_same_path_and_records_each_job(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """rerun used to skip the save after each job and lost the record when its rollback cancel
    failed too; now it is the same apply()."""
    run = _new_run(tmp_path)
    backend = MemoryBackend()
    monkeypatch.setattr(pipeline, "get_backend", lambda name, root: backend)
    monkeypatch.setattr("hpcpipe.watch.refresh.get_backend", lambda name, root: backend)
    from hpcpipe.control.pipeline import write_config

    write_config(RunConfig(), run.layout)
    apply(_plan(run, backend, ["ingest", "features", "train"]), run, backend)
    for j in ("101", "102", "103"):
        backend.queue[j] = "COMPLETED" if j == "101" else "FAILED"
    backend.fail_submit, backend.fail_cancel = backend.submits + 2, True
    with pytest.raises(SubmissionError, match="resubmitting step train failed"):
        pipeline.rerun(Run.open(tmp_path / "runs", "run-plan"), "features", downstream=True,
                       cancel_first=False, overrides=[], echo=lambda s: None)
    recorded = _on_disk(run)
    queued = {j for j, s in backend.queue.items() if s == "PENDING"}
    assert queued == {"104"} and "104" in recorded, (queued, recorded)


@pytest.mark.parametrize("at", [1, 2])
def test_ctrl_c_between_answer_and_record_cancels_and_records(tmp_path: Path, at: int,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    run = _new_run(tmp_path)
    backend = MemoryBackend()
    calls = {"n": 0}

    def interrupted(seconds: float) -> None:  # the moment after sbatch answered
        calls["n"] += 1
        if calls["n"] == at:
            raise KeyboardInterrupt

    monkeypatch.setattr("hpcpipe.control.plan.time.sleep", interrupted)
    with pytest.raises(SubmissionError, match=f"interrupted at step {['ingest', 'features'][at - 1]}"):
        apply(_plan(run, backend, ["ingest", "features", "train"]), run, backend)
    recorded = _on_disk(run)
    assert set(recorded) == set(backend.queue) and len(recorded) == at
    assert all(s == "CANCELLED" for s in backend.queue.values())
    assert all(s == "CANCELLED" for s in recorded.values())
    assert "submitting" not in json.loads(run.layout.state.read_text())


def test_one_table_of_states_covers_what_the_code_distinguishes() -> None:
    assert STATES["COMPLETED"].final and STATES["COMPLETED"].phase is Phase.SUCCEEDED
    assert STATES["COMPLETING"].active and STATES["REQUEUED"].active
    # Slurm may requeue these by itself: over for now, but asked about again.
    assert STATES["PREEMPTED"].ended and not STATES["PREEMPTED"].final
    assert STATES["NODE_FAIL"].ended and not STATES["NODE_FAIL"].final
    assert all(m.ended for s, m in STATES.items() if m.final)
