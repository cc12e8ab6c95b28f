"""How fast `hpcpipe summarize` diagnoses a run whose failed step left a huge tqdm-heavy log.

Builds a run folder (no scheduler needed: the steps are recorded as ended) whose train step
FAILED with a log of --size bytes: progress bars redrawn with carriage returns (one bar per
"line", thousands of redraws each), log lines between them, and near the end a Python traceback.
Then runs `hpcpipe summarize` as a user does (a new process), checks that the diagnosis names the
exception and its last frame, and reports the wall time and the command's peak RSS. The same is
done with a log a tenth of the size: equal peak RSS shows the log is streamed, never read whole.

    python bench/bench_summarize.py [--size-gb 1.0] [--keep]

Target (monitoring issue): under 10 s for 1 GB, constant memory.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hpcpipe.run.folder import Run

TRACEBACK = (
    'Traceback (most recent call last):\n'
    '  File "/work/main/hpcpipe/jobmain.py", line 55, in main\n'
    '    fn(layout, cfg, metrics)\n'
    '  File "/work/main/hpcpipe/train/loop.py", line 212, in _train\n'
    '    loss = model(batch)\n'
    '  File "/work/main/hpcpipe/train/model.py", line 88, in forward\n'
    '    raise ValueError(f"batch {i}: feature matrix has {n} columns, expected {m}")\n'
    'ValueError: batch 8191: feature matrix has 21 columns, expected 22\n'
)


def progress_line(epoch: int, steps: int = 400) -> bytes:
    """One tqdm bar's whole life in a log file: every redraw after a carriage return."""
    parts = []
    for i in range(steps + 1):
        pct = 100 * i // steps
        bar = "#" * (pct // 10)
        parts.append(f"\repoch {epoch}: {pct:3d}%|{bar:<10}| {i}/{steps} "
                     f"[00:{i % 60:02d}<01:{(steps - i) % 60:02d}, {3 + i % 7}.{i % 10}it/s, "
                     f"loss={1.0 / (1 + i):.4f}]")
    return ("".join(parts) + "\n").encode()


def write_log(path: Path, size: int) -> None:
    info = (b"2026-11-21 21:41:02,287 [train] INFO hpcpipe.steps.train.loop: epoch done, val_smape=0.4123"
            b" samples_per_s=812.5\n")
    with open(path, "wb") as f:
        f.write(b"2026-11-21 21:40:00,001 [train] INFO hpcpipe.jobs.train: step train of run "
                b"bench, job 4242 (restart 0) on n1\n")
        written, epoch = 0, 0
        block = b"".join(progress_line(e) + info for e in range(8))  # ~300 KB, 8 bars
        tail_at = size - 4 * len(block)
        while written < tail_at:
            f.write(block)
            written += len(block)
            epoch += 8
        f.write(b"2026-11-21 23:59:59,999 [train] ERROR hpcpipe.jobs.train: step train failed "
                b"after 8000.1 s\n" + TRACEBACK.encode())
        while written < size:  # the other ranks' bars go on a little after rank 0 died
            f.write(block)
            written += len(block)
        f.write(b"srun: error: n1: task 0: Exited with exit code 1\n")


def make_run(root: Path, log: Path) -> Run:
    run = Run.create(root / "runs", "bench-summarize", "local", root / "logs")
    for step in ("ingest", "features"):
        rec = run.add_job(step, f"L{step}", [], Path("x"))
        rec.update(state="COMPLETED", final=True, exit_code="0:0")
    rec = run.add_job("train", "L4242", [], Path("x"))
    rec.update(state="FAILED", final=True, exit_code="1:0", log=str(log))
    run.save()
    return run


def summarize(run: Run, env: dict[str, str]) -> tuple[float, int, str]:
    """Wall seconds and peak RSS (bytes) of one `hpcpipe summarize` process, and its output."""
    code = ("import resource, sys; from hpcpipe.cli import main\n"
            "try:\n    main()\nfinally:\n"
            "    sys.stderr.write('PEAK_RSS_KB=%d\\n' % resource.getrusage("
            "resource.RUSAGE_SELF).ru_maxrss)\n")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, "summarize", str(run.layout.root)],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"summarize failed:\n{proc.stdout}\n{proc.stderr}")
    peak = int(proc.stderr.rsplit("PEAK_RSS_KB=", 1)[1].split()[0]) * 1024
    return wall, peak, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.0, help="size of the big log")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per log (best is reported)")
    ap.add_argument("--keep", action="store_true", help="keep the run folders")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-summarize-"))
    env = dict(os.environ)
    results = []
    try:
        for size in (int(args.size_gb * 1e8), int(args.size_gb * 1e9)):
            root = work / f"{size}"
            root.mkdir()
            log = root / "train-4242.out"
            t0 = time.perf_counter()
            write_log(log, size)
            print(f"wrote {log.stat().st_size / 1e9:.2f} GB log in {time.perf_counter() - t0:.1f} s",
                  flush=True)
            run = make_run(root, log)
            runs = [summarize(run, env) for _ in range(args.repeat)]
            out = runs[0][2]
            if ("ValueError: batch 8191: feature matrix has 21 columns, expected 22" not in out
                    or "model.py:88 in forward" not in out):
                sys.exit(f"the diagnosis missed the traceback:\n{out}")
            wall = min(r[0] for r in runs)
            peak = max(r[1] for r in runs)
            results.append((log.stat().st_size, wall, peak))
            print(f"  summarize: best {wall:.2f} s of {[round(r[0], 2) for r in runs]}, "
                  f"peak RSS {peak / 2**20:.0f} MiB", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    (small_size, _, small_peak), (size, wall, peak) = results
    print(f"\nmachine: {platform.node()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
          f"load average {os.getloadavg()[0]:.1f}, Python {platform.python_version()}")
    print(f"{size / 1e9:.2f} GB tqdm-heavy log: summarize {wall:.2f} s (target < 10 s), "
          f"peak RSS {peak / 2**20:.0f} MiB; with a {small_size / 1e9:.2f} GB log "
          f"{small_peak / 2**20:.0f} MiB")
    ok = wall < 10 and peak < small_peak + 32 * 2**20
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
