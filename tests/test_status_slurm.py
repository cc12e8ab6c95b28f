"""`hpcpipe status` against the real test cluster: batched calls, cached end states, no sacct."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from hpcpipe.run.folder import Run

pytestmark = pytest.mark.slurm


def _shims(folder: Path, log: Path, sacct_disabled: bool) -> None:
    """Logging shims first on PATH; with sacct_disabled, sacct answers as on a cluster without
    slurmdbd (a stand-in: the test cluster has accounting, so this one answer is scripted)."""
    folder.mkdir()
    for name in ("squeue", "sacct", "scontrol"):
        real = subprocess.run(["bash", "-c", f"command -v {name}"], capture_output=True,
                              text=True, check=True).stdout.strip()
        body = f'echo "{name} $*" >> {log}\n'
        if name == "sacct" and sacct_disabled:
            body += 'echo "Slurm accounting storage is disabled" >&2\nexit 1\n'
        else:
            body += f'exec {real} "$@"\n'
        (folder / name).write_text("#!/bin/sh\n" + body)
        (folder / name).chmod(0o755)


def _status(tmp_path: Path, shims: Path) -> str:
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}",
           "HPCPIPE_RUNS_DIR": str(tmp_path / "runs")}
    return subprocess.run(["hpcpipe", "status"], env=env, capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.parametrize("sacct_disabled", [False, True])
def test_status_is_batched_caches_end_states_and_works_without_sacct(
        tmp_path: Path, slurm_cluster, sacct_disabled: bool) -> None:
    done = slurm_cluster.sbatch("--mem=10M", "-o", "/dev/null", "--wrap", "true")
    running = slurm_cluster.sbatch("--mem=10M", "-o", "/dev/null", "--wrap", "sleep 60")
    waiting = slurm_cluster.sbatch("--mem=10M", "-o", "/dev/null",
                                   f"--dependency=afterok:{running}", "--wrap", "true")
    slurm_cluster.wait_state(done, "COMPLETED", timeout=30)
    slurm_cluster.wait_state(running, "RUNNING", timeout=30)
    run = Run.create(tmp_path / "runs", "run-status", "slurm", tmp_path / "logs")
    for step, jid in (("ingest", done), ("features", running), ("train", waiting)):
        run.add_job(step, jid, [], tmp_path / "x.sbatch")
    run.save()
    log = tmp_path / "calls.log"
    _shims(tmp_path / "shims", log, sacct_disabled)
    try:
        text = _status(tmp_path, tmp_path / "shims")
        rows = {line.split()[0]: line for line in text.splitlines()[2:]}
        assert "COMPLETED" in rows["ingest"] and "RUNNING" in rows["features"]
        assert "PENDING" in rows["train"] and "Dependency" in rows["train"]
        calls = log.read_text().splitlines()
        assert [c.split()[0] for c in calls] == ["squeue"], (calls, text)  # one batched call
        # the ended job is cached: the next call asks only about the other two
        log.write_text("")
        _status(tmp_path, tmp_path / "shims")
        (call,) = log.read_text().splitlines()
        assert done not in call and running in call and waiting in call
    finally:
        slurm_cluster.cancel(running, waiting)
    time.sleep(1)
    state = Run.open(tmp_path / "runs").current("ingest")
    assert state.state == "COMPLETED" and state.final is True
