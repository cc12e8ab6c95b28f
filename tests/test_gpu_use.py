"""GPU use in summarize: the train job's NVML sampler, its sample files, sacct's GPU fields.

No GPU here: NVML is a stand-in module (``FakeNvml``, named as such) answering what
``nvidia-ml-py`` answers, and the sacct lines carry TRESUsageInAve/Max in Slurm's documented
format (``gres/gpuutil`` in %, ``gres/gpumem`` with a unit), written by hand, not recorded on a
GPU cluster.
"""

from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

from hpcpipe.run import gpu_samples
from hpcpipe.run.folder import Run
from hpcpipe.run.metrics import MetricsWriter
from hpcpipe.scheduler.slurm import parse_gpu_tres, parse_sacct
from hpcpipe.watch.summary import build_report


class FakeNvml(types.ModuleType):
    """A stand-in for ``pynvml`` with two 80 GiB GPUs: GPU 0 busy, GPU 1 idle."""

    def __init__(self) -> None:
        super().__init__("pynvml")
        self.calls = 0
        self.shut = False

    def nvmlInit(self) -> None:  # noqa: N802 - NVML's names
        pass

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.shut = True

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return 4

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:  # noqa: N802
        return i

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:  # noqa: N802
        return int(uuid[-1])

    def nvmlDeviceGetName(self, h: int) -> bytes:  # noqa: N802
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUUID(self, h: int) -> str:  # noqa: N802
        return f"GPU-fake-{h}"

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:  # noqa: N802
        self.calls += 1
        return types.SimpleNamespace(gpu=90 if h == 0 else 0, memory=10)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:  # noqa: N802
        used = (40 if h == 0 else 1) * 2**30
        return types.SimpleNamespace(used=used, total=80 * 2**30, free=80 * 2**30 - used)


