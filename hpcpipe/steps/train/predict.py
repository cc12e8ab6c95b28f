"""Scores and predictions: SMAPE/MAE against the naive baselines, and ``predictions.parquet``.

``predict(layout, cfg)`` loads ``train/checkpoints/best.pt`` of a finished run and writes the
forecast of next week's reviews for the latest week of every product (what ``hpcpipe predict RUN``
calls); the train step does the same at its end.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcpipe.config import RunConfig
from hpcpipe.errors import InputError
from hpcpipe.files import atomic_path
from hpcpipe.run.layout import RunLayout
from hpcpipe.steps.train import checkpoint, data
from hpcpipe.steps.train.model import (
    Forecaster,
    autocast,
    autocast_dtype,
    build_model,
    model_inputs,
)

log = logging.getLogger(__name__)


def smape_terms(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-row 2|p-y|/(|p|+|y|), defined as 0 where both are 0."""
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    denom = np.abs(pred) + np.abs(true)
    out = np.zeros_like(denom)
    nz = denom > 0
    out[nz] = 2.0 * np.abs(pred[nz] - true[nz]) / denom[nz]
    return out


def smape(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean symmetric absolute percentage error on counts (0 for an empty input)."""
    terms = smape_terms(pred, true)
    return float(terms.mean()) if len(terms) else 0.0


def baselines(rows: data.Rows, index: np.ndarray) -> dict[str, float]:
    """Scores of the naive forecasts on rows ``index``: this week's count, the 4-week mean."""
    y = rows.target[index]
    same, roll4 = rows.n_reviews[index], rows.roll_mean_4[index]
    return {
        "baseline_same_mae": float(np.abs(same - y).mean()),
        "baseline_same_smape": smape(same, y),
        "baseline_roll4_mae": float(np.abs(roll4 - y).mean()),
        "baseline_roll4_smape": smape(roll4, y),
        # Not one of the two baselines of the contract; shown so that the gain from forecasting
        # whole counts can be told apart from the gain from the model.
        "baseline_roll4_rounded_smape": smape(np.rint(roll4), y),
    }


def to_counts(log_pred: np.ndarray) -> np.ndarray:
    """Model output (log1p of the median count) to the forecast: a non-negative whole count.

    Rounding is what a count forecast scored by SMAPE calls for: forecasting 0.3 for a week
    with no reviews costs the maximum (2), forecasting 0 costs nothing.
    """
    return np.rint(np.clip(np.expm1(np.asarray(log_pred, dtype=np.float64)), 0.0, None))


@torch.no_grad()
def predict_log(model: torch.nn.Module, loader: torch.utils.data.DataLoader,
                device: torch.device, dtype: torch.dtype | None) -> tuple[np.ndarray, np.ndarray]:
    """(row numbers, log1p predictions) for every batch of ``loader``."""
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


def latest_rows(rows: data.Rows) -> np.ndarray:
    """Index of each product's latest week among the feature rows."""
    order = np.lexsort((rows.week, rows.product))
    prod = rows.product[order]
    last = np.ones(len(order), dtype=bool)
    last[:-1] = prod[1:] != prod[:-1]
    return order[last]


def write_predictions(path: Path, rows: data.Rows, index: np.ndarray,
                      counts: np.ndarray) -> Path:
    """``predictions.parquet``: parent_asin, week, predicted_next_n (temporary name + rename)."""
    import pyarrow as pa  # type: ignore[import-untyped]
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    order = np.argsort(rows.products[rows.product[index]], kind="stable")
    index, counts = index[order], np.asarray(counts, dtype=np.float64)[order]
    table = pa.table({
        "parent_asin": pa.array(rows.products[rows.product[index]].tolist(), pa.string()),
        "week": pa.array(rows.week[index], pa.date32()),
        "predicted_next_n": pa.array(counts, pa.float64()),
    })
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


def predict_latest(layout: RunLayout, rows: data.Rows, model: Forecaster, state: dict[str, Any],
                   device: torch.device, precision: str, batch_size: int = 1024) -> Path:
    """Forecast for the latest week of every product with ``model``; write predictions.parquet."""
    norm = data.Normalizer.from_dict(state["norm"])
    folder = Path(state["model_dir"])
    tokens = data.token_cache(layout.train, folder, rows, state["max_length"], True, lambda: None)
    if state["freeze_encoder"]:
        model.set_text_table(data.product_embeddings(layout.train, folder, tokens, model,
                                                     device, True, lambda: None))
    index = latest_rows(rows)
    ds = data.ForecastDataset(index, norm.transform(rows.numeric), rows.target, rows.product,
                              None if state["freeze_encoder"] else tokens, with_rows=True)
    loader = data.eval_loader(ds, batch_size, 0, device.type == "cuda")
    row_ids, log_pred = predict_log(model, loader, device, autocast_dtype(device, precision))
    out = write_predictions(layout.predictions, rows, row_ids, to_counts(log_pred))
    log.info("wrote forecasts for %d products to %s", len(row_ids), out)
    return out


def predict(layout: RunLayout, cfg: RunConfig) -> Path:
    """Write ``layout.predictions`` from the best checkpoint of a finished run; return its path."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, state = load_best(layout.train, device)
    rows = data.load_rows(layout)
    return predict_latest(layout, rows, model, state, device, cfg.train.precision)
