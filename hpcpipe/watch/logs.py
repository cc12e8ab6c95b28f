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

from hpcpipe.run.folder import Run
from hpcpipe.watch.refresh import refresh

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


#: Bytes read at a time; a progress bar redrawn for hours is one "line" of many megabytes.
CHUNK = 1 << 20
#: The longest line kept; longer ones (no newline for megabytes) are cut, never held whole.
MAX_LINE = 1 << 16


def read_lines(path: Path, offset: int = 0, limit: int = 64 * CHUNK) -> tuple[list[str], int]:
    """Complete lines from ``offset`` (CR-collapsed); returns them and the offset after the last.

    Reads at most about ``limit`` bytes per call, so following a huge log runs in bounded memory.
    """
    lines: list[str] = []
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; a missing file is the common case
    except FileNotFoundError:
        return lines, offset
    with f:
        f.seek(offset)
        pending = b""  # bytes from ``offset`` on that do not end in a newline yet
        read = 0
        while read < limit or not lines:  # past the limit only inside one endless line
            data = f.read(CHUNK)
            if not data:
                break
            read += len(data)
            buf = pending + data
            end = buf.rfind(b"\n") + 1
            if end:
                lines += [_decode(x) for x in buf[: end - 1].split(b"\n")]
                offset += end
                pending = buf[end:]
            else:
                pending = buf
            if len(pending) > MAX_LINE:  # keep only the last redraw of an endless bar
                cut = max(pending.rfind(b"\r"), len(pending) - MAX_LINE)
                offset += cut
                pending = pending[cut:]
    return lines, offset


def _decode(raw: bytes) -> str:
    if b"\r" in raw:
        parts = [p for p in raw.split(b"\r") if p.strip()]
        raw = parts[-1] if parts else b""
    return raw[-MAX_LINE:].decode("utf-8", errors="replace")


def iter_log(path: Path) -> Iterator[str]:
    """Stream a log's lines (CR-collapsed) in bounded memory, never reading the file whole."""
    offset = 0
    while True:
        lines, new = read_lines(path, offset, limit=CHUNK)
        yield from lines
        if new == offset:
            break
        offset = new
    try:  # a last line without a newline
        with open(path, "rb") as f:
            f.seek(offset)
            tail = f.read(MAX_LINE + 1)
    except FileNotFoundError:
        return
    if tail.strip():
        yield _decode(tail.rstrip(b"\n"))


def show(run: Run, step: str, echo: Echo, follow: bool, flt: LineFilter,
         poll_s: float = 1.0) -> None:
    """Print the log of the step's current job; with ``follow``, keep printing until it ends.

    Follow stays with the step: a requeue (same job id, same file, opened in append mode) is
    announced and followed; a rerun (new job id) switches to the new job's file. It stops when
    the step's current job has ended and no command that may resubmit it (a rerun) holds the run.
    """
    cur = run.job(step)
    job_id, offset = cur.job_id, 0
    restarts = cur.restarts
    path = Path(cur.log)
    if not follow:
        if not path.exists():
            echo(f"(no log yet at {path}: job {job_id} is {cur.state})")
            return
        for line in iter_log(path):
            if flt(line):
                echo(line)
        return
    echo(f"==> {path} (job {job_id})")

    def drain() -> None:
        nonlocal offset
        while True:
            if path.exists() and path.stat().st_size < offset:
                offset = 0  # the file was replaced: start over
            lines, new = read_lines(path, offset)
            for line in lines:
                if flt(line):
                    echo(line)
            if new == offset:
                return
            offset = new

    last_refresh = 0.0
    while True:
        drain()
        if time.time() - last_refresh >= max(poll_s, 2.0):
            refresh(run)
            last_refresh = time.time()
            cur = run.job(step)
            if cur.job_id != job_id:
                drain()
                job_id, path, offset = cur.job_id, Path(cur.log), 0
                restarts = cur.restarts
                echo(f"==> {path} (job {job_id}, resubmitted)")
                continue
            if cur.restarts > restarts:
                restarts = cur.restarts
                echo(f"==> job {job_id} requeued (restart {restarts}); following {path}")
            if not cur.active:
                with run.try_lock() as free:
                    busy = not free
                if busy:  # a rerun or cancel is under way: it may resubmit the step
                    time.sleep(poll_s)
                    continue
                refresh(run)
                if run.job(step).job_id != job_id:
                    continue
                drain()
                echo(f"==> job {job_id} ended: {cur.state}")
                return
        time.sleep(poll_s)
