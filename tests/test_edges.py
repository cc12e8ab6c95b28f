"""Every command over a damaged run folder, an unwritable one and a missing one: a message that
says what and where, never a traceback, and never another run acted on instead."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hpcli import hp

from hpcpipe.config import RunConfig
from hpcpipe.control.pipeline import write_config
from hpcpipe.run.folder import Run

COMMANDS = [["status"], ["status", "--json"], ["runs"], ["logs", "train"], ["summarize"],
            ["cancel"], ["rerun", "train"], ["predict"]]


def _finished_run(runs: Path, run_id: str, created: str) -> Run:
    """A local run whose three jobs are recorded as COMPLETED (no job runs for these tests)."""
    run = Run.create(runs, run_id, "local", runs.parent / "logs")
    run.state.created = created
    write_config(RunConfig(), run.layout)
    for i, step in enumerate(("ingest", "features", "train")):
        run.add_job(step, f"L{900 + i}", [], run.layout.scripts / f"{step}.sbatch").update(
            state="COMPLETED", final=True, exit_code="0:0")
    run.save()
    return run


def _cmd(tmp_path: Path, args: list[str]) -> subprocess.CompletedProcess:
    proc = hp(tmp_path, *args, check=False, timeout=60)
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, f"hpcpipe {' '.join(args)}:\n{out}"
    assert proc.returncode in (0, 1, 2), f"hpcpipe {' '.join(args)} exit {proc.returncode}\n{out}"
    return proc


@pytest.mark.parametrize("content", ["", "{", "[]", '{"run_id": "x"}',
                                     '{"run_id": "x", "backend": "local", "logs_dir": "/l", '
                                     '"steps": {"train": {"jobs": [{"state": "RUNNING"}]}}}'],
                         ids=["empty", "cut", "list", "no-steps", "job-without-id"])
def test_a_damaged_latest_state_file_is_reported_never_skipped(tmp_path: Path,
                                                               content: str) -> None:
    runs = tmp_path / "runs"
    good = _finished_run(runs, "run-good", "2026-01-01T00:00:00")
    damaged = _finished_run(runs, "run-newer", "2026-01-02T00:00:00")
    damaged.layout.state.write_text(content)
    for args in COMMANDS:
        proc = _cmd(tmp_path, args)
        out = proc.stdout + proc.stderr
        if args == ["runs"]:
            assert proc.returncode == 0 and "run-newer  damaged" in out and "run-good" in out
            continue
        assert proc.returncode == 1, f"hpcpipe {' '.join(args)} acted on a run:\n{out}"
        assert "damaged" in out and str(damaged.layout.state) in out.replace("\n", ""), out
        assert good.run_id not in out, f"hpcpipe {' '.join(args)} fell back to the older run"


def test_a_missing_run_or_runs_folder_is_a_message(tmp_path: Path) -> None:
    for args in COMMANDS:
        proc = _cmd(tmp_path, args)  # no runs folder at all
        if args != ["runs"]:
            assert proc.returncode == 1 and "no runs in" in proc.stderr, proc.stderr
    _finished_run(tmp_path / "runs", "run-a", "2026-01-01T00:00:00")
    for args in COMMANDS:
        if args == ["runs"]:
            continue
        proc = _cmd(tmp_path, [*args, "run-nope"])
        assert proc.returncode != 0 and "no run 'run-nope'" in proc.stderr, proc.stderr


@contextlib.contextmanager
def _read_only(folder: Path) -> Iterator[None]:
    """The folder as another user's run looks to you: not writable. As root (where permissions
    do not stop anything) a read-only bind mount; otherwise mode 555."""
    if os.geteuid() == 0:
        subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True)
            yield
        finally:
            subprocess.run(["umount", str(folder)], check=False)
    else:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(mode)


def test_every_command_on_a_run_folder_you_cannot_write(tmp_path: Path) -> None:
    run = _finished_run(tmp_path / "runs", "run-theirs", "2026-01-01T00:00:00")
    with _read_only(run.layout.root):
        results = {" ".join(a): _cmd(tmp_path, a) for a in COMMANDS}
    for name in ("status", "status --json", "runs", "logs train", "summarize"):
        assert results[name].returncode == 0, (name, results[name].stderr)
    out = results["summarize"].stdout
    assert "summary.md not written" in out and str(run.layout.summary) in out, out
    for name in ("cancel", "rerun train"):
        err = results[name].stderr
        assert results[name].returncode == 1 and "cannot take the lock of run run-theirs" in err
    err = results["predict"].stderr
    assert results["predict"].returncode == 1 and str(run.layout.root) in err, err


def test_an_invalid_grep_pattern_is_refused(tmp_path: Path) -> None:
    _finished_run(tmp_path / "runs", "run-a", "2026-01-01T00:00:00")
    proc = _cmd(tmp_path, ["logs", "train", "--grep", "[unclosed"])
    assert proc.returncode == 2 and "not a valid regular expression" in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_disk_during_submit_is_a_message_and_leaves_no_empty_run(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        (mnt / "runs").mkdir()
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
        try:  # fill it to the last block
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        proc = hp(tmp_path, "submit", "--local", check=False,
                  env={"HPCPIPE_RUNS_DIR": str(mnt / "runs")})
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1 and "Traceback" not in out, out
        assert "No space left on device" in proc.stderr and str(mnt / "runs") in proc.stderr
        assert "Free space" in proc.stderr, proc.stderr
        assert list((mnt / "runs").iterdir()) == []  # no empty run to become the latest
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
