"""The Slurm test cluster itself does what the rest of the tests rely on."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slurm


def test_batch_job_completes_and_is_accounted(slurm_cluster, tmp_path):
    out = tmp_path / "job.out"
    job = slurm_cluster.sbatch(f"--output={out}", "--wrap", "echo hello from $SLURMD_NODENAME")

    slurm_cluster.wait_state(job, "COMPLETED", timeout=30)

    assert slurm_cluster.wait_sacct(job, "COMPLETED") == "COMPLETED"
    assert out.read_text().strip() in {"hello from n1", "hello from n2"}


def test_dependency_keeps_job_pending(slurm_cluster, tmp_path):
    first = slurm_cluster.sbatch(f"--output={tmp_path}/first.out", "--wrap", "sleep 60")
    second = ""
    try:
        slurm_cluster.wait_state(first, "RUNNING", timeout=20)
        second = slurm_cluster.sbatch(
            f"--dependency=afterok:{first}", f"--output={tmp_path}/second.out", "--wrap", "true"
        )
        slurm_cluster.wait_state(second, "PENDING", timeout=10)
        info = slurm_cluster.job_info(second)
        assert info["Reason"] == "Dependency"
        assert info["Dependency"].startswith(f"afterok:{first}")
    finally:
        slurm_cluster.cancel(first, second)


def test_two_nodes_two_tasks_each_with_gpus(slurm_cluster, tmp_path):
    out = tmp_path / "ranks.out"
    step = 'echo "$SLURM_PROCID $SLURMD_NODENAME $CUDA_VISIBLE_DEVICES"'
    job = slurm_cluster.sbatch(
        "--nodes=2",
        "--ntasks-per-node=2",
        "--gres=gpu:2",
        f"--output={out}",
        "--wrap",
        f"srun bash -c {shlex.quote(step)}",
    )

    slurm_cluster.wait_state(job, "COMPLETED", timeout=30)

    ranks = sorted(line.split() for line in out.read_text().splitlines())
    assert ranks == [
        ["0", "n1", "0,1"],
        ["1", "n1", "0,1"],
        ["2", "n2", "0,1"],
        ["3", "n2", "0,1"],
    ]


def test_job_over_its_memory_is_killed(slurm_cluster, tmp_path):
    out = tmp_path / "oom.out"
    # b"x" * n touches every page, so the resident size really grows to 500 MB.
    hog = "import time; block = b'x' * (500 << 20); time.sleep(60)"
    job = slurm_cluster.sbatch(
        "--mem=50M", f"--output={out}", "--wrap", f"{shlex.quote(sys.executable)} -c {hog!r}"
    )

    # Without cgroups the job ends FAILED; a cgroup cluster would say OUT_OF_MEMORY.
    slurm_cluster.wait_state(job, {"FAILED", "OUT_OF_MEMORY"}, timeout=30)

    assert slurm_cluster.wait_sacct(job, {"FAILED", "OUT_OF_MEMORY"})
    assert "memory limit" in out.read_text()


def test_unknown_partition_is_rejected(slurm_cluster):
    proc = subprocess.run(
        ["sbatch", "--partition=no-such-partition", "--wrap", "true"],
        capture_output=True,
        text=True,
    )

    assert proc.returncode != 0
    assert "invalid partition name specified" in proc.stderr.lower()


def test_short_partition_has_a_ten_minute_limit(slurm_cluster):
    job = slurm_cluster.sbatch(
        f"--partition={slurm_cluster.short_partition}", "--hold", "--wrap", "true"
    )
    try:
        info = slurm_cluster.job_info(job)
        assert info["Partition"] == "short"
        assert info["TimeLimit"] == "00:10:00"
    finally:
        slurm_cluster.cancel(job)


def test_requeued_job_runs_again(slurm_cluster, tmp_path):
    job = slurm_cluster.sbatch(
        "--requeue", f"--output={tmp_path}/requeue.out", "--wrap", "sleep 60"
    )
    try:
        slurm_cluster.wait_state(job, "RUNNING", timeout=20)
        subprocess.run(["scontrol", "requeue", job], check=True)
        slurm_cluster.wait_state(job, "PENDING", timeout=20)

        slurm_cluster.make_eligible(job)

        slurm_cluster.wait_state(job, "RUNNING", timeout=30)
        assert slurm_cluster.job_info(job)["Restarts"] == "1"
    finally:
        slurm_cluster.cancel(job)
