"""What ``hpcpipe status`` and ``hpcpipe runs`` print."""

from __future__ import annotations

from typing import Any

from hpcpipe.run.folder import Run
from hpcpipe.run.provenance import out_of_date
from hpcpipe.run.record import JobRecord
from hpcpipe.users import user_name


def step_rows(run: Run) -> list[dict[str, Any]]:
    """One row per step: its current job, the ids of earlier jobs, and ``out_of_date``: why the
    output of a step whose job has ended no longer matches what it would be computed from now
    (from the steps' small JSON records), or None."""
    stale = out_of_date(run.layout)
    rows = []
    for step in run.steps():
        jobs = run.jobs(step)
        cur = jobs[-1]
        state = cur.state
        detail = _detail(cur)
        rows.append({
            "step": step, "job_id": cur.job_id, "state": state, "reason": detail,
            "elapsed": cur.elapsed, "time_limit": cur.time_limit,
            "nodes": cur.nodes, "exit_code": cur.exit_code,
            "restarts": cur.restarts,
            "earlier": [j.job_id for j in jobs[:-1]], "log": cur.log,
            # A queued or running job is about to redo the step: its old output says nothing.
            "out_of_date": None if cur.active else stale.get(step),
        })
    return rows


def _detail(rec: JobRecord) -> str:
    """Why a job waits, or how it ended: the REASON/EXIT column."""
    state, reason = rec.state, rec.reason
    if state == "COMPLETED":
        return ""
    if reason == "DependencyNeverSatisfied" or state in ("PENDING", "REQUEUED"):
        return reason
    if state == "CANCELLED":
        by = rec.cancelled_by
        return f"by {user_name(by)}" if by else reason or "-"
    if state == "TIMEOUT":
        return f"time limit {rec.time_limit}".strip()
    if state in ("FAILED", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE"):
        code = rec.exit_code
        return f"exit {code}" if code else reason
    return reason


def format_table(run: Run, note: str | None = None) -> str:
    rows = step_rows(run)
    head = ["STEP", "JOB", "STATE", "ELAPSED/LIMIT", "NODES", "REASON/EXIT", "EARLIER JOBS"]
    body = []
    for r in rows:
        elapsed = r["elapsed"] or "-"
        if r["time_limit"]:
            elapsed += f"/{r['time_limit']}"
        reason = r["reason"] + (f" (requeued {r['restarts']}x)" if r["restarts"] else "")
        if r["out_of_date"]:
            reason = f"{reason}; {r['out_of_date']}" if reason else r["out_of_date"]
        body.append([r["step"], r["job_id"], r["state"], elapsed, r["nodes"] or "-",
                     reason or "-", ",".join(r["earlier"]) or "-"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=False)]
    lines = [f"run {run.run_id} ({run.backend_name})"]
    for row in [head, *body]:
        lines.append("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=False)).rstrip())
    if note:
        lines.append(f"note: {note}")
    return "\n".join(lines)
