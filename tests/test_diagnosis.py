"""Diagnoses for failures a one-machine cluster cannot produce on demand.

The logs and the sacct text under tests/fixtures/ are kept as fixtures, named as such: NCCL
watchdog timeouts, CUDA out-of-memory, node failures and cgroup OOM kills are copied in the form
real clusters print them. The cases the test cluster can produce for real live in the slurm tests.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from hpcpipe.run.folder import Run
from hpcpipe.run.metrics import MetricsWriter
from hpcpipe.scheduler.slurm import parse_sacct
from hpcpipe.watch.summary import build_report, diagnose, scan_log

FIXTURES = Path(__file__).parent / "fixtures"


def _run_with(tmp_path: Path, step: str, log: str, **job: str) -> Run:
    run = Run.create(tmp_path / "runs", "run-fixture", "slurm", tmp_path / "logs")
    ups = {"ingest": [], "features": ["ingest"], "train": ["ingest", "features"]}[step]
    for up in ups:
        rec = run.add_job(up, "100", [], Path("x"))
        rec.update(state="COMPLETED", final=True)
    rec = run.add_job(step, job.pop("job_id", "3015454"), [], Path("x"))
    dest = tmp_path / "logs" / Path(log).name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURES / "logs" / log, dest)
    rec.update(log=str(dest), final=True, **job)
    run.save()
    return run


@pytest.mark.parametrize(
    ("step", "log", "job", "problem", "evidence", "action"),
    [
        ("train", "nccl_timeout.log", {"state": "FAILED", "exit_code": "134:0"},
         "NCCL error or collective timeout", "Watchdog caught collective operation timeout",
         "resumes from the last checkpoint"),
        ("train", "cuda_oom.log", {"state": "FAILED", "exit_code": "1:0"}, "CUDA out of memory",
         "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 3.00 GiB",
         "lower train.batch_size"),
        ("features", "node_fail.log", {"state": "NODE_FAIL", "nodes": "cpu-node-07"},
         "a node failed (NODE_FAIL)", "DUE TO NODE FAILURE", "--exclude=cpu-node-07"),
        ("features", "host_oom_cgroup.log", {"state": "OUT_OF_MEMORY", "req_mem": "64G",
                                             "max_rss_bytes": str(66998012 * 1024)},
         "out of host memory", "Some of the step tasks have been OOM Killed",
         "raise features.mem (requested 64G, peak 63.9 GB)"),
    ],
)
def test_fixture_failures_are_diagnosed_with_evidence_and_next_action(
        tmp_path: Path, step: str, log: str, job: dict, problem: str, evidence: str,
        action: str) -> None:
    run = _run_with(tmp_path, step, log, **job)
    (diag,) = diagnose(run)
    assert diag.step == step and problem in diag.problem
    assert evidence in diag.evidence
    assert action in diag.action
    assert evidence in build_report(run)


def test_last_traceback_frame_and_message_are_found() -> None:
    found = scan_log(FIXTURES / "logs" / "cuda_oom.log")
    frame, message = found["traceback"]
    assert frame.endswith("torch/_tensor.py:626 in backward")
    assert message.startswith("torch.OutOfMemoryError: CUDA out of memory")


def test_real_sacct_text_node_fail_oom_and_requeue() -> None:
    jobs = parse_sacct((FIXTURES / "sacct_real.txt").read_text())
    assert jobs["3015454"].state == "NODE_FAIL"
    assert jobs["3015454"].extra["max_rss_bytes"] == str(30150312 * 1024)
    assert jobs["3015461"].state == "OUT_OF_MEMORY"
    # a job requeued once: the last allocation row wins and the requeue is counted
    assert jobs["3015470"].state == "COMPLETED" and jobs["3015470"].restarts == 1
    assert jobs["3015470"].nodes == "gpu-node-04"


def test_a_tqdm_heavy_log_is_scanned_line_by_line(tmp_path: Path) -> None:
    log = tmp_path / "big.log"
    with open(log, "w") as f:
        for i in range(20000):
            f.write("".join(f"\rbuckets: {j}%|##  | {j}/100 [00:0{j % 10}<00:10, 3.1it/s]"
                            for j in range(5)) + "\n")
            if i == 15000:
                f.write("Traceback (most recent call last):\n  File \"/x/y.py\", line 3, in f\n"
                        "ValueError: bad bucket 00012\n")
    found = scan_log(log)
    assert found["traceback"] == ("/x/y.py:3 in f", "ValueError: bad bucket 00012")


# sacct -P -D rows from the test cluster (14 fields; Reason is the last pending reason): a job
# cancelled while it waited on its dependency gets a Start time on some runs and "None" on others.
_CANCELLED_WAITING = {
    "start set": "919|CANCELLED|0:0|00:00:00|12:00:00|None assigned|2026-11-21T23:24:02|"
                 "2026-11-21T23:24:06|2026-11-21T23:24:06|Dependency|2|00:00:00||16G",
    "start None": "893|CANCELLED|0:0|00:00:00|12:00:00|None assigned|2026-11-21T23:18:37|None|"
                  "2026-11-21T23:18:37|Dependency|2|00:00:00||16G",
}


@pytest.mark.parametrize("row", _CANCELLED_WAITING.values(), ids=_CANCELLED_WAITING.keys())
def test_a_job_cancelled_while_waiting_never_started_whatever_sacct_says(
        tmp_path: Path, row: str) -> None:
    (info,) = parse_sacct(row).values()
    assert info.state == "CANCELLED" and info.start == "", info
    run = Run.create(tmp_path / "runs", "run-x", "slurm", tmp_path / "logs")
    for step, jid in (("ingest", "1"), ("features", "2")):
        run.add_job(step, jid, [], Path("x")).update(state="COMPLETED" if jid == "1" else
                                                      "CANCELLED", final=True)
    rec = run.add_job("train", info.job_id, ["2"], Path("x"))
    rec.cancelled_by = "alice"  # what `hpcpipe cancel` records
    run.apply({info.job_id: info})
    train = next(d for d in diagnose(run) if d.step == "train")
    assert train.problem == "CANCELLED by alice before it started", train
    assert train.evidence == f"job {info.job_id} CANCELLED by alice", train
    assert train.action == "`hpcpipe rerun train` submits it again", train


def test_slurm_cancelling_a_job_whose_dependency_failed_is_named_as_such() -> None:
    (info,) = parse_sacct(_CANCELLED_WAITING["start None"]).values()
    assert info.reason == "DependencyNeverSatisfied"
    by_user = _CANCELLED_WAITING["start None"].replace("|CANCELLED|", "|CANCELLED by 0|")
    (info,) = parse_sacct(by_user).values()
    assert info.reason == "Dependency" and info.extra["cancelled_by"] == "0"


@pytest.mark.slurm
def test_jobs_that_waiting_will_not_start_are_diagnosed(slurm_cluster, tmp_path: Path) -> None:  # noqa: ANN001
    """A time limit above the partition's MaxTime, a held job, and a job whose node is reserved
    for maintenance: all pend, and summarize says why and what to do instead of "Nothing has
    failed so far"."""
    import subprocess

    from hpcpipe.watch.refresh import refresh

    out = f"--output={tmp_path}/%j.out"
    resv = f"hp_maint_{os.getpid()}"
    subprocess.run(["scontrol", "create", "reservation", f"ReservationName={resv}",
                    "StartTime=now", "Duration=10", "Nodes=n2", "Users=root",
                    "Flags=maint,ignore_jobs"], check=True, capture_output=True)
    too_long = slurm_cluster.sbatch("--partition=short", "--time=20", out, "--wrap", "true")
    held = slurm_cluster.sbatch("--hold", "--time=1", out, "--wrap", "true")
    no_node = slurm_cluster.sbatch("--nodelist=n2", "--time=1", out, "--wrap", "true")
    try:
        run = Run.create(tmp_path / "runs", "run-stuck", "slurm", tmp_path / "logs")
        run.add_job("ingest", too_long, [], Path("x"))
        run.add_job("features", held, [], Path("y"))
        run.add_job("train", no_node, [], Path("z"))
        run.save()
        deadline = time.monotonic() + 30
        while True:
            refresh(run)
            reasons = [run.job(s).reason for s in ("ingest", "features", "train")]
            if (reasons[:2] == ["PartitionTimeLimit", "JobHeldUser"]
                    and reasons[2].startswith("ReqNodeNotAvail")) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        report = build_report(run)
        assert "Nothing has failed so far" not in report, report
        found = {d.step: d for d in diagnose(run)}
        assert "above the partition's MaxTime" in found["ingest"].problem, found
        assert "PartitionTimeLimit" in found["ingest"].evidence
        assert "--set ingest.time=" in found["ingest"].action
        assert "held" in found["features"].problem
        assert f"scontrol release {held}" in found["features"].action
        assert "nodes it needs are down, drained or reserved" in found["train"].problem
        assert "--exclude=" in found["train"].action
    finally:
        slurm_cluster.cancel(too_long, held, no_node)
        subprocess.run(["scontrol", "delete", f"ReservationName={resv}"], capture_output=True)


