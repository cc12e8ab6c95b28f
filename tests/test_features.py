"""The features step: exact against DuckDB SQL, resumable after a kill, sized from the allocation.

The input is written here in the ingest layout (small parquet buckets + manifest.json) so these
tests do not depend on the ingest module. The reference is an independent implementation: one
DuckDB statement with RANGE window frames over calendar weeks.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpcpipe.config import FeaturesConfig, RunConfig
from hpcpipe.run.layout import RunLayout
from hpcpipe.runtime.dask_cluster import plan_workers, slurm_roles
from hpcpipe.runtime.env import JobEnvironment
from hpcpipe.steps import features

REPO = Path(__file__).resolve().parents[1]
DAY_MS = 86_400_000


def ms(text: str) -> int:
    """Milliseconds since the epoch of an ISO UTC time such as '2021-01-03T23:59:59.999'."""
    t = dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)
    return int(round(t.timestamp() * 1000))


def monday(d: dt.date) -> dt.date:
    return d - dt.timedelta(days=d.weekday())


# ---------------------------------------------------------------------------------------------
# Input in the ingest layout.


def edge_case_reviews() -> list[dict]:
    """Hand-made products, each exercising one edge of the definitions."""
    rows: list[dict] = []

    def add(asin: str, when: str | int, rating: float, text: str | None = "some text",
            helpful: int = 0, verified: bool = True) -> None:
        rows.append({"parent_asin": asin, "timestamp": when if isinstance(when, int) else ms(when),
                     "rating": rating, "text": text, "helpful_vote": helpful,
                     "verified_purchase": verified})

    add("SINGLE", "2021-03-10T12:00:00", 4.0)
    # Consecutive review weeks 1, 2, 3, 4, 5, 11, 12, 13 weeks apart.
    base = dt.datetime(2020, 6, 3, 8, 30)
    week = 0
    for i, gap in enumerate([0, 1, 2, 3, 4, 5, 11, 12, 13, 1]):
        week += gap
        for j in range(1 + i % 3):
            t = base + dt.timedelta(weeks=week, hours=j)
            add("GAPS", t.isoformat(), float(1 + (i + j) % 5), helpful=i * j, verified=j % 2 == 0)
    # Week boundaries: Sunday 23:59:59.999 is the previous week, Monday 00:00 the new one; the
    # week of 2020-12-28 is ISO week 53 of 2020.
    add("EDGE", "2020-12-27T23:59:59.999", 5.0)
    add("EDGE", "2020-12-28T00:00:00", 1.0, text=None)
    add("EDGE", "2021-01-03T23:59:59.999", 5.0, text="")
    add("EDGE", "2021-01-04T00:00:00", 2.0, text="x" * 300)
    add("EDGE", "2021-01-01T00:00:00", 3.5, text=None)
    add("EDGE", "2021-01-11T00:00:00.001", 5.0)
    # Several reviews in one millisecond and in one week (same timestamp is legal for two users).
    for r in (1.0, 1.0, 5.0, 5.0, 3.0):
        add("SAMEWEEK", "2021-02-02T10:00:00", r, helpful=7, verified=r > 2)
    add("NULLTEXT", "2021-02-15T00:00:00", 2.0, text=None)
    add("NULLTEXT", "2021-02-16T00:00:00", 4.0, text=None)
    # The data set's last week (Monday 2021-06-28) and a product seen only in it.
    add("LATE", "2021-06-21T09:00:00", 3.0)
    add("LATE", "2021-06-30T09:00:00", 4.0)
    add("ONLYLAST", "2021-07-04T23:59:59.999", 5.0)
    add("ONLYLAST", "2021-06-28T00:00:00", 1.0)
    return rows


def random_reviews(n_products: int = 150, seed: int = 1) -> list[dict]:
    """Products with bursts and gaps of random length between 2019 and mid 2021."""
    rng = np.random.default_rng(seed)
    rows = []
    lo, hi = ms("2019-01-01T00:00:00"), ms("2021-06-20T00:00:00")
    for p in range(n_products):
        asin = f"B{rng.integers(0, 10**8):08d}{p:03d}"
        n = int(rng.zipf(1.6)) % 200 + 1
        start = int(rng.integers(lo, hi))
        # Mostly a few days apart, sometimes weeks or months.
        steps = rng.choice([DAY_MS // 3, 3 * DAY_MS, 20 * DAY_MS, 90 * DAY_MS], size=n,
                           p=[0.5, 0.3, 0.15, 0.05])
        times = np.minimum(start + np.cumsum(rng.integers(0, steps + 1)), hi)
        for t in times:
            rows.append({
                "parent_asin": asin, "timestamp": int(t),
                "rating": float(rng.integers(1, 6)),
                "text": None if rng.random() < 0.1 else "w" * int(rng.integers(0, 400)),
                "helpful_vote": int(rng.integers(0, 3) * rng.integers(0, 50)),
                "verified_purchase": bool(rng.random() < 0.7),
            })
    return rows


def write_ingest(out: Path, rows: list[dict], n_buckets: int) -> Path:
    """Write ``rows`` in the ingest output layout; return the folder."""
    df = pd.DataFrame(rows)
    df["asin"] = df["parent_asin"] + "-v"
    df["user_id"] = [f"U{i}" for i in range(len(df))]
    df["title"] = "title"
    df["text_chars"] = df["text"].str.len().fillna(0).astype("int32")
    df = df.sort_values(["parent_asin", "timestamp"], kind="stable")
    products = sorted(df["parent_asin"].unique())
    bucket_of = {p: i % n_buckets for i, p in enumerate(products)}
    schema = pa.schema([
        ("parent_asin", pa.string()), ("asin", pa.string()), ("user_id", pa.string()),
        ("timestamp", pa.int64()), ("rating", pa.float32()), ("title", pa.string()),
        ("text", pa.string()), ("text_chars", pa.int32()), ("helpful_vote", pa.int32()),
        ("verified_purchase", pa.bool_()),
    ])
    for b in range(n_buckets):
        part = df[df["parent_asin"].map(bucket_of) == b]
        folder = out / "reviews" / f"bucket={b:05d}"
        folder.mkdir(parents=True)
        table = pa.Table.from_pandas(part[schema.names], schema=schema, preserve_index=False)
        pq.write_table(table, folder / "part-0.parquet", row_group_size=50)
    last = dt.datetime.fromtimestamp(df["timestamp"].max() / 1000, dt.UTC).date()
    manifest = {"n_buckets": n_buckets, "rows_in": len(df), "rows_out": len(df),
                "quarantined": 0, "duplicates": 0, "reasons": {},
                "min_timestamp": int(df["timestamp"].min()),
                "max_timestamp": int(df["timestamp"].max()),
                "last_week": monday(last).isoformat(), "seconds": 0.0, "inputs": []}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


# ---------------------------------------------------------------------------------------------
# The independent implementation: DuckDB SQL over the same files.

REFERENCE_SQL = (Path(__file__).resolve().parents[1] / "bench" / "features_reference.sql").read_text(
    encoding="utf-8")


def reference(ingest_dir: Path) -> pd.DataFrame:
    files = sorted(str(p) for p in (ingest_dir / "reviews").glob("bucket=*/*.parquet"))
    last_week = json.loads((ingest_dir / "manifest.json").read_text())["last_week"]
    sql = REFERENCE_SQL.format(files=files, last_week=last_week)
    with duckdb.connect() as con:
        return con.sql(sql).arrow().read_all().to_pandas()


def read_features(out_dir: Path) -> pd.DataFrame:
    parts = [pq.read_table(p) for p in sorted(out_dir.glob("bucket=*/part-0.parquet"))]
    table = pa.concat_tables(parts)
    assert table.schema == features.OUTPUT_SCHEMA
    return table.to_pandas().sort_values(["parent_asin", "week"], ignore_index=True)


def assert_same(ours: pd.DataFrame, ref: pd.DataFrame) -> None:
    assert list(ours.columns) == list(ref.columns)
    assert len(ours) == len(ref)
    for col in ours.columns:
        a, b = ours[col], ref[col]
        assert (a.isna() == b.isna()).all(), f"nulls differ in {col}"
        a, b = a[a.notna()].to_numpy(), b[b.notna()].to_numpy()
        if col in ("parent_asin", "week") or np.issubdtype(a.dtype, np.integer):
            assert (a == b).all(), f"{col} differs"
        else:
            np.testing.assert_allclose(a.astype(float), b.astype(float), rtol=1e-12, atol=1e-12,
                                       err_msg=col)


# ---------------------------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="module")
def client():
    # Two workers whatever the machine (open_cluster itself is exercised through hpcpipe.jobs.features).
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="2GB",
                      dashboard_address=":0") as cluster, Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def ingest_dir(tmp_path_factory) -> Path:
    rows = edge_case_reviews() + random_reviews()
    return write_ingest(tmp_path_factory.mktemp("ingest"), rows, n_buckets=12)


@pytest.fixture(scope="module")
def full_run(ingest_dir, client, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("features")
    manifest = features.build_features(ingest_dir, out, FeaturesConfig(), client=client,
                                       progress=False)
    return out, manifest


# ---------------------------------------------------------------------------------------------
# Exactness.


def test_matches_duckdb_reference(full_run, ingest_dir):
    out, manifest = full_run
    ours, ref = read_features(out), reference(ingest_dir)
    assert_same(ours, ref)
    assert manifest["rows_out"] == len(ref)
    assert manifest["rows_in"] == json.loads((ingest_dir / "manifest.json").read_text())["rows_out"]
    assert manifest["n_buckets"] == 12


def test_edge_cases_by_hand(full_run):
    df = read_features(full_run[0]).set_index(["parent_asin", "week"])
    d = dt.date
    single = df.loc[("SINGLE", d(2021, 3, 8))]
    assert single.n_reviews == 1 and pd.isna(single.rating_std) and single.cum_reviews == 1
    assert single.weeks_since_first == 0 and single.roll_mean_4 == 0.25
    assert single.target_next_n == 0

    edge = df.loc["EDGE"]
    # Sunday 2020-12-27 23:59:59.999 is still the week of 2020-12-21.
    assert edge.loc[d(2020, 12, 21)].n_reviews == 1
    # ISO week 53 of 2020: Monday 00:00, New Year's Day and Sunday 23:59:59.999.
    w53 = edge.loc[d(2020, 12, 28)]
    assert w53.n_reviews == 3 and w53.mean_text_chars == 0.0
    assert w53.share_1 == pytest.approx(1 / 3) and w53.share_5 == pytest.approx(1 / 3)
    assert w53.lag_1 == 1 and w53.weeks_since_first == 1
    w01 = edge.loc[d(2021, 1, 4)]
    assert w01.n_reviews == 1 and w01.mean_text_chars == 300.0 and w01.lag_1 == 3
    assert w01.lag_2 == 1 and w01.target_next_n == 1 and w01.cum_reviews == 5
    assert w01.roll_mean_4 == pytest.approx(5 / 4)

    same = df.loc[("SAMEWEEK", d(2021, 2, 1))]
    assert same.n_reviews == 5 and same.share_1 == 0.4 and same.share_5 == 0.4
    assert same.helpful_votes == 35 and same.verified_share == 0.6
    assert same.rating_std == pytest.approx(np.std([1, 1, 5, 5, 3], ddof=1))

    gaps = df.loc["GAPS"]
    weeks = [(w - gaps.index[0]).days // 7 for w in gaps.index]
    assert weeks == [0, 1, 3, 6, 10, 15, 26, 38, 51, 52]
    # 13 weeks after the previous review week, the 12-week window holds only the current week.
    row = gaps.loc[gaps.index[8]]
    assert row.roll_mean_12 == row.n_reviews / 12 and row.lag_4 == 0
    assert row.roll_rating_12 == row.mean_rating
    # 12 weeks after: the window of 12 weeks starts one week after the previous review week.
    row = gaps.loc[gaps.index[7]]
    assert row.roll_mean_12 == row.n_reviews / 12

    # The last week of the data set has no target; every other week has one.
    assert pd.isna(df.loc[("ONLYLAST", d(2021, 6, 28))].target_next_n)
    assert df.loc[("ONLYLAST", d(2021, 6, 28))].n_reviews == 2
    assert pd.isna(df.loc[("LATE", d(2021, 6, 28))].target_next_n)
    late = df.loc[("LATE", d(2021, 6, 21))]
    assert late.target_next_n == 1
    assert df["target_next_n"].isna().sum() == (
        df.index.get_level_values("week") == d(2021, 6, 28)).sum()


def test_kernel_alone_sorts_unsorted_input_and_accepts_pandas():
    rows = edge_case_reviews()
    df = pd.DataFrame(rows)
    df["text_chars"] = df["text"].str.len().fillna(0)
    ordered = df.sort_values(["parent_asin", "timestamp"], kind="stable")
    want = features.compute_bucket(pa.Table.from_pandas(ordered, preserve_index=False),
                                   "2021-06-28")
    shuffled = df.sample(frac=1.0, random_state=3)
    got = features.compute_bucket(shuffled, dt.date(2021, 6, 28))
    assert got.equals(want)
    empty = features.compute_bucket(ordered.iloc[:0], "2021-06-28")
    assert empty.num_rows == 0 and empty.schema == features.OUTPUT_SCHEMA


def test_week_index_matches_iso_weeks():
    times = np.array([ms(t) for t in (
        "2020-12-27T23:59:59.999", "2020-12-28T00:00:00", "2021-01-03T23:59:59.999",
        "2021-01-04T00:00:00", "1970-01-01T00:00:00", "1969-12-28T12:00:00")])
    mondays = features.week_index(times) * 7 - 3
    got = [dt.date(1970, 1, 1) + dt.timedelta(days=int(x)) for x in mondays]
    assert got == [dt.date(2020, 12, 21), dt.date(2020, 12, 28), dt.date(2020, 12, 28),
                   dt.date(2021, 1, 4), dt.date(1969, 12, 29), dt.date(1969, 12, 22)]


# ---------------------------------------------------------------------------------------------
# Resume.


def test_done_when_manifest_exists(full_run, client, ingest_dir, caplog):
    out, manifest = full_run
    with caplog.at_level(logging.INFO, logger="hpcpipe.steps.features"):
        again = features.build_features(ingest_dir, out, FeaturesConfig(), client=client,
                                        progress=False)
    assert again == manifest
    assert "nothing to do" in caplog.text


def test_rerun_after_losing_buckets_recomputes_only_those(full_run, client, ingest_dir, tmp_path,
                                                          caplog):
    ref_out, _ = full_run
    out = tmp_path / "features"
    features.build_features(ingest_dir, out, FeaturesConfig(), client=client, progress=False)
    # What a killed run leaves: some buckets missing, a torn temporary, no manifest.
    (out / "manifest.json").unlink()
    for b in (2, 5, 11):
        features.bucket_output(out, b).unlink()
    stray = out / "bucket=00005" / ".tmp-part-0.parquet-123-abcdef01"
    stray.write_bytes(b"PAR1 torn")
    kept = {b: features.bucket_output(out, b).stat().st_mtime_ns for b in range(12)
            if b not in (2, 5, 11)}
    with caplog.at_level(logging.INFO, logger="hpcpipe.steps.features"):
        manifest = features.build_features(ingest_dir, out, FeaturesConfig(), client=client,
                                           progress=False)
    assert manifest["buckets_skipped"] == 9 and manifest["buckets_done"] == 3
    assert "bucket 00000 already done, skipped" in caplog.text
    assert not stray.exists()
    for b, mtime in kept.items():
        assert features.bucket_output(out, b).stat().st_mtime_ns == mtime
    for b in range(12):
        assert (features.bucket_output(out, b).read_bytes()
                == features.bucket_output(ref_out, b).read_bytes())


def test_changed_ingest_output_recomputes_features(client, tmp_path, caplog):
    """Ingest ran again on other data: the old features are stale, not "already complete"."""
    ingest = write_ingest(tmp_path / "ingest", random_reviews(40, seed=3), n_buckets=4)
    out = tmp_path / "features"
    features.build_features(ingest, out, FeaturesConfig(), client=client, progress=False)
    shutil.rmtree(ingest)
    write_ingest(ingest, random_reviews(50, seed=4), n_buckets=3)
    with caplog.at_level(logging.INFO, logger="hpcpipe"):
        manifest = features.build_features(ingest, out, FeaturesConfig(), client=client,
                                           progress=False)
    assert "nothing to do" not in caplog.text
    assert "ingest output changed since features ran" in caplog.text, caplog.text
    assert manifest["buckets_done"] == 3 and manifest["buckets_skipped"] == 0
    assert_same(read_features(out), reference(ingest))


def test_buckets_of_an_interrupted_run_on_other_ingest_output_are_not_reused(client, tmp_path):
    """Buckets are reused by what they were computed from, not by their age: here ingest's new
    output is a copy that kept its files' older times (copytree, `cp -p`, `rsync -a`)."""
    other = write_ingest(tmp_path / "other", random_reviews(50, seed=6), n_buckets=4)
    ingest = write_ingest(tmp_path / "ingest", random_reviews(50, seed=5), n_buckets=4)
    out = tmp_path / "features"
    features.build_features(ingest, out, FeaturesConfig(), client=client, progress=False)
    (out / "manifest.json").unlink()  # as a killed run leaves it
    shutil.rmtree(ingest)
    shutil.copytree(other, ingest)
    manifest = features.build_features(ingest, out, FeaturesConfig(), client=client,
                                       progress=False)
    assert manifest["buckets_skipped"] == 0
    assert_same(read_features(out), reference(ingest))


