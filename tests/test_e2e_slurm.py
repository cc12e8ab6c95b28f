"""The whole pipeline on the real two-node Slurm test cluster, driven through the `hpcpipe` CLI.

One submission of the three steps, watched with status/logs/summarize; the train step runs as 4
ranks on 2 nodes (gloo on CPU: the GPUs of the test cluster are fake GRES); train is cancelled
while it runs and `hpcpipe rerun train` completes it from its checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from hpcli import hp, steps, wait_for

from hpcpipe.faulthooks import AFTER_SUBMIT_DELAY_ENV

pytestmark = pytest.mark.slurm

SMALL = [
    "--set", "data.synth_reviews=20000", "--set", "ingest.target_bucket_rows=6000",
    "--set", "ingest.mem=2G", "--set", "features.mem=4G", "--set", "train.mem=3G",
    "--set", "train.cpus_per_gpu=1", "--set", "train.epochs=2", "--set", "train.batch_size=16",
    "--set", "train.max_length=32", "--set", "train.num_workers=0", "--set", "train.log_every=5",
    "--set", "train.max_steps_per_epoch=12", "--set", "train.checkpoint_every=4",
    "--set", "train.precision=fp32", "--set", "train.val_weeks=4",
    # fine-tune the transformer itself, so DDP carries the encoder's gradients across nodes
    "--set", "train.freeze_encoder=false",
]


def test_submit_runs_the_pipeline_on_two_nodes_and_rerun_completes_a_cancelled_train(
        tmp_path: Path, slurm_cluster) -> None:
    out = hp(tmp_path, "submit", "--cpus", "32", "--gpus", "4", "--gpus-per-node", "2", *SMALL).stdout
    assert "ingest" in out and "features" in out and "train" in out
    run_dir = next((tmp_path / "runs").iterdir())
    state = json.loads((run_dir / "state.json").read_text())
    ids = {s: state["steps"][s]["jobs"][0]["job_id"] for s in ("ingest", "features", "train")}
    assert state["steps"]["features"]["jobs"][0]["depends_on"] == [ids["ingest"]]
    assert state["steps"]["train"]["jobs"][0]["depends_on"] == [ids["features"]]

    # The dependency visibly holds train while an earlier step runs.
    rows = wait_for(tmp_path, lambda r: r["features"]["state"] == "RUNNING"
                    or r["ingest"]["state"] == "RUNNING", 180, "ingest or features to run")
    assert rows["train"]["state"] == "PENDING" and rows["train"]["reason"] == "Dependency"
    text = hp(tmp_path, "status").stdout
    assert "Dependency" in text

    # train runs as 4 ranks on 2 nodes; cancel it once it has written a checkpoint.
    ckpt = run_dir / "train" / "checkpoints" / "last.pt"
    deadline = time.time() + 600
    while not ckpt.exists():
        rows = steps(tmp_path)
        assert rows["train"]["state"] in ("PENDING", "RUNNING", "CONFIGURING"), rows
        assert time.time() < deadline, "train wrote no checkpoint in time"
        time.sleep(1)
    rows = steps(tmp_path)
    assert rows["train"]["nodes"] in ("n[1-2]", "n1,n2"), rows["train"]
    cancelled = hp(tmp_path, "cancel", "train").stdout
    assert ids["train"] in cancelled
    wait_for(tmp_path, lambda r: r["train"]["state"] == "CANCELLED", 60, "train to be cancelled")
    assert steps(tmp_path)["features"]["state"] == "COMPLETED"
    assert steps(tmp_path)["ingest"]["state"] == "COMPLETED"

    rerun = hp(tmp_path, "rerun", "train").stdout
    assert "train" in rerun
    rows = wait_for(tmp_path, lambda r: r["train"]["state"] == "COMPLETED", 600, "rerun of train")
    assert rows["train"]["earlier"] == [ids["train"]] and rows["train"]["job_id"] != ids["train"]

    log = hp(tmp_path, "logs", "train").stdout
    assert "on 4 rank(s)" in log and "rank 3/4" not in log, log[-3000:]  # only rank 0 logs
    resumed = [line for line in log.splitlines() if "resuming from" in line]
    assert resumed and "epoch 2, step 0" not in resumed[-1], log[-3000:]
    assert hp(tmp_path, "logs", "train", "--rank", "3").returncode == 0

    report = hp(tmp_path, "summarize").stdout
    for step in ("ingest", "features", "train"):
        assert f"| {step} |" in report
    assert "validation SMAPE" in report
    assert (run_dir / "summary.md").exists()
    assert (run_dir / "predictions.parquet").exists()


def test_layout_the_partition_cannot_place_is_refused_before_queueing(tmp_path: Path,
                                                                       slurm_cluster) -> None:
    for args, message in [
        (["--gpus", "6", "--gpus-per-node", "3"], "most GPUs on one node: 2"),
        (["--gpus", "8", "--gpus-per-node", "2"], "only 2 node(s)"),
        (["--cpus", "64"], "features asks for 64 CPUs"),
        (["--partition", "nosuch"], "partition 'nosuch' does not exist"),
    ]:
        proc = hp(tmp_path, "submit", *args, check=False)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_sbatch_rejection_shows_slurms_message_and_cancels_earlier_jobs(tmp_path: Path,
                                                                        slurm_cluster) -> None:
    """A rejection no check before queueing can foresee: the partition is set INACTIVE by an
    administrator between the ingest and the features submission. The ingest job already
    submitted must be cancelled and the error must carry Slurm's words.

    The ingest job is held back (--begin) so that it is still queued when the cancel comes: the
    built-in sample's ingest completes in ~5 s on 25.11, before the features submission fails
    (an ingest that ended first is recorded as it ended: tests/test_plan.py)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPCPIPE_")}
    env.update({"HPCPIPE_RUNS_DIR": str(tmp_path / "runs"), AFTER_SUBMIT_DELAY_ENV: "8"})
    proc = subprocess.Popen(["hpcpipe", "submit", "--partition", "short", "--time", "5", "--set",
                             "train.signal_seconds=60", "--set",
                             "slurm.extra_sbatch=[--begin=now+1hour]"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("runs/*/sbatch/ingest.sbatch")) or not subprocess.run(
                ["squeue", "-h", "--partition=short", "-o", "%i"], capture_output=True,
                text=True).stdout.strip():
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        subprocess.run(["scontrol", "update", "PartitionName=short", "State=INACTIVE"],
                       check=True)
        _, err = proc.communicate(timeout=120)
    finally:
        subprocess.run(["scontrol", "update", "PartitionName=short", "State=UP"], check=True)
    assert proc.returncode != 0 and "Traceback" not in err
    assert "submitting step features failed" in err, err
    assert "Required partition not available" in err, err
    assert "were cancelled" in err
    state = json.loads(next((tmp_path / "runs").iterdir()).joinpath("state.json").read_text())
    ingest = state["steps"]["ingest"]["jobs"][0]
    assert ingest["state"] == "CANCELLED"
    assert slurm_cluster.wait_state(ingest["job_id"], "CANCELLED", timeout=30) == "CANCELLED"
    assert "features" not in state["steps"]


def test_dry_run_prints_scripts_and_sbatch_lines_and_submits_nothing(tmp_path: Path,
                                                                     slurm_cluster) -> None:
    out = hp(tmp_path, "submit", "--gpus", "4", "--gpus-per-node", "2", "--dry-run").stdout
    # The test clusters run select/cons_tres, which takes --gpus-per-node (hpcpipe doctor).
    assert "#SBATCH --nodes=2" in out and "#SBATCH --gpus-per-node=2" in out
    assert "$ sbatch --parsable --dependency=afterok:<job id of features> " \
        "--kill-on-invalid-dep=yes" in out
    assert not (tmp_path / "runs").exists()
