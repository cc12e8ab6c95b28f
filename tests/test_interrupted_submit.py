"""An interrupted submit on the test cluster: Ctrl-C (or SIGTERM) rolls the submission back; a
kill -9 between the scheduler's answer and the record leaves a marker, and the next command finds
the queued job by its name (which carries the run id) and records it. Either way summarize says
which steps were never submitted instead of "Nothing went wrong"."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from hpcli import hp

from hpcpipe.faulthooks import AFTER_SUBMIT_DELAY_ENV

pytestmark = pytest.mark.slurm


def _start_submit(tmp_path: Path) -> tuple[subprocess.Popen, Path, str]:
    """`hpcpipe submit` held (by the test hook) just after sbatch answered for ingest; returns
    the process, the run folder and the ingest job's id (seen in squeue by its name)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPCPIPE_")}
    env.update({"HPCPIPE_RUNS_DIR": str(tmp_path / "runs"), AFTER_SUBMIT_DELAY_ENV: "120"})
    proc = subprocess.Popen(["hpcpipe", "submit", "--name", "cut", "--set", "ingest.time=5"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        runs = list((tmp_path / "runs").glob("cut-*"))
        if runs:
            name = f"ingest.{runs[0].name}"
            out = subprocess.run(["squeue", "-h", "--states=all", f"--name={name}", "-o", "%i"],
                                 capture_output=True, text=True).stdout.split()
            if out:
                return proc, runs[0], out[0]
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"the ingest job never appeared in squeue: {proc.communicate()}")


def test_kill_9_between_answer_and_record_then_the_job_is_found(slurm_cluster,  # noqa: ANN001
                                                                 tmp_path: Path) -> None:
    proc, run_dir, job = _start_submit(tmp_path)
    try:
        state = json.loads((run_dir / "state.json").read_text())
        assert state["submitting"]["step"] == "ingest" and "ingest" not in state["steps"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        status = json.loads(hp(tmp_path, "status", "--json").stdout)
        assert [(r["step"], r["job_id"]) for r in status["steps"]] == [("ingest", job)], status
        state = json.loads((run_dir / "state.json").read_text())
        assert "submitting" not in state and state["submit_failed"] is True
        report = hp(tmp_path, "summarize").stdout
        assert "never submitted: features, train" in report and "Nothing went wrong" not in report
        assert "`hpcpipe rerun features`" in report
        out = hp(tmp_path, "cancel").stdout
        assert f"cancelled {job}" in out
        slurm_cluster.wait_state(job, "CANCELLED")
    finally:
        slurm_cluster.cancel(job)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_during_submit_rolls_it_back(slurm_cluster, tmp_path: Path,  # noqa: ANN001
                                                       sig: signal.Signals) -> None:
    proc, run_dir, job = _start_submit(tmp_path)
    try:
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, (out, err)
        assert "Traceback" not in err and "interrupted at step ingest" in err, err
        assert "steps never submitted: ingest, features, train" not in err  # ingest was queued
        assert f"were cancelled: {job}" in err, err
        slurm_cluster.wait_state(job, "CANCELLED")
        state = json.loads((run_dir / "state.json").read_text())
        (rec,) = state["steps"]["ingest"]["jobs"]
        assert rec["job_id"] == job and rec["state"] == "CANCELLED" and "submitting" not in state
        report = hp(tmp_path, "summarize").stdout
        assert "never submitted: features, train" in report and "Nothing went wrong" not in report
    finally:
        slurm_cluster.cancel(job)
