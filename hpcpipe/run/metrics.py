"""The JSON-lines metrics file every job appends to.

Numbers a program reads (rows/s, loss, timings) go here, one JSON object per line, so that
``hpcpipe summarize`` never scrapes a progress bar. Each line carries the step, the job id and a
``kind`` (e.g. "summary", "train", "eval").

Every line is JSON proper, which has no NaN or Infinity: a value that is not a finite number is
written as ``null`` (Python's json would write a bare ``NaN`` that strict readers refuse).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Append-only writer of ``<run>/metrics.jsonl``; one ``write`` is one line, flushed at once."""

    def __init__(self, path: Path, step: str, job_id: str | None = None) -> None:
        self.path = Path(path)
        self.step = step
        self.job_id = job_id  # the entry passes JobEnvironment.job_id
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, kind: str, **values: Any) -> dict[str, Any]:
        clash = {"time", "step", "job_id", "kind"} & set(values)
        if clash:
            raise ValueError(f"metrics fields {sorted(clash)} are reserved; use another name")
        record = _finite({"time": round(time.time(), 3), "step": self.step,
                          "job_id": self.job_id, "kind": kind, **values})
        line = json.dumps(record, default=_default, sort_keys=False, allow_nan=False) + "\n"
        # One write() of a short line in append mode lands whole even with several writers.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
        return record


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float (numpy's too) replaced by None, in dicts and lists."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy/torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics file; a torn last line (job killed mid-write) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
