"""The embedded default: `hpcpipe submit --local` runs the three steps on this machine."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
from hpcli import job_problems

SMALL = [
    "--set", "data.synth_reviews=15000", "--set", "ingest.target_bucket_rows=5000",
    "--set", "train.epochs=1", "--set", "train.batch_size=32", "--set", "train.max_length=32",
    "--set", "train.num_workers=0", "--set", "train.max_steps_per_epoch=15",
    "--set", "train.val_weeks=4",
]


def hp(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["hpcpipe", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "HPCPIPE_RUNS_DIR": str(cwd / "runs")})


def test_local_submit_runs_every_step_and_status_logs_summarize_work(tmp_path: Path) -> None:
    proc = hp(tmp_path, "submit", "--local", "--wait", *SMALL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = next((tmp_path / "runs").iterdir())
    status = json.loads(hp(tmp_path, "status", "--json").stdout)
    assert [(r["step"], r["state"]) for r in status["steps"]] == [
        ("ingest", "COMPLETED"), ("features", "COMPLETED"), ("train", "COMPLETED")]
    # the synthetic sample, the ingested buckets, the features and the predictions are real
    manifest = json.loads((run_dir / "ingest" / "manifest.json").read_text())
    assert manifest["rows_in"] == 15000
    assert manifest["rows_in"] == manifest["rows_out"] + manifest["quarantined"] + \
        manifest["duplicates"]
    feats = pd.concat(pd.read_parquet(p) for p in sorted((run_dir / "features").glob("bucket=*/*.parquet")))
    assert len(feats) > 0 and feats["n_reviews"].sum() == manifest["rows_out"]
    preds = pd.read_parquet(run_dir / "predictions.parquet")
    # one forecast per product with reviews in the data's last week, for the week after it
    last = feats["week"].max()
    assert set(preds["parent_asin"]) == set(feats.loc[feats["week"] == last, "parent_asin"])
    assert preds["parent_asin"].is_unique
    assert (pd.to_datetime(preds["forecast_week"]) == pd.Timestamp(last) + pd.Timedelta(days=7)).all()
    assert "finished" in hp(tmp_path, "logs", "features").stdout
    report = hp(tmp_path, "summarize").stdout
    assert "| train |" in report and "COMPLETED" in report and not job_problems(report), report
    assert "| train |" in (run_dir / "summary.md").read_text()


def test_rerun_of_a_completed_step_reuses_its_output(tmp_path: Path) -> None:
    proc = hp(tmp_path, "submit", "--local", "--wait", "--steps", "ingest,features", *SMALL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = hp(tmp_path, "rerun", "features")
    assert out.returncode == 0, out.stderr
    wait = subprocess.run(["hpcpipe", "status", "--watch", "--interval", "2"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HPCPIPE_RUNS_DIR": str(tmp_path / "runs")})
    assert wait.returncode == 0
    rows = json.loads(hp(tmp_path, "status", "--json").stdout)["steps"]
    features = [r for r in rows if r["step"] == "features"][0]
    assert features["state"] == "COMPLETED" and len(features["earlier"]) == 1
    log = hp(tmp_path, "logs", "features").stdout
    assert "already" in log.lower()
