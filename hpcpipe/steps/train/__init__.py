"""The train step: a text + numeric-features forecaster trained with torch DDP.

``run(layout, cfg, metrics)`` is the step's entry point (once per rank, see ``loop.py``);
``hpcpipe.steps.train.predict.predict(layout, cfg)`` writes predictions from a finished run. torch and
transformers are imported only when one of them is called, so importing this package is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hpcpipe.config import RunConfig
    from hpcpipe.run.layout import RunLayout
    from hpcpipe.run.metrics import MetricsWriter
    from hpcpipe.runtime.env import JobEnvironment

__all__ = ["run"]


def run(layout: RunLayout, cfg: RunConfig, metrics: MetricsWriter,
        env: JobEnvironment | None = None) -> dict[str, Any] | None:
    """Train on the run's features (resuming if a checkpoint exists) and write predictions."""
    from hpcpipe.steps.train.loop import run as run_training

    return run_training(layout, cfg, metrics)