def test_manifest_without_fingerprint_is_recomputed_once(client, ingest_dir, tmp_path, caplog):
    """A features manifest an older hpcpipe wrote: what it was computed from is unknown."""
    out = tmp_path / "features"
    first = features.build_features(ingest_dir, out, FeaturesConfig(), client=client,
                                    progress=False)
    old = {k: v for k, v in first.items() if k not in ("fingerprint", "made_from")}
    (out / "manifest.json").write_text(json.dumps(old))
    for part in out.glob("bucket=*/part-0.parquet"):  # nor did its buckets record anything
        pq.write_table(pq.read_table(part).replace_schema_metadata(None), part)
    with caplog.at_level(logging.INFO, logger="hpcpipe"):
        again = features.build_features(ingest_dir, out, FeaturesConfig(), client=client,
                                        progress=False)
        assert "recomputing once" in caplog.text, caplog.text
        assert again["buckets_done"] == 12
        caplog.clear()
        features.build_features(ingest_dir, out, FeaturesConfig(), client=client,
                                progress=False)
    assert "nothing to do" in caplog.text


def test_a_bucket_task_run_again_keeps_the_bucket_already_written(ingest_dir, tmp_path):
    """Dask runs a task again when the worker holding its result dies before the client took
    it: the bucket that task wrote stays as it is; another input's or an older one is redone."""
    files = sorted(str(p) for p in (ingest_dir / "reviews" / "bucket=00003").glob("*.parquet"))
    last_week = json.loads((ingest_dir / "manifest.json").read_text())["last_week"]
    out = tmp_path / "bucket=00003" / features.PART_NAME
    first = features.process_bucket(files, str(out), last_week, "fp-a")
    assert "kept" not in first and first["rows_in"] > 0
    written = out.stat().st_mtime_ns
    again = features.process_bucket(files, str(out), last_week, "fp-a")
    assert again["kept"] and out.stat().st_mtime_ns == written
    assert (again["rows_in"], again["rows_out"]) == (first["rows_in"], first["rows_out"])
    other = features.process_bucket(files, str(out), last_week, "fp-b")
    assert "kept" not in other and out.stat().st_mtime_ns != written
    os.utime(out, (1, 1))  # older than its input
    assert "kept" not in features.process_bucket(files, str(out), last_week, "fp-b")


