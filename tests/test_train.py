"""Tests of the train step (hpcpipe/train/): real torch, real gloo process groups, real files.

Most tests use a tiny BERT saved to tmp_path (with MiniLM's tokenizer) and a small features data
set generated here in the contract's layout, so the whole file runs in well under 3 minutes on two
CPU cores. Only ``test_minilm_encodes_products`` loads the real all-MiniLM-L6-v2.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from hpcpipe.config import RunConfig, from_dict
from hpcpipe.run.layout import RunLayout
from hpcpipe.run.metrics import MetricsWriter, read_metrics
from hpcpipe.runtime.env import JobEnvironment
from hpcpipe.steps.train import checkpoint, data, dist, predict
from hpcpipe.steps.train import run as train_run

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = {  # name: (peak week of year, seasonal amplitude)
    "Christmas Lights": (51, 2.5), "Garden Hose": (16, 1.5), "Swimwear": (28, 1.8),
    "Space Heater": (3, 1.5), "Phone Case": (0, 0.0), "School Backpack": (34, 1.8),
}


# ---------------------------------------------------------------------------------------------
# A small data set in the features contract: seasonal categories named in the titles,
# launch-and-decay life cycles, Zipf popularity.


def make_features(root: Path, n_products: int = 80, n_weeks: int = 60, seed: int = 0,
                  n_buckets: int = 2) -> RunLayout:
    rng = np.random.default_rng(seed)
    layout = RunLayout(root)
    weeks = np.datetime64("2022-01-03") + np.arange(n_weeks) * np.timedelta64(7, "D")
    woy = ((weeks - weeks.astype("datetime64[Y]").astype("datetime64[D]")).astype(int) // 7)
    names = list(CATEGORIES)
    cat = rng.integers(0, len(names), n_products)
    pop = 6.0 / (1 + rng.permutation(n_products)) ** 0.8 * 8
    launch = rng.integers(-30, n_weeks - 8, n_products)
    tau = rng.uniform(8, 40, n_products)
    age = np.arange(n_weeks)[None, :] - launch[:, None]
    life = np.where(age < 0, 0.0, np.minimum(1.0, (age + 1) / 3) * np.exp(-np.maximum(age, 0)
                                                                         / tau[:, None]))
    peak = np.array([CATEGORIES[names[c]][0] for c in cat])
    amp = np.array([CATEGORIES[names[c]][1] for c in cat])
    season = np.exp(amp[:, None] * np.cos(2 * np.pi * (woy[None, :] - peak[:, None]) / 52))
    counts = rng.poisson(pop[:, None] * life * season / np.exp(amp[:, None] * 0.5))
    asins = np.array([f"B{seed:02d}{i:06d}" for i in range(n_products)])

    def shifted(k: int) -> np.ndarray:
        out = np.zeros_like(counts)
        out[:, k:] = counts[:, :-k]
        return out

    def roll(k: int) -> np.ndarray:
        c = np.cumsum(np.pad(counts, ((0, 0), (k, 0))), axis=1)
        return (c[:, k:] - c[:, :-k]) / k

    first = np.where(counts.cumsum(1) > 0, np.arange(n_weeks)[None, :], n_weeks).min(1)
    p_idx, w_idx = np.nonzero(counts)
    n = counts[p_idx, w_idx]
    nxt = np.full(len(n), np.nan)
    has_next = w_idx < n_weeks - 1
    nxt[has_next] = counts[p_idx[has_next], w_idx[has_next] + 1]
    rating = np.clip(rng.normal(4.0, 0.6, len(n)), 1, 5)
    frame = pd.DataFrame({
        "parent_asin": asins[p_idx], "week": weeks[w_idx], "n_reviews": n.astype("int64"),
        "mean_rating": rating, "rating_std": np.where(n > 1, rng.uniform(0, 1.5, len(n)), np.nan),
        "share_5": rng.uniform(0, 1, len(n)), "share_1": rng.uniform(0, 0.2, len(n)),
        "helpful_votes": rng.poisson(n).astype("int64"), "verified_share": rng.uniform(0, 1, len(n)),
        "mean_text_chars": rng.uniform(20, 400, len(n)),
        "lag_1": shifted(1)[p_idx, w_idx].astype("int64"),
        "lag_2": shifted(2)[p_idx, w_idx].astype("int64"),
        "lag_4": shifted(4)[p_idx, w_idx].astype("int64"),
        "roll_mean_4": roll(4)[p_idx, w_idx], "roll_mean_12": roll(12)[p_idx, w_idx],
        "roll_rating_12": rating, "weeks_since_first": (w_idx - first[p_idx]).astype("int64"),
        "cum_reviews": counts.cumsum(1)[p_idx, w_idx].astype("int64"),
        "target_next_n": pd.array(nxt, dtype="Int64"),
    })
    bucket = np.array([int(a[-6:]) for a in frame.parent_asin]) % n_buckets
    for b in range(n_buckets):
        part = frame[bucket == b].sort_values(["parent_asin", "week"])
        out = layout.features / f"bucket={b:05d}" / "part-0.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pandas(part, preserve_index=False)
        table = table.set_column(1, "week", table["week"].cast(pa.date32()))
        pq.write_table(table, out)
    (layout.features / "manifest.json").write_text(json.dumps({"n_buckets": n_buckets}))
    layout.ingest.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "parent_asin": asins,
        "title": [f"{names[c]} model {i} by Acme" for i, c in enumerate(cat)],
        "main_category": [names[c].split()[-1] for c in cat],
        "store": ["Acme"] * n_products,
    }), layout.ingest / "products.parquet")
    return layout


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dataset") / "run"
    make_features(root)
    return root


def new_run(dataset: Path, dest: Path, tiny_model: Path, **train: object) -> tuple[RunLayout,
                                                                                  RunConfig]:
    """A run folder with the shared features/ingest data (symlinked) and its config.yaml."""
    dest.mkdir(parents=True)
    for name in ("features", "ingest"):
        (dest / name).symlink_to(dataset / name)
    settings = {"model": str(tiny_model), "max_length": 16, "batch_size": 16, "epochs": 2,
                "val_weeks": 6, "checkpoint_every": 1000, "log_every": 1, "num_workers": 0,
                "warmup_steps": 3, "freeze_encoder": False, "lr": 2e-3, "encoder_lr": 1e-3,
                **train}
    cfg = from_dict({"train": settings})
    layout = RunLayout(dest)
    layout.config.write_text(yaml.safe_dump(cfg.to_dict()))
    return layout, cfg


def train_losses(layout: RunLayout) -> dict[int, float]:
    return {r["global_step"]: r["loss"] for r in read_metrics(layout.metrics) if r["kind"] == "train"}


def final_weights(layout: RunLayout) -> dict[str, torch.Tensor]:
    return checkpoint.load(checkpoint.last_path(layout.train))["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                        atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


@pytest.fixture(autouse=True)
def no_slurm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about local runs; a developer's shell may sit inside an allocation."""
    for var in list(os.environ):
        if var.startswith("SLURM_") or var in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                               "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(var)


