"""Scores and predictions: SMAPE/MAE against the naive baselines, and ``predictions.parquet``.

``predict(layout, cfg)`` loads ``train/checkpoints/best.pt`` of a finished run and writes
``predictions.parquet`` (what ``hpcpipe predict RUN`` calls); the train step does the same at its
end.

What the predictions are for: the week after the data's last week (``forecast_week``), for every
product with a feature row in that last week (``week``, the week the forecast is based on). The
model forecasts a product's next week from a week with reviews, so a product without reviews in
the data's last week has no features to forecast that week from and is left out; forecasting it
"next week" from its own last row would be a forecast for a week long past. The file's schema
metadata (key ``hpcpipe``, JSON) says the same: forecast_week, based_on_week, how many products
were forecast and how many left out, and why.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcpipe.config import RunConfig
from hpcpipe.errors import InputError
from hpcpipe.files import atomic_path
from hpcpipe.run.layout import RunLayout
from hpcpipe.steps.train import checkpoint, data, loaders
from hpcpipe.steps.train.evaluate import smape_optimal_count, smape_terms
from hpcpipe.steps.train.model import (
    Forecaster,
    autocast,
    autocast_dtype,
    build_model,
    model_inputs,
)
from hpcpipe.steps.train.stop import DivergedError

log = logging.getLogger(__name__)


def smape(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean symmetric absolute percentage error on counts (0 for an empty input; NaN when any
    forecast or value is not finite)."""
    terms = smape_terms(pred, true)
    return float(terms.mean()) if len(terms) else 0.0


def to_counts(out: np.ndarray) -> np.ndarray:
    """Model output (N, 2): log mean and log dispersion of a negative binomial, to the forecast:
    the whole count that minimises the expected SMAPE under that distribution.

    A whole count is what a count forecast scored by SMAPE calls for (forecasting 0.3 for a week
    with no reviews costs the maximum, 2; forecasting 0 costs nothing), and the best one is not
    the rounded mean: for small means it is 0 more often, for others it sits near the median.
    """
    out = np.asarray(out, dtype=np.float64)
    return smape_optimal_count(np.exp(np.clip(out[:, 0], -30.0, 30.0)),
                               np.exp(np.clip(out[:, 1], -20.0, 5.0)))


@torch.no_grad()
def predict_log(model: torch.nn.Module, loader: torch.utils.data.DataLoader,
                device: torch.device, dtype: torch.dtype | None) -> tuple[np.ndarray, np.ndarray]:
    """(row numbers, model outputs (N, 2): log mean and log dispersion) for every batch of
    ``loader``."""
    was_training = model.training
    model.eval()
    rows, preds = [], []
    try:
        for batch in loader:
            batch = batch.to(device)
            with autocast(device, dtype):
                out = model(*model_inputs(batch))
            rows.append(batch["row"].cpu().numpy())
            preds.append(out.float().cpu().numpy())
    finally:
        model.train(was_training)
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    return np.concatenate(rows), np.concatenate(preds)


def forecast_rows(rows: data.Rows) -> np.ndarray:
    """Index of the rows of the data's last week: one per product with reviews that week."""
    return np.flatnonzero(rows.week == rows.week.max())


