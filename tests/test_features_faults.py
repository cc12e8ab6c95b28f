"""Faults injected for real into the features step on the Slurm test cluster.

Each test submits ingest -> features through the `hpcpipe` CLI, breaks the features job while
buckets are in flight, and then checks what a user relies on: the run (or its rerun) completes,
the features are byte-identical to an uninterrupted run of ``build_features`` on the same ingest
output, no temporary file is left, and a rerun reuses the buckets the broken job had finished.

The faults: ``hpcpipe cancel features`` (scancel), ``kill -9`` of one Dask worker process of the
job, and the job's Slurm time limit. To land them mid-bucket on a fast kernel, the jobs run with
the test hook ``HPCPIPE_FAULT_BUCKET_DELAY_S`` (``hpcpipe.runtime.faulthooks``): every
bucket waits that long between writing its temporary file and renaming it into place, the
widest window a real fault can hit. Reruns run without it.

A one-minute time limit ends the job 60-90 s after it starts (slurmctld checks limits every
30 s; later when it is busy), so that run is submitted when the module starts and the minute
passes while the other tests run; its test comes last.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from hpcli import hp

from hpcpipe import faulthooks
from hpcpipe.config import FeaturesConfig
from hpcpipe.steps import features

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("time_limited_run")]

N_BUCKETS = 20
# 40k synthetic reviews in 20 buckets of about 2000 rows; 2 Dask workers. Short time limits let
# the backfill scheduler start the jobs while other tests' jobs wait for resources.
SMALL = [
    "--cpus", "2", "--steps", "ingest,features", "--time", "00:05:00",
    "--set", "data.synth_reviews=40000", "--set", "ingest.target_bucket_rows=2000",
    "--set", "ingest.mem=2G", "--set", "features.mem=4G",
]


@dataclass
class Submitted:
    cwd: Path
    run_dir: Path
    ingest_job: str
    features_job: str



def submit(cwd: Path, *extra: str, delay_s: float) -> Submitted:
    """Submit ingest -> features in ``cwd``; every job of it runs with ``delay_s`` per bucket."""
    cwd.mkdir(parents=True, exist_ok=True)
    hp(cwd, "submit", *SMALL, *extra, env={faulthooks.BUCKET_DELAY_ENV: str(delay_s)})
    run_dir = next((cwd / "runs").iterdir())
    state = json.loads((run_dir / "state.json").read_text())
    ids = {s: state["steps"][s]["jobs"][0]["job_id"] for s in ("ingest", "features")}
    assert "train" not in state["steps"]
    return Submitted(cwd, run_dir, ids["ingest"], ids["features"])


def status(cwd: Path) -> dict[str, dict]:
    out = json.loads(hp(cwd, "status", "--json").stdout)
    return {row["step"]: row for row in out["steps"]}


def log_of(cwd: Path, step: str) -> str:
    path = Path(status(cwd)[step]["log"])
    return path.read_text() if path.exists() else "(no log)"


def wait_until(cond: Callable[[], object], timeout: float, what: str,
               poll_s: float = 0.2) -> object:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll_s)
    return value


def finished_buckets(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in out.glob("bucket=*/" + features.PART_NAME)}


def temporaries(out: Path) -> list[Path]:
    return [p for p in out.rglob(".tmp-*")]


def wait_mid_run(sub: Submitted, slurm_cluster, min_done: int) -> None:
    """Wait until the features job has finished ``min_done`` buckets and has others in flight
    (written to a temporary name, not renamed yet)."""
    out = sub.run_dir / "features"
    deadline = time.monotonic() + 240  # queueing included: other tests share the cluster
    next_check = 0.0
    while not (len(finished_buckets(out)) >= min_done and temporaries(out)):
        now = time.monotonic()
        assert now < deadline, f"features job {sub.features_job} never got mid-run"
        if now > next_check:  # the files are polled often, the scheduler now and then
            state = slurm_cluster.state(sub.features_job)
            assert state in ("PENDING", "CONFIGURING", "RUNNING"), (
                f"features job {sub.features_job} is {state} before the fault:\n"
                + log_of(sub.cwd, "features"))
            next_check = now + 2
        time.sleep(0.05)


def job_processes(job_id: str) -> list[psutil.Process]:
    """The processes of a Slurm job on this machine (both test nodes are this machine), found by
    the SLURM_JOB_ID in their environment: orphans of a killed parent are found too."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("SLURM_JOB_ID") == job_id:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_processes_gone(job_id: str, timeout: float = 60) -> None:
    """Slurm marks a job ended at once; its processes may take up to KillWait to go."""
    wait_until(lambda: not [p for p in job_processes(job_id) if alive(p)], timeout,
               f"the processes of job {job_id} to end")