def subprocess_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


# ---------------------------------------------------------------------------------------------


def test_smape_and_baselines() -> None:
    assert predict.smape(np.array([0.0, 2.0, 1.0]), np.array([0.0, 2.0, 3.0])) == \
        pytest.approx((0 + 0 + 1.0) / 3)
    assert predict.smape(np.array([1.0]), np.array([0.0])) == 2.0
    # The model's (log mean, log dispersion) to the SMAPE-optimal whole count: 0 for a week
    # likely without reviews, not the rounded mean.
    out = np.log(np.array([[0.3, 1e-6], [0.6, 1e-6], [2.6, 1e-6], [40.0, 1e-6]]))
    np.testing.assert_array_equal(predict.to_counts(out), [0, 0, 3, 40])


def test_history_window_and_calendar() -> None:
    """Each row reads its own product's counts from its week back, -1 before the product's
    first review, never a later week (the target); the calendar is the target week's."""
    from hpcpipe.steps.train.model import month_shares, week_number

    weeks = np.datetime64("2023-01-02") + 7 * np.array([0, 1, 3, 2, 3])
    rows = data.Rows(products=np.array(["a", "b"], dtype=object), texts=["", ""],
                     product=np.array([0, 0, 0, 1, 1], dtype=np.int32),
                     week=weeks.astype("datetime64[D]"), numeric=np.zeros((5, 1), np.float32),
                     n_reviews=np.array([2.0, 5.0, 1.0, 7.0, 3.0]), roll_mean_4=np.zeros(5),
                     roll_mean_12=np.zeros(5), target=np.zeros(5))
    history = data.History.from_rows(rows, weeks=4)
    counts, week = history.window(np.arange(5), rows.product)
    np.testing.assert_array_equal(counts, [[2, -1, -1, -1], [5, 2, -1, -1], [1, 0, 5, 2],
                                           [7, -1, -1, -1], [3, 7, -1, -1]])
    np.testing.assert_array_equal(week, week_number(weeks))
    # 2023-01-30 (Monday) to 2023-02-05: 2 days in January, 5 in February.
    shares = month_shares(week_number(np.array(["2023-01-30"], dtype="datetime64[D]")))
    np.testing.assert_allclose(shares[0, :3], [2 / 7, 5 / 7, 0], atol=1e-6)
    assert shares.sum() == pytest.approx(1.0)


