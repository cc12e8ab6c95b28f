"""The train job's GPU samples (written by ``hpcpipe.steps.train.gpu_sampler``): where they lie
in the run folder, and what summarize and the plot read from them. Cheap: no torch, no NVML."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: The folder of the sample files, under the run's ``train/``.
SAMPLES = "gpu"


def samples_dir(train_dir: Path) -> Path:
    return Path(train_dir) / SAMPLES


def read_samples(train_dir: Path) -> list[dict[str, Any]]:
    """Every whole sample line of every node, oldest first (a torn last line is skipped)."""
    out: list[dict[str, Any]] = []
    folder = samples_dir(train_dir)
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("gpus"), list):
                out.append(record)
    return sorted(out, key=lambda r: r.get("time", 0))


def summarize(records: list[dict[str, Any]], idle_pct: float = 5.0) -> list[dict[str, Any]]:
    """Per GPU (host, UUID): samples, mean utilisation, peak memory, whether it sat idle (mean
    utilisation under ``idle_pct``), its name and total memory; in host then index order."""
    per: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        for g in r["gpus"]:
            key = (str(r.get("host", "?")), str(g.get("uuid", g.get("index"))))
            acc = per.setdefault(key, {"host": key[0], "index": g.get("index"),
                                       "name": g.get("name", "?"), "samples": 0, "util_sum": 0.0,
                                       "mem_peak": 0, "mem_total": g.get("mem_total", 0)})
            acc["samples"] += 1
            acc["util_sum"] += float(g.get("util_pct", 0.0))
            acc["mem_peak"] = max(acc["mem_peak"], int(g.get("mem_used", 0)))
    out = []
    for acc in sorted(per.values(), key=lambda a: (a["host"], a["index"])):
        mean = acc.pop("util_sum") / acc["samples"]
        out.append({**acc, "util_mean": mean, "idle": mean < idle_pct})
    return out


def restart_times(records: list[dict[str, Any]]) -> list[float]:
    """When each requeued start began sampling (the first sample of each new restart count)."""
    seen: set[Any] = set()
    times = []
    for r in records:
        restart = r.get("restart", 0)
        if restart not in seen:
            seen.add(restart)
            if len(seen) > 1:
                times.append(float(r["time"]))
    return times


def iter_gpu_series(records: list[dict[str, Any]]) -> Iterator[tuple[str, list[float],
                                                                     list[float], list[float]]]:
    """(label, times, utilisation %, memory GiB) per GPU, for the plot."""
    series: dict[str, tuple[list[float], list[float], list[float]]] = {}
    for r in records:
        for g in r["gpus"]:
            label = f"{r.get('host', '?')}:{g.get('index')}"
            t, u, m = series.setdefault(label, ([], [], []))
            t.append(float(r["time"]))
            u.append(float(g.get("util_pct", 0.0)))
            m.append(int(g.get("mem_used", 0)) / 2**30)
    for label, (t, u, m) in sorted(series.items()):
        yield label, t, u, m
