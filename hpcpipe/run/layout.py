"""Where everything of a run lives. One place, so jobs, CLI and tests agree on the paths."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    """Paths inside a run folder ``runs/<run-id>/`` (all absolute)."""

    root: Path

    @property
    def run_id(self) -> str:
        return self.root.name

    def job_name(self, step: str) -> str:
        """The scheduler's name for a job of ``step``: it carries the run id, so a job queued by
        a submit that died before recording it can still be found."""
        return f"{step}.{self.run_id}"

    @property
    def config(self) -> Path:  # resolved config, YAML
        return self.root / "config.yaml"

    @property
    def state(self) -> Path:  # job ids and states per step, JSON
        return self.root / "state.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def metrics(self) -> Path:  # JSON lines appended by every job
        return self.root / "metrics.jsonl"

    @property
    def scripts(self) -> Path:  # rendered sbatch scripts
        return self.root / "sbatch"

    @property
    def raw(self) -> Path:  # synthetic input, when no input is configured
        return self.root / "raw"

    @property
    def ingest(self) -> Path:  # reviews/ (bucketed parquet), products.parquet, quarantine, manifest
        return self.root / "ingest"

    @property
    def features(self) -> Path:  # bucketed parquet of weekly features, manifest
        return self.root / "features"

    @property
    def train(self) -> Path:  # checkpoints/, token cache, normalization statistics
        return self.root / "train"

    @property
    def checkpoints(self) -> Path:  # last.pt, best.pt (hpcpipe.steps.train.checkpoint)
        return self.train / "checkpoints"

    @property
    def requeue_request(self) -> Path:  # the id of a train job whose ranks asked for a requeue
        return self.train / "requeue-request"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.parquet"

    @property
    def summary(self) -> Path:
        return self.root / "summary.md"