def test_the_sampler_appends_whole_lines_per_gpu_of_the_job(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hpcpipe.steps.train import gpu_sampler

    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    for restart in (0, 1):  # a job requeued once appends to the same file
        sampler = gpu_sampler.start(tmp_path, restart, "0,1", interval_s=0.02)
        assert sampler is not None
        time.sleep(0.15)
        gpu_sampler.stop(sampler)
    assert fake.shut
    (path,) = gpu_samples.samples_dir(tmp_path).glob("*.jsonl")
    with open(path, "a") as f:
        f.write('{"time": 1, "gpus": [')  # a torn last line (a crash mid-write) is skipped
    records = gpu_samples.read_samples(tmp_path)
    assert len(records) >= 4 and {r["restart"] for r in records} == {0, 1}
    assert all([g["index"] for g in r["gpus"]] == [0, 1] for r in records), "only the job's GPUs"
    gpus = gpu_samples.summarize(records)
    assert [(g["util_mean"], g["mem_peak"], g["idle"]) for g in gpus] == [
        (90.0, 40 * 2**30, False), (0.0, 2**30, True)]
    assert len(gpu_samples.restart_times(records)) == 1


def test_without_nvml_there_is_no_sampler_and_one_log_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from hpcpipe.steps.train import gpu_sampler

    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    with caplog.at_level("INFO", logger=gpu_sampler.__name__):
        assert gpu_sampler.start(tmp_path, 0, "0") is None
    assert [r.message for r in caplog.records] == [
        "GPU use is not sampled: nvidia-ml-py (pynvml) is not installed"]
    assert not gpu_samples.samples_dir(tmp_path).exists()


SACCT_WITH_GPU = "\n".join([
    "501|COMPLETED|0:0|00:10:00|01:00:00|n1|2026-01-01T00:00:00|2026-01-01T00:00:00|"
    "2026-01-01T00:10:00|None|16|02:00:00||30G||",
    "501.batch|COMPLETED|0:0|00:10:00||n1|2026-01-01T00:00:00|2026-01-01T00:00:00|"
    "2026-01-01T00:10:00||8|00:00:01|10480K||cpu=00:00:01,mem=10480K|cpu=00:00:01,mem=10480K",
    "501.0|COMPLETED|0:0|00:09:58||n1|2026-01-01T00:00:01|2026-01-01T00:00:01|"
    "2026-01-01T00:09:59||16|01:59:00|3000000K||cpu=01:00:00,gres/gpumem=30000M,"
    "gres/gpuutil=71,mem=3000000K|cpu=01:00:00,gres/gpumem=38000M,gres/gpuutil=97,mem=3000000K",
])


def test_sacct_gpu_fields_are_read_where_the_site_records_them() -> None:
    assert parse_gpu_tres("gres/gpuutil=71,mem=1K", "gres/gpumem=2G,gres/gpuutil=97") == {
        "gpu_util_ave": 71.0, "gpu_util_max": 97.0, "gpu_mem_max": float(2 * 2**30)}
    info = parse_sacct(SACCT_WITH_GPU)["501"]
    assert info.extra["gpu_util_ave"] == "71" and info.extra["gpu_util_max"] == "97"
    assert int(info.extra["gpu_mem_max"]) == 38000 * 2**20
    old = "\n".join(line.rsplit("|", 2)[0] for line in SACCT_WITH_GPU.splitlines())
    assert "gpu_util_ave" not in parse_sacct(old)["501"].extra, "a sacct without the fields"


def _train_run(tmp_path: Path) -> Run:
    run = Run.create(tmp_path / "runs", "run-gpu", "slurm", tmp_path / "logs")
    for step in ("ingest", "features", "train"):
        run.add_job(step, "501" if step == "train" else f"1{step}", [], Path("x")).update(
            state="COMPLETED", final=True)
    writer = MetricsWriter(run.layout.metrics, "train", job_id="501")
    for step in (20, 40):
        writer.write("train", epoch=0, global_step=step, loss=0.5, data_wait_frac=0.25)
    run.save()
    return run


def test_summarize_shows_gpu_use_by_source(tmp_path: Path) -> None:
    run = _train_run(tmp_path)
    folder = gpu_samples.samples_dir(run.layout.train)
    folder.mkdir(parents=True)
    lines = []
    for i, restart in enumerate((0, 0, 1, 1)):
        lines.append(json.dumps({"time": 1000.0 + 5 * i, "host": "n1", "restart": restart, "gpus": [
            {"index": 0, "uuid": "GPU-a", "name": "NVIDIA H200", "util_pct": 80.0 + i,
             "mem_used": (50 + i) * 2**30, "mem_total": 141 * 2**30},
            {"index": 1, "uuid": "GPU-b", "name": "NVIDIA H200", "util_pct": 0.0,
             "mem_used": 2**29, "mem_total": 141 * 2**30}]}))
    (folder / "n1.jsonl").write_text("\n".join(lines) + "\n")
    job = run.job("train")
    job.update(final=False)  # as while refresh asks sacct
    assert job.apply(parse_sacct(SACCT_WITH_GPU)["501"])
    run.save()
    report = build_report(run)
    section = report.split("## GPU use", 1)[1].split("\n## ", 1)[0]
    assert "NVML samples of the train job (4 samples, 2 start(s)" in section, section
    assert "| n1:0 (NVIDIA H200) | 4 | 82% | 53.0 GB of 141.0 GB | no |" in section, section
    assert "| n1:1 (NVIDIA H200) | 4 | 0% | 512.0 MB of 141.0 GB | yes |" in section, section
    assert "Idle GPUs (mean utilisation under 5%): n1:1." in section
    assert "waited for data 25% of its time" in section
    assert "Slurm accounting (sacct gres/gpuutil, gres/gpumem" in section
    assert "mean utilisation 71%, peak utilisation 97%, peak memory 37.1 GB" in section


def test_summarize_without_gpu_records_says_so_in_one_line(tmp_path: Path) -> None:
    report = build_report(_train_run(tmp_path))
    assert "## GPU use" not in report
    (line,) = [x for x in report.splitlines() if x.startswith("GPU use")]
    assert "none recorded" in line and "waited for data 25%" in line


def test_the_plot_draws_gpu_use_with_requeue_boundaries(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from hpcpipe.watch.plot import write_plot

    run = _train_run(tmp_path)
    folder = gpu_samples.samples_dir(run.layout.train)
    folder.mkdir(parents=True)
    (folder / "n1.jsonl").write_text("".join(json.dumps(
        {"time": 1000.0 + i, "host": "n1", "restart": i // 2,
         "gpus": [{"index": 0, "util_pct": 50.0, "mem_used": 2**30}]}) + "\n" for i in range(4)))
    out = write_plot(run)
    assert out.stat().st_size > 10_000
