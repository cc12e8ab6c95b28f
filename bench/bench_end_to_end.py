"""End to end, raw reviews files -> weekly features: hpcpipe against DuckDB on one machine.

    python bench/bench_end_to_end.py [--reviews 31800000] [--files 8] [--data-dir bench/data]
                                     [--skip-duckdb-two] [--repeat 2]

In one run, each phase in its own subprocess whose process tree's memory is sampled from /proc
(peak of the summed RSS and PSS; see bench_features.py):

1. ``synth``: realistic synthetic reviews (``hpcpipe data synth --sizes realistic``: ~53-word
   texts with a long tail, image lists, full metadata) in ``--files`` jsonl.gz files, like the
   per-category files of Amazon Reviews'23; reused when present.
2. ``duckdb_one``: DuckDB's single statement: read_json over the raw files (explicit columns, the
   ingest's validity checks as a filter) -> the weekly definitions of
   ``bench/features_reference.sql`` -> parquet.
3. ``duckdb_two``: DuckDB in two stages: raw files -> 64 hash buckets of parquet, then the same
   definitions over them (the shape of hpcpipe's own pipeline).
4. ``hpcpipe``: the real step entry points, ``python -m hpcpipe.jobs.ingest --run-dir RUN`` then
   ``python -m hpcpipe.jobs.features --run-dir RUN``, on a run folder whose config names the
   raw files (each step opens its own Dask cluster sized from the machine).
5. ``compare``: hpcpipe's features against ``duckdb_one``'s, value for value (full outer join on
   parent_asin and week).

Phases 2-4 run ``--repeat`` rounds, in turned-round order each round; the fastest run of each is
compared, with the largest peak memory of its runs (this machine's speed drifts by a quarter
within minutes: one round of each would compare moments, not programs). Every run's time is kept.

DuckDB does not deduplicate here (hpcpipe does: (user_id, parent_asin, timestamp), first in
input order), which only makes DuckDB faster; the synthetic data has no duplicates, so the outputs
must still be equal. Writes ``<data-dir>/e2e-<N>/bench.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import bench_features  # noqa: E402
from bench_features import FEATURES_SQL, phase_compare  # noqa: E402

_COLUMNS = ("{'rating': 'DOUBLE', 'text': 'VARCHAR', 'parent_asin': 'VARCHAR', "
            "'user_id': 'VARCHAR', 'timestamp': 'BIGINT', 'helpful_vote': 'BIGINT', "
            "'verified_purchase': 'BOOLEAN'}")
# What ingest refuses, as a filter (the synthetic data has none of it; the cost is DuckDB's).
_VALID = ("rating BETWEEN 1 AND 5 AND parent_asin <> '' AND user_id <> '' "
          "AND timestamp >= 100000000000 AND timestamp <= epoch_ms(now()) + 2 * 86400000")


def _raw_files(raw: Path) -> list[str]:
    return sorted(str(p) for p in raw.glob("reviews*.jsonl.gz"))


def _read_raw(raw: Path) -> str:
    return (f"(SELECT parent_asin, rating, coalesce(helpful_vote, 0) AS helpful_vote, "
            f"coalesce(verified_purchase, false) AS verified_purchase, "
            f"coalesce(length(text), 0)::INTEGER AS text_chars, timestamp "
            f"FROM read_json({_raw_files(raw)}, format='newline_delimited', "
            f"columns={_COLUMNS}) WHERE {_VALID})")


def _features_sql(source: str) -> str:
    """The reference definitions over ``source``, the last week found in the data itself."""
    sql = FEATURES_SQL.replace("read_parquet({files})", source)
    return sql.replace("DATE '{last_week}'", "(SELECT max(week) FROM g)")


def phase_synth(a: argparse.Namespace) -> dict[str, Any]:
    from hpcpipe.steps.synth import write_synthetic

    return write_synthetic(Path(a.raw), a.reviews, seed=0, files=a.files, sizes="realistic")


def phase_duckdb_one(a: argparse.Namespace) -> dict[str, Any]:
    import duckdb

    with duckdb.connect() as con:
        con.sql(f"COPY ({_features_sql(_read_raw(Path(a.raw)))}) TO '{a.out}' (FORMAT parquet)")
        rows = con.sql(f"SELECT count(*) FROM read_parquet('{a.out}')").fetchall()[0][0]
    return {"rows_out": rows}


def phase_duckdb_two(a: argparse.Namespace) -> dict[str, Any]:
    import duckdb

    buckets = Path(a.out).with_suffix(".buckets")
    shutil.rmtree(buckets, ignore_errors=True)
    with duckdb.connect() as con:
        start = time.perf_counter()
        con.sql(f"""COPY (SELECT *, hash(parent_asin) % 64 AS bucket FROM {_read_raw(Path(a.raw))})
                    TO '{buckets}' (FORMAT parquet, PARTITION_BY (bucket))""")
        stage1 = time.perf_counter() - start
        source = f"read_parquet('{buckets}/*/*.parquet')"
        con.sql(f"COPY ({_features_sql(source)}) TO '{a.out}' (FORMAT parquet)")
        stage2 = time.perf_counter() - start - stage1
    shutil.rmtree(buckets, ignore_errors=True)
    return {"stage1_s": round(stage1, 2), "stage2_s": round(stage2, 2)}


def new_run(raw: Path, run: Path, keep_text: bool = False) -> Any:
    """A fresh run folder (its RunLayout) whose config names the raw files, the defaults
    otherwise (``ingest.keep_text`` as given)."""
    import yaml

    from hpcpipe.config import RunConfig
    from hpcpipe.run.layout import RunLayout

    layout = RunLayout(run)
    shutil.rmtree(layout.root, ignore_errors=True)
    layout.root.mkdir(parents=True)
    cfg = RunConfig()
    cfg.data.reviews = _raw_files(raw)
    cfg.data.metadata = str(raw / "meta.jsonl.gz")
    cfg.ingest.keep_text = keep_text
    layout.config.write_text(yaml.safe_dump(cfg.to_dict()))
    return layout


def phase_hpcpipe(a: argparse.Namespace) -> dict[str, Any]:
    """Both steps through their job entry points, as a job script runs them."""
    layout = new_run(Path(a.raw), Path(a.run))
    seconds = {}
    for step in ("ingest", "features"):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", f"hpcpipe.jobs.{step}", "--run-dir",
                        str(layout.root)], check=True, cwd=REPO)
        seconds[step] = round(time.perf_counter() - start, 2)
    manifest = json.loads((layout.features / "manifest.json").read_text())
    return {"step_seconds": seconds, "rows_out": manifest["rows_out"],
            "n_workers": manifest["n_workers"],
            "ingest": json.loads((layout.ingest / "manifest.json").read_text())}


def phase_compare_e2e(a: argparse.Namespace) -> dict[str, Any]:
    return phase_compare(a)


PHASES = {"synth": phase_synth, "duckdb_one": phase_duckdb_one, "duckdb_two": phase_duckdb_two,
          "hpcpipe": phase_hpcpipe, "compare": phase_compare_e2e}


def run_phase(name: str, args: list[str], log_path: Path) -> dict[str, Any]:
    """One phase of this script in a subprocess (bench_features' runner, sampled every 0.25 s)."""
    return bench_features.run_phase(name, args, log_path, script=__file__, every=0.25)


def _rounds(a: argparse.Namespace, raw: Path, run: Path, logs: Path, one: Path, two: Path
            ) -> dict[str, list[dict[str, Any]]]:
    """Every phase ``--repeat`` times, the order turned round each round (DuckDB first, then
    hpcpipe first, ...) so that a machine that speeds up or slows down during the run favours
    neither."""
    runs: dict[str, list[dict[str, Any]]] = {"duckdb_one": [], "duckdb_two": [], "hpcpipe": []}
    args = {"duckdb_one": ["--raw", str(raw), "--out", str(one)],
            "duckdb_two": ["--raw", str(raw), "--out", str(two)],
            "hpcpipe": ["--raw", str(raw), "--run", str(run)]}
    names = ["duckdb_one"] + ([] if a.skip_duckdb_two else ["duckdb_two"]) + ["hpcpipe"]
    for r in range(a.repeat):
        for name in (names if r % 2 == 0 else names[::-1]):
            load = os.getloadavg()[0]
            result = run_phase(name, args[name], logs / f"{name}-{r}.log")
            runs[name].append({**result, "round": r, "load_before": round(load, 2)})
    return {k: v for k, v in runs.items() if v}


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest run of a phase, with the largest peak memory of all its runs."""
    best = dict(min(runs, key=lambda r: r["wall_s"]))
    best["walls_s"] = [r["wall_s"] for r in runs]
    for key in ("peak_tree_rss_bytes", "peak_tree_pss_bytes"):
        best[key] = max(r[key] for r in runs)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reviews", type=int, default=31_800_000)
    p.add_argument("--files", type=int, default=8, help="raw reviews files (by category)")
    p.add_argument("--data-dir", type=Path, default=HERE / "data")
    p.add_argument("--skip-duckdb-two", action="store_true")
    p.add_argument("--repeat", type=int, default=2,
                   help="rounds of every phase (the fastest of each is compared)")
    p.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    for opt in ("--raw", "--out", "--run", "--ours", "--duckdb-out"):
        p.add_argument(opt, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.phase:
        import logging

        logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                            format="%(asctime)s %(name)s: %(message)s")
        Path(a.result).write_text(json.dumps(PHASES[a.phase](a), default=str))
        return

    base = (a.data_dir / f"e2e-{a.reviews}").resolve()
    raw, logs, run = base / "raw", base / "logs", base / "run"
    logs.mkdir(parents=True, exist_ok=True)
    one, two = base / "duckdb-one.parquet", base / "duckdb-two.parquet"
    report: dict[str, Any] = {"reviews": a.reviews, "files": a.files, "repeat": a.repeat,
                              "machine": {
        "cpus_usable": len(os.sched_getaffinity(0)), "cpus": os.cpu_count(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "load_before": os.getloadavg()}}
    if not (raw / "meta.jsonl.gz").is_file():
        report["synth"] = run_phase("synth", ["--raw", str(raw), "--reviews", str(a.reviews),
                                              "--files", str(a.files)], logs / "synth.log")
    report["raw_bytes"] = sum(os.path.getsize(f) for f in _raw_files(raw))
    report["runs"] = _rounds(a, raw, run, logs, one, two)
    for name, runs in report["runs"].items():
        report[name] = _best(runs)
    report["compare"] = run_phase("compare", ["--ours", str(run / "features"), "--duckdb-out",
                                              str(one)], logs / "compare.log")["result"]
    report["machine"]["load_after"] = os.getloadavg()

    h = report["hpcpipe"]
    duck = [report[k] for k in ("duckdb_one", "duckdb_two") if k in report]
    best = min(d["wall_s"] for d in duck)
    least = min(d["peak_tree_rss_bytes"] for d in duck)
    report["ratios"] = {"wall_hpcpipe_over_best_duckdb": round(h["wall_s"] / best, 3),
                        "peak_rss_hpcpipe_over_least_duckdb":
                            round(h["peak_tree_rss_bytes"] / max(1, least), 3),
                        # Round by round (the phases of one round ran minutes apart).
                        "wall_by_round": [
                            round(hr["wall_s"] / min(report["runs"][k][r]["wall_s"]
                                                     for k in ("duckdb_one", "duckdb_two")
                                                     if k in report["runs"]), 3)
                            for r, hr in enumerate(report["runs"]["hpcpipe"])]}
    report["targets"] = {"wall_at_most_1x": h["wall_s"] <= best,
                         "peak_rss_at_most_a_third": 3 * h["peak_tree_rss_bytes"] <= least,
                         "outputs_agree": report["compare"]["agree"]}
    (base / "bench.json").write_text(json.dumps(report, indent=2, default=str))

    print(f"\n{a.reviews:,} realistic reviews in {a.files} jsonl.gz files "
          f"({report['raw_bytes'] / 1e9:.2f} GB), {report['machine']['cpus_usable']} usable CPUs, "
          f"{report['machine']['memory_bytes'] / 2**30:.0f} GiB, load before "
          f"{report['machine']['load_before'][0]:.1f}; {a.repeat} round(s), the fastest shown, "
          "with the largest peak")
    print(f"{'phase':<14}{'wall s':>9}{'peak RSS':>12}{'peak PSS':>12}  every round's wall s")
    for name in ("synth", "duckdb_one", "duckdb_two", "hpcpipe"):
        if name in report:
            r = report[name]
            print(f"{name:<14}{r['wall_s']:>9.1f}{r['peak_tree_rss_bytes'] / 1e9:>10.2f} GB"
                  f"{r['peak_tree_pss_bytes'] / 1e9:>10.2f} GB  {r.get('walls_s', '')}")
    print("hpcpipe steps (fastest round):", h["result"]["step_seconds"])
    print("ratios:", report["ratios"])
    print("targets:", report["targets"])
    c = report["compare"]
    print(f"comparison: {c['rows_joined']:,} rows joined, "
          f"{'all values agree' if c['agree'] else 'DIFFERENCES: ' + str(c['differences'])}")


if __name__ == "__main__":
    main()
