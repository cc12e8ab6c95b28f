"""Jobs on this machine, with no scheduler: the embedded default.

Each submitted step becomes a detached runner process (``python -m hpcpipe.scheduler.local``) that
waits for its dependencies, then runs the very same rendered step script with bash, writing its log
where Slurm would and its state to ``<run>/local/<job-id>.json``. ``submit`` returns at once and
status, logs, cancel and rerun work as they do on Slurm.

submitit's LocalExecutor was considered: it runs pickled Python callables and has no job
dependencies, while hpcpipe needs the same shell script as on Slurm and afterok chaining.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from hpcpipe import files
from hpcpipe.scheduler.base import Backend, JobInfo
from hpcpipe.scheduler.states import is_ended
from hpcpipe.users import user_name

POLL_S = 0.5


def _now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive: it only waits for its parent to reap it.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _elapsed(start: str, end: str) -> str:
    if not start:
        return ""
    t0 = dt.datetime.fromisoformat(start)
    t1 = dt.datetime.fromisoformat(end) if end else dt.datetime.now()
    secs = max(0, int((t1 - t0).total_seconds()))
    return f"{secs // 3600:02d}:{secs % 3600 // 60:02d}:{secs % 60:02d}"


class LocalBackend(Backend):
    name = "local"

    def __init__(self, run_root: Path) -> None:
        self.jobs_dir = Path(run_root) / "local"

    def launcher(self, step: str, ntasks: int) -> str:
        return ""

    def _runner_cmd(self, script: Path, depends_on: list[str]) -> list[str]:
        cmd = [sys.executable, "-m", "hpcpipe.scheduler.local", "--script", str(script),
               "--jobs-dir", str(self.jobs_dir)]
        for dep in depends_on:
            cmd += ["--after", dep]
        return cmd

    def submit_command(self, script: Path, depends_on: list[str]) -> list[str]:
        return self._runner_cmd(script, depends_on)

    def submit(self, script: Path, depends_on: list[str]) -> str:
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        proc = subprocess.Popen(
            self._runner_cmd(script, depends_on), start_new_session=True, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self.jobs_dir / "runner.err", "ab"),  # noqa: SIM115 - the child owns it
        )
        job_id = f"L{proc.pid}"
        # The first record comes from here, so a query right after submit sees the dependency;
        # the runner waits for it before it writes anything itself.
        files.write_json(self.jobs_dir / f"{job_id}.json",
                         _first_record(job_id, depends_on, script))
        return job_id

    def query(self, job_ids: list[str]) -> dict[str, JobInfo]:
        jobs = {}
        for jid in job_ids:
            path = self.jobs_dir / f"{jid}.json"
            pid = int(jid[1:]) if jid[1:].isdigit() else -1
            try:
                rec = files.read_json(path)
            except (OSError, ValueError):
                # The runner has not written its first record yet, or never will.
                state = "PENDING" if pid > 0 and _alive(pid) else "FAILED"
                jobs[jid] = JobInfo(jid, state, reason="" if state == "PENDING" else "RunnerLost",
                                    source="local")
                continue
            state = rec["state"]
            reason = rec.get("reason", "")
            if not is_ended(state) and not _alive(pid):
                state, reason = "FAILED", "RunnerLost"
            jobs[jid] = JobInfo(
                job_id=jid, state=state, reason=reason,
                elapsed=_elapsed(rec.get("start", ""), rec.get("end", "")),
                nodes=rec.get("node", "") if rec.get("start") else "",
                exit_code=rec.get("exit_code", ""), submit=rec.get("submit", ""),
                start=rec.get("start", ""), end=rec.get("end", ""), source="local",
                extra={"cancelled_by": rec.get("cancelled_by", "")},
            )
        return jobs

    def find(self, job_name: str, script: Path) -> list[str]:
        """Local jobs are found by the script they run (their first record names it)."""
        found = []
        for path in sorted(self.jobs_dir.glob("L*.json")):
            try:
                rec = files.read_json(path)
            except (OSError, ValueError):
                continue
            if rec.get("script") == str(script):
                found.append(path.stem)
        return found

    def cancel(self, job_ids: list[str]) -> None:
        for jid in job_ids:
            pid = int(jid[1:]) if jid[1:].isdigit() else -1
            if pid > 0 and _alive(pid):
                try:
                    os.killpg(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass


# ---------------------------------------------------------------------------------------------
# The runner: one detached process per local job.


class _Runner:
    def __init__(self, script: Path, jobs_dir: Path, after: list[str]) -> None:
        self.script = script
        self.after = after
        self.job_id = f"L{os.getpid()}"
        self.path = jobs_dir / f"{self.job_id}.json"
        self.rec = _first_record(self.job_id, after, script)
        self.cancelled = False
        self.child: subprocess.Popen | None = None

    def save(self, **changes: str) -> None:
        self.rec.update(changes)
        files.write_json(self.path, self.rec)

    def on_signal(self, signum: int, frame: object) -> None:
        self.cancelled = True
        if self.child is not None and self.child.poll() is None:
            try:
                os.killpg(os.getpgid(self.child.pid), signal.SIGTERM)
            except ProcessLookupError:
                pass

    def wait_dependencies(self) -> bool:
        backend = LocalBackend(self.path.parent.parent)
        while not self.cancelled:
            states = backend.query(self.after)
            failed = [j for j, info in states.items() if info.terminal and info.state != "COMPLETED"]
            if failed:
                self.save(state="CANCELLED", reason="DependencyNeverSatisfied", end=_now(),
                          exit_code="0:0", failed_dependency=",".join(failed))
                return False
            if all(info.state == "COMPLETED" for info in states.values()):
                return True
            time.sleep(POLL_S)
        return False

    def log_path(self) -> Path:
        text = self.script.read_text(encoding="utf-8")
        return sbatch_output_path(text, self.job_id) or self.script.with_suffix(".out")

    def run(self) -> int:
        deadline = time.time() + 30
        while not self.path.exists() and time.time() < deadline:
            time.sleep(0.05)
        try:
            self.rec = files.read_json(self.path)
        except (OSError, ValueError):
            self.save()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.on_signal)
        if self.after and not self.wait_dependencies():
            if self.cancelled and self.rec["state"] != "CANCELLED":
                self.save(state="CANCELLED", reason="", end=_now(), cancelled_by=user_name())
            return 1
        if self.cancelled:
            self.save(state="CANCELLED", reason="", end=_now(), cancelled_by=user_name())
            return 1
        log = self.log_path()
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["HPCPIPE_JOB_ID"] = self.job_id
        with open(log, "ab") as out:
            # The child gets a process group of its own, so cancel reaches every process in it.
            self.child = subprocess.Popen(["bash", str(self.script)], stdout=out,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=env, start_new_session=True)
            self.save(state="RUNNING", reason="", start=_now())
            rc = self.child.wait()
        if self.cancelled:
            self.save(state="CANCELLED", end=_now(), exit_code=f"0:{signal.SIGTERM.value}",
                      cancelled_by=user_name())
        elif rc == 0:
            self.save(state="COMPLETED", end=_now(), exit_code="0:0")
        elif rc < 0:
            self.save(state="FAILED", end=_now(), exit_code=f"0:{-rc}")
        else:
            self.save(state="FAILED", end=_now(), exit_code=f"{rc}:0")
        return 0


# ---------------------------------------------------------------------------------------------
# Where the log goes: the script's #SBATCH --output, read as sbatch reads it.


def _sbatch_words(line: str) -> list[str]:
    """The arguments of one #SBATCH line (after the magic word), split as sbatch splits them
    (``_get_argument`` in src/sbatch/opt.c): whitespace separates, single or double quotes group,
    a backslash escapes the next character (inside quotes too), an unquoted ``#`` starts a
    comment."""
    words: list[str] = []
    word: list[str] | None = None
    quote = ""
    chars = iter(line)
    for c in chars:
        if c == "\\":
            word = word if word is not None else []
            word.append(next(chars, ""))
        elif quote:
            if c == quote:
                quote = ""
            else:
                word = word if word is not None else []
                word.append(c)
        elif c in "\"'":
            quote = c
            word = word if word is not None else []
        elif c == "#":
            break
        elif c.isspace():
            if word is not None:
                words.append("".join(word))
            word = None
        else:
            word = word if word is not None else []
            word.append(c)
    if word is not None:
        words.append("".join(word))
    return words


def _expand_filename(name: str, job_id: str) -> str:
    """Slurm's file name patterns that a local job has: ``%j`` (job id) and ``%%`` (a ``%``). Like
    Slurm, a name with a backslash has its backslashes removed and no pattern expanded."""
    if "\\" in name:
        return name.replace("\\", "")
    return re.sub(r"%(%|j)", lambda m: "%" if m.group(1) == "%" else job_id, name)


def sbatch_output_path(script_text: str, job_id: str) -> Path | None:
    """The log path the script's ``#SBATCH --output`` (or ``-o``) names for ``job_id``, or None.

    sbatch reads #SBATCH lines up to the first command line; the last --output given wins.
    """
    out = None
    for line in script_text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#!"):
            continue
        if not stripped.startswith("#"):
            break  # sbatch stops reading options at the first command
        if not stripped.startswith("#SBATCH"):
            continue
        words = _sbatch_words(stripped[len("#SBATCH"):])
        for i, word in enumerate(words):
            if word.startswith("--output="):
                out = word[len("--output="):]
            elif word in ("--output", "-o") and i + 1 < len(words):
                out = words[i + 1]
            elif word.startswith("-o") and len(word) > 2:
                out = word[2:]
    return Path(_expand_filename(out, job_id)) if out is not None else None


def _first_record(job_id: str, after: list[str], script: Path) -> dict:
    return {"job_id": job_id, "state": "PENDING", "submit": _now(), "script": str(script),
            "reason": "Dependency" if after else "", "node": os.uname().nodename}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="hpcpipe local job runner (started by hpcpipe submit)")
    p.add_argument("--script", type=Path, required=True)
    p.add_argument("--jobs-dir", type=Path, required=True)
    p.add_argument("--after", action="append", default=[])
    a = p.parse_args(argv)
    sys.exit(_Runner(a.script, a.jobs_dir, a.after).run())


if __name__ == "__main__":
    main()
