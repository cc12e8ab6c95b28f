"""Printing and following a step's log: ``hpcpipe logs STEP [RUN] [-f]``.

Logs live at stable absolute paths, one per job id (``logs/<run-id>/<step>-<jobid>.out``) and are
opened in append mode, so a job requeued under the same id keeps writing to the same file. Follow
mode switches to the new file when the step is rerun under a new job id and stops when the step's
current job has ended. tqdm's carriage-return redraws are collapsed to the last state of each bar.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from hpcpipe.pipeline import is_active, refresh
from hpcpipe.run import Run

Echo = Callable[[str], None]


def collapse_cr(line: str) -> str:
    """The last drawn state of a line that tqdm redrew with carriage returns."""
    if "\r" not in line:
        return line
    parts = [p for p in line.split("\r") if p.strip()]
    return parts[-1] if parts else ""


class LineFilter:
    def __init__(self, rank: int | None = None, grep: str | None = None) -> None:
        self.rank = rank
        self.grep = re.compile(grep) if grep else None

    def __call__(self, line: str) -> bool:
        if self.rank is not None:
            # srun --label prefixes "<rank>: "; lines without a label belong to the batch shell.
            m = re.match(r"^\s*(\d+): ", line)
            if m and int(m.group(1)) != self.rank:
                return False
        return not (self.grep and not self.grep.search(line))


def read_lines(path: Path, offset: int = 0) -> tuple[list[str], int]:
    """Complete lines from ``offset``; returns them and the offset after the last one."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    text = data[: end + 1].decode("utf-8", errors="replace")
    return [collapse_cr(x) for x in text.split("\n")[:-1]], offset + end + 1


def iter_log(path: Path) -> Iterator[str]:
    """Stream a log's lines (CR-collapsed) without reading the file whole."""
    with open(path, "rb") as f:
        for raw in f:
            yield collapse_cr(raw.decode("utf-8", errors="replace").rstrip("\n"))


def show(run: Run, step: str, echo: Echo, follow: bool, flt: LineFilter,
         poll_s: float = 1.0) -> None:
    cur = run.current(step)
    if cur is None:
        raise_no_step(run, step)
    job_id, offset = cur["job_id"], 0
    path = Path(cur["log"])
    if not follow:
        if not path.exists():
            echo(f"(no log yet at {path}: job {job_id} is {cur.get('state', '?')})")
            return
        for line in iter_log(path):
            if flt(line):
                echo(line)
        return
    echo(f"==> {path} (job {job_id})")
    last_refresh = 0.0
    while True:
        lines, offset = read_lines(path, offset)
        if path.exists() and path.stat().st_size < offset:
            offset = 0  # the file was replaced: start over
        for line in lines:
            if flt(line):
                echo(line)
        if time.time() - last_refresh >= max(poll_s, 2.0):
            refresh(run)
            last_refresh = time.time()
            cur = run.current(step)
            if cur["job_id"] != job_id:
                job_id, path, offset = cur["job_id"], Path(cur["log"]), 0
                echo(f"==> {path} (job {job_id}, resubmitted)")
                continue
            if not is_active(cur):
                lines, offset = read_lines(path, offset)
                for line in lines:
                    if flt(line):
                        echo(line)
                echo(f"==> job {job_id} ended: {cur.get('state')}")
                return
        time.sleep(poll_s)


def raise_no_step(run: Run, step: str) -> None:
    from hpcpipe.errors import RunError

    raise RunError(f"run {run.run_id} has no step '{step}' (it has {', '.join(run.steps())})")
