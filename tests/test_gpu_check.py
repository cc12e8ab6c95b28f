"""bench/gpu_check.sh, the prepared GPU check, in its --cpu mode: every part that can run without
a GPU runs (the encoder built locally, the throughput benchmark with its real-loop case, the
pipeline on a synthetic sample, the real train job in two precisions, the resume across
precisions, the figures), tiny. The GPU figures themselves need a GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from test_train import subprocess_env

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_every_part_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = {**subprocess_env(), "PYTHONPATH": str(REPO)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu", str(out)],
                          capture_output=True, text=True, env=env, timeout=1200, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    for name in ("env.json", "bench_train.json", "resume.json", "figures.md", "figures.json",
                 "model/config.json", "train-fp32/predictions.parquet", "train-fp16/metrics.jsonl"):
        assert (out / name).exists(), (name, os.listdir(out))
    bench = json.loads((out / "bench_train.json").read_text())
    assert all(r["loop_samples_per_s"] > 0 for r in bench["train"])
    resume = json.loads((out / "resume.json").read_text())
    assert resume["ok"] and [leg["precision"] for leg in resume["legs"]] == ["fp32", "fp16",
                                                                             "fp32"]
    steps = [leg["saved_step"] for leg in resume["legs"]]
    assert steps == sorted(steps) and len(set(steps)) == 3, resume
    figures = (out / "figures.md").read_text()
    assert "Throughput benchmark" in figures and "| train-fp16 | fp16 | 3 |" in figures, figures
