"""Honest evaluation: the model against strong baselines, scored the same way, on the same rows.

* Every forecast is scored as a whole count, the model's (rounded) and the baselines' alike: a
  fractional forecast for a week without reviews costs SMAPE's maximum (2), so comparing a
  rounded model with unrounded baselines credits the model with the rounding.
* Scores (:func:`scores`): SMAPE on whole counts, and separately on rows whose target is 0 and
  rows whose target is not; MAE on counts; MAE and RMSE of log1p(count).
* Baselines on the validation rows: naive ones (this week's count, the 4- and 12-week means,
  rounded; and the 4-week mean as the SMAPE-optimal whole count of a Poisson of that mean), and
  LightGBM on the model's numeric features plus the product category, trained on the training
  weeks (early stopping on the held-out inner weeks, as the model's epoch is chosen there).
* On synthetic data, the floor: the generator's own expected count per product and week
  (``hpcpipe.steps.synth.generator_parameters``), forecast as the SMAPE-optimal whole count of a
  Poisson with that mean; and the share of the gap from rounded roll_mean_4 to it the model
  closes.

Everything here is numpy (and lightgbm when installed); no torch.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from hpcpipe.steps.train import data

log = logging.getLogger(__name__)

#: Naive baselines: name -> what it forecasts (rounded to a whole count).
NAIVE = {"same_week": "this week's count", "roll_mean_4": "mean of the last 4 weeks",
         "roll_mean_12": "mean of the last 12 weeks",
         "roll_mean_4_poisson": "SMAPE-optimal count of Poisson(mean of the last 4 weeks)"}
#: The baseline the gap to the floor is measured from (issue 13).
GAP_FROM = "roll_mean_4"
N_SUMS = 9


def smape_terms(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-row 2|p-y|/(|p|+|y|), 0 where both are 0, NaN where either is not finite."""
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    denom = np.abs(pred) + np.abs(true)
    out = np.zeros_like(denom)
    finite = np.isfinite(pred) & np.isfinite(true)
    ok = finite & (denom > 0)  # not inf/inf: no NaN computed, so no warning
    out[ok] = 2.0 * np.abs(pred[ok] - true[ok]) / denom[ok]
    out[~finite] = np.nan
    return out


