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
from collections.abc import Iterator, Sequence
from pathlib import Path

from hpcpipe import files
from hpcpipe.config import STEPS, RunConfig, load_config
from hpcpipe.errors import RunError
from hpcpipe.run.layout import RunLayout
from hpcpipe.run.record import JobRecord, RunState, now
from hpcpipe.scheduler.base import JobInfo


def new_run_id(name: str | None = None) -> str:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{name or 'run'}-{stamp}-{secrets.token_hex(2)}"


class Run:
    """A run folder and its state; load with :meth:`open` or make with :meth:`create`."""

    def __init__(self, root: Path, state: RunState) -> None:
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
        state = RunState(run_id=run_id, backend=backend,
                         logs_dir=str(Path(logs_dir).resolve() / run_id))
        # The caller saves the state under the run's lock (see control.plan.apply), so that no
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
        return cls(root, read_state(path))

    # -- state -------------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        return self.state.run_id

    @property
    def backend_name(self) -> str:
        return self.state.backend

    def save(self) -> None:
        files.write_json(self.layout.state, self.state.to_json())

    def steps(self) -> list[str]:
        return [s for s in STEPS if s in self.state.steps]

    def jobs(self, step: str) -> list[JobRecord]:
        return self.state.steps.get(step, [])

    def all_jobs(self) -> list[JobRecord]:
        return [j for s in self.steps() for j in self.jobs(s)]

    def current(self, step: str) -> JobRecord | None:
        jobs = self.jobs(step)
        return jobs[-1] if jobs else None

    def load_config(self, overrides: Sequence[str] = ()) -> RunConfig:
        """The run's resolved config, with ``--set`` overrides applied (validated as at submit)."""
        return load_config(self.layout.config, list(overrides))

    def job(self, step: str) -> JobRecord:
        """The current job of a step the run has; RunError if it has none."""
        rec = self.current(step)
        if rec is None:
            raise RunError(f"run {self.run_id} has no job for step '{step}' "
                           f"(it has {', '.join(self.steps()) or 'none'})")
        return rec

    def log_path(self, step: str, job_id: str) -> Path:
        return Path(self.state.logs_dir) / f"{step}-{job_id}.out"

    def add_job(self, step: str, job_id: str, depends_on: list[str], script: Path) -> JobRecord:
        rec = JobRecord(job_id=job_id, submitted=now(), depends_on=list(depends_on),
                        script=str(script), reason="Dependency" if depends_on else "",
                        log=str(self.log_path(step, job_id)))
        self.state.steps.setdefault(step, []).append(rec)
        return rec

    def event(self, text: str) -> None:
        self.state.events.append({"time": now(), "text": text})

    def open_jobs(self) -> list[str]:
        """Job ids whose last known state is not final (they need a scheduler query)."""
        return [j.job_id for j in self.all_jobs() if not j.final]

    def apply(self, infos: dict[str, JobInfo]) -> bool:
        """Fold scheduler answers into the state; return True if anything changed."""
        changed = False
        for rec in self.all_jobs():
            info = infos.get(rec.job_id)
            if info is not None and rec.apply(info):
                changed = True
        return changed

    # -- locking -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, what: str) -> Iterator[None]:
        """Hold the run's exclusive lock; refuse at once if another command holds it."""
        try:
            fd = os.open(self.layout.lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunError(
                f"cannot take the lock of run {self.run_id} to {what} it: {exc.strerror} "
                f"({self.layout.lock}). Only a user who can write the run folder can change the "
                "run; status, logs and summarize still work") from None
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
            with contextlib.suppress(OSError):  # who holds it is only for the busy message
                os.ftruncate(fd, 0)
                os.write(fd, f"`hpcpipe {what}` (pid {os.getpid()})".encode())
            self.reload()  # the command that held the lock may have changed the state meanwhile
            yield
        finally:
            os.close(fd)

    def reload(self) -> None:
        """Read the state file again; kept as it is if the file cannot be read just now."""
        try:
            self.state = read_state(self.layout.state)
        except (OSError, RunError):
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


def read_state(path: Path) -> RunState:
    """The state file at ``path``; RunError names the file when it is damaged."""
    try:
        return RunState.from_json(files.read_json(path))
    except (ValueError, TypeError, KeyError) as exc:
        raise RunError(f"the state file {path} is damaged ({exc}); it cannot be read") from None


def list_runs(runs_dir: Path) -> list[Path]:
    """Run folders in ``runs_dir``, oldest first (by creation time in their state file)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    found = []
    for p in runs_dir.iterdir():
        state = p / "state.json"
        if state.is_file():
            # A damaged state file keeps its run's place (by the file's time), so the latest
            # run is never silently the one before it: opening it then says it is damaged.
            try:
                created = str(files.read_json(state)["created"])
            except (OSError, ValueError, TypeError, KeyError):
                created = _mtime(state)
            found.append((created, p.name, p))
    return [p for _, _, p in sorted(found)]


def _mtime(path: Path) -> str:
    try:
        return dt.datetime.fromtimestamp(path.stat().st_mtime).isoformat(timespec="seconds")
    except OSError:
        return ""


def latest_run(runs_dir: Path) -> Path:
    runs = list_runs(runs_dir)
    if not runs:
        raise RunError(f"no runs in {Path(runs_dir).resolve()}; start one with `hpcpipe submit`")
    return runs[-1]
