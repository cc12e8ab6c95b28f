"""How fast `hpcpipe --help` and `hpcpipe status` answer, and how many scheduler calls status makes.

Builds a run whose steps have 200 real Slurm jobs in their history (tiny `sbatch --wrap true`
jobs), then times the commands as a user runs them (new processes) and counts every scheduler
command they start, through logging shims put first on PATH.

    SLURM_CONF=/var/tmp/hpcpipe-slurm/slurm.conf python bench/bench_status.py [--jobs 200]

Targets (monitoring issue): status <= 2 scheduler calls and < 0.5 s; --help < 0.3 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hpcpipe.run.folder import Run

SCHEDULER_COMMANDS = ("sbatch", "squeue", "sacct", "scancel", "scontrol", "sinfo")


def make_shims(folder: Path, log: Path) -> None:
    for name in SCHEDULER_COMMANDS:
        real = subprocess.run(["bash", "-c", f"command -v {name}"], capture_output=True,
                              text=True).stdout.strip()
        if not real:
            sys.exit(f"{name} is not on PATH: start the test cluster (tests/slurm/testbed.sh start)")
        shim = folder / name
        shim.write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\nexec {real} "$@"\n')
        shim.chmod(0o755)


def timed(cmd: list[str], env: dict[str, str], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--jobs", type=int, default=200, help="jobs in the run's history")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-status-"))
    print(f"submitting {args.jobs} tiny jobs ...", flush=True)
    ids = [subprocess.run(["sbatch", "--parsable", "--mem=10M", "-o", "/dev/null",
                           "--wrap", "true"], capture_output=True, text=True,
                          check=True).stdout.strip().split(";")[0] for _ in range(args.jobs)]
    run = Run.create(work / "runs", "bench-status", "slurm", work / "logs")
    steps = ("ingest", "features", "train")
    for i, jid in enumerate(ids):
        run.add_job(steps[i * 3 // len(ids)], jid, [], work / "x.sbatch")
    run.save()
    time.sleep(3)  # let the tiny jobs finish

    log = work / "calls.log"
    shims = work / "shims"
    shims.mkdir()
    make_shims(shims, log)
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}",
           "HPCPIPE_RUNS_DIR": str(work / "runs")}

    log.write_text("")
    first = timed(["hpcpipe", "status"], env, 1)[0]
    first_calls = log.read_text().splitlines()
    log.write_text("")
    cached = timed(["hpcpipe", "status"], env, args.repeat)
    cached_calls = log.read_text().splitlines()
    helps = timed(["hpcpipe", "--help"], env, args.repeat)

    print(f"\nmachine: {os.cpu_count()} CPUs, {os.uname().nodename}; run with {args.jobs} jobs")
    print(f"status, first call (all {args.jobs} jobs open): {first:.3f} s, "
          f"{len(first_calls)} scheduler call(s): {[c.split()[0] for c in first_calls]}")
    print(f"status, later calls (ended jobs cached):  median {statistics.median(cached):.3f} s, "
          f"{len(cached_calls) / args.repeat:.1f} scheduler call(s) each")
    print(f"--help:                                   median {statistics.median(helps):.3f} s")
    ok = len(first_calls) <= 2 and max(first, *cached) < 0.5 and statistics.median(helps) < 0.3
    print("targets (<= 2 calls, status < 0.5 s, --help < 0.3 s):", "met" if ok else "NOT met")
    subprocess.run(["scancel", *ids], check=False)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
