"""Faults of the train step under real use (issue #11): a stop signal with the shipped loader
workers on, a diverging model, a tampered checkpoint, predictions that say which week they are
for, and a checkpoint computed from other data or settings.

Real torch, real DataLoader worker processes, real signals to the process group (as the local
runner's cancel and Slurm send them); the data set and tiny model are those of test_train.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from test_plan import MemoryBackend, _new_run
from test_train import (  # noqa: F401 (no_slurm_env is an autouse fixture)
    assert_same_weights,
    final_weights,
    make_features,
    new_run,
    no_slurm_env,
    subprocess_env,
    train_losses,
)

from hpcpipe import faulthooks
from hpcpipe.config import RunConfig, from_dict
from hpcpipe.control import pipeline
from hpcpipe.errors import InputError, RunError
from hpcpipe.run.layout import RunLayout
from hpcpipe.run.metrics import MetricsWriter
from hpcpipe.steps.train import checkpoint, predict
from hpcpipe.steps.train import run as train_run
from hpcpipe.steps.train.stop import CheckpointMismatchError, DivergedError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dataset") / "run"
    make_features(root)
    return root


def strict_records(path: Path) -> list[dict]:
    """Every line of a metrics file, parsed as JSON proper: bare NaN/Infinity are errors."""

    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


#: The train job with loader workers that die of SIGTERM, as torch's own would: the hook
#: unblocks the signal the workers are born blocking and restores its default action. A worker
#: imports it by name (it is pickled by reference), so it lives in a module on PYTHONPATH.
WORKERS_DIE_OF_SIGTERM = """
import runpy, sys
import hpcpipe.steps.train.loaders as loaders
import workers_die
loaders.ignore_stop_signals = workers_die.die_of_sigterm
sys.argv = ["train.py", "--run-dir", sys.argv[1]]
runpy.run_module("hpcpipe.jobs.train", run_name="__main__")
"""
WORKERS_DIE_MODULE = """
import signal


