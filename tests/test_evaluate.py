"""Tests of the train step's evaluation (hpcpipe/steps/train/evaluate.py): scores, the
SMAPE-optimal count, the generator's expected counts (the floor) and the LightGBM baseline."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from hpcpipe.run.layout import RunLayout
from hpcpipe.steps import synth
from hpcpipe.steps.train import data, evaluate


def brute_force_count(rate: float) -> int:
    """argmin over k of E[SMAPE(k, Y)], Y ~ Poisson(rate), summed far into the tail."""
    y = np.arange(0, int(rate + 20 * math.sqrt(rate) + 40))
    pmf = np.exp(y * math.log(max(rate, 1e-300)) - rate
                 - np.array([math.lgamma(v + 1) for v in y]))
    cost = [float((evaluate.smape_terms(np.full(len(y), k), y) * pmf).sum()) for k in y]
    return int(np.argmin(cost))


def test_smape_optimal_count_matches_brute_force() -> None:
    rates = np.array([0.0, 0.2, 0.7, 1.0, 1.6, 3.0, 7.5, 40.0, 250.0])
    got = evaluate.smape_optimal_count(rates)
    assert got.tolist() == [brute_force_count(r) for r in rates]
    assert got[0] == 0 and got[1] == 0, "a week likely without reviews is forecast as 0"


def brute_force_nb_count(mean: float, alpha: float) -> int:
    """argmin over k of E[SMAPE(k, Y)], Y negative binomial (mean, variance mean + alpha
    mean^2), summed far into the tail."""
    r = 1.0 / alpha
    y = np.arange(0, int(mean + 40 * math.sqrt(mean + alpha * mean ** 2) + 40))
    logp = np.array([math.lgamma(v + r) - math.lgamma(r) - math.lgamma(v + 1)
                     + r * math.log(r / (r + mean)) + v * math.log(mean / (r + mean))
                     for v in y])
    cost = [float((evaluate.smape_terms(np.full(len(y), k), y) * np.exp(logp)).sum()) for k in y]
    return int(np.argmin(cost))


def test_smape_optimal_count_under_a_negative_binomial() -> None:
    means = np.array([0.2, 0.7, 1.6, 3.0, 7.5, 40.0, 3.0, 40.0])
    alphas = np.array([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 2.0, 0.05])
    got = evaluate.smape_optimal_count(means, alphas)
    assert got.tolist() == [brute_force_nb_count(m, a) for m, a in zip(means, alphas, strict=True)]
    # A dispersion near 0 is the Poisson; a wide one forecasts lower than the Poisson would.
    assert (evaluate.smape_optimal_count(means, np.full(len(means), 1e-9))
            == evaluate.smape_optimal_count(means)).all()
    assert got[5] < evaluate.smape_optimal_count(means[5:6])[0]


def test_bootstrap_interval_of_a_paired_difference() -> None:
    rng = np.random.default_rng(0)
    true = rng.poisson(3.0, 4000).astype(float)
    good, bad = true.copy(), np.rint(true * rng.uniform(0.3, 1.7, len(true)))
    d = evaluate.bootstrap_smape_diff(good, bad, true)
    assert d["diff"] < 0 and d["low"] < d["diff"] < d["high"] < 0, d
    same = evaluate.bootstrap_smape_diff(bad, bad, true)
    assert same["diff"] == same["low"] == same["high"] == 0.0


def test_gap_closed_interval_holds_the_share_and_narrows_with_more_rows() -> None:
    """The share of the gap closed, with its paired bootstrap interval: the same share as
    gap_closed_pct on the whole rows, inside an interval that shrinks like 1/sqrt(rows)."""
    rng = np.random.default_rng(1)
    widths = []
    for n in (2_000, 32_000):
        rate = rng.gamma(1.5, 2.0, n)
        true = rng.poisson(rate).astype(float)
        floor = evaluate.smape_optimal_count(rate)
        ref = np.rint(rate * rng.uniform(0.2, 1.8, n))
        model = np.where(rng.random(n) < 0.6, floor, ref)  # ~60% of the way
        table = {"baselines": {evaluate.GAP_FROM: evaluate.scores(ref, true)},
                 "floor": evaluate.scores(floor, true),
                 "forecasts": {evaluate.GAP_FROM: ref, "floor": floor}}
        got = evaluate.gap_closed_interval(model, table, true)
        assert got is not None
        point = evaluate.gap_closed_pct(evaluate.scores(model, true)["smape"], table)
        assert got["pct"] == pytest.approx(point)
        assert got["low"] < got["pct"] < got["high"] and 40 < got["pct"] < 80, got
        widths.append(got["high"] - got["low"])
    assert widths[1] < widths[0] / 2.5, widths  # 16x the rows: about a quarter of the width
    table["forecasts"].pop("floor")
    assert evaluate.gap_closed_interval(model, table, true) is None


def test_scores_split_zero_and_nonzero_targets() -> None:
    s = evaluate.scores(np.array([0.0, 1.0, 2.0, 0.0]), np.array([0.0, 0.0, 2.0, 3.0]))
    assert s["smape"] == pytest.approx((0 + 2 + 0 + 2) / 4)
    assert s["smape_zero"] == pytest.approx(1.0) and s["smape_nonzero"] == pytest.approx(1.0)
    assert s["mae"] == pytest.approx(1.0) and s["rows"] == 4 and s["zero_share"] == 0.5
    assert s["mae_log1p"] == pytest.approx((math.log(2) + math.log(4)) / 4)
    assert s["rmse_log1p"] == pytest.approx(math.sqrt((math.log(2) ** 2 + math.log(4) ** 2) / 4))


def test_generator_expected_counts_add_up_and_follow_the_data(tmp_path: Path) -> None:
    n_reviews = 30_000
    params = synth.generator_parameters(n_reviews, seed=3)
    n_products = len(params["parent_asin"])
    weeks = np.datetime64("2018-01-01") + np.arange(313) * np.timedelta64(7, "D")
    product = np.repeat(np.arange(n_products), len(weeks))
    rate = evaluate.expected_weekly_counts(params, product, np.tile(weeks, n_products))
    assert rate.sum() == pytest.approx(n_reviews, rel=1e-9), "every review lands in some week"
    # The generated reviews per product and per week follow the expectation.
    made = synth.write_synthetic(tmp_path, n_reviews, seed=3, fmt="parquet")
    reviews = pq.read_table(made["reviews"], columns=["parent_asin", "timestamp"]).to_pandas()
    index = {a: i for i, a in enumerate(params["parent_asin"])}
    p = reviews.parent_asin.map(index).to_numpy()
    w = (reviews.timestamp.to_numpy() - synth.START_MS) // (7 * synth.DAY_MS)
    seen = np.bincount(p * 313 + w, minlength=n_products * 313)
    # Poisson counts of these means: dispersion about 1 (wrong means give far more).
    busy = rate > 1e-3
    dispersion = float((((seen - rate) ** 2)[busy] / rate[busy]).mean())
    assert 0.9 < dispersion < 1.1, dispersion
    assert seen[~busy].sum() < 0.01 * n_reviews
    by_week = seen.reshape(n_products, 313).sum(0)
    expected = rate.reshape(n_products, 313).sum(0)
    assert np.abs(by_week - expected).max() < 5 * np.sqrt(expected.max()) + 5


def test_lightgbm_baseline_and_a_missing_lightgbm_said(dataset: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    rows = data.load_rows(RunLayout(dataset))
    split = data.split_by_time(rows, 6)
    table = evaluate.baseline_table(rows, split, dataset / "raw", synthetic=False)
    assert {"same_week", "roll_mean_4", "roll_mean_12", "roll_mean_4_poisson", "lightgbm",
            "lightgbm_poisson", "lightgbm_poisson_history"} <= table["baselines"].keys()
    assert table["forecasts"].keys() == table["baselines"].keys()
    assert all(len(f) == len(split.val) for f in table["forecasts"].values())
    assert table["floor"] is None and any("not synthetic" in n for n in table["notes"])
    monkeypatch.setitem(sys.modules, "lightgbm", None)  # import lightgbm now fails
    table = evaluate.baseline_table(rows, split, dataset / "raw", synthetic=False)
    assert "lightgbm" not in table["baselines"]
    assert any(n.startswith("lightgbm is not importable") for n in table["notes"]), table


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_train import make_features

    root = tmp_path_factory.mktemp("dataset") / "run"
    make_features(root)
    return root
