"""How much of issue 13's gap can any forecaster close? A forecaster that knows the synthetic
generator's family, measured on the same validation rows as the model.

The floor of the evaluation (``hpcpipe.steps.train.evaluate.synthetic_floor``) is the generator's
own expected count of each row's target week: it knows each product's popularity, launch and
life-cycle scale, which no forecaster can know. What the observed counts allow is bounded by the
Bayes forecast given the product's history. This script computes an approximation of it that
knows everything but the product: the generator's family (a review's time is launch +
Gamma(2, scale) days, kept by the category's month weights; ``synth.generator_parameters``) and its
priors (launch uniform over the generator's range, scale log-normal(log 200, 0.8), the exact season
table, the product's total review count from a Gamma fitted to the generator's popularity).

Per category it tabulates the weekly curves of a grid of (launch, scale) (``--launches`` x
``--scales`` equal-prior-mass points), integrates the level out in closed form, weights each grid
point by its marginal likelihood given the product's weekly counts up to the row's week (zeros
included), and forecasts the posterior mean rate of the next week as the SMAPE-optimal whole count.
It prints, per cell, rounded roll_mean_4, this forecast, the floor and the share of the gap from
rounded roll_mean_4 to the floor the forecast closes (issue 13 asks the model for 75%; the model's
own figures are in ``bench/bench_model.py``'s table).

    python bench/bench_bound.py                          # 200k and 2M, seeds 0 and 1
    python bench/bench_bound.py --sizes 200000 --seeds 0 # one cell
    python bench/bench_bound.py --runs runs/a            # a run with ingest and features done

Each cell runs the shipped local config's ingest and features steps (``hpcpipe submit --local
--wait --steps ingest,features``) with ``data.synth_reviews`` and ``data.seed`` set. The grid
converges from below: on 200k seed 0, 60 x 16 points closed 61.7%, 240 x 32 73.0%, 600 x 48 74.6%,
1200 x 96 75.7% (14 minutes on 2 cores).
The last line is the table as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# scipy comes with lightgbm, a dependency of the train step's baseline.
from scipy.special import gammaln  # type: ignore[import-untyped]
from scipy.stats import norm  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval import machine  # noqa: E402

from hpcpipe.config import load_config  # noqa: E402
from hpcpipe.run.layout import RunLayout  # noqa: E402
from hpcpipe.steps import synth  # noqa: E402
from hpcpipe.steps.train import data, evaluate  # noqa: E402

DAY_MS = 86_400_000


def features_run(workdir: Path, size: int, seed: int) -> Path:
    """The local ingest and features steps on ``size`` synthetic reviews of ``seed``."""
    name = f"bound-{size}-s{seed}"
    subprocess.run(["hpcpipe", "submit", "--local", "--wait", "--steps", "ingest,features",
                    "--name", name, "--set", f"data.synth_reviews={size}",
                    "--set", f"data.seed={seed}"],
                   cwd=workdir, check=True, stdout=subprocess.DEVNULL)
    runs = [p for p in (workdir / "runs").iterdir() if p.name.startswith(name + "-")]
    return max(runs, key=lambda p: p.stat().st_mtime)


def family_forecast(rows: data.Rows, split: data.Split, params: dict[str, Any],
                    gen_of_product: np.ndarray, launches: int,
                    scales: int) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean rate of each validation row's next week, and the predictive's
    overdispersion (variance = rate + alpha rate^2), under the generator's family."""
    n_reviews = int(params["n_reviews"])
    start, end = int(params["start_ms"]), int(params["end_ms"])
    n_weeks = (end - start) // DAY_MS // 7
    first_day = np.datetime64(start // DAY_MS, "D")
    weeks = first_day + 7 * np.arange(n_weeks)
    week_of = (rows.week - first_day).astype(np.int64) // 7
    counts = np.zeros((len(rows.products), n_weeks))
    counts[rows.product, week_of] = rows.n_reviews  # weeks without a feature row had no review

    scale_grid = np.exp(np.log(200.0) + 0.8 * norm.ppf((np.arange(scales) + 0.5) / scales))
    launch_grid = np.linspace(start - 540 * DAY_MS, end - 60 * DAY_MS, launches).astype(np.int64)
    launch, scale = (a.ravel() for a in np.meshgrid(launch_grid, scale_grid, indexing="ij"))
    k = len(launch)
    total = n_reviews * params["weight"]  # a product's expected review count over the range
    a0, b0 = total.mean() ** 2 / total.var(), total.mean() / total.var()

    val = split.val
    cat_of_row = params["cat"][gen_of_product[rows.product[val]]]
    rate, alpha = np.zeros(len(val)), np.zeros(len(val))
    for cat in np.unique(cat_of_row):
        grid = {**params, "cat": np.full(k, cat), "launch": launch, "scale_days": scale,
                "weight": np.full(k, 1.0 / n_reviews)}
        curves = evaluate.expected_weekly_counts(
            grid, np.repeat(np.arange(k), n_weeks), np.tile(weeks, k)).reshape(k, n_weeks)
        log_curves = np.log(np.maximum(curves, 1e-300))
        for week in np.unique(week_of[val[cat_of_row == cat]]):
            sel = np.flatnonzero((cat_of_row == cat) & (week_of[val] == week))
            seen = counts[rows.product[val[sel]], :week + 1]
            c = seen.sum(axis=1, keepdims=True)
            g = curves[:, :week + 1].sum(axis=1)[None, :]
            log_marginal = (seen @ log_curves[:, :week + 1].T + gammaln(c + a0)
                            - (c + a0) * np.log(g + b0))
            post = np.exp(log_marginal - log_marginal.max(axis=1, keepdims=True))
            post /= post.sum(axis=1, keepdims=True)
            mean_k = (c + a0) / (g + b0) * curves[None, :, week + 1]
            m = (post * mean_k).sum(axis=1)
            second = (post * mean_k ** 2 * (c + a0 + 1) / (c + a0)).sum(axis=1)
            rate[sel] = m
            alpha[sel] = np.maximum(second - m ** 2, 0.0) / np.maximum(m, 1e-12) ** 2
    return rate, alpha


def cell(run: Path, launches: int, scales: int) -> dict[str, Any]:
    layout = RunLayout(run)
    train = load_config(layout.config).train
    rows = data.load_rows(layout)
    split = data.split_by_time(rows, train.val_weeks, train.train_weeks)
    request = json.loads((run / "raw" / "synth.json").read_text())["made_from"]["request"]
    params = synth.generator_parameters(int(request["n_reviews"]), int(request["seed"]),
                                        request.get("n_products"))
    position = {asin: i for i, asin in enumerate(params["parent_asin"])}
    gen_of_product = np.array([position[a] for a in rows.products], dtype=np.int64)
    true = rows.target[split.val]
    t0 = time.perf_counter()
    rate, alpha = family_forecast(rows, split, params, gen_of_product, launches, scales)
    seconds = time.perf_counter() - t0
    floor = evaluate.synthetic_floor(run / "raw", True, rows, split.val)
    if isinstance(floor, str):
        raise SystemExit(f"{run}: {floor}")
    smape = {
        "roll_mean_4": evaluate.scores(evaluate.naive_forecasts(rows, split.val)["roll_mean_4"],
                                       true)["smape"],
        "family": evaluate.scores(evaluate.smape_optimal_count(rate), true)["smape"],
        "family_nb": evaluate.scores(evaluate.smape_optimal_count(rate, alpha), true)["smape"],
        "floor": evaluate.scores(floor, true)["smape"],
    }
    # The forecast is the posterior mean as a Poisson count: family_nb (the predictive's
    # overdispersion) is reported beside it, never picked on these rows.
    closed = (100 * (smape["roll_mean_4"] - smape["family"])
              / (smape["roll_mean_4"] - smape["floor"]))
    return {"reviews": int(request["n_reviews"]), "seed": int(request["seed"]),
            "val_rows": len(true), "grid": f"{launches}x{scales}", "smape": smape,
            "gap_closed_pct": round(closed, 1), "seconds": round(seconds, 1)}


def render(cells: list[dict[str, Any]]) -> list[str]:
    out = ["| reviews | seed | val rows | rounded roll_mean_4 | family forecast | floor "
           "| gap closed |", "|---|---|---|---|---|---|---|"]
    for c in cells:
        s = c["smape"]
        out.append(f"| {c['reviews']:,} | {c['seed']} | {c['val_rows']:,} | "
                   f"{s['roll_mean_4']:.3f} | {s['family']:.3f} | "
                   f"{s['floor']:.3f} | {c['gap_closed_pct']:.1f}% |")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200_000, 2_000_000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--runs", type=Path, nargs="+", help="runs with features done")
    parser.add_argument("--launches", type=int, default=600)
    parser.add_argument("--scales", type=int, default=48)
    args = parser.parse_args()
    print(machine())
    cells = []
    if args.runs:
        for run in args.runs:
            cells.append(cell(run, args.launches, args.scales))
    else:
        with tempfile.TemporaryDirectory(prefix="bench-bound-") as tmp:
            for size in args.sizes:
                for seed in args.seeds:
                    run = features_run(Path(tmp), size, seed)
                    cells.append(cell(run, args.launches, args.scales))
                    print("\n".join(render(cells[-1:])[2:]), flush=True)
    print("\n".join(render(cells)))
    print(json.dumps(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
