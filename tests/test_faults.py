"""Faults injected into real runs: a process killed between write and rename, a full disk, the
scheduler going away, a failing upstream step, two commands at once, and hostile or secret values.

Each test says what it injects and what it checks; the README's "Faults and bad input" is the
table of them. Where a stand-in replaces a real part (a PATH shim for sbatch), the test says so.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import secrets
import signal
import stat
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from hpcpipe.cli import main

REPO = Path(__file__).resolve().parent.parent
TESTBED = REPO / "tests" / "slurm" / "testbed.sh"
TS = 1_600_000_000_000


def hp(cwd: Path, *args: str, runs: Path | None = None, check: bool = True, timeout: float = 120,
       env: dict | None = None, umask: int = -1) -> subprocess.CompletedProcess:
    """The installed ``hpcpipe`` command in ``cwd`` with HPCPIPE_RUNS_DIR set."""
    env = {**os.environ, **(env or {}), "HPCPIPE_RUNS_DIR": str(runs or cwd / "runs")}
    proc = subprocess.run(["hpcpipe", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env, umask=umask)
    if check and proc.returncode != 0:
        raise AssertionError(f"hpcpipe {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def steps(cwd: Path, runs: Path | None = None) -> dict[str, dict]:
    out = json.loads(hp(cwd, "status", "--json", runs=runs).stdout)
    return {row["step"]: row for row in out["steps"]}


def wait_step(cwd: Path, step: str, states: set[str], runs: Path | None = None,
              timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        row = steps(cwd, runs)[step]
        if row["state"] in states:
            return row
        time.sleep(0.5)
    raise AssertionError(f"{step} never reached {states}: {row}")


def write_reviews(path: Path, n: int, start: int = 0) -> None:
    rows = [{"rating": float(1 + i % 5), "title": "t", "text": f"text {i}", "asin": f"A{i % 40}",
             "parent_asin": f"P{i % 40}", "user_id": f"U{i}", "timestamp": TS + i * 3_600_000,
             "helpful_vote": i % 3, "verified_purchase": True} for i in range(start, start + n)]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


def write_meta(path: Path) -> None:
    path.write_text("".join(json.dumps({"parent_asin": f"P{i}", "title": f"T{i}",
                                        "main_category": "Toys", "store": "S"}) + "\n"
                            for i in range(40)))


def tables(folder: Path) -> dict[str, object]:
    """Every parquet file under ``folder`` read whole (a partial file would fail to read)."""
    return {str(p.relative_to(folder)): pq.read_table(p) for p in sorted(folder.rglob("*.parquet"))}


# ---------------------------------------------------------------------------------------------
# A process killed between writing an output and renaming it into place.

KILL_AT_RENAME = """
import os, sys
from pathlib import Path
target = sys.argv[1]
real = os.replace
def replace(src, dst, *a, **k):
    if Path(dst).name == target:
        os._exit(9)  # dies like SIGKILL: no finally, no cleanup
    return real(src, dst, *a, **k)
