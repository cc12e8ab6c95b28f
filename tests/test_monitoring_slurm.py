"""Watching runs that go wrong, on the real two-node Slurm test cluster, through the `hpcpipe` CLI.

Every failure here is produced for real: a step killed over its --mem, a step that hits its time
limit, a step cancelled by the user, a Python exception from bad input and the steps behind it left
DependencyNeverSatisfied. Each case checks `hpcpipe status` and the diagnosis of `hpcpipe summarize`
with the evidence line from the job's log. Then cancel + rerun of features and train (with and
without --downstream, with and without --cancel-first) complete a run whose status shows every
earlier job id, while one `hpcpipe logs train -f` follows the step across a requeue (same job id)
and a rerun (new job id) and stops by itself when the step ends.

To stay cheap the failure runs are submitted together at the start and end within seconds (the
time-limit case sleeps, which costs no CPU). The long run is held at chosen points by a setup line
that waits while a "hold" file exists, so the test decides when a job is running and when it may
go on, instead of racing a job that finishes in five seconds.
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hpcli import job_problems

pytestmark = pytest.mark.slurm

SMALL = [
    "--set", "data.synth_reviews=5000",
    "--set", "ingest.cpus=1", "--set", "ingest.mem=1G",
    "--set", "features.cpus=2", "--set", "features.mem=3G",
    "--set", "train.gpus=1", "--set", "train.gpus_per_node=1", "--set", "train.cpus_per_gpu=1",
    "--set", "train.mem=3G", "--set", "train.epochs=1", "--set", "train.batch_size=16",
    "--set", "train.max_length=32", "--set", "train.num_workers=0",
    "--set", "train.max_steps_per_epoch=4", "--set", "train.checkpoint_every=2",
    "--set", "train.log_every=1", "--set", "train.precision=fp32", "--set", "train.val_weeks=4",
    "--set", "train.freeze_encoder=true",
]
WAIT_S = 420  # other sessions share the cluster: a job may queue behind theirs for a while


@dataclass
class Case:
    """One run in its own folder, driven through the installed `hpcpipe` command."""

    cwd: Path
    holds: Path | None = None  # folder of the hold files of a gated run

    def hp(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
        proc = subprocess.run(["hpcpipe", *args], cwd=self.cwd, capture_output=True, text=True,
                              timeout=timeout, env=self.env())
        if check and proc.returncode != 0:
            raise AssertionError(f"hpcpipe {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def env(self) -> dict[str, str]:
        return {**os.environ, "HPCPIPE_RUNS_DIR": str(self.cwd / "runs")}

    def rows(self) -> dict[str, dict]:
        out = json.loads(self.hp("status", "--json").stdout)
        return {row["step"]: row for row in out["steps"]}

    def wait(self, cond, what: str, timeout: float = WAIT_S) -> dict[str, dict]:
        deadline = time.monotonic() + timeout
        rows: dict[str, dict] = {}
        while time.monotonic() < deadline:
            rows = self.rows()
            if cond(rows):
                return rows
            time.sleep(1)
        raise AssertionError(f"timed out waiting for {what}; last status:\n"
                             + self.hp("status").stdout)

    def state(self) -> dict:
        return json.loads(next((self.cwd / "runs").iterdir()).joinpath("state.json").read_text())

    def diagnosis(self) -> str:
        report = self.hp("summarize").stdout
        return report[report.index("## Diagnosis"):]


def _ended(*steps: str):
    return lambda rows: all(rows[s]["state"] not in ("PENDING", "RUNNING", "CONFIGURING",
                                                     "COMPLETING", "REQUEUED") for s in steps)


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory, slurm_cluster):
    """Submit every case at once; cancel whatever of ours is left at the end."""
    made: dict[str, Case] = {}

    def case(name: str, *args: str) -> Case:
        c = Case(tmp_path_factory.mktemp(name))
        c.hp("submit", "--name", name, *SMALL, *args)
        made[name] = c
        return c

    # (b) a plain time limit: 1 minute, and a step that sleeps past it (no USR2 handling here).
    case("timeout", "--steps", "ingest", "--set", "ingest.time=1",
         "--set", "slurm.setup=['echo waiting past the limit', 'sleep 600']")
    # (a) a step over its --mem: Python with pyarrow alone needs more than 60 MB, and synthesizing
    # 400k reviews keeps it far above that for seconds, so Slurm's 1 s memory sampling sees it
    # (a 5k-review ingest can finish between two samples).
    case("oom", "--steps", "ingest", "--set", "ingest.mem=60M",
         "--set", "data.synth_reviews=400000")
    # (d) + (e) input that is not JSON: ingest raises InputError, features and train never run.
    bad = tmp_path_factory.mktemp("input")
    (bad / "reviews.jsonl").write_text("this is not JSON\n")
    (bad / "meta.jsonl").write_text('{"parent_asin": "B0001"}\n')
    case("badinput", "--set", f"data.reviews=['{bad / 'reviews.jsonl'}']",
         "--set", f"data.metadata={bad / 'meta.jsonl'}")
    # The long run: features and train wait while their hold file exists.
    holds = tmp_path_factory.mktemp("holds")
    for step in ("features", "train"):
        (holds / f"hold-{step}").touch()
    gate = [r'echo "gate job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}"',
            f'while [ -e {holds}/hold-${{SLURM_JOB_NAME%%.*}} ]; do sleep 0.5; done']
    case("main", "--set", f"slurm.setup={json.dumps(gate)}")
    made["main"].holds = holds
    yield made
    for c in made.values():
        c.hp("cancel", check=False)


def test_a_step_over_its_memory_is_killed_and_diagnosed_out_of_memory(cases) -> None:
    c = cases["oom"]
    rows = c.wait(_ended("ingest"), "ingest to be killed for memory")
    assert rows["ingest"]["state"] in ("FAILED", "OUT_OF_MEMORY"), rows
    assert rows["ingest"]["reason"].startswith("exit "), rows  # sacct's exit code, e.g. 0:9
    diag = c.diagnosis()
    assert "**ingest: out of host memory" in diag, diag
    evidence = next(line for line in diag.splitlines() if "evidence:" in line)
    assert "xceeded" in evidence and "memory limit" in evidence, diag
    assert "raise ingest.mem (requested 60M" in diag and "--set ingest.mem=" in diag, diag


def test_python_exception_and_the_steps_behind_it_never_satisfied(cases) -> None:
    c = cases["badinput"]
    rows = c.wait(_ended("ingest", "features", "train"), "the failed chain to end")
    assert rows["ingest"]["state"] == "FAILED" and rows["ingest"]["reason"] == "exit 1:0", rows
    # --kill-on-invalid-dep=yes: Slurm cancels both dependents with DependencyNeverSatisfied.
    for step in ("features", "train"):
        assert rows[step]["state"] == "CANCELLED", rows
        assert rows[step]["reason"] == "DependencyNeverSatisfied", rows
    text = c.hp("status").stdout
    assert text.count("DependencyNeverSatisfied") == 2, text

    diag = c.diagnosis()
    ingest = diag[diag.index("**ingest:"):diag.index("**features:")]
    assert "Python exception InputError in " in ingest and "steps/ingest/" in ingest, ingest
    assert "evidence: `hpcpipe.errors.InputError: no valid reviews in" in ingest, ingest
    assert "malformed JSON" in ingest and "hpcpipe rerun ingest" in ingest, ingest
    for step in ("features", "train"):
        part = diag[diag.index(f"**{step}:"):]
        part = part[: part.index("\n- **") if "\n- **" in part else len(part)]
        assert "never ran, upstream step ingest ended FAILED" in part, part
        assert f"upstream ingest (job {rows['ingest']['job_id']}) ended FAILED" in part, part
        assert "InputError" in part and "`hpcpipe rerun ingest`" in part, part


def test_cancel_rerun_requeue_and_follow_complete_the_run_with_full_history(
        cases, slurm_cluster) -> None:
    c = cases["main"]
    holds = c.holds
    assert holds is not None
    ids = {s: c.state()["steps"][s]["jobs"][0]["job_id"] for s in ("ingest", "features", "train")}
    f1, t1 = ids["features"], ids["train"]

    # (c) features runs (held), the user cancels it: it and train behind it end CANCELLED.
    c.wait(lambda r: r["features"]["state"] == "RUNNING", "features to run")
    out = c.hp("cancel", "features").stdout
    assert f1 in out and t1 in out, out
    rows = c.wait(_ended("features", "train"), "features and train to be cancelled", 60)
    user = getpass.getuser()
    assert rows["features"]["state"] == "CANCELLED", rows
    assert rows["features"]["reason"] == f"by {user}", rows
    assert rows["ingest"]["state"] == "COMPLETED", rows
    diag = c.diagnosis()
    assert f"**features: CANCELLED by {user}**" in diag, diag
    evidence = next(x for x in diag.splitlines() if "evidence:" in x)
    # 22.05 prefixes Slurm's line with "slurmstepd-n1:", 25.11 with a timestamp (VERSIONS.md).
    assert "error: ***" in evidence and f"*** JOB {f1} ON n" in evidence, diag
    assert "CANCELLED AT" in evidence, diag
    assert "`hpcpipe rerun features` resumes it in place" in diag, diag
    # One scancel for both: Slurm may cancel train for us first, as its dependency failed.
    if rows["train"]["reason"] == "DependencyNeverSatisfied":
        assert "**train: DependencyNeverSatisfied: never ran, upstream step features ended " \
            "CANCELLED" in diag, diag
        assert "`hpcpipe rerun features`: the steps after it are resubmitted" in diag, diag
    else:
        assert rows["train"]["reason"] == f"by {user}", rows
        assert f"**train: CANCELLED by {user} before it started**" in diag, diag
        assert "`hpcpipe rerun train` submits it again" in diag, diag

    # rerun features alone: train stays cancelled.
    out = c.hp("rerun", "features", "--no-downstream").stdout
    assert "features" in out and "train" not in out, out
    rows = c.wait(lambda r: r["features"]["state"] == "RUNNING", "features rerun to run")
    f2 = rows["features"]["job_id"]
    assert rows["features"]["earlier"] == [f1] and rows["train"]["job_id"] == t1, rows

    # a running step is not resubmitted behind the user's back ...
    proc = c.hp("rerun", "features", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"features job {f2}" in proc.stderr and "still RUNNING" in proc.stderr, proc.stderr
    assert "--cancel-first" in proc.stderr, proc.stderr
    # ... unless asked to: features again, and (--downstream, the default) train behind it.
    out = c.hp("rerun", "features", "--cancel-first").stdout
    rows = c.rows()
    f3, t2 = rows["features"]["job_id"], rows["train"]["job_id"]
    assert f3 in out and t2 in out and t2 != t1, out
    assert rows["features"]["earlier"] == [f1, f2] and rows["train"]["earlier"] == [t1], rows
    assert c.state()["steps"]["train"]["jobs"][-1]["depends_on"] == [f3]
    assert rows["train"]["state"] == "PENDING", rows
    (holds / "hold-features").unlink()

    # One follower for the rest: it must survive a requeue and a rerun and end by itself.
    follower = subprocess.Popen(["hpcpipe", "logs", "train", "-f"], cwd=c.cwd, env=c.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        rows = c.wait(lambda r: r["train"]["state"] == "RUNNING", "train to run")
        assert rows["features"]["state"] == "COMPLETED", rows
        proc = c.hp("rerun", "train", check=False)
        assert proc.returncode != 0 and f"train job {t2}" in proc.stderr, proc.stderr
        assert "--cancel-first" in proc.stderr, proc.stderr

        # requeue: the same job id goes back to the queue and runs again, appending to its log
        subprocess.run(["scontrol", "requeue", t2], check=True, capture_output=True)
        slurm_cluster.wait_state(t2, ("PENDING", "REQUEUED"), timeout=60)
        slurm_cluster.make_eligible(t2)
        rows = c.wait(lambda r: r["train"]["state"] == "RUNNING" and r["train"]["restarts"] >= 1,
                      "the requeued train job to run again")
        assert rows["train"]["job_id"] == t2, rows
        assert "requeued 1x" in c.hp("status").stdout
        diag = c.diagnosis()
        assert "**train: requeued 1x" in diag and "now RUNNING" in diag, diag

        # rerun with --cancel-first: a new job id, this time allowed to train
        out = c.hp("rerun", "train", "--cancel-first", "--no-downstream").stdout
        t3 = c.rows()["train"]["job_id"]
        assert t3 not in (t1, t2) and t3 in out, out
        (holds / "hold-train").unlink()
        rows = c.wait(_ended("train"), "the rerun of train to finish", WAIT_S + 120)
        followed, _ = follower.communicate(timeout=60)
    finally:
        if follower.poll() is None:
            follower.kill()
            print(follower.communicate()[0])
    assert follower.returncode == 0, followed
    assert rows["train"]["state"] == "COMPLETED", c.hp("logs", "train").stdout[-3000:]

    # the follower saw restart 0 and 1 of t2 (same file), then switched to t3 and stopped
    assert f"gate job {t2} restart 0" in followed, followed
    assert f"gate job {t2} restart 1" in followed, followed
    assert f"train-{t3}.out (job {t3}, resubmitted)" in followed, followed
    assert "step train of run" in followed and f"job {t3} (restart 0)" in followed, followed
    assert followed.rstrip().endswith(f"==> job {t3} ended: COMPLETED"), followed[-2000:]
    assert followed.index("restart 1") < followed.index(f"(job {t3}, resubmitted)")

    # the whole run completed, and status keeps every earlier job of each step
    rows = c.rows()
    assert {s: r["state"] for s, r in rows.items()} == dict.fromkeys(rows, "COMPLETED"), rows
    assert rows["ingest"]["earlier"] == []
    assert rows["features"]["job_id"] == f3 and rows["features"]["earlier"] == [f1, f2]
    assert rows["train"]["job_id"] == t3 and rows["train"]["earlier"] == [t1, t2]
    table = c.hp("status").stdout
    assert f"{f1},{f2}" in table and f"{t1},{t2}" in table, table
    report = c.hp("summarize").stdout
    assert "## Diagnosis" in report and not job_problems(report), report
    assert f"{t1} (CANCELLED), {t2} (CANCELLED)" in report, report


def test_a_step_past_its_time_limit_ends_timeout_with_slurms_line_as_evidence(cases) -> None:
    c = cases["timeout"]
    rows = c.wait(_ended("ingest"), "ingest to hit its 1-minute limit", 240)
    assert rows["ingest"]["state"] == "TIMEOUT", rows
    assert rows["ingest"]["reason"].startswith("time limit "), rows
    diag = c.diagnosis()
    assert "**ingest: hit its time limit (TIMEOUT)**" in diag, diag
    assert "DUE TO TIME LIMIT" in next(x for x in diag.splitlines() if "evidence:" in x), diag
    assert "raise ingest.time (now " in diag and "--set ingest.time=" in diag, diag


def test_a_train_job_that_requeued_itself_before_its_limit_is_reported_as_requeued(
        tmp_path: Path) -> None:
    """Stand-in state and log, in the exact words train writes when USR2 comes before the time
    limit (hpcpipe/train/loop.py `_stop`): producing it for real needs a minute-long training
    job per test run. The diagnosis must say it requeued itself and will resume, not that it
    failed; a TIMEOUT of the same step says the requeue did not happen."""
    from hpcpipe.run.folder import Run
    from hpcpipe.watch.summary import build_report

    run = Run.create(tmp_path / "runs", "run-usr2", "slurm", tmp_path / "logs")
    for step in ("ingest", "features"):
        run.add_job(step, "100", [], Path("x")).update(state="COMPLETED", final=True)
    log = tmp_path / "logs" / "train-4242.out"
    log.parent.mkdir(parents=True)
    log.write_text(
        "2026-11-21 21:40:00,001 [train] INFO hpcpipe.jobs.train: step train of run run-usr2, "
        "job 4242 (restart 0) on n1\n"
        "\repoch 0:  10%|#         | 40/400\repoch 0:  20%|##        | 80/400\n"
        "0: 2026-11-21 21:40:59,001 [train] WARNING hpcpipe.steps.train: SIGUSR2 at epoch 0 step 80: "
        "checkpoint saved to /r/train/checkpoints/last.pt; exiting 140 so that the batch script "
        "requeues job 4242\n"
        "hpcpipe: requeueing job 4242: it resumes from its checkpoint when Slurm starts it again\n")
    rec = run.add_job("train", "4242", ["100"], Path("x"))
    rec.update(state="PENDING", reason="BeginTime", restarts=1, log=str(log), time_limit="00:01:00")
    run.save()
    report = build_report(run)
    assert "**train: requeued 1x by itself before its time limit (USR2 warning), now PENDING**" \
        in report, report
    assert "evidence: `0: 2026-11-21 21:40:59,001 [train] WARNING hpcpipe.steps.train: SIGUSR2 at " \
        "epoch 0 step 80: checkpoint saved" in report, report
    assert "nothing to do: it resumes from its checkpoint" in report and "train.time" in report

    rec.update(state="TIMEOUT", final=True)
    with open(log, "a") as f:
        f.write("slurmstepd-n1: error: *** JOB 4242 ON n1 CANCELLED AT 2026-11-21T21:42:00 "
                "DUE TO TIME LIMIT ***\n")
    report = build_report(run)
    assert "**train: hit its time limit (TIMEOUT)**" in report, report
    assert "DUE TO TIME LIMIT" in report and "here that did not happen" in report, report
