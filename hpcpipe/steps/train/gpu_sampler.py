"""GPU use over time, sampled in the train job: one thread per node (on its local rank 0).

Every ``interval_s`` the thread asks NVML (the ``nvidia-ml-py`` package, imported only here and
only when a rank trains on a GPU) for each of the job's GPUs on the node: utilisation (% of time
a kernel ran) and memory in use. It appends one JSON line per sample to
``train/gpu/<host>.jsonl``: one writer per file, a whole line per ``write`` on a file opened for
appending, so a crash leaves at most a torn last line (readers skip it) and a requeued job
appends to the same file with its restart count, which marks the requeue boundaries.

Where NVML is absent or finds no driver, there is no sampler: one log line says so, and
``hpcpipe summarize`` says the run has no GPU samples.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from hpcpipe.run.gpu_samples import samples_dir

log = logging.getLogger(__name__)

def _visible(nvml: Any, visible: str | None) -> list[Any]:
    """NVML handles of the GPUs ``CUDA_VISIBLE_DEVICES`` names (indices or UUIDs); all the
    node's GPUs where it is unset."""
    count = nvml.nvmlDeviceGetCount()
    if not visible:
        return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    handles = []
    for item in (v.strip() for v in visible.split(",") if v.strip()):
        if item.isdigit() and int(item) < count:
            handles.append(nvml.nvmlDeviceGetHandleByIndex(int(item)))
        elif item.startswith(("GPU-", "MIG-")):
            handles.append(nvml.nvmlDeviceGetHandleByUUID(item))
    return handles


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Sampler:
    """The sampling thread of one node; :meth:`stop` ends it (and is safe to call twice)."""

    def __init__(self, nvml: Any, handles: list[Any], path: Path, restart: int,
                 interval_s: float) -> None:
        self.nvml, self.handles, self.path = nvml, handles, path
        self.restart, self.interval_s = restart, interval_s
        self.names = [_text(nvml.nvmlDeviceGetName(h)) for h in handles]
        self.uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in handles]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)

    def start(self) -> Sampler:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def sample(self) -> dict[str, Any]:
        gpus = []
        for i, h in enumerate(self.handles):
            util = self.nvml.nvmlDeviceGetUtilizationRates(h)
            mem = self.nvml.nvmlDeviceGetMemoryInfo(h)
            gpus.append({"index": i, "uuid": self.uuids[i], "name": self.names[i],
                         "util_pct": float(util.gpu), "mem_used": int(mem.used),
                         "mem_total": int(mem.total)})
        return {"time": time.time(), "host": socket.gethostname(), "restart": self.restart,
                "gpus": gpus}

    def write(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write of a whole line: appended whole or not at all
        finally:
            os.close(fd)

    def _run(self) -> None:
        while True:
            try:
                self.write(self.sample())
            except Exception as exc:  # noqa: BLE001 - monitoring must never end training
                log.warning("GPU sampling stopped: %s", exc)
                return
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.interval_s + 1)
        try:
            self.nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001, S110 - already shut down
            pass


def start(train_dir: Path, restart: int, visible: str | None,
          interval_s: float = 5.0) -> Sampler | None:
    """Start sampling this node's GPUs into ``train/gpu/<host>.jsonl``; None (with one log line)
    where NVML is not installed or finds no GPU."""
    try:
        import pynvml as nvml  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        log.info("GPU use is not sampled: nvidia-ml-py (pynvml) is not installed")
        return None
    try:
        nvml.nvmlInit()
        handles = _visible(nvml, visible)
    except Exception as exc:  # noqa: BLE001 - NVMLError and its many subclasses
        log.info("GPU use is not sampled: NVML did not start (%s)", exc)
        return None
    if not handles:
        log.info("GPU use is not sampled: NVML finds none of the GPUs %s", visible)
        nvml.nvmlShutdown()
        return None
    path = samples_dir(train_dir) / f"{socket.gethostname()}.jsonl"
    sampler = Sampler(nvml, handles, path, restart, interval_s)
    log.info("sampling %d GPU(s) (%s) every %.0f s into %s", len(handles),
             ", ".join(sampler.names), interval_s, path)
    return sampler.start()


def stop(sampler: Sampler | None) -> None:
    if sampler is not None:
        sampler.stop()