def wait_step(sub: Submitted, state: str, timeout: float) -> dict:
    def reached() -> dict | None:
        row = status(sub.cwd)["features"]
        if row["state"] == state:
            return row
        assert row["state"] in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"), (
            f"features ended {row['state']}, expected {state}:\n" + log_of(sub.cwd, "features"))
        return None

    return wait_until(reached, timeout, f"features to be {state}", poll_s=1)


def features_summaries(run_dir: Path) -> dict[str, dict]:
    """The features step's metrics summary lines, by job id."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["job_id"]: m for m in lines if m["step"] == "features" and m["kind"] == "summary"}


@pytest.fixture
def submit_run(slurm_cluster, tmp_path: Path) -> Iterator[Callable[..., Submitted]]:
    """``submit`` in the test's tmp_path; a test that fails early leaves no job behind."""
    runs: list[Submitted] = []

    def submit_here(*extra: str, delay_s: float) -> Submitted:
        runs.append(submit(tmp_path / "cwd", *extra, delay_s=delay_s))
        return runs[-1]

    yield submit_here
    for sub in runs:
        hp(sub.cwd, "cancel", check=False)  # the run's own unfinished jobs; none once it passed


@pytest.fixture(scope="module")
def client() -> Iterator[object]:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as c:
        yield c


def assert_same_as_uninterrupted(run_dir: Path, client, tmp_path: Path) -> dict:
    """The run's features equal, file for file and byte for byte, an uninterrupted in-process
    run on the same ingest output; nothing temporary is left. Returns the run's manifest."""
    ref = tmp_path / "reference"
    ref_manifest = features.build_features(run_dir / "ingest", ref, FeaturesConfig(),
                                           client=client, progress=False)
    out = run_dir / "features"
    assert not temporaries(out), temporaries(out)
    names = sorted(p.relative_to(out) for p in out.glob("bucket=*/*"))
    assert names == sorted(p.relative_to(ref) for p in ref.glob("bucket=*/*"))
    assert len(names) == ref_manifest["n_buckets"] == N_BUCKETS
    for name in names:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("n_buckets", "rows_in", "rows_out", "last_week", "columns"):
        assert manifest[key] == ref_manifest[key], key
    return manifest


def assert_rerun_reused(sub: Submitted, finished: dict[Path, int], rerun_job: str) -> None:
    """The rerun skipped (and kept untouched) exactly the buckets the broken job finished."""
    assert 0 < len(finished) < N_BUCKETS
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was rewritten"
    summary = features_summaries(sub.run_dir)[rerun_job]
    assert summary["buckets_skipped"] == len(finished) > 0
    assert summary["buckets_done"] == N_BUCKETS - len(finished)
    log = log_of(sub.cwd, "features")
    for path in finished:
        number = path.parent.name.split("=")[1]
        assert f"bucket {number} already done, skipped" in log, log[-3000:]


# ---------------------------------------------------------------------------------------------
# The time-limited run, submitted first so that its minute passes during the other tests.


@pytest.fixture(scope="module")
def time_limited_run(slurm_cluster, tmp_path_factory) -> Iterator[Submitted]:
    # 20 buckets x 20 s on 2 workers is 200 s of work: far past the limit, however late a busy
    # slurmctld notices it (110 s after the start has been seen).
    sub = submit(tmp_path_factory.mktemp("timelimit"), "--set", "features.time=1",
                 delay_s=20)
    yield sub
    hp(sub.cwd, "cancel", check=False)  # only when a test failed before it ended


def test_cancel_mid_run_then_rerun_reuses_finished_buckets(slurm_cluster, client, submit_run,
                                                           tmp_path: Path) -> None:
    sub = submit_run(delay_s=2)
    wait_mid_run(sub, slurm_cluster, min_done=2)

    out = hp(sub.cwd, "cancel", "features").stdout
    assert sub.features_job in out
    assert slurm_cluster.wait_state(sub.features_job, "CANCELLED", timeout=30) == "CANCELLED"
    wait_processes_gone(sub.features_job)
    features_dir = sub.run_dir / "features"
    finished = finished_buckets(features_dir)
    torn = temporaries(features_dir)
    assert not (features_dir / "manifest.json").exists()

    hp(sub.cwd, "rerun", "features", "--no-downstream")
    row = wait_step(sub, "COMPLETED", timeout=240)
    assert row["earlier"] == [sub.features_job] and row["job_id"] != sub.features_job
    assert_rerun_reused(sub, finished, row["job_id"])
    if torn:
        assert "left by an interrupted run" in log_of(sub.cwd, "features")
    assert_same_as_uninterrupted(sub.run_dir, client, tmp_path)


