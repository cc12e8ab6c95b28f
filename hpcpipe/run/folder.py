"""A run: its folder ``runs/<run-id>/``, its state file and its lock.

The state file records every job id ever submitted for each step, with the last state the
scheduler reported; terminal states are cached there so later ``status`` calls need no scheduler
query. Commands that submit or cancel hold an exclusive lock on the run folder, so two of them can
never double-submit.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hpcpipe import files
from hpcpipe.config import STEPS
from hpcpipe.errors import RunError
from hpcpipe.run.layout import RunLayout
from hpcpipe.scheduler.slurm import TERMINAL_STATES, JobInfo

STATE_VERSION = 1


def default_runs_dir() -> Path:
    return Path(os.environ.get("HPCPIPE_RUNS_DIR", "runs"))


def new_run_id(name: str | None = None) -> str:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{name or 'run'}-{stamp}-{secrets.token_hex(2)}"


class Run:
    """A run folder and its state; load with :meth:`open` or make with :meth:`create`."""

    def __init__(self, root: Path, state: dict[str, Any]) -> None:
        self.layout = RunLayout(Path(root).resolve())
        self.state = state

    # -- finding and making runs ---------------------------------------------------------------

    @classmethod
    def create(cls, runs_dir: Path, run_id: str, backend: str, logs_dir: Path) -> Run:
        root = Path(runs_dir) / run_id
        try:
            root.mkdir(parents=True)
        except FileExistsError:
            raise RunError(f"run folder {root} already exists; choose another name") from None
        state = {
            "version": STATE_VERSION, "run_id": run_id, "backend": backend,
            "created": dt.datetime.now().isoformat(timespec="seconds"),
            "logs_dir": str(Path(logs_dir).resolve() / run_id),
            "steps": {}, "events": [],
        }
        # The caller saves the state under the run's lock (see pipeline.submit), so that no
        # other command can open the run before its first jobs are recorded.
        return cls(root, state)

    @classmethod
    def open(cls, runs_dir: Path, run: str | None = None) -> Run:
        """The run named ``run`` (an id or a path), or the latest run in ``runs_dir``."""
        if run is None:
            root = latest_run(runs_dir)
        elif Path(run).is_dir() and (Path(run) / "state.json").exists():
            root = Path(run)
        else:
            root = Path(runs_dir) / run
        path = root / "state.json"
        if not path.exists():
            known = ", ".join(r.name for r in list_runs(runs_dir)[-5:]) or "none"
            raise RunError(f"no run '{run}' in {Path(runs_dir).resolve()} (latest: {known}); "
                           "see `hpcpipe runs`")
        try:
            state = files.read_json(path)
        except ValueError as exc:
            raise RunError(f"the state file {path} is damaged ({exc}); it cannot be read") from None
        return cls(root, state)

    # -- state -------------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        return self.state["run_id"]

    @property
    def backend_name(self) -> str:
        return self.state["backend"]

    def save(self) -> None:
        files.write_json(self.layout.state, self.state)

    def steps(self) -> list[str]:
        return [s for s in STEPS if s in self.state["steps"]]

    def jobs(self, step: str) -> list[dict[str, Any]]:
        return self.state["steps"].get(step, {}).get("jobs", [])

    def current(self, step: str) -> dict[str, Any] | None:
        jobs = self.jobs(step)
        return jobs[-1] if jobs else None

    def log_path(self, step: str, job_id: str) -> Path:
        return Path(self.state["logs_dir"]) / f"{step}-{job_id}.out"

    def add_job(self, step: str, job_id: str, depends_on: list[str], script: Path) -> dict:
        rec = {
            "job_id": job_id, "submitted": dt.datetime.now().isoformat(timespec="seconds"),
            "depends_on": list(depends_on), "script": str(script), "state": "PENDING",
            "reason": "Dependency" if depends_on else "", "final": False,
            "log": str(self.log_path(step, job_id)),
        }
        self.state["steps"].setdefault(step, {"jobs": []})["jobs"].append(rec)
        return rec

    def event(self, text: str) -> None:
        self.state["events"].append(
            {"time": dt.datetime.now().isoformat(timespec="seconds"), "text": text})

    def open_jobs(self) -> list[str]:
        """Job ids whose last known state is not terminal (they need a scheduler query)."""
        return [j["job_id"] for s in self.steps() for j in self.jobs(s) if not j.get("final")]

    def apply(self, infos: dict[str, JobInfo]) -> bool:
        """Fold scheduler answers into the state; return True if anything changed."""
        changed = False
        for step in self.steps():
            for rec in self.jobs(step):
                info = infos.get(rec["job_id"])
                if info is None or rec.get("final"):
                    continue
                new = {
                    "state": info.state, "reason": info.reason, "elapsed": info.elapsed,
                    "time_limit": info.time_limit or rec.get("time_limit", ""),
                    "nodes": info.nodes or rec.get("nodes", ""),
                    "exit_code": info.exit_code or rec.get("exit_code", ""),
                    "restarts": max(info.restarts, rec.get("restarts", 0)),
                    "start": info.start or rec.get("start", ""), "end": info.end,
                    # A preempted or node-failed job may still be requeued by Slurm: keep asking.
                    "final": info.state in TERMINAL_STATES - {"PREEMPTED", "NODE_FAIL"},
                }
                new.update({k: v for k, v in info.extra.items() if v})
                if rec.get("cancelled_by") and info.state == "CANCELLED" and \
                        info.reason in ("Dependency", "DependencyNeverSatisfied"):
                    new["reason"] = ""  # cancelled by a user while it waited, not by Slurm
                if any(rec.get(k) != v for k, v in new.items()):
                    rec.update(new)
                    changed = True
        return changed

    # -- locking -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, what: str) -> Iterator[None]:
        """Hold the run's exclusive lock; refuse at once if another command holds it."""
        fd = os.open(self.layout.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another command"
                raise RunError(
                    f"run {self.run_id} is busy: {holder} holds its lock. Wait for it to finish "
                    "and try again") from None
            os.ftruncate(fd, 0)
            os.write(fd, f"`hpcpipe {what}` (pid {os.getpid()})".encode())
            self.reload()  # the command that held the lock may have changed the state meanwhile
            yield
        finally:
            os.close(fd)

    def reload(self) -> None:
        """Read the state file again; kept as it is if the file cannot be read just now."""
        try:
            self.state = files.read_json(self.layout.state)
        except (OSError, ValueError):
            pass

    def try_lock(self) -> contextlib.AbstractContextManager[bool]:
        """Take the lock if free (yield True) or go on without it (yield False)."""
        return _try_lock(self.layout.lock)


@contextlib.contextmanager
def _try_lock(path: Path) -> Iterator[bool]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            yield True
        except OSError:
            yield False
    finally:
        os.close(fd)


def list_runs(runs_dir: Path) -> list[Path]:
    """Run folders in ``runs_dir``, oldest first (by creation time in their state file)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    found = []
    for p in runs_dir.iterdir():
        state = p / "state.json"
        if state.is_file():
            try:
                created = files.read_json(state).get("created", "")
            except (OSError, ValueError):
                created = ""
            found.append((created, p.name, p))
    return [p for _, _, p in sorted(found)]


def latest_run(runs_dir: Path) -> Path:
    runs = list_runs(runs_dir)
    if not runs:
        raise RunError(f"no runs in {Path(runs_dir).resolve()}; start one with `hpcpipe submit`")
    return runs[-1]
