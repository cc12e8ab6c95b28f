"""Entry of the train step inside its allocation: `python -m hpcpipe.jobs.train --run-dir DIR`."""

from hpcpipe.steps.train.stop import SIGNALS

# First, before torch is imported: Slurm's USR2 may arrive while the job is still starting.
SIGNALS.install()

import sys  # noqa: E402

from hpcpipe.config import RunConfig  # noqa: E402
from hpcpipe.run.layout import RunLayout  # noqa: E402
from hpcpipe.run.metrics import MetricsWriter  # noqa: E402
from hpcpipe.runtime.entry import main  # noqa: E402
from hpcpipe.runtime.env import JobEnvironment  # noqa: E402
from hpcpipe.steps import train  # noqa: E402


def train_job(layout: RunLayout, cfg: RunConfig, metrics: MetricsWriter,
              env: JobEnvironment) -> None:
    """Train; a job stopped by a signal exits here with the code ``run_job`` chose (0 after a
    requeue), so the entry does not report the step as finished."""
    code = train.run_job(layout, cfg, metrics, env)
    if code is not None:
        sys.exit(code)


if __name__ == "__main__":
    try:
        main("train", train_job)
    finally:
        # The step is over (done, failed or requeued): a warning now must not kill the process
        # while it exits, which would turn a finished job into one killed by a signal.
        SIGNALS.ignore_warnings()