def test_resources_are_not_part_of_what_features_are_computed_from(full_run, client,
                                                                   ingest_dir, caplog):
    out, manifest = full_run
    other = FeaturesConfig(cpus=3, nodes=2, mem="9G", time="1:00:00", threads_per_worker=2,
                           worker_memory="1GB")
    with caplog.at_level(logging.INFO, logger="hpcpipe.steps.features"):
        again = features.build_features(ingest_dir, out, other, client=client, progress=False)
    assert again == manifest and "nothing to do" in caplog.text


KILLED_RUN = """
import sys, time
from pathlib import Path
from distributed import Client, LocalCluster
from hpcpipe.steps import features
from hpcpipe.config import FeaturesConfig

real = features.process_bucket

def slow(*args):
    time.sleep(0.3)  # long enough for the test to kill the run between buckets
    return real(*args)

features.process_bucket = slow
with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                  dashboard_address=None) as cluster, Client(cluster) as client:
    features.build_features(Path(sys.argv[1]), Path(sys.argv[2]), FeaturesConfig(),
                            client=client, progress=False)
"""


def test_kill_9_then_rerun_gives_identical_output(full_run, client, ingest_dir, tmp_path):
    ref_out, ref_manifest = full_run
    out = tmp_path / "features"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(ingest_dir), str(out)],
                            cwd=REPO, start_new_session=True)
    try:
        deadline = time.time() + 60
        while len(list(out.glob("bucket=*/part-0.parquet"))) < 4:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no bucket was written within 60 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in out.glob("bucket=*/part-0.parquet")}
    assert 4 <= len(finished) < 12 and not (out / "manifest.json").exists()

    manifest = features.build_features(ingest_dir, out, FeaturesConfig(), client=client,
                                       progress=False)
    assert manifest["buckets_skipped"] == len(finished)
    assert manifest["buckets_done"] == 12 - len(finished)
    assert {k: manifest[k] for k in ("rows_in", "rows_out", "n_buckets")} == {
        k: ref_manifest[k] for k in ("rows_in", "rows_out", "n_buckets")}
    for p, mtime in finished.items():
        assert p.stat().st_mtime_ns == mtime
    for b in range(12):
        assert (features.bucket_output(out, b).read_bytes()
                == features.bucket_output(ref_out, b).read_bytes())
    assert not [p for p in out.rglob(".tmp-*")]


