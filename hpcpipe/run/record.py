"""The typed content of a run's state file: one :class:`JobRecord` per job ever submitted.

The file (``runs/<run-id>/state.json``) is JSON: ``{"version", "run_id", "backend", "created",
"logs_dir", "steps": {step: {"jobs": [record, ...]}}, "events": [...], "submit_failed"}``.
Keys this version does not know are kept and written back, so an older hpcpipe never loses what
a newer one recorded.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from hpcpipe.scheduler.base import JobInfo
from hpcpipe.scheduler.states import meaning

#: 2: job records are typed; ``submitting`` marks a job whose sbatch answer was never recorded.
STATE_VERSION = 2


def now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


@dataclass
class JobRecord:
    """One job of a step, with the last state the scheduler reported."""

    job_id: str
    script: str = ""
    log: str = ""
    submitted: str = ""
    depends_on: list[str] = field(default_factory=list)
    state: str = "PENDING"
    reason: str = ""
    #: The state will never change again: no scheduler query needed.
    final: bool = False
    elapsed: str = ""
    time_limit: str = ""
    nodes: str = ""
    exit_code: str = ""
    restarts: int = 0
    start: str = ""
    end: str = ""
    #: Who cancelled it, where hpcpipe did (sacct names the canceller only sometimes).
    cancelled_by: str = ""
    #: Accounting figures (sacct), for summarize.
    alloc_cpus: str = ""
    total_cpu: str = ""
    req_mem: str = ""
    max_rss_bytes: str = ""
    #: GPU use as Slurm accounts it (sacct's gres/gpuutil and gres/gpumem), where the site does.
    gpu_util_ave: str = ""
    gpu_util_max: str = ""
    gpu_mem_max: str = ""
    accounted: bool = False
    failed_dependency: str = ""
    #: Keys of a newer state file, kept as they are.
    other: dict[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        """Queued or running (or in a state hpcpipe does not know: keep asking)."""
        return meaning(self.state).active

    @property
    def completed(self) -> bool:
        return self.state == "COMPLETED"

    def update(self, **changes: Any) -> None:
        """Set fields by name; a name that is not a field is a programming error."""
        unknown = set(changes) - _FIELDS
        if unknown:
            raise AttributeError(f"JobRecord has no field {', '.join(sorted(unknown))}")
        for key, value in changes.items():
            setattr(self, key, value)

    def apply(self, info: JobInfo) -> bool:
        """Fold one scheduler answer in; return True if anything changed."""
        if self.final:
            return False
        new: dict[str, Any] = {
            "state": info.state, "reason": info.reason, "elapsed": info.elapsed,
            "time_limit": info.time_limit or self.time_limit,
            "nodes": info.nodes or self.nodes,
            "exit_code": info.exit_code or self.exit_code,
            "restarts": max(info.restarts, self.restarts),
            "start": info.start or self.start, "end": info.end,
            "final": meaning(info.state).final,
        }
        for key, value in info.extra.items():
            if value and key in _FIELDS:
                new[key] = value
        if self.cancelled_by and info.state == "CANCELLED" and \
                info.reason in ("Dependency", "DependencyNeverSatisfied"):
            new["reason"] = ""  # cancelled by a user while it waited, not by Slurm
        changed = {k: v for k, v in new.items() if getattr(self, k) != v}
        for key, value in changed.items():
            setattr(self, key, value)
        return bool(changed)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "other"}
        out["depends_on"] = list(self.depends_on)
        out.update(self.other)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobRecord:
        if not isinstance(data, dict) or not isinstance(data.get("job_id"), str):
            raise ValueError(f"a job record without a job id: {data!r:.200}")
        known = {k: v for k, v in data.items() if k in _FIELDS}
        rec = cls(**known)
        rec.other = {k: v for k, v in data.items() if k not in _FIELDS and k != "other"}
        rec.depends_on = [str(d) for d in rec.depends_on]
        return rec


_FIELDS = {f.name for f in dataclasses.fields(JobRecord)} - {"other"}


@dataclass
class RunState:
    """Everything the state file holds."""

    run_id: str
    backend: str
    logs_dir: str
    created: str = field(default_factory=now)
    steps: dict[str, list[JobRecord]] = field(default_factory=dict)
    events: list[dict[str, str]] = field(default_factory=list)
    submit_failed: bool = False
    #: Steps a submit or rerun set out to queue, in order (a step missing from ``steps`` was
    #: never submitted: the submission failed or was interrupted).
    planned: list[str] = field(default_factory=list)
    #: The submission under way: {"step", "job_name", "script", "since"}. Left behind only by a
    #: process killed between asking the scheduler and recording its answer; then the job is
    #: looked up by its name (which carries the run id) and recorded.
    submitting: dict[str, str] | None = None
    version: int = STATE_VERSION
    other: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": self.version, "run_id": self.run_id, "backend": self.backend,
            "created": self.created, "logs_dir": self.logs_dir,
            "steps": {s: {"jobs": [j.to_json() for j in jobs]} for s, jobs in self.steps.items()},
            "events": list(self.events),
        }
        if self.submit_failed:
            out["submit_failed"] = True
        if self.planned:
            out["planned"] = list(self.planned)
        if self.submitting:
            out["submitting"] = dict(self.submitting)
        out.update(self.other)
        return out

    @classmethod
    def from_json(cls, data: Any) -> RunState:
        """Parse a state file's JSON; ValueError says what is wrong with it."""
        if not isinstance(data, dict):
            raise ValueError("it is not a JSON object")
        missing = [k for k in ("run_id", "backend", "logs_dir", "steps") if k not in data]
        if missing:
            raise ValueError(f"it lacks {', '.join(missing)}")
        if not isinstance(data["steps"], dict):
            raise ValueError("its 'steps' is not an object")
        version = data.get("version", 1)
        if not isinstance(version, int) or version > STATE_VERSION:
            raise ValueError(f"it has version {version!r}; this hpcpipe reads up to "
                             f"{STATE_VERSION}: upgrade hpcpipe")
        steps = {}
        for step, entry in data["steps"].items():
            jobs = entry.get("jobs") if isinstance(entry, dict) else None
            if not isinstance(jobs, list):
                raise ValueError(f"step {step!r} has no list of jobs")
            steps[step] = [JobRecord.from_json(j) for j in jobs]
        known = {"version", "run_id", "backend", "created", "logs_dir", "steps", "events",
                 "submit_failed", "planned", "submitting"}
        submitting = data.get("submitting")
        return cls(
            run_id=str(data["run_id"]), backend=str(data["backend"]),
            logs_dir=str(data["logs_dir"]), created=str(data.get("created", "")), steps=steps,
            events=list(data.get("events", [])), submit_failed=bool(data.get("submit_failed")),
            planned=[str(p) for p in data.get("planned", [])],
            submitting={str(k): str(v) for k, v in submitting.items()}
            if isinstance(submitting, dict) else None,
            version=STATE_VERSION, other={k: v for k, v in data.items() if k not in known},
        )