def score_sums(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """The sums :func:`scores_from_sums` needs, so that ranks can add theirs up (one
    all-reduce): rows, SMAPE, zero-target rows and their SMAPE, other rows and their SMAPE,
    absolute error, absolute and squared log1p error."""
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    terms = smape_terms(pred, true)
    zero = true == 0
    dlog = np.log1p(np.clip(pred, 0.0, None)) - np.log1p(true)
    return np.array([len(true), terms.sum(), zero.sum(), terms[zero].sum(), (~zero).sum(),
                     terms[~zero].sum(), np.abs(pred - true).sum(), np.abs(dlog).sum(),
                     (dlog ** 2).sum()], dtype=np.float64)


def scores_from_sums(sums: np.ndarray | list[float]) -> dict[str, float]:
    n, sm, n0, sm0, n1, sm1, ae, al, sl = (float(v) for v in sums)

    def mean(total: float, count: float) -> float:
        return total / count if count else math.nan

    return {"smape": mean(sm, n), "smape_zero": mean(sm0, n0), "smape_nonzero": mean(sm1, n1),
            "mae": mean(ae, n), "mae_log1p": mean(al, n),
            "rmse_log1p": math.sqrt(mean(sl, n)) if n else math.nan, "rows": int(n),
            "zero_share": mean(n0, n)}


def scores(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """SMAPE (all rows, target 0, target > 0), MAE, MAE and RMSE of log1p of whole counts."""
    return scores_from_sums(score_sums(pred, true))


def _log_pmf(y: np.ndarray, lam: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    """(B, Y) log P(Y = y) for Poisson(lam) rows, or negative binomial (mean lam, variance
    lam + alpha lam^2) where ``alpha`` is given."""
    from scipy.special import gammaln  # type: ignore[import-untyped]

    yy = y[None, :]
    if alpha is None:
        return yy * np.log(lam)[:, None] - lam[:, None] - gammaln(yy + 1)
    r = (1.0 / alpha)[:, None]
    log_r_mu = np.logaddexp(np.log(r), np.log(lam)[:, None])
    return (gammaln(yy + r) - gammaln(r) - gammaln(yy + 1) + r * (np.log(r) - log_r_mu)
            + yy * (np.log(lam)[:, None] - log_r_mu))


def smape_optimal_count(rate: np.ndarray, alpha: np.ndarray | None = None,
                        block: int = 256) -> np.ndarray:
    """The whole count k minimising E[SMAPE(k, Y)] per row, for Y ~ Poisson(rate), or where
    ``alpha`` is given a negative binomial of mean ``rate`` and variance rate + alpha rate^2.

    Exact up to mass beyond 8 standard deviations: rows are sorted by rate and taken in blocks,
    each with the counts around its rates as candidates and outcomes (and 0).
    """
    rate = np.clip(np.nan_to_num(np.asarray(rate, dtype=np.float64), nan=0.0), 0.0, None)
    if alpha is not None:
        alpha = np.clip(np.nan_to_num(np.asarray(alpha, dtype=np.float64), nan=1.0), 1e-8, 1e3)
    out = np.zeros(len(rate), dtype=np.float64)
    order = np.argsort(rate, kind="stable")
    for start in range(0, len(order), block):
        sel = order[start:start + block]
        lam = np.maximum(rate[sel], 1e-12)
        a = None if alpha is None else alpha[sel]
        sd = np.sqrt(lam + (0.0 if a is None else a * lam ** 2))
        lo = float(max(0.0, (lam - 8 * sd).min() - 8))
        hi = float(min((lam + 8 * sd).max() + 9, lam.max() * 50 + 1000))
        y = np.arange(int(lo), int(hi), dtype=np.float64)
        pmf = np.exp(_log_pmf(y, lam, a))
        k = np.unique(np.concatenate([[0.0], y]))
        kk, yy = np.meshgrid(k, y, indexing="ij")
        cost = smape_terms(kk.ravel(), yy.ravel()).reshape(kk.shape)  # (K, Y)
        out[sel] = k[np.argmin(pmf @ cost.T, axis=1)]
    return out


def bootstrap_smape_diff(pred: np.ndarray, other: np.ndarray, true: np.ndarray,
                         resamples: int = 1000, seed: int = 0,
                         level: float = 0.95) -> dict[str, float]:
    """SMAPE(pred) - SMAPE(other) on the same rows, with a paired bootstrap interval (rows
    resampled with replacement, both forecasts scored on each resample): negative with
    ``high`` < 0 means ``pred`` is better by more than the resampling noise."""
    d = smape_terms(pred, true) - smape_terms(other, true)
    rng = np.random.default_rng(seed)
    n = len(d)
    means = np.array([d[rng.integers(0, n, n)].mean() for _ in range(resamples)]) if n else \
        np.full(1, math.nan)
    tail = 100 * (1 - level) / 2
    return {"diff": float(d.mean()) if n else math.nan,
            "low": float(np.percentile(means, tail)),
            "high": float(np.percentile(means, 100 - tail)), "level": level,
            "resamples": resamples}


def naive_forecasts(rows: data.Rows, index: np.ndarray) -> dict[str, np.ndarray]:
    """The naive baselines of :data:`NAIVE` on rows ``index``, as whole counts."""
    return {"same_week": np.rint(rows.n_reviews[index]),
            "roll_mean_4": np.rint(rows.roll_mean_4[index]),
            "roll_mean_12": np.rint(rows.roll_mean_12[index]),
            "roll_mean_4_poisson": smape_optimal_count(rows.roll_mean_4[index])}


# ---- LightGBM -------------------------------------------------------------------------------


def lightgbm_forecasts(rows: data.Rows, split: data.Split, seed: int = 0,
                       threads: int = 0) -> dict[str, np.ndarray] | str:
    """LightGBM's whole-count forecasts of the validation rows, or why there are none.

    Inputs: the model's numeric features (trees need no standardising) and the product's
    main_category. Trained on the fit weeks with early stopping on the inner weeks (what the
    model's epoch is chosen on). ``lightgbm``: L1 on log1p(count) (the model's loss), rounded;
    ``lightgbm_poisson``: a Poisson rate, forecast as the SMAPE-optimal whole count.
    """
    try:
        import lightgbm as lgb
    except ImportError as exc:
        return f"lightgbm is not importable ({exc}): no LightGBM baseline; pip install lightgbm"
    category = rows.category if rows.category is not None else np.full(len(rows.products), "")
    _, codes = np.unique(category.astype(str), return_inverse=True)
    x = np.column_stack([rows.numeric.astype(np.float64), codes[rows.product].astype(np.float64)])
    cat_col = x.shape[1] - 1
    y = rows.target
    params: dict[str, Any] = {"learning_rate": 0.05, "num_leaves": 63, "min_data_in_leaf": 50,
                              "feature_fraction": 0.9, "seed": seed, "deterministic": True,
                              "force_row_wise": True, "num_threads": threads, "verbose": -1}
    out: dict[str, np.ndarray] = {}
    history = data.History.from_rows(rows)
    hist_x = None
    for name, objective, target in (("lightgbm", "regression_l1", np.log1p(y)),
                                    ("lightgbm_poisson", "poisson", y),
                                    ("lightgbm_poisson_history", "poisson", y)):
        if name.endswith("_history"):
            # The model's inputs in full: also the product's weekly counts of the last weeks
            # (NaN before its first review); for the trees, only the index changes per part.
            if hist_x is None:
                counts, _ = history.window(np.arange(len(rows)), rows.product)
                counts[counts < 0] = np.nan
                hist_x = np.column_stack([x[:, :cat_col], counts, x[:, cat_col]])
            xx, cc = hist_x, hist_x.shape[1] - 1
        else:
            xx, cc = x, cat_col
        fit = lgb.Dataset(xx[split.fit], target[split.fit], categorical_feature=[cc],
                          free_raw_data=False)
        inner = lgb.Dataset(xx[split.inner], target[split.inner], reference=fit,
                            categorical_feature=[cc])
        booster = lgb.train({**params, "objective": objective}, fit, num_boost_round=1000,
                            valid_sets=[inner],
                            callbacks=[lgb.early_stopping(50, verbose=False)])
        pred = np.asarray(booster.predict(xx[split.val], num_iteration=booster.best_iteration))
        if objective == "poisson":
            out[name] = smape_optimal_count(pred)
        else:
            out[name] = np.rint(np.clip(np.expm1(pred), 0.0, None))
    return out


# ---- the floor on synthetic data ------------------------------------------------------------


def expected_weekly_counts(params: dict[str, Any], product: np.ndarray,
                           week: np.ndarray) -> np.ndarray:
    """The generator's expected review count of generator product ``product[i]`` in the ISO
    week starting ``week[i]`` (datetime64[D]); 0 outside the generated range.

    Per review: P(product) = weight; its time is launch + Gamma(2, scale_days) days, kept with
    probability season[cat, month] for up to ``tries`` draws, else uniform from the (clipped)
    launch to the end (``synth._review_chunk``). Summed per day, then per week.
    """
    day_ms = 86_400_000
    start, end = int(params["start_ms"]), int(params["end_ms"])
    n_days = (end - start) // day_ms
    n_weeks = n_days // 7  # the range starts on a Monday and is whole weeks long
    edges = start + np.arange(n_days + 1, dtype=np.int64) * day_ms
    first_day = np.datetime64(start // day_ms, "D")
    month = ((first_day + np.arange(n_days)).astype("datetime64[M]").astype(np.int64)) % 12
    week_of = ((np.asarray(week, dtype="datetime64[D]") - first_day).astype(np.int64)) // 7
    out = np.zeros(len(product), dtype=np.float64)
    ok = (week_of >= 0) & (week_of < n_weeks)
    wanted = np.unique(np.asarray(product)[ok])
    tries = int(params["tries"])
    pos = np.searchsorted(wanted, product)  # where a row's product is in ``wanted`` (ok rows)
    for lo in range(0, len(wanted), 256):
        p = wanted[lo:lo + 256]
        scale = params["scale_days"][p][:, None]
        launch = params["launch"][p][:, None]
        x = np.clip((edges[None, :] - launch) / day_ms / scale, 0.0, None)
        cdf = 1.0 - np.exp(-x) * (1.0 + x)  # Gamma(2, 1)
        q = np.diff(cdf, axis=1) * params["season"][params["cat"][p]][:, month]
        accept = q.sum(axis=1, keepdims=True)
        kept = np.where(accept > 0, (1.0 - (1.0 - accept) ** tries) / np.maximum(accept, 1e-300),
                        float(tries))
        fallback = (1.0 - accept) ** tries
        u0 = np.clip(launch, start, end - day_ms).astype(np.float64)
        covered = np.clip(edges[None, 1:] - np.maximum(edges[None, :-1], u0), 0.0, None)
        daily = q * kept + fallback * covered / (end - u0)
        weekly = daily[:, :n_weeks * 7].reshape(len(p), n_weeks, 7).sum(axis=2)
        rate = weekly * params["weight"][p][:, None] * params["n_reviews"]
        mine = ok & (pos >= lo) & (pos < lo + len(p))
        out[mine] = rate[pos[mine] - lo, week_of[mine]]
    return out


def synthetic_floor(raw_dir: Path, synthetic: bool, rows: data.Rows,
                    index: np.ndarray) -> np.ndarray | str:
    """The best possible whole-count forecasts of rows ``index`` of synthetic data (the
    generator's expected count of each row's target week, SMAPE-optimal under Poisson), or why
    there are none."""
    marker = Path(raw_dir) / "synth.json"
    if not synthetic or not marker.is_file():
        return "not synthetic data (the run reads configured input): no floor"
    from hpcpipe.steps import synth

    request = json.loads(marker.read_text())["made_from"]["request"]
    params = synth.generator_parameters(int(request["n_reviews"]), int(request["seed"]),
                                        request.get("n_products"))
    position = {asin: i for i, asin in enumerate(params["parent_asin"])}
    gen = np.array([position.get(a, -1) for a in rows.products], dtype=np.int64)[
        rows.product[index]]
    if (gen < 0).any():
        return (f"{int((gen < 0).sum())} validation rows name products the generator did not "
                f"make ({marker} does not describe this data): no floor")
    rate = expected_weekly_counts(params, gen, rows.week[index] + np.timedelta64(7, "D"))
    return smape_optimal_count(rate)


# ---- the whole table ------------------------------------------------------------------------


def baseline_table(rows: data.Rows, split: data.Split, raw_dir: Path, synthetic: bool,
                   seed: int = 0, threads: int = 0) -> dict[str, Any]:
    """Scores of every baseline (and the floor) on the validation rows, and notes saying what
    could not be computed. ``{"baselines": {name: scores}, "floor": scores | None, "notes":
    [str], "seconds": {name: s}, "forecasts": {name: whole counts per row}}`` (forecasts
    for :func:`versus_baselines`, not for the metrics)."""
    index = split.val
    true = rows.target[index]
    table: dict[str, Any] = {"baselines": {}, "floor": None, "notes": [], "seconds": {},
                             "forecasts": {}}
    for name, pred in naive_forecasts(rows, index).items():
        table["baselines"][name] = scores(pred, true)
        table["forecasts"][name] = pred
    t0 = time.perf_counter()
    got = lightgbm_forecasts(rows, split, seed, threads)
    table["seconds"]["lightgbm"] = round(time.perf_counter() - t0, 2)
    if isinstance(got, str):
        table["notes"].append(got)
        log.warning("%s", got)
    else:
        for name, pred in got.items():
            table["baselines"][name] = scores(pred, true)
            table["forecasts"][name] = pred
    t0 = time.perf_counter()
    floor = synthetic_floor(raw_dir, synthetic, rows, index)
    table["seconds"]["floor"] = round(time.perf_counter() - t0, 2)
    if isinstance(floor, str):
        table["notes"].append(floor)
    else:
        table["floor"] = scores(floor, true)
        table["forecasts"]["floor"] = floor
    return table


def versus_baselines(pred: np.ndarray, table: dict[str, Any], true: np.ndarray,
                     seed: int = 0) -> dict[str, dict[str, float]]:
    """The model's whole-count forecasts ``pred`` of the validation rows against each forecast
    in ``table["forecasts"]`` (baselines and floor): :func:`bootstrap_smape_diff`."""
    return {name: bootstrap_smape_diff(pred, other, true, seed=seed)
            for name, other in table.get("forecasts", {}).items()}


def strongest(baselines: dict[str, dict[str, float]], names: Any = None) -> tuple[str, float]:
    """(name, SMAPE) of the baseline with the lowest SMAPE among ``names`` (all by default)."""
    pool = {k: v["smape"] for k, v in baselines.items() if names is None or k in names}
    name = min(pool, key=lambda k: pool[k])
    return name, pool[name]


def improvement_pct(model_smape: float, base_smape: float) -> float:
    return 100.0 * (base_smape - model_smape) / base_smape if base_smape else math.nan


def gap_closed_interval(pred: np.ndarray, table: dict[str, Any], true: np.ndarray,
                        resamples: int = 1000, seed: int = 0,
                        level: float = 0.95) -> dict[str, float] | None:
    """:func:`gap_closed_pct` of the whole-count forecasts ``pred`` with a paired bootstrap
    interval: the rows resampled with replacement, the model, rounded roll_mean_4 and the floor
    scored on each resample. On a few thousand rows the share moves by several points from
    resample to resample; a target on it is met beyond the noise only where ``low`` reaches it.
    None without the floor or rounded roll_mean_4 among ``table["forecasts"]``."""
    forecasts = table.get("forecasts", {})
    if "floor" not in forecasts or GAP_FROM not in forecasts or not len(true):
        return None
    terms = np.stack([smape_terms(pred, true), smape_terms(forecasts[GAP_FROM], true),
                      smape_terms(forecasts["floor"], true)])  # (3, n): model, ref, floor
    n = terms.shape[1]
    rng = np.random.default_rng(seed)
    shares = np.empty(resamples)
    for i in range(resamples):
        model, ref, floor = terms[:, rng.integers(0, n, n)].mean(axis=1)
        shares[i] = 100.0 * (ref - model) / (ref - floor) if ref > floor else math.nan
    model, ref, floor = terms.mean(axis=1)
    if ref <= floor:
        return None
    tail = 100 * (1 - level) / 2
    return {"pct": float(100.0 * (ref - model) / (ref - floor)),
            "low": float(np.nanpercentile(shares, tail)),
            "high": float(np.nanpercentile(shares, 100 - tail)), "level": level,
            "resamples": resamples}


def gap_closed_pct(model_smape: float, table: dict[str, Any]) -> float | None:
    """Share of the gap from rounded roll_mean_4 to the floor that the model closes (%)."""
    floor = table.get("floor")
    ref = table["baselines"].get(GAP_FROM)
    if not floor or not ref or ref["smape"] <= floor["smape"]:
        return None
    return 100.0 * (ref["smape"] - model_smape) / (ref["smape"] - floor["smape"])