# ---------------------------------------------------------------------------------------------
# The step entry point and the cluster sizing.


def _layout_with_ingest(tmp_path: Path, ingest_dir: Path) -> RunLayout:
    import shutil

    import yaml

    layout = RunLayout(tmp_path / "run")
    shutil.copytree(ingest_dir, layout.ingest)
    layout.config.write_text(yaml.safe_dump(RunConfig().to_dict()))
    return layout


def test_job_entry_point_writes_summary_and_manifest(tmp_path, ingest_dir, full_run):
    """hpcpipe.jobs.features in a one-node allocation of 32 CPUs on (at most) 2 usable CPUs."""
    layout = _layout_with_ingest(tmp_path, ingest_dir)
    cpus = sorted(os.sched_getaffinity(0))[:2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "1", "SLURM_CPUS_PER_TASK": "32"})
    proc = subprocess.run([sys.executable, "-m", "hpcpipe.jobs.features", "--run-dir", str(layout.root)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n = len(cpus)
    assert f"32 CPUs allocated, {n} usable: {n} workers x 1 thread" in proc.stdout
    summary = [json.loads(line) for line in layout.metrics.read_text().splitlines()]
    summary = [m for m in summary if m["kind"] == "summary"]
    assert len(summary) == 1 and summary[0]["step"] == "features"
    s = summary[0]
    assert s["rows_out"] == full_run[1]["rows_out"] and s["buckets_done"] == 12
    assert s["n_workers"] == n and s["peak_worker_memory_bytes"] > 10 * 2**20
    assert (layout.features / "manifest.json").is_file()
    assert_same(read_features(layout.features), read_features(full_run[0]))


def test_worker_plan_never_exceeds_usable_cpus():
    usable = len(os.sched_getaffinity(0))
    env = JobEnvironment.from_environ({"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "32",
                                       "SLURM_JOB_NUM_NODES": "1", "SLURM_MEM_PER_NODE": "8000"})
    plan = plan_workers(FeaturesConfig(cpus=32), env)
    n = min(32, usable)
    assert plan.n_workers == n and plan.threads_per_worker == 1
    assert plan.describe().startswith(f"32 CPUs allocated, {usable} usable: {n} worker")
    assert plan.memory_per_worker == int(8000 * 2**20 * 0.9 / plan.n_workers)
    plan = plan_workers(FeaturesConfig(cpus=32, threads_per_worker=4, worker_memory="1GB"), env)
    assert plan.workers_per_node * plan.threads_per_worker <= usable
    assert plan.memory_per_worker == 10**9


def test_slurm_roles_two_nodes(monkeypatch):
    # 2 nodes x 32 one-CPU tasks on a machine with 2 usable CPUs: 2 workers per node, ranks 0 and
    # 1 (scheduler, client) first on node 1, the other ranks beyond the cap idle.
    monkeypatch.setattr("hpcpipe.runtime.dask_cluster.usable_cpus", lambda: 2)
    env = {"SLURM_JOB_ID": "9", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "64",
           "SLURM_TASKS_PER_NODE": "32(x2)", "SLURM_CPUS_PER_TASK": "1"}
    plan = plan_workers(FeaturesConfig(), JobEnvironment.from_environ(env))
    assert (plan.nodes, plan.workers_per_node, plan.n_workers) == (2, 2, 4)

    def role(rank: int):
        return slurm_roles(plan, JobEnvironment.from_environ({
            **env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % 32),
            "SLURM_NODEID": str(rank // 32)}))

    active = [r for r in range(64) if role(r).active]
    assert active == [0, 1, 2, 3, 32, 33]
    assert role(5).n_workers == 4
    assert plan.describe(4).startswith("2 nodes x 32 CPUs allocated, 2 usable per node: 4 workers")

    # hpcpipe's sbatch for 2 nodes: 2 tasks of 8 CPUs per node. Without CPU binding (the test
    # cluster) the node's 2 CPUs give one worker of 2 threads; rank 3 idles.
    env.update({"SLURM_NTASKS": "4", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_CPUS_PER_TASK": "8"})

    def role4(rank: int):
        return slurm_roles(plan, JobEnvironment.from_environ({
            **env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % 2),
            "SLURM_NODEID": str(rank // 2)}))

    plan = plan_workers(FeaturesConfig(), JobEnvironment.from_environ(env))
    assert (plan.workers_per_node, plan.threads_per_worker) == (1, 2)
    assert [r for r in range(4) if role4(r).active] == [0, 1, 2] and role4(0).n_workers == 1
    # With each task bound to its own 8 CPUs of a 64-core node, every task is a worker.
    monkeypatch.setattr("hpcpipe.runtime.dask_cluster.usable_cpus", lambda: 8)
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    plan = plan_workers(FeaturesConfig(), JobEnvironment.from_environ(env))
    assert (plan.workers_per_node, plan.threads_per_worker, plan.per_task_binding) == (2, 8, True)
    assert [r for r in range(4) if role4(r).active] == [0, 1, 2, 3] and role4(0).n_workers == 2


SRUN_TASK = """
import logging, sys
from pathlib import Path
from hpcpipe.steps import features
from hpcpipe.config import RunConfig
from hpcpipe.run.layout import RunLayout
from hpcpipe.run.metrics import MetricsWriter

logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
layout = RunLayout(Path(sys.argv[1]))
result = features.run(layout, RunConfig(), MetricsWriter(layout.metrics, "features"))
print("RESULT", len(result))
"""


def test_slurm_runner_across_simulated_tasks(tmp_path, ingest_dir, full_run):
    """What `srun` does on 2 nodes x 2 tasks, with the Slurm variables set by hand: the real
    SLURMRunner starts the scheduler on rank 0, runs the step on rank 1, workers on ranks 2-3."""
    layout = _layout_with_ingest(tmp_path, ingest_dir)
    procs = []
    for rank in range(4):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update({"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "4",
                    "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_CPUS_PER_TASK": "1",
                    "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % 2),
                    "SLURM_NODEID": str(rank // 2)})
        procs.append(subprocess.Popen([sys.executable, "-c", SRUN_TASK, str(layout.root)],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(outputs)
    assert "RESULT 0" in outputs[0] and "RESULT 0" not in outputs[1], outputs
    manifest = json.loads((layout.features / "manifest.json").read_text())
    assert manifest["n_workers"] == min(2, len(os.sched_getaffinity(0)))
    assert manifest["buckets_done"] == 12
    assert_same(read_features(layout.features), read_features(full_run[0]))


@pytest.mark.slurm
def test_two_node_job_on_the_slurm_cluster(slurm_cluster, tmp_path, ingest_dir, full_run):
    """The step as hpcpipe's sbatch runs it on 2 nodes: 2 tasks per node under srun."""
    layout = _layout_with_ingest(tmp_path, ingest_dir)
    out = tmp_path / "job.out"
    cmd = (f"srun --kill-on-bad-exit=1 --label --cpus-per-task=$SLURM_CPUS_PER_TASK "
           f"{sys.executable} -m hpcpipe.jobs.features --run-dir {layout.root}")
    job = slurm_cluster.sbatch("--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=8",
                               "--time=5", f"--output={out}", "--wrap", cmd, cwd=REPO)
    state = slurm_cluster.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
                                     timeout=240)
    log = out.read_text() if out.exists() else ""
    assert state == "COMPLETED", log
    assert "2 nodes x 16 CPUs allocated" in log and "client on rank 1" in log, log
    manifest = json.loads((layout.features / "manifest.json").read_text())
    assert manifest["buckets_done"] == 12 and manifest["n_workers"] >= 1
    assert_same(read_features(layout.features), read_features(full_run[0]))