def write_predictions(path: Path, rows: data.Rows, index: np.ndarray,
                      counts: np.ndarray) -> Path:
    """``predictions.parquet`` (temporary name + rename): parent_asin, week (the week the
    forecast is based on), forecast_week (the week forecast: the next one), predicted_next_n;
    the schema metadata ``hpcpipe`` says which weeks and which products (module doc)."""
    import pyarrow as pa  # type: ignore[import-untyped]
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    order = np.argsort(rows.products[rows.product[index]], kind="stable")
    index, counts = index[order], np.asarray(counts, dtype=np.float64)[order]
    based_on = rows.week.max()
    forecast_week = based_on + np.timedelta64(7, "D")
    table = pa.table({
        "parent_asin": pa.array(rows.products[rows.product[index]].tolist(), pa.string()),
        "week": pa.array(rows.week[index], pa.date32()),
        "forecast_week": pa.array(rows.week[index] + np.timedelta64(7, "D"), pa.date32()),
        "predicted_next_n": pa.array(counts, pa.float64()),
    })
    products = len(np.unique(rows.product))
    meta = {
        "forecast_week": str(forecast_week), "based_on_week": str(based_on),
        "predicted": "reviews in forecast_week (Monday to Sunday), a whole count",
        "products_in_data": products, "products_forecast": len(index),
        "products_left_out": products - len(index),
        "note": f"products with no reviews in {based_on} (the data's last week) have no "
                "features for it and are left out; the model forecasts the week after a week "
                "with reviews",
    }
    table = table.replace_schema_metadata({"hpcpipe": json.dumps(meta)})
    with atomic_path(Path(path)) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def load_best(train_dir: Path, device: torch.device) -> tuple[Forecaster, dict[str, Any]]:
    """The best model of a run (on ``device``) and its checkpoint dict."""
    state = checkpoint.load(checkpoint.best_path(train_dir))
    if state is None:
        raise InputError(f"{checkpoint.best_path(train_dir)} does not exist; the train step has "
                         "not finished an epoch in this run (run or resume it first)")
    model = build_model(Path(state["model_dir"]), len(state["norm"]["names"]),
                        state["freeze_encoder"])
    checkpoint.load_model_state(model, state["model"])
    return model.to(device), state


def forecast_counts(layout: RunLayout, rows: data.Rows, model: Forecaster,
                    state: dict[str, Any], device: torch.device, precision: str,
                    index: np.ndarray, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(row numbers, whole-count forecasts) of rows ``index`` with ``model`` (rank 0 alone);
    raises DivergedError where a forecast is not finite."""
    norm = data.Normalizer.from_dict(state["norm"])
    folder = Path(state["model_dir"])
    tokens = data.token_cache(layout.train, folder, rows, state["max_length"], True, lambda: None)
    if state["freeze_encoder"]:
        model.set_text_table(data.product_embeddings(layout.train, folder, tokens, model,
                                                     device, True, lambda: None))
    ds = data.ForecastDataset(index, norm.transform(rows.numeric), rows.target, rows.product,
                              None if state["freeze_encoder"] else tokens, with_rows=True,
                              history=data.History.from_rows(rows))
    loader = loaders.eval_loader(ds, batch_size, 0, device.type == "cuda")
    row_ids, out = predict_log(model, loader, device, autocast_dtype(device, precision))
    bad = int((~np.isfinite(out).all(axis=1)).sum()) if len(out) else 0
    if bad:
        raise DivergedError(
            f"{checkpoint.best_path(layout.train)} forecasts a number that is not finite for "
            f"{bad} of {len(out)} products; its weights are not usable. Train again from "
            "scratch with a lower train.lr (or train.precision=fp32, a smaller "
            "train.grad_clip): `hpcpipe rerun train --fresh --set train.lr=...`")
    return row_ids, to_counts(out)


def predict_latest(layout: RunLayout, rows: data.Rows, model: Forecaster, state: dict[str, Any],
                   device: torch.device, precision: str, batch_size: int = 1024) -> Path:
    """Forecast the week after the data's last week for every product with reviews in that
    week (module doc) with ``model``; write predictions.parquet."""
    row_ids, counts = forecast_counts(layout, rows, model, state, device, precision,
                                      forecast_rows(rows), batch_size)
    out = write_predictions(layout.predictions, rows, row_ids, counts)
    week = rows.week.max()
    log.info("wrote forecasts of week %s (from week %s) for %d products to %s; %d products "
             "had no reviews in %s and are left out", week + np.timedelta64(7, "D"), week,
             len(row_ids), out, len(np.unique(rows.product)) - len(row_ids), week)
    return out


def predict(layout: RunLayout, cfg: RunConfig) -> Path:
    """Write ``layout.predictions`` from the best checkpoint of a finished run; return its path."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, state = load_best(layout.train, device)
    rows = data.load_rows(layout)
    return predict_latest(layout, rows, model, state, device, cfg.train.precision)