def test_split_and_normalization_use_training_weeks_only(dataset: Path, tiny_model: Path,
                                                         tmp_path: Path) -> None:
    layout, cfg = new_run(dataset, tmp_path / "run", tiny_model, epochs=1, freeze_encoder=True,
                          train_weeks=20)
    train_run(layout, cfg, MetricsWriter(layout.metrics, "train"))
    frame = pd.concat(pd.read_parquet(p) for p in sorted(layout.features.glob("bucket=*/*.parquet")))
    week = pd.to_datetime(frame.week)
    last = week.max()
    val_start = last - pd.Timedelta(weeks=6)
    train = frame[(week < val_start) & (week >= val_start - pd.Timedelta(weeks=20))
                  & frame.target_next_n.notna()]
    norm = json.loads((layout.train / "norm.json").read_text())
    i = norm["names"].index("n_reviews")
    assert norm["mean"][i] == pytest.approx(np.log1p(train.n_reviews).mean(), rel=1e-6)
    assert norm["std"][i] == pytest.approx(np.log1p(train.n_reviews).std(ddof=0), rel=1e-5)
    assert norm["mean"][i] != pytest.approx(np.log1p(frame.n_reviews).mean(), rel=1e-3)
    assert norm["train_rows"] == len(train)
    assert norm["val_rows"] == int(((week >= val_start) & frame.target_next_n.notna()).sum())
    assert norm["val_start"] == str(val_start.date())


