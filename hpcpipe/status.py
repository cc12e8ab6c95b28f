"""What ``hpcpipe status`` and ``hpcpipe runs`` print."""

from __future__ import annotations

from typing import Any

from hpcpipe.run import Run


def step_rows(run: Run) -> list[dict[str, Any]]:
    """One row per step: its current job and the ids of earlier jobs."""
    rows = []
    for step in run.steps():
        jobs = run.jobs(step)
        cur = jobs[-1]
        state = cur.get("state", "?")
        detail = cur.get("reason", "")
        if state in ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "CANCELLED") and not detail:
            detail = f"exit {cur.get('exit_code', '?')}"
        if state == "CANCELLED" and cur.get("cancelled_by"):
            detail = f"by {cur['cancelled_by']}"
        rows.append({
            "step": step, "job_id": cur["job_id"], "state": state, "reason": detail,
            "elapsed": cur.get("elapsed", ""), "time_limit": cur.get("time_limit", ""),
            "nodes": cur.get("nodes", ""), "exit_code": cur.get("exit_code", ""),
            "restarts": cur.get("restarts", 0),
            "earlier": [j["job_id"] for j in jobs[:-1]], "log": cur.get("log", ""),
        })
    return rows


def format_table(run: Run, note: str | None = None) -> str:
    rows = step_rows(run)
    head = ["STEP", "JOB", "STATE", "ELAPSED/LIMIT", "NODES", "REASON/EXIT", "EARLIER JOBS"]
    body = []
    for r in rows:
        elapsed = r["elapsed"] or "-"
        if r["time_limit"]:
            elapsed += f"/{r['time_limit']}"
        reason = r["reason"] + (f" (requeued {r['restarts']}x)" if r["restarts"] else "")
        body.append([r["step"], r["job_id"], r["state"], elapsed, r["nodes"] or "-",
                     reason or "-", ",".join(r["earlier"]) or "-"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=False)]
    lines = [f"run {run.run_id} ({run.backend_name})"]
    for row in [head, *body]:
        lines.append("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=False)).rstrip())
    if note:
        lines.append(f"note: {note}")
    return "\n".join(lines)