def test_a_model_worse_than_the_baseline_is_said_first(tmp_path: Path) -> None:
    run = Run.create(tmp_path / "runs", "run-worse", "local", tmp_path / "logs")
    for step in ("ingest", "features", "train"):
        run.add_job(step, f"L{step}", [], Path("x")).update(state="COMPLETED", final=True)
    writer = MetricsWriter(run.layout.metrics, "train", job_id="L1")
    writer.write("eval", epoch=0, val_smape=1.13, baseline_same_smape=1.002,
                 baseline_roll4_smape=1.035, improvement_pct=-12.91)
    report = build_report(run)
    assert "12.91% WORSE" in report and "% better" not in report, report
    assert "Nothing went wrong" not in report
    first = diagnose(run)[0]
    assert first.step == "train" and "does not beat the naive baseline" in first.problem


def _scores(smape: float) -> dict:
    return {"smape": smape, "smape_zero": smape, "smape_nonzero": smape, "mae": 1.0,
            "mae_log1p": 0.3, "rmse_log1p": 0.5, "rows": 100, "zero_share": 0.4}


def test_a_model_that_beats_the_naive_baselines_but_not_lightgbm_is_said_to_lose_first(
        tmp_path: Path) -> None:
    run = Run.create(tmp_path / "runs", "run-lgb", "local", tmp_path / "logs")
    for step in ("ingest", "features", "train"):
        run.add_job(step, f"L{step}", [], Path("x")).update(state="COMPLETED", final=True)
    writer = MetricsWriter(run.layout.metrics, "train", job_id="L1")
    writer.write("eval", epoch=0, inner_smape=0.70, val_smape=0.65, baseline_same_smape=1.0,
                 baseline_roll4_smape=0.69, improvement_pct=5.8)
    writer.write("summary", best_epoch=0, epoch_chosen_on="inner weeks", inner_weeks=8,
                 best_inner_smape=0.70, best_val_smape=0.65, best_baseline_smape=0.69,
                 strongest_baseline="roll_mean_4", improvement_pct=5.8, model=_scores(0.65),
                 baselines={"same_week": _scores(1.0), "roll_mean_4": _scores(0.69),
                            "lightgbm": _scores(0.66), "lightgbm_poisson": _scores(0.62)},
                 floor=_scores(0.57), gap_closed_pct=33.3,
                 gap_closed_interval={"pct": 33.3, "low": 21.04, "high": 44.9, "level": 0.95,
                                      "resamples": 1000}, eval_notes=[])
    report = build_report(run)
    training = report.split("## Training", 1)[1].strip().splitlines()
    assert training[0].startswith("**The model loses to LightGBM (Poisson"), training[0]
    assert "0.65 vs 0.62" in training[0] and "% better" not in report.split("## Diagnosis")[0]
    assert "| floor: generator's expected count | 0.57 |" in report
    assert "the model closes 33.3% (95% paired bootstrap interval 21.04-44.9%)" in report
    first = diagnose(run)[0]
    assert first.step == "train" and "does not beat LightGBM (Poisson" in first.problem
    assert "Nothing went wrong" not in report


def test_a_model_that_beats_every_baseline_gets_the_honest_headline(tmp_path: Path) -> None:
    run = Run.create(tmp_path / "runs", "run-win", "local", tmp_path / "logs")
    for step in ("ingest", "features", "train"):
        run.add_job(step, f"L{step}", [], Path("x")).update(state="COMPLETED", final=True)
    writer = MetricsWriter(run.layout.metrics, "train", job_id="L1")
    writer.write("eval", epoch=0, inner_smape=0.6, val_smape=0.6, improvement_pct=10.0)
    writer.write("summary", best_epoch=0, inner_weeks=8, best_val_smape=0.6,
                 best_baseline_smape=2 / 3, strongest_baseline="roll_mean_4",
                 improvement_pct=10.0, model=_scores(0.6),
                 baselines={"roll_mean_4": _scores(2 / 3), "lightgbm_poisson": _scores(0.62)},
                 floor=None, eval_notes=["not synthetic data (the run reads configured input): "
                                         "no floor"])
    report = build_report(run)
    assert ("Validation SMAPE 0.6 vs 0.6667 for the strongest baseline (roll_mean_4, whole "
            "counts): 10% better") in report
    assert "Note: not synthetic data" in report and "Nothing went wrong" in report