def test_train_writes_metrics_checkpoints_and_predictions(dataset: Path, tiny_model: Path,
                                                          tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_tokenize = data.tokenize_products
    monkeypatch.setattr(data, "tokenize_products",
                        lambda *a, **k: calls.append(1) or real_tokenize(*a, **k))
    layout, cfg = new_run(dataset, tmp_path / "run", tiny_model, freeze_encoder=True,
                          epochs=3, batch_size=64, log_every=5, num_workers=1)
    summary = train_run(layout, cfg, MetricsWriter(layout.metrics, "train"))
    assert len(calls) == 1, "product texts are tokenized once per run, not per epoch"

    records = read_metrics(layout.metrics)
    kinds = [r["kind"] for r in records]
    assert kinds.count("eval") == 3 and kinds[-1] == "summary"
    train_rec = next(r for r in records if r["kind"] == "train")
    assert {"epoch", "step", "loss", "lr", "samples_per_s", "tokens_per_s", "gpu_mem_bytes",
            "data_wait_frac"} <= train_rec.keys()
    eval_rec = next(r for r in records if r["kind"] == "eval")
    assert {"val_mae", "val_smape", "baseline_same_mae", "baseline_same_smape",
            "baseline_roll4_mae", "baseline_roll4_smape", "improvement_pct"} <= eval_rec.keys()
    assert {"inner_smape", "val_smape_zero", "val_smape_nonzero", "val_mae_log1p",
            "val_rmse_log1p", "strongest_baseline"} <= eval_rec.keys()
    # The epoch is the one best on the inner weeks, whatever its validation score.
    evals = [r for r in records if r["kind"] == "eval"]
    chosen = min(evals, key=lambda r: r["inner_smape"])
    assert summary["best_epoch"] == chosen["epoch"] and summary["epoch_chosen_on"] == "inner weeks"
    assert summary["best_val_smape"] == chosen["val_smape"] == summary["model"]["smape"]
    norm = json.loads((layout.train / "norm.json").read_text())
    assert eval_rec["inner_rows"] == norm["inner_rows"] > 0
    assert norm["fit_rows"] + norm["inner_rows"] == norm["train_rows"]
    # Baselines scored like the model (whole counts) on the same rows, LightGBM among them.
    base = summary["baselines"]
    assert {"same_week", "roll_mean_4", "roll_mean_12", "roll_mean_4_poisson", "lightgbm",
            "lightgbm_poisson"} <= base.keys()
    for scores in (*base.values(), summary["model"]):
        assert {"smape", "smape_zero", "smape_nonzero", "mae", "mae_log1p", "rmse_log1p"} <= \
            scores.keys() and scores["rows"] == norm["val_rows"]
    rows = data.load_rows(layout)
    split = data.split_by_time(rows, cfg.train.val_weeks)
    assert eval_rec["baseline_roll4_smape"] == pytest.approx(
        predict.smape(np.rint(rows.roll_mean_4[split.val]), rows.target[split.val]))
    assert summary["floor"] is None and any("not synthetic" in n for n in summary["eval_notes"])
    assert "gap_closed_interval" in summary and summary["gap_closed_interval"] is None
    assert summary["strongest_baseline"] in base and summary["improvement_pct"] == \
        pytest.approx(100 * (1 - summary["best_val_smape"] / summary["best_baseline_smape"]))
    assert Path(summary["checkpoint"]).is_file() and checkpoint.last_path(layout.train).is_file()
    # It learns: far better than repeating this week on this seasonal data.
    assert summary["best_val_smape"] < 0.9 * base["same_week"]["smape"], summary

    pred = pd.read_parquet(layout.predictions)
    frame = pd.concat(pd.read_parquet(p) for p in layout.features.glob("bucket=*/*.parquet"))
    last_week = frame[frame.week == frame.week.max()]  # which week: tests/test_train_faults.py
    assert list(pred.columns) == ["parent_asin", "week", "forecast_week", "predicted_next_n"]
    assert pred.predicted_next_n.dtype == np.float64 and (pred.predicted_next_n >= 0).all()
    assert len(pred) == len(last_week) and pred.parent_asin.is_unique

    # A later predict() and a rerun reuse the token cache: tokenizing now would fail.
    cache = next(layout.train.glob("tokens-*"))
    mtime = (cache / "ids.npy").stat().st_mtime_ns
    first = pred.copy()
    monkeypatch.setattr(data, "tokenize_products", lambda *a, **k: pytest.fail("re-tokenized"))
    layout.predictions.unlink()
    assert predict.predict(layout, cfg) == layout.predictions
    pd.testing.assert_frame_equal(pd.read_parquet(layout.predictions), first)
    train_run(layout, cfg, MetricsWriter(layout.metrics, "train"))  # complete: predicts again
    assert (cache / "ids.npy").stat().st_mtime_ns == mtime


def test_the_chosen_epoch_does_not_depend_on_the_validation_weeks(
        dataset: Path, tiny_model: Path, tmp_path: Path) -> None:
    """Validation targets changed at random: the same epoch is chosen, with the same inner
    scores; only the reported validation scores change."""
    layout, cfg = new_run(dataset, tmp_path / "run", tiny_model, freeze_encoder=True, epochs=4,
                          batch_size=32, lr=5e-3)
    train_run(layout, cfg, MetricsWriter(layout.metrics, "train"))

    other = tmp_path / "perturbed"
    (other / "features").mkdir(parents=True)
    (other / "ingest").symlink_to(dataset / "ingest")
    (other / "features" / "manifest.json").write_text(
        (dataset / "features" / "manifest.json").read_text())
    rng = np.random.default_rng(7)
    for path in sorted((dataset / "features").glob("bucket=*/part-0.parquet")):
        frame = pd.read_parquet(path)
        last = pd.Timestamp(max(pd.read_parquet(p, columns=["week"]).week.max()
                                for p in (dataset / "features").glob("bucket=*/*.parquet")))
        val = (pd.to_datetime(frame.week) >= last - pd.Timedelta(weeks=cfg.train.val_weeks)) \
            & frame.target_next_n.notna()
        frame.loc[val, "target_next_n"] = rng.integers(0, 30, int(val.sum()))
        out = other / "features" / path.parent.name / path.name
        out.parent.mkdir()
        table = pa.Table.from_pandas(frame, preserve_index=False)
        pq.write_table(table.set_column(1, "week", table["week"].cast(pa.date32())), out)
    moved = RunLayout(other)
    moved.config.write_text(layout.config.read_text())
    train_run(moved, cfg, MetricsWriter(moved.metrics, "train"))

    def evals(run: RunLayout) -> list[dict]:
        return [r for r in read_metrics(run.metrics) if r["kind"] == "eval"]

    def summary(run: RunLayout) -> dict:
        return next(r for r in read_metrics(run.metrics) if r["kind"] == "summary")

    assert [e["inner_smape"] for e in evals(moved)] == [e["inner_smape"] for e in evals(layout)]
    assert summary(moved)["best_epoch"] == summary(layout)["best_epoch"]
    assert [e["val_smape"] for e in evals(moved)] != [e["val_smape"] for e in evals(layout)]
    # and what validation alone would pick is not what decides
    assert summary(layout)["best_inner_smape"] == min(e["inner_smape"] for e in evals(layout))


def _rank_main(rank: int, world: int, port: int, root: str, cfg_dict: dict) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    layout = RunLayout(Path(root))
    train_run(layout, from_dict(cfg_dict), MetricsWriter(layout.metrics, "train"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_follow_the_one_rank_loss_curve(dataset: Path, tiny_model: Path,
                                                  tmp_path: Path) -> None:
    """Same global batch of 16: 1 rank x 16, 1 rank x 8 x 2 accumulation (with gradient
    checkpointing, which must not change the result), 2 gloo ranks x 8."""
    short = {"max_steps_per_epoch": 30}
    one, cfg = new_run(dataset, tmp_path / "one", tiny_model, batch_size=16, **short)
    train_run(one, cfg, MetricsWriter(one.metrics, "train"))
    acc, cfg_acc = new_run(dataset, tmp_path / "acc", tiny_model, batch_size=8, grad_accum=2,
                           grad_checkpointing=True, **short)
    train_run(acc, cfg_acc, MetricsWriter(acc.metrics, "train"))
    two, cfg2 = new_run(dataset, tmp_path / "two", tiny_model, batch_size=8, **short)
    torch.multiprocessing.spawn(_rank_main, args=(2, free_port(), str(two.root), cfg2.to_dict()),
                                nprocs=2, join=True)

    ref = train_losses(one)
    assert len(ref) == 60
    for other in (acc, two):
        got = train_losses(other)
        assert got.keys() == ref.keys()
        np.testing.assert_allclose([got[s] for s in ref], list(ref.values()), rtol=1e-4,
                                   atol=1e-5)
        assert_same_weights(final_weights(other), final_weights(one), atol=1e-4)
    summary = [r for r in read_metrics(two.metrics) if r["kind"] == "summary"]
    assert len(summary) == 1 and summary[0]["world_size"] == 2, "only rank 0 writes metrics"
    assert two.predictions.is_file()


class Crash(Exception):
    pass


def test_resume_mid_epoch_equals_uninterrupted_run(dataset: Path, tiny_model: Path,
                                                   tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    whole, cfg = new_run(dataset, tmp_path / "whole", tiny_model, checkpoint_every=7,
                         max_steps_per_epoch=30)
    train_run(whole, cfg, MetricsWriter(whole.metrics, "train"))

    broken, cfg = new_run(dataset, tmp_path / "broken", tiny_model, checkpoint_every=7,
                          max_steps_per_epoch=30)
    real_save = checkpoint.save

    def save_then_crash(path: Path, state: dict) -> Path:
        out = real_save(path, state)
        if path.name == "last.pt" and state["epoch"] == 1 and state["step_in_epoch"] > 0:
            raise Crash(f"crash after step {state['global_step']}")
        return out

    monkeypatch.setattr(checkpoint, "save", save_then_crash)
    with pytest.raises(Crash):
        train_run(broken, cfg, MetricsWriter(broken.metrics, "train"))
    monkeypatch.setattr(checkpoint, "save", real_save)
    state = checkpoint.load(checkpoint.last_path(broken.train))
    crashed_at = state["global_step"]
    assert state["epoch"] == 1 and 0 < state["step_in_epoch"] < state["steps_per_epoch"]

    train_run(broken, cfg, MetricsWriter(broken.metrics, "train"))
    assert_same_weights(final_weights(broken), final_weights(whole))
    lines = [r for r in read_metrics(broken.metrics) if r["kind"] == "train"]
    steps = [r["global_step"] for r in lines]
    # Steps after the checkpoint are logged again (the crash lost them), nothing else repeats.
    assert steps == sorted(steps[:steps.index(crashed_at) + 1]) + list(
        range(crashed_at + 1, steps[-1] + 1))
    ref = train_losses(whole)
    for r in lines[steps.index(crashed_at) + 1:]:
        assert r["loss"] == pytest.approx(ref[r["global_step"]], rel=1e-5)


CRASH_DURING_RENAME = """
import os, sys
from pathlib import Path
import hpcpipe.files
from hpcpipe.config import load_config
from hpcpipe.run.layout import RunLayout
from hpcpipe.run.metrics import MetricsWriter
from hpcpipe.steps.train import run
real_replace = os.replace
renames = []
def replace(src, dst):
    if Path(dst).name == "last.pt":
        renames.append(dst)
        if len(renames) == 2:  # the second checkpoint is written, then the process dies
            os._exit(9)
    return real_replace(src, dst)
hpcpipe.files.os.replace = replace
layout = RunLayout(Path(sys.argv[1]))
run(layout, load_config(layout.config), MetricsWriter(layout.metrics, "train"))
"""


def test_crash_between_write_and_rename_keeps_previous_checkpoint(
        dataset: Path, tiny_model: Path, tmp_path: Path) -> None:
    layout, cfg = new_run(dataset, tmp_path / "run", tiny_model, checkpoint_every=5,
                          max_steps_per_epoch=20)
    proc = subprocess.run([sys.executable, "-c", CRASH_DURING_RENAME, str(layout.root)],
                          capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 9, proc.stderr[-2000:]
    ckpt = checkpoint.checkpoint_dir(layout.train)
    leftovers = [p for p in ckpt.iterdir() if p.name.startswith(".tmp-last.pt")]
    assert len(leftovers) == 1, "the crash left the complete but unrenamed second checkpoint"
    assert checkpoint.load(checkpoint.last_path(layout.train))["global_step"] == 5

    summary = train_run(layout, cfg, MetricsWriter(layout.metrics, "train"))
    assert summary is not None and layout.predictions.is_file()
    assert not any(p.name.startswith(".tmp-") for p in ckpt.iterdir())
    resumed = [r["global_step"] for r in read_metrics(layout.metrics) if r["kind"] == "train"]
    assert resumed.count(6) == 2 and resumed.count(5) == 1, "resumed after step 5"


@pytest.mark.parametrize("when", ["training", "starting"])
def test_usr2_locally_checkpoints_and_exits_nonzero(dataset: Path, tiny_model: Path,
                                                    tmp_path: Path, when: str) -> None:
    """USR2 mid-training, or while the process still imports torch (a requeued job can get
    Slurm's warning that early): either way a checkpoint at a step boundary, then exit 140."""
    layout, _ = new_run(dataset, tmp_path / "run", tiny_model, epochs=200)
    proc = subprocess.Popen([sys.executable, "-u", "-m", "hpcpipe.jobs.train", "--run-dir",
                             str(layout.root)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=subprocess_env())
    try:
        head = ""
        if when == "starting":
            # jobs/main logs this line before the step imports torch and builds the model.
            while "step train of run" not in head:
                line = proc.stdout.readline()
                assert line, head
                head += line
            assert not any(r["kind"] == "train" for r in read_metrics(layout.metrics))
        else:
            deadline = time.monotonic() + 90
            while not any(r["kind"] == "train" for r in read_metrics(layout.metrics)):
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "training did not start"
                time.sleep(0.2)
        proc.send_signal(signal.SIGUSR2)
        out, _ = proc.communicate(timeout=60)
        out = head + out
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGUSR2, out[-3000:]
    assert "stopped by SIGUSR2" in out and "checkpoint saved" in out
    state = checkpoint.load(checkpoint.last_path(layout.train))
    last_logged = max(train_losses(layout), default=0)
    assert state["global_step"] == last_logged or when == "starting", \
        "checkpoint at the step boundary it stopped on"
    if when == "starting":
        assert state["global_step"] == 1 and "at epoch 0 step 1;" in out, out[-3000:]
    assert state["epoch"] < 200


def test_usr2_after_training_finished_does_not_kill_the_job(dataset: Path, tiny_model: Path,
                                                            tmp_path: Path) -> None:
    """Slurm's warning can come while the last predictions are written or the process exits:
    the run has finished, so the signal must not turn the job into one killed by USR2."""
    layout, _ = new_run(dataset, tmp_path / "run", tiny_model, epochs=1, max_steps_per_epoch=2)
    late = ("import os, runpy, signal, sys, time\n"
            f"sys.argv = ['train.py', '--run-dir', {str(layout.root)!r}]\n"
            "runpy.run_module('hpcpipe.jobs.train', run_name='__main__')\n"
            "print('USR2 ignored:', signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN)\n"
            "os.kill(os.getpid(), signal.SIGUSR2)\n"
            "time.sleep(0.5)\n"
            "print('still alive after USR2')\n")
    proc = subprocess.run([sys.executable, "-u", "-c", late], capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "step train finished" in out and "still alive after USR2" in out, out[-3000:]
    # ignored, not merely caught: Python resets the handlers it owns while it exits
    assert "USR2 ignored: True" in out, out[-3000:]


def test_rank_and_rendezvous_from_slurm_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    assert dist.ranks(JobEnvironment.from_environ()) == (3, 1, 4)
    assert JobEnvironment.from_environ().master_port == 15000 + 12345 % 20000
    monkeypatch.setenv("MASTER_PORT", "29400")
    assert JobEnvironment.from_environ().master_port == 29400
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert dist.ranks(JobEnvironment.from_environ()) == (0, 0, 2), "torchrun's variables win"
    monkeypatch.setenv("SLURM_NTASKS", "1")
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var)
    assert dist.ranks(JobEnvironment.from_environ()) == (0, 0, 1)


def test_minilm_encodes_products() -> None:
    from hpcpipe.steps.train.model import build_model, default_model_dir, load_tokenizer, mean_pool

    folder = default_model_dir()
    model = build_model(folder, len(data.NUMERIC_NAMES), freeze_encoder=True)
    assert model.encoder.config.hidden_size == 384
    assert not any(p.requires_grad for p in model.encoder.parameters())
    ids, lengths = data.tokenize_products(load_tokenizer(folder),
                                          ["Garden: Garden Hose 50ft", "Christmas Lights"], 32)
    mask = torch.from_numpy((np.arange(32)[None] < lengths[:, None]).astype(np.int64))
    with torch.no_grad():
        emb = mean_pool(model.encoder(input_ids=torch.from_numpy(ids).long(),
                                      attention_mask=mask).last_hidden_state, mask)
    assert emb.shape == (2, 384) and torch.isfinite(emb).all()
