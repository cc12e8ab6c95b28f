"""Test hooks for the fault-injection tests, off by default; never set them outside tests.

Each is an environment variable holding seconds to wait at a point where a real fault can hit,
so that a test on a small data set can land a cancel, a kill -9 or a time limit there. Jobs
inherit them from the ``hpcpipe submit`` that queued them (sbatch exports the environment),
Dask workers from their job.
"""

from __future__ import annotations

import os

#: Every features bucket waits this long between writing its temporary file and renaming it.
BUCKET_DELAY_ENV = "HPCPIPE_FAULT_BUCKET_DELAY_S"
#: Every rank waits this long after each optimizer step (a short training run lasts longer).
STEP_DELAY_ENV = "HPCPIPE_FAULT_STEP_DELAY_S"
#: submit/rerun wait this long between the scheduler's answer to a submission and recording it.
AFTER_SUBMIT_DELAY_ENV = "HPCPIPE_FAULT_AFTER_SUBMIT_S"


def delay_s(name: str) -> float:
    """Seconds in the hook variable ``name``: 0 when unset, negative or not a number."""
    try:
        return max(0.0, float(os.environ.get(name, "") or 0))
    except ValueError:
        return 0.0
