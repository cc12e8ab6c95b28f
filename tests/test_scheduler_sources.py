"""Scheduler answers are taken per source: when accounting (sacct, through slurmdbd) is down
while the controller answers, the controller's answers are kept, the jobs nobody can say anything
about are named, and `submit --wait` ends within a bounded time instead of never."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from hpcli import hp

from hpcpipe.errors import PartialAnswer
from hpcpipe.run.folder import Run
from hpcpipe.scheduler import slurm
from hpcpipe.watch.refresh import wait

REPO = Path(__file__).resolve().parents[1]


def _stop_slurmdbd(state_dir: Path) -> None:
    pid = int((state_dir / "run" / "slurmdbd.pid").read_text().strip())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if subprocess.run(["sacct", "-n", "-j", "1"], capture_output=True).returncode != 0:
            return
        time.sleep(0.5)
    pytest.fail("sacct still answers 30 s after slurmdbd was stopped")


@pytest.mark.slurm
def test_sacct_down_keeps_the_controllers_answers_and_names_the_unknown(
        slurm_cluster, tmp_path: Path) -> None:  # noqa: ANN001 - the conftest's SlurmCluster
    failed = slurm_cluster.sbatch("--time=1", f"--output={tmp_path}/f.out", "--wrap", "exit 3")
    slurm_cluster.wait_state(failed, "FAILED")
    run = Run.create(tmp_path / "runs", "run-sources", "slurm", tmp_path / "logs")
    run.add_job("ingest", failed, [], tmp_path / "x.sbatch")
    # A job id Slurm never had: neither squeue nor scontrol nor (the downed) sacct can place it.
    run.add_job("features", "99999999", [failed], tmp_path / "y.sbatch")
    run.save()
    try:
        _stop_slurmdbd(slurm_cluster.state_dir)
        with pytest.raises(PartialAnswer) as err:
            slurm.query([failed, "99999999"])
        assert err.value.unknown == ["99999999"] and err.value.infos[failed].state == "FAILED"

        proc = hp(tmp_path, "status", "--json")
        out = json.loads(proc.stdout)
        states = {row["step"]: row["state"] for row in out["steps"]}
        assert states["ingest"] == "FAILED", out  # not "PENDING, the scheduler cannot be reached"
        assert "99999999" in out["note"] and "last known state" in out["note"], out

        lines: list[str] = []
        start = time.monotonic()
        assert wait(Run.open(tmp_path / "runs"), lines.append, poll_s=0.5,
                    unsure_limit_s=3) is False
        assert time.monotonic() - start < 60
        assert "stopped waiting" in lines[-1] and "hpcpipe status" in lines[-1], lines
    finally:
        subprocess.run(["bash", str(REPO / "tests" / "slurm" / "testbed.sh"), "start"],
                       capture_output=True, text=True, check=True)
