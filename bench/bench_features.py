"""Benchmark of the features step against DuckDB on one machine.

    python bench/bench_features.py [--reviews 31800000] [--data-dir bench/data]
                                   [--format parquet|jsonl.gz|jsonl]

Steps (each timed in its own subprocess, whose process tree's memory is sampled from /proc):
1. synthesize the reviews with ``hpcpipe.steps.synth.write_synthetic`` in ``--format`` (parquet by
   default; jsonl.gz is how Amazon Reviews'23 is distributed), reused when present;
2. ingest them with ``hpcpipe.steps.ingest.ingest`` (reused when its manifest is present);
3. DuckDB reading the raw reviews and rewriting them into 64 hash buckets of parent_asin
   (the cost of merely reading and reshuffling the data once: ingest's yardstick);
4. the features step (``hpcpipe.steps.features.build_features`` with its own LocalCluster);
5. the same feature definitions as one DuckDB statement over the same ingested files;
6. a value-for-value comparison of 4 and 5 (in DuckDB: a full outer join on parent_asin and week).

Prints wall time, rows/s and peak memory of each and the ratios features/DuckDB, and writes them to
``<data-dir>/bench-<N>.json``. Peak memory is the largest sum over the process tree (the step and
its Dask workers) of RSS and of PSS (shared library pages counted once), sampled every 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PAGE = os.sysconf("SC_PAGE_SIZE")

# The feature definitions of the issue as one DuckDB statement (tests/test_features.py checks
# against the same file).
FEATURES_SQL = (HERE / "features_reference.sql").read_text(encoding="utf-8")

INT_COLUMNS = ("n_reviews", "helpful_votes", "lag_1", "lag_2", "lag_4", "weeks_since_first",
               "cum_reviews", "target_next_n")
FLOAT_COLUMNS = ("mean_rating", "rating_std", "share_5", "share_1", "verified_share",
                 "mean_text_chars", "roll_mean_4", "roll_mean_12", "roll_rating_12")


# ---------------------------------------------------------------------------------------------
# Phases, each run as `python bench/bench_features.py --phase NAME ...` in a subprocess.


def phase_synth(a: argparse.Namespace) -> dict[str, Any]:
    from hpcpipe.steps.synth import write_synthetic

    return write_synthetic(Path(a.raw), a.reviews, seed=0, fmt=a.format)


def phase_ingest(a: argparse.Namespace) -> dict[str, Any]:
    from hpcpipe.config import IngestConfig
    from hpcpipe.steps.ingest import ingest

    raw = Path(a.raw)
    return ingest([raw / f"reviews.{a.format}"], raw / f"meta.{a.format}", Path(a.ingest),
                  IngestConfig())


def phase_duckdb_rewrite(a: argparse.Namespace) -> dict[str, Any]:
    import duckdb

    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    src = str(Path(a.raw) / f"reviews.{a.format}")
    read = f"read_parquet('{src}')" if a.format == "parquet" else \
        f"read_json('{src}', format='newline_delimited')"
    with duckdb.connect() as con:
        con.sql(f"""COPY (SELECT *, hash(parent_asin) % 64 AS bucket FROM {read})
                    TO '{out}' (FORMAT parquet, PARTITION_BY (bucket))""")
    return {}


def phase_features(a: argparse.Namespace) -> dict[str, Any]:
    from hpcpipe.config import FeaturesConfig
    from hpcpipe.steps.features import build_features

    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    return build_features(Path(a.ingest), out, FeaturesConfig(), progress=True)


def _ingest_files(ingest: Path) -> list[str]:
    return sorted(str(p) for p in (ingest / "reviews").glob("bucket=*/*.parquet")
                  if not p.name.startswith("."))


def phase_duckdb_features(a: argparse.Namespace) -> dict[str, Any]:
    import duckdb

    ingest = Path(a.ingest)
    last_week = json.loads((ingest / "manifest.json").read_text())["last_week"]
    sql = FEATURES_SQL.format(files=_ingest_files(ingest), last_week=last_week)
    with duckdb.connect() as con:
        con.sql(f"COPY ({sql}) TO '{a.out}' (FORMAT parquet)")
        rows = con.sql(f"SELECT count(*) FROM read_parquet('{a.out}')").fetchall()[0][0]
    return {"rows_out": rows}


def phase_compare(a: argparse.Namespace) -> dict[str, Any]:
    """Full outer join of both outputs on (parent_asin, week); count differences per column."""
    import duckdb

    ours = str(Path(a.ours) / "bucket=*" / "part-0.parquet")
    checks = [f"count(*) FILTER (WHERE o.{c} IS DISTINCT FROM d.{c}) AS {c}" for c in INT_COLUMNS]
    # Floats: equal nulls, and values within 1e-9 relative (summation order differs).
    checks += [
        f"count(*) FILTER (WHERE (o.{c} IS NULL) <> (d.{c} IS NULL) OR "
        f"abs(o.{c} - d.{c}) > 1e-9 * greatest(1.0, abs(d.{c}))) AS {c}"
        for c in FLOAT_COLUMNS
    ]
    sql = f"""
        SELECT count(*) AS rows_joined,
               count(*) FILTER (WHERE o.parent_asin IS NULL) AS only_duckdb,
               count(*) FILTER (WHERE d.parent_asin IS NULL) AS only_features,
               max(abs(o.roll_rating_12 - d.roll_rating_12)) AS max_abs_diff_roll_rating_12,
               max(abs(o.rating_std - d.rating_std)) AS max_abs_diff_rating_std,
               {", ".join(checks)}
        FROM read_parquet('{ours}') o
        FULL OUTER JOIN read_parquet('{a.duckdb_out}') d
          ON o.parent_asin = d.parent_asin AND o.week = d.week
    """
    with duckdb.connect() as con:
        rel = con.sql(sql)
        row = dict(zip(rel.columns, rel.fetchall()[0], strict=True))
    bad = {k: v for k, v in row.items()
           if k not in ("rows_joined",) and not k.startswith("max_") and v}
    row["agree"] = not bad
    row["differences"] = bad
    return row


PHASES = {"synth": phase_synth, "ingest": phase_ingest, "duckdb_rewrite": phase_duckdb_rewrite,
          "features": phase_features, "duckdb_features": phase_duckdb_features,
          "compare": phase_compare}


# ---------------------------------------------------------------------------------------------
# Measuring a subprocess and its descendants.


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _tree_memory(root: int) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) in bytes over ``root`` and its descendants."""
    kids = _children_map()
    todo, rss, pss = [root], 0, 0
    while todo:
        pid = todo.pop()
        todo += kids.get(pid, [])
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith(b"Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith(b"Pss:"):
                        pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return rss, pss


def run_phase(name: str, args: list[str], log_path: Path, script: str = __file__,
              every: float = 0.5) -> dict[str, Any]:
    """Run one phase of ``script`` (``--phase NAME ... --result FILE``) in a subprocess; return
    its result, wall time and peak tree memory, sampled every ``every`` seconds."""
    cmd = [sys.executable, str(Path(script).resolve()), "--phase", name, *args]
    result_file = log_path.with_suffix(".json")
    result_file.unlink(missing_ok=True)
    peak = [0, 0]
    done = threading.Event()
    print(f"== {name}: {' '.join(args)}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([*cmd, "--result", str(result_file)], cwd=REPO, stdout=log_file,
                                stderr=subprocess.STDOUT)

        def sample() -> None:
            while not done.is_set():
                rss, pss = _tree_memory(proc.pid)
                peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
                done.wait(every)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise SystemExit(f"phase {name} failed with exit code {proc.returncode}:\n{tail}")
    out = json.loads(result_file.read_text()) if result_file.exists() else {}
    return {"wall_s": round(wall, 2), "peak_tree_rss_bytes": peak[0],
            "peak_tree_pss_bytes": peak[1],
            # Largest single process among the waited-for ones (Linux: KiB).
            "max_process_rss_bytes": usage.ru_maxrss * 1024, "result": out}


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reviews", type=int, default=31_800_000, help="reviews to synthesize")
    p.add_argument("--data-dir", type=Path, default=HERE / "data", help="where data goes")
    p.add_argument("--format", choices=("parquet", "jsonl.gz", "jsonl"), default="parquet",
                   help="format of the raw reviews (default parquet)")
    p.add_argument("--skip-rewrite", action="store_true", help="skip the DuckDB rewrite timing")
    p.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    for opt in ("--raw", "--ingest", "--out", "--ours", "--duckdb-out"):
        p.add_argument(opt, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.phase:
        logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                            format="%(asctime)s %(name)s: %(message)s")
        result = PHASES[a.phase](a)
        Path(a.result).write_text(json.dumps(result, default=str))
        return

    n = a.reviews
    data = a.data_dir.resolve()
    tag = n if a.format == "parquet" else f"{n}-{a.format}"
    raw, ingest = data / f"raw-{tag}", data / f"ingest-{tag}"
    feats, duck = data / f"features-{n}", data / f"duckdb-features-{n}.parquet"
    buckets, logs = data / f"duckdb-buckets-{tag}", data / f"logs-{tag}"
    logs.mkdir(parents=True, exist_ok=True)
    fmt = ["--format", a.format]
    report: dict[str, Any] = {"reviews": n, "format": a.format, "machine": {
        "cpus_usable": len(os.sched_getaffinity(0)), "cpus": os.cpu_count(),
        "memory_bytes": PAGE * os.sysconf("SC_PHYS_PAGES"), "node": os.uname().nodename}}

    if not ((raw / f"reviews.{a.format}").is_file() and (raw / f"meta.{a.format}").is_file()):
        report["synth"] = run_phase("synth", ["--reviews", str(n), "--raw", str(raw), *fmt],
                                    logs / "synth.log")
    if not (ingest / "manifest.json").is_file():
        report["ingest"] = run_phase("ingest", ["--raw", str(raw), "--ingest", str(ingest), *fmt],
                                     logs / "ingest.log")
    rows_in = json.loads((ingest / "manifest.json").read_text())["rows_out"]
    if not a.skip_rewrite:
        report["duckdb_rewrite"] = run_phase("duckdb_rewrite", ["--raw", str(raw), "--out",
                                                                str(buckets), *fmt],
                                             logs / "duckdb_rewrite.log")
        shutil.rmtree(buckets, ignore_errors=True)
    report["features"] = run_phase("features", ["--ingest", str(ingest), "--out", str(feats)],
                                   logs / "features.log")
    report["duckdb_features"] = run_phase("duckdb_features", ["--ingest", str(ingest), "--out",
                                                              str(duck)],
                                          logs / "duckdb_features.log")
    report["compare"] = run_phase("compare", ["--ours", str(feats), "--duckdb-out", str(duck)],
                                  logs / "compare.log")["result"]

    f, d = report["features"], report["duckdb_features"]
    report["ratios"] = {
        "wall_features_over_duckdb": round(f["wall_s"] / d["wall_s"], 3),
        "peak_pss_features_over_duckdb": round(f["peak_tree_pss_bytes"]
                                               / max(1, d["peak_tree_pss_bytes"]), 3),
        "peak_rss_features_over_duckdb": round(f["peak_tree_rss_bytes"]
                                               / max(1, d["peak_tree_rss_bytes"]), 3),
    }
    report["targets"] = {
        "wall_within_1.5x_duckdb": f["wall_s"] <= 1.5 * d["wall_s"],
        "peak_memory_within_8GB": f["peak_tree_rss_bytes"] <= 8e9,
        "outputs_agree": report["compare"]["agree"],
    }
    if "ingest" in report and "duckdb_rewrite" in report:
        i, r = report["ingest"]["wall_s"], report["duckdb_rewrite"]["wall_s"]
        report["ratios"]["wall_ingest_over_duckdb_rewrite"] = round(i / r, 3)
        report["targets"]["ingest_within_2x_duckdb_rewrite"] = i <= 2 * r
    (data / f"bench-{tag}.json").write_text(json.dumps(report, indent=2, default=str))

    print(f"\n{n:,} reviews ({rows_in:,} after ingest), {report['machine']['cpus_usable']} usable "
          f"CPUs, {report['machine']['memory_bytes'] / 2**30:.0f} GiB")
    print(f"{'phase':<18}{'wall s':>9}{'rows/s':>13}{'peak RSS':>12}{'peak PSS':>12}")
    for name in ("synth", "ingest", "duckdb_rewrite", "features", "duckdb_features"):
        if name in report:
            r = report[name]
            print(f"{name:<18}{r['wall_s']:>9.1f}{rows_in / r['wall_s']:>13,.0f}"
                  f"{_gb(r['peak_tree_rss_bytes']):>12}{_gb(r['peak_tree_pss_bytes']):>12}")
    fm = f["result"]
    print(f"features step: {fm.get('rows_out', 0):,} rows out, {fm.get('n_workers')} workers, "
          f"step's own time {fm.get('seconds')} s (without cluster start)")
    print("ratios features/DuckDB:", report["ratios"])
    print("targets:", report["targets"])
    c = report["compare"]
    print(f"comparison: {c['rows_joined']:,} rows joined, "
          f"{'all values agree' if c['agree'] else 'DIFFERENCES: ' + str(c['differences'])}")


if __name__ == "__main__":
    main()