os.replace = replace
"""


@pytest.mark.parametrize("target", ["reviews", "products.parquet", "manifest.json"])
def test_ingest_killed_between_write_and_rename(tmp_path: Path, target: str) -> None:
    """Ingest of changed input dies at the rename of one output: nothing reads as complete, every
    file is a complete old or new version, and a rerun gives the same output as a clean run."""
    from hpcpipe.config import IngestConfig
    from hpcpipe.errors import InputError
    from hpcpipe.steps.features import run as features_run
    from hpcpipe.steps.ingest import ingest

    write_meta(tmp_path / "m.jsonl")
    write_reviews(tmp_path / "r.jsonl", 300)
    out = tmp_path / "run" / "ingest"
    cfg = IngestConfig(target_bucket_rows=100)
    ingest([tmp_path / "r.jsonl"], tmp_path / "m.jsonl", out, cfg)
    before = tables(out / "reviews")
    write_reviews(tmp_path / "r.jsonl", 450)  # new input: the old output must be redone

    code = KILL_AT_RENAME + textwrap.dedent(f"""
        from hpcpipe.config import IngestConfig
        from hpcpipe.steps.ingest import ingest
        ingest([{str(tmp_path / 'r.jsonl')!r}], {str(tmp_path / 'm.jsonl')!r}, {str(out)!r},
               IngestConfig(target_bucket_rows=100))
    """)
    proc = subprocess.run([sys.executable, "-c", code, target], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert not (out / "manifest.json").exists()  # nothing says "complete"
    if target == "reviews":
        # A folder cannot replace a non-empty folder in one rename: the old buckets were moved
        # aside (whole, under a .tmp- name no reader looks at) and the new ones not yet renamed in.
        assert not (out / "reviews").exists()
        assert [tables(p) == before for p in sorted(out.glob(".tmp-reviews-*"))].count(True) == 1
    else:
        tables(out / "reviews")  # every bucket file in place is whole
    layout_root = out.parent
    from hpcpipe.config import RunConfig
    from hpcpipe.run.layout import RunLayout
    from hpcpipe.run.metrics import MetricsWriter

    with pytest.raises(InputError, match="ingest step has not finished"):
        features_run(RunLayout(layout_root), RunConfig(),
                     MetricsWriter(layout_root / "metrics.jsonl", "features"))

    m = ingest([tmp_path / "r.jsonl"], tmp_path / "m.jsonl", out, cfg)
    assert "skipped" not in m and m["rows_out"] == 450
    assert not [p for p in out.rglob(".tmp-*")]
    clean = tmp_path / "clean"
    ingest([tmp_path / "r.jsonl"], tmp_path / "m.jsonl", clean, cfg)
    assert tables(out) == tables(clean)


def test_features_killed_between_write_and_rename(tmp_path: Path) -> None:
    """Features dies at the rename of its second bucket: the first bucket stays complete, the
    second is only a temporary, no manifest; the rerun skips the first and ends equal to a clean
    run."""
    from hpcpipe.config import IngestConfig
    from hpcpipe.steps.ingest import ingest

    write_meta(tmp_path / "m.jsonl")
    write_reviews(tmp_path / "r.jsonl", 600)
    ingest([tmp_path / "r.jsonl"], tmp_path / "m.jsonl", tmp_path / "ingest",
           IngestConfig(target_bucket_rows=150))
    code = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from distributed import Client
        from hpcpipe.config import FeaturesConfig
        from hpcpipe.steps.features import build_features
        real = os.replace
        renamed = []
        def replace(src, dst, *a, **k):
            if Path(dst).name == "part-0.parquet":
                renamed.append(dst)
                if len(renamed) == int(sys.argv[1]):
                    os._exit(9)
            return real(src, dst, *a, **k)
        os.replace = replace
        with Client(processes=False, n_workers=1, threads_per_worker=1,
                    dashboard_address=None) as client:
            m = build_features(Path({str(tmp_path / 'ingest')!r}), Path(sys.argv[2]),
                               FeaturesConfig(cpus=1), client=client, progress=False)
        print(m["buckets_skipped"], m["buckets_done"])
    """)
    out = tmp_path / "features"
    proc = subprocess.run([sys.executable, "-c", code, "2", str(out)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr[-3000:]
    assert not (out / "manifest.json").exists()
    done = tables(out)
    assert len(done) == 1  # one complete bucket, read whole
    first = out / next(iter(done))
    first_mtime = first.stat().st_mtime_ns
    assert len(list(out.rglob(".tmp-*"))) == 1  # the unrenamed second bucket, never read

    again = subprocess.run([sys.executable, "-c", code, "0", str(out)], capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.split()[-2:] == ["1", "3"]  # 1 skipped, 3 computed
    assert first.stat().st_mtime_ns == first_mtime and not list(out.rglob(".tmp-*"))
    clean = subprocess.run([sys.executable, "-c", code, "0", str(tmp_path / "clean")],
                           capture_output=True, text=True, timeout=120)
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert tables(out) == tables(tmp_path / "clean")


# ---------------------------------------------------------------------------------------------
# The disk fills up while a step writes.

SMALL = ["--set", "data.synth_reviews=20000", "--set", "ingest.target_bucket_rows=5000"]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_disk_full_while_features_writes(tmp_path: Path) -> None:
    """The run folder is a 32 MB tmpfs. Ingest completes; then a filler leaves 96 KB and
    `hpcpipe rerun features` fails saying which file did not fit; ingest's output is intact;
    with the filler gone the same rerun completes."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)], check=True)
    try:
        runs = mnt / "runs"
        hp(tmp_path, "submit", "--local", "--wait", "--steps", "ingest", *SMALL, runs=runs)
        run_dir = next(runs.iterdir())
        ingest_before = tables(run_dir / "ingest")
        manifest = json.loads((run_dir / "ingest" / "manifest.json").read_text())

        st = os.statvfs(mnt)
        filler = mnt / "filler"
        with open(filler, "wb") as f:
            f.write(b"\0" * (st.f_bavail * st.f_frsize - 96 * 1024))
        hp(tmp_path, "rerun", "features", runs=runs)
        row = wait_step(tmp_path, "features", {"FAILED", "COMPLETED"}, runs)
        assert row["state"] == "FAILED", row
        log = hp(tmp_path, "logs", "features", runs=runs).stdout
        assert "No space left on device: could not write " + str(run_dir / "features") in log, \
            log[-3000:]
        assert tables(run_dir / "ingest") == ingest_before  # earlier outputs intact
        assert not (run_dir / "features" / "manifest.json").exists()
        assert not list((run_dir / "features").rglob(".tmp-*"))
        tables(run_dir / "features")  # what did fit is whole

        filler.unlink()
        hp(tmp_path, "rerun", "features", runs=runs)
        assert wait_step(tmp_path, "features", {"FAILED", "COMPLETED"}, runs)["state"] == \
            "COMPLETED"
        done = json.loads((run_dir / "features" / "manifest.json").read_text())
        assert done["rows_in"] == manifest["rows_out"]
    finally:
        proc = subprocess.run(["umount", str(mnt)], capture_output=True)
        if proc.returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


# ---------------------------------------------------------------------------------------------
# The scheduler goes away.

HOLD = ["--set", "slurm.extra_sbatch=[--begin=now+1hour]", "--set", "data.synth_reviews=1000",
        "--set", "ingest.time=5", "--set", "ingest.mem=1G", "--set", "features.mem=1G",
        "--set", "features.cpus=2", "--set", "features.time=5"]


def _ctld_pid(slurm_cluster) -> int:
    return int((slurm_cluster.state_dir / "run" / "slurmctld.pid").read_text().strip())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _status_and_submit(tmp_path: Path, run_id: str, env: dict) -> tuple[tuple, tuple]:
    """`hpcpipe status RUN` and `hpcpipe submit` at once; each waits out Slurm's own retries
    (~10-20 s) before it gives up. Returns (exit code, stdout, stderr) of each."""
    procs = [subprocess.Popen(["hpcpipe", *args], cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for args in (["status", run_id], ["submit", "--steps", "ingest", *HOLD])]
    status, submit = ((p.wait(timeout=120), *p.communicate()) for p in procs)
    return status, submit


def _unreachable_port_conf(tmp_path: Path, slurm_cluster) -> str:
    """A copy of slurm.conf whose controller port nothing listens on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    text = slurm_cluster.conf.read_text()
    conf = tmp_path / "slurm-unreachable.conf"
    conf.write_text(re.sub(r"^SlurmctldPort=\S+", f"SlurmctldPort={port}", text, flags=re.M))
    return str(conf)


@pytest.mark.slurm
def test_status_and_submit_while_slurmctld_is_down(tmp_path: Path, slurm_cluster) -> None:
    """slurmctld is stopped (by its pid, for ~20 s): `status` says the scheduler cannot be
    reached and shows the last known states; `submit` fails with a clear message and leaves no
    run folder; after the restart the held job is still there and is cancelled.

    Other test sessions on this machine restart a stopped slurmctld within seconds (their
    fixture's `testbed.sh start`), and Slurm's clients retry long enough to hide such a short
    outage. If that happens twice, the same checks run with a stand-in, labelled as such: a copy
    of slurm.conf that points at a port where no controller listens."""
    hp(tmp_path, "submit", "--steps", "ingest", *HOLD)
    runs = tmp_path / "runs"
    run_id = next(runs.iterdir()).name
    job = steps(tmp_path)["ingest"]["job_id"]
    assert steps(tmp_path)["ingest"]["state"] == "PENDING"
    env = {**os.environ, "HPCPIPE_RUNS_DIR": str(runs)}
    pidfile = slurm_cluster.state_dir / "run" / "slurmctld.pid"
    clean = False
    try:
        for _ in range(2):
            before = sorted(p.name for p in runs.iterdir())
            pid = _ctld_pid(slurm_cluster)
            os.kill(pid, signal.SIGTERM)
            deadline = time.time() + 20
            while _alive(pid) and time.time() < deadline:
                time.sleep(0.1)
            assert not _alive(pid)
            status, submit = _status_and_submit(tmp_path, run_id, env)
            clean = "cannot be reached" in status[1] and submit[0] != 0
            restarted = pidfile.exists() and _alive(_ctld_pid(slurm_cluster))
            if clean or not restarted:
                break
    finally:
        up = subprocess.run(["bash", str(TESTBED), "start"], capture_output=True, text=True)
        deadline = time.time() + 60
        while subprocess.run(["sinfo", "-h"], capture_output=True).returncode != 0:
            assert time.time() < deadline, "sinfo does not answer after the restart"
            time.sleep(0.5)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        if not clean:  # the stand-in: the controller unreachable for these two commands only
            warnings.warn("another session restarted slurmctld during both attempts: checked "
                          "with the unreachable-port stand-in instead", stacklevel=1)
            before = sorted(p.name for p in runs.iterdir())
            status, submit = _status_and_submit(
                tmp_path, run_id, {**env, "SLURM_CONF": _unreachable_port_conf(tmp_path,
                                                                             slurm_cluster)})
        assert status[0] == 0, status[2]
        assert re.search(rf"^ingest\s+{job}\s+PENDING\s", status[1], re.M), status[1]
        assert "the scheduler cannot be reached" in status[1]
        assert "Unable to contact slurm controller" in status[1]
        assert "showing the last known states" in status[1]
        assert submit[0] == 1 and "Traceback" not in submit[2]
        assert "Unable to contact slurm controller" in submit[2], submit[2]
        assert sorted(p.name for p in runs.iterdir()) == before  # no run folder left behind
        again = json.loads(hp(tmp_path, "status", "--json", run_id).stdout)
        assert again["steps"][0]["state"] == "PENDING" and not again["note"]  # reachable again
    finally:
        for run in runs.iterdir():  # runs a restarted controller let through included
            hp(tmp_path, "cancel", run.name, check=False)
        slurm_cluster.cancel(job)


def _sbatch_shim(tmp_path: Path, scancel_fails: bool) -> dict[str, str]:
    """A stand-in for a controller that stops answering mid-submit: the real sbatch the first
    time, then Slurm's "Unable to contact" failure (and the same from scancel if asked)."""
    shim = tmp_path / "shim"
    shim.mkdir()
    real = subprocess.run(["which", "sbatch"], capture_output=True, text=True,
                          check=True).stdout.strip()
    fail = ('echo "sbatch: error: Batch job submission failed: Unable to contact slurm '
            'controller (connect failure)" >&2; exit 1')
    (shim / "sbatch").write_text(
        f"#!/bin/bash\nn=$(cat {shim}/count 2>/dev/null || echo 0); echo $((n+1)) > "
        f"{shim}/count\nif [ \"$n\" -ge 1 ]; then {fail}; fi\nexec {real} \"$@\"\n")
    if scancel_fails:
        (shim / "scancel").write_text(
            "#!/bin/bash\necho 'scancel: error: Unable to contact slurm controller (connect "
            "failure)' >&2\nexit 1\n")
    for p in shim.iterdir():
        p.chmod(0o755)
    return {"PATH": f"{shim}:{os.environ['PATH']}"}


@pytest.mark.slurm
@pytest.mark.parametrize("scancel_fails", [False, True])
def test_scheduler_stops_answering_mid_submit(tmp_path: Path, slurm_cluster,
                                              scancel_fails: bool) -> None:
    """Stand-in (PATH shim): sbatch works for ingest, then fails as if slurmctld went away. The
    ingest job is cancelled, or, when scancel cannot reach the controller either, recorded in
    the run so that `hpcpipe cancel` can reach it later; nothing is left half-submitted
    unnoticed."""
    env = _sbatch_shim(tmp_path, scancel_fails)
    proc = hp(tmp_path, "submit", "--steps", "ingest,features", *HOLD, check=False, env=env)
    run_dir = next((tmp_path / "runs").iterdir())
    state = json.loads((run_dir / "state.json").read_text())
    job = state["steps"]["ingest"]["jobs"][0]["job_id"]
    try:
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert "submitting step features failed" in proc.stderr
        assert "Unable to contact slurm controller" in proc.stderr
        assert "features" not in state["steps"] and state["submit_failed"] is True
        if not scancel_fails:
            assert f"were cancelled: {job}" in proc.stderr
            assert state["steps"]["ingest"]["jobs"][0]["state"] == "CANCELLED"
            assert slurm_cluster.wait_state(job, "CANCELLED", timeout=30) == "CANCELLED"
        else:
            assert any("could not cancel" in e["text"] for e in state["events"])
            assert slurm_cluster.state(job) == "PENDING"
            # The job is recorded and open, so `hpcpipe cancel` (controller back) reaches it.
            assert job in hp(tmp_path, "cancel").stdout
            assert slurm_cluster.wait_state(job, "CANCELLED", timeout=30) == "CANCELLED"
            assert f"were cancelled: {job}" not in proc.stderr
            assert "could NOT be cancelled" in proc.stderr and "hpcpipe cancel" in proc.stderr
    finally:
        slurm_cluster.cancel(job)


# ---------------------------------------------------------------------------------------------
# An upstream step fails.


def test_failed_ingest_means_features_and_train_never_run(tmp_path: Path) -> None:
    """Local backend, real steps: ingest fails on a gzip cut short; features and train never
    start; status and summarize say why."""
    data = tmp_path / "data"
    data.mkdir()
    write_reviews(data / "r.jsonl.gz", 3000)
    cut = (data / "r.jsonl.gz").read_bytes()
    (data / "r.jsonl.gz").write_bytes(cut[: len(cut) // 2])
    write_meta(data / "m.jsonl")
    proc = hp(tmp_path, "submit", "--local", "--wait", "--set",
              f"data.reviews=[{data / 'r.jsonl.gz'}]", "--set", f"data.metadata={data / 'm.jsonl'}",
              check=False)
    assert proc.returncode == 1 and "did not complete" in proc.stderr
    rows = steps(tmp_path)
    assert rows["ingest"]["state"] == "FAILED"
    for step in ("features", "train"):
        assert (rows[step]["state"], rows[step]["reason"]) == ("CANCELLED",
                                                               "DependencyNeverSatisfied")
        assert not Path(rows[step]["log"]).exists()  # never started
    run_dir = next((tmp_path / "runs").iterdir())
    assert not (run_dir / "features").exists() and not (run_dir / "train").exists()
    assert "DependencyNeverSatisfied" in hp(tmp_path, "status").stdout
    log = hp(tmp_path, "logs", "ingest").stdout
    assert f"{data / 'r.jsonl.gz'} is truncated or corrupt" in log
    report = hp(tmp_path, "summarize").stdout
    for step in ("features", "train"):
        assert f"**{step}: DependencyNeverSatisfied" in report, report
    assert f"upstream ingest (job {rows['ingest']['job_id']}" in report
    assert "cancelled by the local runner before it started" in report


# ---------------------------------------------------------------------------------------------
# Two commands at once on one run.


def test_concurrent_reruns_submit_once(tmp_path: Path) -> None:
    """Three `hpcpipe rerun ingest` processes started together on one run: one submits, the
    others are refused (the run's lock, or the job the winner just queued); one new job."""
    hp(tmp_path, "submit", "--local", "--wait", "--steps", "ingest", "--set",
       "data.synth_reviews=1000")
    env = {**os.environ, "HPCPIPE_RUNS_DIR": str(tmp_path / "runs")}
    procs = [subprocess.Popen(["hpcpipe", "rerun", "ingest"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [(p.wait(timeout=60), *p.communicate()) for p in procs]
    winners = [r for r in results if r[0] == 0]
    assert len(winners) == 1, results
    for rc, _, err in results:
        if rc != 0:
            assert "is busy" in err or "is still" in err, err
    state = json.loads(next((tmp_path / "runs").iterdir()).joinpath("state.json").read_text())
    jobs = state["steps"]["ingest"]["jobs"]
    assert len(jobs) == 2 and jobs[1]["job_id"] in winners[0][1]
    wait_step(tmp_path, "ingest", {"COMPLETED"})


# ---------------------------------------------------------------------------------------------
# Security: hostile names and paths, file modes, secrets.

HOSTILE = ["$(touch {p})", "`touch {p}`", "a;touch {p}", "a b", "x'y", "../up", "-rf", "a\nb"]


def test_hostile_run_names_are_refused_before_anything_is_made(tmp_path: Path) -> None:
    pwned = tmp_path / "pwned"
    for name in HOSTILE:
        result = CliRunner().invoke(main, ["submit", "--local", "--name", name.format(p=pwned),
                                           "--runs-dir", str(tmp_path / "runs")])
        assert result.exit_code == 1 and "name: " in result.output, (name, result.output)
    assert not pwned.exists() and not (tmp_path / "runs").exists()


def _modes(*roots: Path) -> dict[str, int]:
    out = {}
    for root in roots:
        out[str(root)] = stat.S_IMODE(root.lstat().st_mode)
        for p in root.rglob("*"):
            out[str(p)] = stat.S_IMODE(p.lstat().st_mode)
    return out


@pytest.mark.parametrize("umask", [0o002, 0o077])
def test_run_folder_logs_modes_and_no_secrets(tmp_path: Path, umask: int) -> None:
    """A local run (hostile characters in the runs folder and input paths) under umask 002 and
    077, with secrets in its environment: nothing runs that was not meant to, nothing is
    world-writable (with 077 nothing is open to group or others at all), and the secrets are in
    no file of the run folder or its logs."""
    odd = "a b $(touch pwned) `touch pwned` ;x 'q\""  # relative: a shell would touch cwd/pwned
    runs = tmp_path / f"runs {odd}"
    data = tmp_path / f"in {odd}"
    data.mkdir()
    write_reviews(data / "r.jsonl", 3000)
    write_meta(data / "m.jsonl")
    secret = {"HPCPIPE_TEST_SECRET": f"hpcpipe-secret-{secrets.token_hex(8)}",
              "AWS_SECRET_ACCESS_KEY": f"aws-{secrets.token_hex(12)}"}
    steps_arg = "ingest,features,train" if umask == 0o077 else "ingest,features"
    hp(tmp_path, "submit", "--local", "--wait", "--steps", steps_arg,
       "--set", f"data.reviews={json.dumps([str(data / 'r.jsonl')])}",
       "--set", f"data.metadata={json.dumps(str(data / 'm.jsonl'))}",
       "--set", "ingest.target_bucket_rows=1000", "--set", "train.epochs=1",
       "--set", "train.batch_size=16", "--set", "train.max_length=16",
       "--set", "train.num_workers=0", "--set", "train.max_steps_per_epoch=3",
       "--set", "train.val_weeks=4", runs=runs, env=secret, umask=umask, timeout=300)
    assert not list(tmp_path.rglob("pwned"))
    run_dir = next(runs.iterdir())
    assert (run_dir / "features" / "manifest.json").exists()
    if umask == 0o077:
        assert (run_dir / "train" / "checkpoints" / "last.pt").exists()
    logs = tmp_path / "logs" / run_dir.name
    modes = _modes(runs, logs)
    assert any("/local/" in p for p in modes) and any(p.endswith(".out") for p in modes)
    world_writable = {p: oct(m) for p, m in modes.items() if m & 0o002}
    assert not world_writable
    if umask == 0o077:
        assert not {p: oct(m) for p, m in modes.items() if m & 0o077}
    else:  # the umask is followed, not replaced by fixed modes
        assert modes[str(run_dir / "state.json")] == 0o664
        assert modes[str(run_dir)] == 0o775
    for root in (runs, logs):
        for p in root.rglob("*"):
            if p.is_file():
                body = p.read_bytes()
                for value in secret.values():
                    assert value.encode() not in body, f"{value} written to {p}"


def test_a_logs_folder_needing_quotes_works_and_one_slurm_cannot_take_leaves_no_run(
        tmp_path: Path) -> None:
    """The default logs folder is ./logs. From a folder whose path has a space it is quoted in
    the #SBATCH --output line (it used to be refused); a backslash, which makes Slurm drop %j,
    is refused before a run folder exists, or an empty run would become "latest"."""
    cwd = tmp_path / "a b"
    cwd.mkdir()
    result = hp(cwd, "submit", "--local", "--wait", "--steps", "ingest", "--set",
                "data.synth_reviews=500", runs=tmp_path / "runs", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    (run,) = (tmp_path / "runs").iterdir()
    job = json.loads((run / "state.json").read_text())["steps"]["ingest"]["jobs"][0]["job_id"]
    assert (cwd / "logs" / run.name / f"ingest-{job}.out").is_file()

    cwd = tmp_path / "a\\b"
    cwd.mkdir()
    result = hp(cwd, "submit", "--local", "--steps", "ingest", runs=tmp_path / "runs2",
                check=False)
    assert result.returncode == 1 and "logs folder" in result.stderr and \
        "backslash" in result.stderr and "Traceback" not in result.stderr
    assert not list(cwd.rglob("*.out"))
    assert not (tmp_path / "runs2").exists() or not list((tmp_path / "runs2").iterdir())