def test_kill_9_of_a_dask_worker_loses_nothing(slurm_cluster, client, submit_run,
                                               tmp_path: Path) -> None:
    sub = submit_run(delay_s=1.5)
    # The worker to kill: one holding a written but not yet renamed bucket; the temporary's
    # name carries the pid of the process that writes it.
    wait_mid_run(sub, slurm_cluster, min_done=2)
    main = [p for p in job_processes(sub.features_job)
            if "hpcpipe.jobs.features" in p.cmdline()]
    assert len(main) == 1, "the features job's process was not found"
    workers = {p.pid: p for p in main[0].children()
               if any("spawn_main" in c for c in p.cmdline())}
    assert len(workers) == 2, [p.cmdline() for p in main[0].children()]

    def stopped_victim() -> tuple[int, Path] | None:
        """A worker stopped (SIGSTOP) while its bucket is still a temporary: killing it then
        is sure to tear that bucket, however the timing falls."""
        for tmp in temporaries(sub.run_dir / "features"):
            pid = int(tmp.name.split("-")[-2])
            if pid not in workers:
                continue
            os.kill(pid, signal.SIGSTOP)
            if tmp.exists():
                return pid, tmp
            os.kill(pid, signal.SIGCONT)  # renamed meanwhile: let it go on, try again
        return None

    pid, tmp = wait_until(stopped_victim, 30, "a worker with a bucket in flight")
    finished = finished_buckets(sub.run_dir / "features")
    os.kill(pid, signal.SIGKILL)
    killed_bucket = tmp.parent.name

    # Dask's nanny starts a new worker and the scheduler runs the lost bucket again. Were the
    # job to fail instead, a rerun must finish it with nothing lost.
    state = slurm_cluster.wait_state(sub.features_job, ("COMPLETED", "FAILED"), timeout=240)
    log = log_of(sub.cwd, "features")
    if state == "FAILED":
        done = finished_buckets(sub.run_dir / "features")
        hp(sub.cwd, "rerun", "features", "--no-downstream")
        row = wait_step(sub, "COMPLETED", timeout=240)
        assert_rerun_reused(sub, done, row["job_id"])
    else:
        assert "Restarting worker" in log, log[-3000:]  # Dask's nanny saw the kill
        assert f"{tmp.name} left by a killed worker" in log, log[-3000:]
    # Only the bucket in flight is computed again, not those the killed worker had finished:
    # when its last result was not collected yet, Dask runs that task again ("lose already
    # computed task" in the log), which keeps the bucket already written.
    if "lose already computed task" in log:
        assert "already written from the same input (its worker died" in log, log[-3000:]
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was computed again"
    manifest = assert_same_as_uninterrupted(sub.run_dir, client, tmp_path)
    if state == "COMPLETED":
        assert manifest["buckets_done"] == N_BUCKETS and manifest["buckets_skipped"] == 0
    assert (sub.run_dir / "features" / killed_bucket / features.PART_NAME).is_file()


def test_time_limit_then_rerun_reuses_finished_buckets(slurm_cluster, client,
                                                       time_limited_run: Submitted,
                                                       tmp_path: Path) -> None:
    sub = time_limited_run
    assert slurm_cluster.wait_state(sub.features_job, "TIMEOUT", timeout=300) == "TIMEOUT"
    wait_processes_gone(sub.features_job)
    features_dir = sub.run_dir / "features"
    finished = finished_buckets(features_dir)
    assert not (features_dir / "manifest.json").exists()
    row = status(sub.cwd)["features"]
    assert row["state"] == "TIMEOUT"
    assert "DUE TO TIME LIMIT" in Path(row["log"]).read_text()  # slurmstepd's own words

    hp(sub.cwd, "rerun", "features", "--set", "features.time=5")
    row = wait_step(sub, "COMPLETED", timeout=240)
    assert row["earlier"] == [sub.features_job]
    assert_rerun_reused(sub, finished, row["job_id"])
    assert_same_as_uninterrupted(sub.run_dir, client, tmp_path)