def die_of_sigterm(worker_id):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
"""


def start_job(run_dir: Path, env: dict[str, str] | None = None,
              workers_die: bool = False) -> subprocess.Popen:
    """The train job as the local runner starts it: in a process group of its own."""
    how = ["-m", "hpcpipe.jobs.train", "--run-dir"]
    env = {**subprocess_env(), **(env or {})}
    if workers_die:
        hooks = Path(run_dir).parent / "hooks"
        hooks.mkdir(exist_ok=True)
        (hooks / "workers_die.py").write_text(WORKERS_DIE_MODULE)
        how = ["-c", WORKERS_DIE_OF_SIGTERM]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hooks), env.get("PYTHONPATH")]))
    return subprocess.Popen([sys.executable, "-u", *how, str(run_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)


def finish_job(layout: RunLayout) -> None:
    """Run the train job to its end (resuming from a checkpoint if there is one)."""
    proc = start_job(layout.root)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]


# ---------------------------------------------------------------------------------------------
# 1. SIGTERM with loader workers on


@pytest.mark.parametrize(("workers", "workers_die"), [(1, False), (4, False), (1, True)],
                         ids=["local.yaml", "default.yaml", "a-worker-dies-anyway"])
def test_sigterm_to_the_process_group_with_loader_workers_checkpoints_and_resumes(
        dataset: Path, tiny_model: Path, tmp_path: Path, workers: int, workers_die: bool) -> None:
    """`hpcpipe cancel` (killpg) and scancel signal every process of the job, the loader's
    workers included: the rank must still checkpoint, and a rerun end where an uninterrupted
    run ends. The workers ignore the signal; one that dies of it all the same (it was still
    starting) is a stop, not a crash."""
    settings = {"num_workers": workers, "epochs": 2, "max_steps_per_epoch": 40,
                "freeze_encoder": True}
    # Every part runs as the job does, in a process of its own: in-process training after other
    # tests can differ in the last digits (process-wide torch settings), which grows over steps.
    whole, cfg = new_run(dataset, tmp_path / "whole", tiny_model, **settings)
    finish_job(whole)

    layout, cfg = new_run(dataset, tmp_path / "run", tiny_model, **settings)
    proc = start_job(layout.root, {faulthooks.STEP_DELAY_ENV: "0.05"}, workers_die)
    try:
        deadline = time.monotonic() + 90
        while len(train_losses(layout)) < 5:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "killed by signal" not in out and "exited unexpectedly" not in out, out[-3000:]
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    state = checkpoint.load(checkpoint.last_path(layout.train))
    assert state is not None and 0 < state["global_step"] < 80, "stopped mid-training"
    assert (f"stopped by SIGTERM at epoch {state['epoch']} step {state['step_in_epoch']};"
            in out), out[-3000:]

    finish_job(layout)
    assert_same_weights(final_weights(layout), final_weights(whole))
    ref = train_losses(whole)
    assert train_losses(layout) == pytest.approx(ref, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# 2. Divergence is a failure, never a score


@pytest.mark.filterwarnings("error")
def test_smape_never_counts_nan_as_perfect() -> None:
    assert math.isnan(predict.smape(np.array([np.nan, 1.0]), np.array([0.0, 1.0])))
    assert math.isnan(predict.smape(np.array([np.inf, 1.0]), np.array([3.0, 1.0])))
    assert predict.smape(np.array([0.0, 1.0]), np.array([0.0, 1.0])) == 0.0


def test_metrics_file_is_valid_json_with_non_finite_values(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path / "metrics.jsonl", "train")
    record = writer.write("eval", loss=float("nan"), val=np.float64("inf"),
                          nested={"x": [1.0, -math.inf]}, ok=np.float32(0.5))
    (line,) = strict_records(tmp_path / "metrics.jsonl")
    assert line["loss"] is None and line["val"] is None and line["nested"] == {"x": [1.0, None]}
    assert line["ok"] == 0.5 and record["loss"] is None


def test_a_diverging_loss_fails_the_job_saying_where_and_what_to_try(
        dataset: Path, tiny_model: Path, tmp_path: Path) -> None:
    layout, _ = new_run(dataset, tmp_path / "run", tiny_model, lr=1e10, epochs=2,
                        max_steps_per_epoch=40, freeze_encoder=True, num_workers=1)
    proc = subprocess.run([sys.executable, "-u", "-m", "hpcpipe.jobs.train", "--run-dir",
                           str(layout.root)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "DivergedError" in out and "loss is nan at epoch 0 step 2" in out, out[-3000:]
    assert "train.lr" in out and "fp32" in out and "grad_clip" in out, out[-3000:]
    assert not checkpoint.best_path(layout.train).exists(), "no best.pt from a diverged model"
    assert not layout.predictions.exists()
    records = strict_records(layout.metrics)
    assert not [r for r in records if r["kind"] in ("eval", "summary")], records[-3:]
    assert all(r["loss"] is not None for r in records if r["kind"] == "train")


def test_a_non_finite_validation_score_fails_the_step(dataset: Path, tiny_model: Path,
                                                      tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    layout, cfg = new_run(dataset, tmp_path / "run", tiny_model, epochs=1,
                          max_steps_per_epoch=5, freeze_encoder=True)
    real = predict.predict_log

    def nan_forecasts(*args: object, **kwargs: object) -> tuple[np.ndarray, np.ndarray]:
        rows, out = real(*args, **kwargs)
        return rows, np.full_like(out, np.nan)

    monkeypatch.setattr(predict, "predict_log", nan_forecasts)
    with pytest.raises(DivergedError, match=r"validation .* not finite at epoch 0"):
        train_run(layout, cfg, MetricsWriter(layout.metrics, "train"))
    assert not checkpoint.best_path(layout.train).exists()
    assert not [r for r in strict_records(layout.metrics) if r["kind"] == "eval"]


# ---------------------------------------------------------------------------------------------
# 9. Checkpoints load without running code


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(dataset: Path, tiny_model: Path,
                                                     tmp_path: Path) -> None:
    layout, cfg = new_run(dataset, tmp_path / "run", tiny_model, epochs=1,
                          max_steps_per_epoch=3, freeze_encoder=True)
    train_run(layout, cfg, MetricsWriter(layout.metrics, "train"))
    marker = tmp_path / "pwned"
    for which in ("best", "last"):
        path = checkpoint.checkpoint_dir(layout.train) / f"{which}.pt"
        state = torch.load(path, weights_only=True)  # what hpcpipe writes loads safely
        torch.save({**state, "extra": Payload(marker)}, path)
    with pytest.raises(InputError, match=r"best\.pt.*refused.*tampered"):
        predict.predict(layout, cfg)
    with pytest.raises(InputError, match=r"last\.pt.*refused.*tampered"):
        train_run(layout, cfg, MetricsWriter(layout.metrics, "train"))
    assert not marker.exists(), "the checkpoint's payload ran"


# ---------------------------------------------------------------------------------------------
# 11. Predictions say which week they are for


def test_predictions_are_for_the_week_after_the_data_and_say_so(dataset: Path, tiny_model: Path,
                                                                tmp_path: Path) -> None:
    layout, cfg = new_run(dataset, tmp_path / "run", tiny_model, epochs=1,
                          max_steps_per_epoch=5, freeze_encoder=True)
    train_run(layout, cfg, MetricsWriter(layout.metrics, "train"))
    frame = pd.concat(pd.read_parquet(p) for p in layout.features.glob("bucket=*/*.parquet"))
    last = frame.week.max()
    in_last_week = set(frame.parent_asin[frame.week == last])
    assert len(in_last_week) < frame.parent_asin.nunique(), "the data must have stale products"

    pred = pd.read_parquet(layout.predictions)
    assert list(pred.columns) == ["parent_asin", "week", "forecast_week", "predicted_next_n"]
    assert set(pred.parent_asin) == in_last_week and pred.parent_asin.is_unique
    assert (pred.week == last).all()
    assert (pd.to_datetime(pred.forecast_week) == pd.to_datetime(last) + pd.Timedelta(weeks=1)).all()
    meta = json.loads(pq.read_schema(layout.predictions).metadata[b"hpcpipe"])
    assert meta["forecast_week"] == str((pd.to_datetime(last) + pd.Timedelta(weeks=1)).date())
    assert meta["based_on_week"] == str(pd.to_datetime(last).date())
    assert meta["products_forecast"] == len(in_last_week)
    assert meta["products_left_out"] == frame.parent_asin.nunique() - len(in_last_week)
    assert "no reviews in" in meta["note"]


# ---------------------------------------------------------------------------------------------
# 3. A checkpoint of other data or settings is not silently continued; --fresh starts over


def test_resume_from_other_settings_or_data_is_refused_saying_what_changed(
        tiny_model: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    make_features(data_dir)
    layout, cfg = new_run(data_dir, tmp_path / "run", tiny_model, epochs=1,
                          max_steps_per_epoch=5, freeze_encoder=True)
    train_run(layout, cfg, MetricsWriter(layout.metrics, "train"))
    before = checkpoint.last_path(layout.train).read_bytes()

    other = from_dict({"train": {**cfg.to_dict()["train"], "lr": 0.1}})
    with pytest.raises(CheckpointMismatchError, match=r"train\.lr 0\.002 -> 0\.1") as err:
        train_run(layout, other, MetricsWriter(layout.metrics, "train"))
    assert "hpcpipe rerun train --fresh" in str(err.value)

    # Other feature data under the same run (features recomputed from other input).
    shutil.rmtree(data_dir / "features")
    make_features(tmp_path / "data2", seed=3)
    shutil.copytree(tmp_path / "data2" / "features", data_dir / "features")
    with pytest.raises(CheckpointMismatchError, match="feature data"):
        train_run(layout, cfg, MetricsWriter(layout.metrics, "train"))
    assert checkpoint.last_path(layout.train).read_bytes() == before, "nothing overwritten"


def test_rerun_train_fresh_moves_the_checkpoints_aside(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    run = _new_run(tmp_path)
    backend = MemoryBackend()
    monkeypatch.setattr(pipeline, "get_backend", lambda name, root: backend)
    monkeypatch.setattr("hpcpipe.watch.refresh.get_backend", lambda name, root: backend)
    pipeline.write_config(RunConfig(), run.layout)
    for step in ("ingest", "features"):
        (run.layout.root / step).mkdir()
    ckpt = checkpoint.checkpoint_dir(run.layout.train)
    ckpt.mkdir(parents=True)
    (ckpt / "last.pt").write_bytes(b"old last")
    (ckpt / "best.pt").write_bytes(b"old best")

    with pytest.raises(RunError, match="--fresh"):
        pipeline.rerun(run, "features", downstream=False, cancel_first=False, overrides=[],
                       echo=lambda s: None, fresh=True)
    assert (ckpt / "last.pt").exists()

    said: list[str] = []
    new = pipeline.rerun(run, "train", downstream=False, cancel_first=False, overrides=[],
                         echo=said.append, fresh=True)
    assert list(new) == ["train"]
    assert not ckpt.exists()
    (aside,) = [p for p in run.layout.train.iterdir() if p.name.startswith("checkpoints.")]
    assert (aside / "last.pt").read_bytes() == b"old last"
    assert (aside / "best.pt").read_bytes() == b"old best"
    assert any(str(aside) in s for s in said)
    assert any("moved aside" in e["text"] for e in run.state.events)


def test_rerun_help_documents_fresh_and_the_refusal() -> None:
    from click.testing import CliRunner

    from hpcpipe.cli import main

    text = CliRunner().invoke(main, ["rerun", "--help"]).output
    assert "--fresh" in text and "moved aside" in " ".join(text.split())
    assert "other data or settings" in " ".join(text.split())
