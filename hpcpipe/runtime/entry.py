"""What every job entry point in ``jobs/`` does around its step.

Parse ``--run-dir``, read the run's resolved config, configure logging once, open the metrics file,
run the step, and turn a failure into a logged traceback and exit code 1 (so Slurm marks the job
FAILED and ``afterok`` dependents never start).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpcpipe.config import RunConfig, load_config
from hpcpipe.run.layout import RunLayout
from hpcpipe.run.metrics import MetricsWriter
from hpcpipe.runtime.env import JobEnvironment

StepFn = Callable[[RunLayout, RunConfig, MetricsWriter, JobEnvironment], Any]


def main(step: str, fn: StepFn, argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"jobs/{step}.py", description=f"Run the {step} step.")
    parser.add_argument("--run-dir", required=True, type=Path, help="the run folder runs/<run-id>")
    args = parser.parse_args(argv)
    env = JobEnvironment.from_environ()
    rank = env.global_rank
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [{step}{'' if rank == 0 else f' rank {rank}'}] %(levelname)s "
        "%(name)s: %(message)s",
        stream=sys.stdout,
    )
    log = logging.getLogger(f"hpcpipe.jobs.{step}")
    layout = RunLayout(args.run_dir.resolve())
    cfg = load_config(layout.config)
    metrics = MetricsWriter(layout.metrics, step, job_id=env.job_id)
    if rank == 0:
        log.info("step %s of run %s, job %s (restart %d) on %s", step, layout.run_id,
                 env.job_id or "?", env.restart_count, os.uname().nodename)
    start = time.time()
    try:
        fn(layout, cfg, metrics, env)
    except KeyboardInterrupt:
        log.error("interrupted")
        sys.exit(130)
    except Exception:
        log.exception("step %s failed after %.1f s", step, time.time() - start)
        sys.exit(1)
    if rank == 0:
        log.info("step %s finished in %.1f s", step, time.time() - start)
