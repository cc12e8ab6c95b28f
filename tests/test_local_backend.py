"""The local backend for real: detached runners, afterok chaining, cancel, lost runners."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hpcpipe.scheduler.local import LocalBackend


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / "sbatch" / f"{name}.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "logs" / f"{name}-%j.out"
    path.write_text(f"#!/bin/bash\n#SBATCH --output={log}\nset -e\n{body}\n")
    return path


def _wait(backend: LocalBackend, job: str, states: set[str], timeout: float = 20) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = backend.query([job])[job].state
        if state in states:
            return state
        time.sleep(0.2)
    raise AssertionError(f"{job} never reached {states}; last {state}")


def test_chain_runs_in_order_and_logs_where_slurm_would(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    first = backend.submit(_script(tmp_path, "a", "sleep 1; "
                                   f"echo done-a; touch {tmp_path}/a.done"), [])
    second = backend.submit(_script(tmp_path, "b", f"test -e {tmp_path}/a.done; echo done-b"),
                            [first])
    info = backend.query([second])[second]
    assert info.state == "PENDING" and info.reason == "Dependency"
    assert _wait(backend, second, {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED"
    assert backend.query([first])[first].state == "COMPLETED"
    assert (tmp_path / "logs" / f"a-{first}.out").read_text().strip() == "done-a"
    assert (tmp_path / "logs" / f"b-{second}.out").read_text().strip() == "done-b"


def test_failed_upstream_leaves_dependent_never_satisfied(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    first = backend.submit(_script(tmp_path, "a", "echo boom; exit 3"), [])
    second = backend.submit(_script(tmp_path, "b", f"touch {tmp_path}/b.ran"), [first])
    assert _wait(backend, second, {"CANCELLED", "COMPLETED", "FAILED"}) == "CANCELLED"
    info = backend.query([first, second])
    assert info[first].state == "FAILED" and info[first].exit_code == "3:0"
    assert info[second].reason == "DependencyNeverSatisfied"
    assert not (tmp_path / "b.ran").exists()


def test_cancel_stops_the_whole_process_group(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    job = backend.submit(_script(tmp_path, "a", f"(sleep 30; touch {tmp_path}/late) & sleep 30"),
                         [])
    _wait(backend, job, {"RUNNING"})
    backend.cancel([job])
    assert _wait(backend, job, {"CANCELLED", "FAILED", "COMPLETED"}) == "CANCELLED"
    time.sleep(0.5)
    assert not (tmp_path / "late").exists()


def test_a_runner_killed_with_sigkill_is_reported_lost(tmp_path: Path) -> None:
    import os
    import signal

    backend = LocalBackend(tmp_path)
    job = backend.submit(_script(tmp_path, "a", "sleep 30"), [])
    _wait(backend, job, {"RUNNING"})
    os.killpg(int(job[1:]), signal.SIGKILL)
    state = _wait(backend, job, {"FAILED"})
    assert state == "FAILED" and backend.query([job])[job].reason == "RunnerLost"


@pytest.mark.parametrize("missing", ["L999999999", "Lnot-a-pid"])
def test_unknown_jobs_are_failed_not_pending(tmp_path: Path, missing: str) -> None:
    assert LocalBackend(tmp_path).query([missing])[missing].state == "FAILED"
