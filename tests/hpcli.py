"""Driving the `hpcpipe` CLI from tests, as a user would: a new process per command, in a tmp
folder whose runs/ is the runs folder."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path


def hp(cwd: Path, *args: str, check: bool = True, timeout: float = 120,
       env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `hpcpipe ARGS` in ``cwd`` with ``cwd/runs`` as the runs folder.

    ``env`` adds variables (the fault hooks of hpcpipe/faulthooks.py): the command gets them,
    and so do the jobs it submits, through sbatch's environment export. No hook is inherited
    from this process's environment.
    """
    full = {k: v for k, v in os.environ.items() if not k.startswith("HPCPIPE_FAULT_")}
    full.update({"HPCPIPE_RUNS_DIR": str(cwd / "runs"), **(env or {})})
    proc = subprocess.run(["hpcpipe", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full)
    if check and proc.returncode != 0:
        raise AssertionError(f"hpcpipe {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def steps(cwd: Path) -> dict[str, dict]:
    """`hpcpipe status --json` as {step: row}."""
    out = json.loads(hp(cwd, "status", "--json").stdout)
    return {row["step"]: row for row in out["steps"]}


def wait_for(cwd: Path, cond: Callable[[dict[str, dict]], bool], timeout: float, what: str,
             poll_s: float = 1.0) -> dict[str, dict]:
    """Poll `hpcpipe status --json` until ``cond(rows)``; fail early when a step fails."""
    deadline = time.time() + timeout
    seen: list = []
    while time.time() < deadline:
        rows = steps(cwd)
        seen.append({s: (r["job_id"], r["state"], r["reason"]) for s, r in rows.items()})
        if cond(rows):
            return rows
        failed = [s for s, r in rows.items() if r["state"] in ("FAILED", "TIMEOUT", "OUT_OF_MEMORY")]
        if failed:
            log = Path(rows[failed[0]]["log"])
            raise AssertionError(f"{failed} failed while waiting for {what}:\n"
                                 + (log.read_text()[-4000:] if log.exists() else "(no log)"))
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}; last states {seen[-3:]}")


def job_problems(report: str) -> list[str]:
    """The diagnoses of a summarize report that concern the jobs, leaving out the model's quality
    (a tiny test model may well lose to the naive baselines, and the report rightly says so)."""
    diagnosis = report.split("## Diagnosis", 1)[-1]
    found = [ln for ln in diagnosis.splitlines() if ln.startswith("- **")]
    return [ln for ln in found if "the model does not beat" not in ln
            and "The model loses" not in ln]
