"""Entry of the train step inside its allocation: `python -m hpcpipe.jobs.train --run-dir DIR`."""

from hpcpipe.steps.train.stop import SIGNALS

# First, before torch is imported: Slurm's USR2 may arrive while the job is still starting.
SIGNALS.install()

from hpcpipe.runtime.entry import main  # noqa: E402
from hpcpipe.steps import train  # noqa: E402

if __name__ == "__main__":
    try:
        main("train", train.run)
    finally:
        # The step is over (done, failed or requeued): a warning now must not kill the process
        # while it exits, which would turn a finished job into one killed by a signal.
        SIGNALS.ignore_warnings()
