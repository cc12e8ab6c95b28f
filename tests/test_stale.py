"""Stale outputs: every step records what it was computed from, a rerun recomputes what is stale,
and `hpcpipe status` says which steps are out of date (issue #11, class 3).

The end-to-end case is the one a user met: `rerun ingest --set data.reviews=[other file]`, then
`rerun features`, which used to say "already complete" and keep the old data's features. Since
then `rerun ingest` also resubmits the completed steps after it (they end at once if their input
did not change); with --no-downstream the stale features stay, and status says so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
from hpcli import hp, steps, wait_for

from hpcpipe.config import DataConfig
from hpcpipe.steps.ingest import synthesize_once
from hpcpipe.steps.synth import write_synthetic

SMALL = ["--set", "ingest.target_bucket_rows=1000", "--set", "features.cpus=2"]


def _data(folder: Path, reviews: int, seed: int) -> list[str]:
    made = write_synthetic(folder, reviews, seed=seed)
    return ["--set", f"data.reviews=[{made['reviews']}]", "--set", f"data.metadata={made['metadata']}"]


def _features(run_dir: Path) -> pd.DataFrame:
    parts = sorted((run_dir / "features").glob("bucket=*/part-0.parquet"))
    return pd.concat(pd.read_parquet(p) for p in parts).sort_values(
        ["parent_asin", "week"], ignore_index=True)


def _completed(step: str, not_job: str | None = None):
    return lambda rows: (rows[step]["state"] == "COMPLETED"
                         and rows[step]["job_id"] != not_job)


def test_rerun_ingest_on_other_data_makes_features_out_of_date_and_rerun_recomputes(
        tmp_path: Path) -> None:
    first = _data(tmp_path / "a", 3000, seed=1)
    other = _data(tmp_path / "b", 4000, seed=2)
    work, clean = tmp_path / "work", tmp_path / "clean"
    work.mkdir()
    clean.mkdir()
    hp(work, "submit", "--local", "--wait", "--steps", "ingest,features", *SMALL, *first,
       timeout=300)
    run_dir = next((work / "runs").iterdir())
    assert "out of date" not in hp(work, "status").stdout
    on_first = _features(run_dir)

    ingest_job = steps(work)["ingest"]["job_id"]
    # --no-downstream: features is left as it was, on the first data, and status says so
    hp(work, "rerun", "ingest", "--no-downstream", *other)
    wait_for(work, _completed("ingest", ingest_job), 240, "the ingest rerun")
    manifest = json.loads((run_dir / "ingest" / "manifest.json").read_text())
    assert manifest["rows_in"] == 4000
    table = hp(work, "status").stdout
    row = steps(work)["features"]
    features_job = row["job_id"]

    hp(work, "rerun", "features")
    wait_for(work, _completed("features", features_job), 240, "the features rerun")
    log = hp(work, "logs", "features").stdout
    after = hp(work, "status").stdout

    hp(clean, "submit", "--local", "--wait", "--steps", "ingest,features", *SMALL, *other,
       timeout=300)
    pd.testing.assert_frame_equal(_features(run_dir), _features(next((clean / "runs").iterdir())))
    assert "already complete" not in log
    assert "ingest output changed since features ran" in log, log[-3000:]
    assert row["out_of_date"] == "out of date: ingest ran again since", row
    assert "out of date: ingest ran again since" in table, table
    assert "out of date" not in after, after

    # The default (--downstream): back to the first data, and features follows by itself.
    ingest_job, features_job = steps(work)["ingest"]["job_id"], steps(work)["features"]["job_id"]
    out = hp(work, "rerun", "ingest", *first).stdout
    assert "features: COMPLETED before" in out and "resubmitted behind ingest" in out, out
    wait_for(work, _completed("features", features_job), 240, "features behind the rerun")
    redone = json.loads((run_dir / "ingest" / "manifest.json").read_text())
    assert redone["rows_in"] == 3000
    pd.testing.assert_frame_equal(_features(run_dir), on_first)
    assert "out of date" not in hp(work, "status").stdout


def test_synthetic_input_is_made_again_when_its_request_changes(tmp_path: Path, caplog) -> None:
    data = DataConfig(synth_reviews=500, seed=0)
    made = synthesize_once(tmp_path, data)
    with caplog.at_level(logging.INFO, logger="hpcpipe"):
        assert synthesize_once(tmp_path, data) == made
        assert "reusing synthetic input" in caplog.text
        caplog.clear()
        again = synthesize_once(tmp_path, DataConfig(synth_reviews=500, seed=3))
    assert "seed changed: 0 -> 3" in caplog.text
    assert again["seed"] == 3 and again["fingerprint"] != made["fingerprint"]


def test_synthetic_record_without_fingerprint_is_made_again_once(tmp_path: Path, caplog) -> None:
    data = DataConfig(synth_reviews=500, seed=0)
    made = synthesize_once(tmp_path, data)
    old = {k: v for k, v in made.items() if k not in ("fingerprint", "made_from")}
    (tmp_path / "synth.json").write_text(json.dumps(old))  # as an older hpcpipe wrote it
    with caplog.at_level(logging.INFO, logger="hpcpipe"):
        synthesize_once(tmp_path, data)
        assert "recomputing once" in caplog.text
        caplog.clear()
        synthesize_once(tmp_path, data)
    assert "reusing synthetic input" in caplog.text
