"""Weekly features per product, computed bucket by bucket on a Dask cluster.

Input is the ingest output, output one row per (parent_asin, week) with at least one review in
``features/bucket=NNNNN/part-0.parquet``; docs/contracts.md defines every column and window.

Windows are calendar weeks, never rows. The per-bucket kernel (``compute_bucket``) works on sorted
numpy arrays: one pass of ``np.add.reduceat`` for the weekly aggregates over a (product, week) key,
then every trailing window is a difference of cumulative sums located with ``np.searchsorted`` on
that key, and lags and the target are a few shifted comparisons of it; no Python loop per product.

Each bucket is read, computed and written to a temporary name that is renamed into place, so a
killed job leaves only complete buckets; a rerun skips them (and logs so) and writes
``features/manifest.json`` last. What the output is computed from (ingest's fingerprint, the last
week; see :mod:`hpcpipe.run.provenance`) is recorded in the manifest and in every bucket file's
footer: a finished step, or a finished bucket, is kept only when that is still what it would be
computed from, so features made from an earlier ingest output are recomputed, never reused. A
killed worker costs only the bucket it had in flight: Dask's nanny restarts it, the bucket is
computed again, and its temporary is removed at the end.

Several nodes: the step runs once per Slurm task under ``srun``, one task per Dask process (see
:mod:`hpcpipe.runtime.dask_cluster`): rank 0 runs the Dask scheduler, rank 1 the code below, every
later rank one worker with its task's CPUs as threads (ranks beyond their node's usable CPUs
idle). hpcpipe's sbatch asks for ``--nodes=N --ntasks-per-node=W --cpus-per-task=T``: a node's
share of ``features.cpus`` cut into W tasks of T = ``threads_per_worker`` CPUs (W at least 2; the
scheduler and client take node 1's first two tasks, so they cost two tasks' CPUs, not a node).
It launches ``srun --cpus-per-task=$SLURM_CPUS_PER_TASK python -m hpcpipe.jobs.features
--run-dir RUN`` (since Slurm 22.05 srun does not take --cpus-per-task over from sbatch). The
scheduler's address goes to ``features/.dask-scheduler-<jobid>-<restart>.json`` in the run
folder, which every node must see.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import resource
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from hpcpipe import faulthooks
from hpcpipe.config import FeaturesConfig, RunConfig
from hpcpipe.errors import InputError
from hpcpipe.files import atomic_path, is_temp, read_json, write_json
from hpcpipe.run.layout import RunLayout
from hpcpipe.run.metrics import MetricsWriter
from hpcpipe.run.provenance import fingerprint, identity
from hpcpipe.runtime.env import JobEnvironment
from hpcpipe.steps.done import already_done

if TYPE_CHECKING:
    import pandas as pd  # type: ignore[import-untyped]
    from distributed import Client

log = logging.getLogger(__name__)

#: The input columns the kernel reads; nothing else is loaded.
INPUT_COLUMNS: tuple[str, ...] = (
    "parent_asin", "timestamp", "rating", "helpful_vote", "verified_purchase", "text_chars",
)

OUTPUT_SCHEMA = pa.schema([
    ("parent_asin", pa.string()),
    ("week", pa.date32()),
    ("n_reviews", pa.int64()),
    ("mean_rating", pa.float64()),
    ("rating_std", pa.float64()),
    ("share_5", pa.float64()),
    ("share_1", pa.float64()),
    ("helpful_votes", pa.int64()),
    ("verified_share", pa.float64()),
    ("mean_text_chars", pa.float64()),
    ("lag_1", pa.int64()),
    ("lag_2", pa.int64()),
    ("lag_4", pa.int64()),
    ("roll_mean_4", pa.float64()),
    ("roll_mean_12", pa.float64()),
    ("roll_rating_12", pa.float64()),
    ("weeks_since_first", pa.int64()),
    ("cum_reviews", pa.int64()),
    ("target_next_n", pa.int64()),
])

PART_NAME = "part-0.parquet"
MANIFEST = "manifest.json"
#: The key in each bucket file's footer that holds the fingerprint of what it was computed from.
FINGERPRINT_KEY = b"hpcpipe.fingerprint"
_DAY_MS = 86_400_000
# 1970-01-01 was a Thursday: week index w = floor((days + 3) / 7) counts Mondays from 1969-12-29,
# and that Monday is day 7 * w - 3.
_MONDAY_SHIFT = 3
_EPOCH = dt.date(1970, 1, 1)


# ---------------------------------------------------------------------------------------------
# The per-bucket kernel.


def week_index(timestamp_ms: np.ndarray) -> np.ndarray:
    """Week number (Mondays since 1969-12-29) of each millisecond UTC timestamp, as int64."""
    days = np.floor_divide(timestamp_ms, _DAY_MS)
    return np.floor_divide(days + _MONDAY_SHIFT, 7)


def _week_of_date(value: str | dt.date) -> int:
    """Week index of a date ("YYYY-MM-DD" or ``datetime.date``)."""
    if isinstance(value, str):
        value = dt.date.fromisoformat(value)
    days = (value - _EPOCH).days
    return (days + _MONDAY_SHIFT) // 7


def _at_offset(key: np.ndarray, values: np.ndarray, offset: int) -> np.ndarray:
    """``values`` of the group whose key is ``key + offset``, 0 where there is none.

    Keys are sorted and distinct, so the group ``offset`` weeks away is at most ``|offset|``
    positions away: a few shifted comparisons replace a binary search.
    """
    out = np.zeros(len(key), dtype=values.dtype)
    for j in range(1, abs(offset) + 1):
        if j >= len(key):
            break
        if offset < 0:  # earlier weeks: compare each group with the one j positions before
            hit = key[j:] - key[:-j] == -offset
            np.copyto(out[j:], values[:-j], where=hit)
        else:
            hit = key[j:] - key[:-j] == offset
            np.copyto(out[:-j], values[j:], where=hit)
    return out


def _as_table(data: pa.Table | pd.DataFrame) -> pa.Table:
    if isinstance(data, pa.Table):
        table = data
    else:
        table = pa.Table.from_pandas(data, preserve_index=False)
    missing = [c for c in INPUT_COLUMNS if c not in table.column_names]
    if missing:
        raise InputError(
            f"ingested reviews lack the column(s) {', '.join(missing)}; the features step needs "
            f"{', '.join(INPUT_COLUMNS)}. Rerun the ingest step to rebuild ingest/"
        )
    return table.select(list(INPUT_COLUMNS))


def _numpy(column: pa.ChunkedArray | pa.Array, dtype: Any, fill: Any = None) -> np.ndarray:
    if fill is not None and column.null_count:
        column = pc.fill_null(column, fill)
    return np.asarray(column.to_numpy(), dtype=dtype)


def compute_bucket(data: pa.Table | pd.DataFrame, last_week: str | dt.date) -> pa.Table:
    """The weekly features of one bucket of ingested reviews, as a table with ``OUTPUT_SCHEMA``.

    ``data`` holds (at least) the columns of ``INPUT_COLUMNS`` for whole products; rows sorted by
    (parent_asin, timestamp) as ingest writes them are used as they are, otherwise they are sorted
    first. ``last_week`` (the Monday of the data set's last week, e.g. ingest's manifest
    ``last_week``) is the week whose ``target_next_n`` is null. Pure: no files, no globals.
    """
    table = _as_table(data)
    if table.num_rows == 0:
        return OUTPUT_SCHEMA.empty_table()
    for name in ("parent_asin", "timestamp", "rating"):
        if table.column(name).null_count:
            raise InputError(f"ingested reviews have null {name} values; rerun the ingest step")

    asin = table.column("parent_asin")
    if pa.types.is_dictionary(asin.type):
        asin = asin.cast(asin.type.value_type)
    if asin.type != pa.string():
        asin = asin.cast(pa.string())
    asin = asin.combine_chunks()
    ts = _numpy(table.column("timestamp"), np.int64)

    # Product boundaries from adjacent comparisons; unsorted input is sorted once.
    new_product = np.asarray(pc.not_equal(asin[1:], asin[:-1]).to_numpy(zero_copy_only=False))
    same = ~new_product
    if (np.asarray(pc.less(asin[1:], asin[:-1]).to_numpy(zero_copy_only=False)).any()
            or (same & (ts[1:] < ts[:-1])).any()):
        order = pc.sort_indices(pa.table({"a": asin, "t": ts}),
                                sort_keys=[("a", "ascending"), ("t", "ascending")])
        table = table.take(order)
        asin = asin.take(order)
        ts = ts[order.to_numpy()]
        new_product = np.asarray(pc.not_equal(asin[1:], asin[:-1]).to_numpy(zero_copy_only=False))

    n_rows = len(ts)
    week = week_index(ts)
    product_start = np.empty(n_rows, dtype=bool)
    product_start[0] = True
    product_start[1:] = new_product
    group_start = product_start.copy()
    group_start[1:] |= week[1:] != week[:-1]
    starts = np.flatnonzero(group_start)  # first row of each (product, week)
    n = np.diff(starts, append=n_rows).astype(np.int64)

    # Weekly aggregates: one reduceat per column.
    rating = _numpy(table.column("rating"), np.float64)
    sum_rating = np.add.reduceat(rating, starts)
    mean_rating = sum_rating / n
    dev = rating - np.repeat(mean_rating, n)
    sq = np.add.reduceat(dev * dev, starts)
    single = n == 1
    rating_std = np.sqrt(sq / np.where(single, 1, n - 1))
    share_5 = np.add.reduceat(rating == 5.0, starts, dtype=np.int64) / n
    share_1 = np.add.reduceat(rating == 1.0, starts, dtype=np.int64) / n
    helpful = np.add.reduceat(_numpy(table.column("helpful_vote"), np.int64, 0), starts)
    verified = np.add.reduceat(
        _numpy(table.column("verified_purchase"), bool, False), starts, dtype=np.int64) / n
    text_chars = np.add.reduceat(_numpy(table.column("text_chars"), np.int64, 0), starts) / n

    # Calendar windows: a sorted key (product, week) per group, cumulative sums over groups.
    gweek = week[starts]
    gproduct = np.cumsum(product_start)[starts] - 1
    key = (gproduct << 32) + (gweek - gweek.min())
    g = len(starts)
    cum_n = np.zeros(g + 1, dtype=np.int64)
    np.cumsum(n, out=cum_n[1:])
    cum_r = np.zeros(g + 1, dtype=np.float64)
    np.cumsum(sum_rating, out=cum_r[1:])
    upto = np.arange(1, g + 1)

    def trailing(weeks: int) -> tuple[np.ndarray, np.ndarray]:
        """Reviews and summed ratings over the trailing ``weeks`` calendar weeks."""
        first = np.searchsorted(key, key - (weeks - 1))  # never crosses into another product
        return cum_n[upto] - cum_n[first], cum_r[upto] - cum_r[first]

    n4, _ = trailing(4)
    n12, r12 = trailing(12)
    is_first = np.empty(g, dtype=bool)
    is_first[0] = True
    is_first[1:] = gproduct[1:] != gproduct[:-1]
    first_group = np.maximum.accumulate(np.where(is_first, np.arange(g), 0))
    target = _at_offset(key, n, 1)
    target_null = gweek == _week_of_date(last_week)

    columns = {
        "parent_asin": asin.take(pa.array(starts)),
        "week": pa.array((gweek * 7 - _MONDAY_SHIFT).astype(np.int32)).cast(pa.date32()),
        "n_reviews": n,
        "mean_rating": mean_rating,
        "rating_std": pa.array(rating_std, mask=single),
        "share_5": share_5,
        "share_1": share_1,
        "helpful_votes": helpful,
        "verified_share": verified,
        "mean_text_chars": text_chars,
        "lag_1": _at_offset(key, n, -1),
        "lag_2": _at_offset(key, n, -2),
        "lag_4": _at_offset(key, n, -4),
        "roll_mean_4": n4 / 4.0,
        "roll_mean_12": n12 / 12.0,
        "roll_rating_12": r12 / n12,
        "weeks_since_first": gweek - gweek[first_group],
        "cum_reviews": cum_n[upto] - cum_n[first_group],
        "target_next_n": pa.array(target, mask=target_null),
    }
    return pa.table(columns, schema=OUTPUT_SCHEMA)


# ---------------------------------------------------------------------------------------------
# One bucket on a worker: read, compute, write under a temporary name, rename.


def _read_bucket(files: list[str]) -> pa.Table:
    tables = [pq.read_table(f, columns=list(INPUT_COLUMNS)) for f in files
              if os.path.getsize(f) > 0]
    if not tables:
        return pa.table({c: pa.array([], type=pa.string()) for c in INPUT_COLUMNS[:1]})
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def process_bucket(files: list[str], out_path: str, last_week: str, fp: str = "") -> dict[str, Any]:
    """Compute one bucket's features, write them atomically to ``out_path`` (``fp``, the
    fingerprint of what they are computed from, in the file's footer); runs on a worker.

    A bucket already written from the same input is kept as it is: Dask runs a task again when
    the worker holding its result dies before the result was collected, and the finished
    bucket must not be computed (nor rewritten) twice."""
    start = time.perf_counter()
    if fp and (rows_out := _reusable_rows(Path(out_path), files, fp)) is not None:
        return {"rows_in": _rows(files), "rows_out": rows_out, "kept": True,
                "seconds": time.perf_counter() - start}
    table = _read_bucket(files)
    rows_in = table.num_rows
    if rows_in:
        out = compute_bucket(table, last_week)
    else:
        out = OUTPUT_SCHEMA.empty_table()
    del table
    out = out.replace_schema_metadata({FINGERPRINT_KEY: fp.encode()})
    delay = faulthooks.delay_s(faulthooks.BUCKET_DELAY_ENV)
    with atomic_path(Path(out_path)) as tmp:
        pq.write_table(out, tmp, compression="zstd")
        if delay:
            # The widest window for a fault: the bucket is written but not yet renamed.
            time.sleep(delay)
    return {"rows_in": rows_in, "rows_out": out.num_rows,
            "seconds": time.perf_counter() - start}


def _peak_rss_bytes() -> int:
    """Peak resident memory of the calling process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------
# The step.


def _input_buckets(in_dir: Path) -> dict[int, list[str]]:
    """Bucket number -> its parquet files, from ``in_dir/reviews/bucket=NNNNN/`` (or ``in_dir``)."""
    root = in_dir / "reviews" if (in_dir / "reviews").is_dir() else in_dir
    buckets: dict[int, list[str]] = {}
    for folder in sorted(root.glob("bucket=*")):
        number = folder.name.split("=", 1)[1]
        if not folder.is_dir() or not number.isdigit():
            continue
        buckets[int(number)] = sorted(
            str(f) for f in folder.iterdir()
            if f.suffix == ".parquet" and not is_temp(f) and not f.name.startswith((".", "_"))
        )
    if not buckets:
        raise InputError(
            f"no ingested reviews in {root} (expected folders bucket=NNNNN/ with parquet files); "
            "run the ingest step first"
        )
    return buckets


def bucket_output(out_dir: Path, bucket: int) -> Path:
    """Where the features of input bucket ``bucket`` go."""
    return Path(out_dir) / f"bucket={bucket:05d}" / PART_NAME


def _clean_leftovers(out_dir: Path, buckets: dict[int, list[str]],
                     left_by: str = "an interrupted run") -> None:
    """Remove temporaries of a killed run (or worker) and buckets the current input does not have."""
    for folder in out_dir.glob("bucket=*"):
        number = folder.name.split("=", 1)[1]
        if number.isdigit() and int(number) not in buckets:
            log.warning("removing %s: the ingested input has no bucket %s", folder, number)
            shutil.rmtree(folder, ignore_errors=True)
            continue
        for f in folder.iterdir() if folder.is_dir() else ():
            if is_temp(f):
                log.info("removing %s left by %s", f, left_by)
                if f.is_dir():
                    shutil.rmtree(f, ignore_errors=True)
                else:
                    f.unlink(missing_ok=True)


def _rows(files: list[str]) -> int:
    return sum(pq.read_metadata(f).num_rows for f in files if os.path.getsize(f) > 0)


def _reusable_rows(out: Path, files: list[str], fp: str) -> int | None:
    """The row count of a finished bucket that can be kept, else None. It can when its footer
    says it was computed from the same ingest output and settings, and it is not older than its
    input (a bucket written before fingerprints were recorded has none: recomputed)."""
    if not out.is_file():
        return None
    try:
        meta = pq.read_metadata(out)
    except (OSError, pa.ArrowException):
        return None
    if (meta.metadata or {}).get(FINGERPRINT_KEY) != fp.encode():
        return None
    newest_input = max((os.path.getmtime(f) for f in files), default=0.0)
    if out.stat().st_mtime < newest_input:
        return None
    return int(meta.num_rows)


def made_from(in_dir: Path, cfg: FeaturesConfig, last_week: str | dt.date | None = None
              ) -> dict[str, Any]:
    """What the features of ``in_dir`` would be computed from now: ingest's fingerprint (from
    ``in_dir/manifest.json``), the data set's last week (``last_week``, by default the ingest
    manifest's) and the settings that change the output."""
    ingest_manifest = Path(in_dir) / MANIFEST
    ingest = read_json(ingest_manifest) if ingest_manifest.is_file() else None
    if last_week is None:
        if ingest is None:
            raise InputError(
                f"{ingest_manifest} does not exist: the ingest step has not finished; run it first"
                " (`hpcpipe rerun ingest`, or `hpcpipe submit` for a new run)")
        last_week = ingest["last_week"]
    last_week = str(last_week)
    try:
        dt.date.fromisoformat(last_week)
    except ValueError:
        raise InputError(f"last_week {last_week!r} is not a date YYYY-MM-DD") from None
    return {
        # A folder of buckets without ingest's manifest has no fingerprint: None.
        "ingest": identity(ingest) if isinstance(ingest, dict) else None,
        "last_week": last_week,
        # No features key changes the output today (cpus, nodes, memory, time and threads never
        # do); one that does belongs here.
        "settings": {},
    }


def _complete(out_dir: Path, made: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of a finished features step in ``out_dir`` computed from ``made``, or None
    (a manifest computed from anything else is removed; the log says what changed)."""
    manifest = already_done(out_dir / MANIFEST, made, what="features")
    if manifest is not None:
        log.info("features already complete (%s exists), nothing to do", out_dir / MANIFEST)
    return manifest


def build_features(
    in_dir: Path,
    out_dir: Path,
    cfg: FeaturesConfig,
    last_week: str | dt.date | None = None,
    metrics: MetricsWriter | None = None,
    client: Client | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Compute the features of every bucket in ``in_dir`` into ``out_dir``; return the manifest.

    ``in_dir`` is the ingest output folder (with ``reviews/bucket=NNNNN/``) or a folder of bucket
    folders. ``last_week`` defaults to ``last_week`` of ``in_dir/manifest.json``. Buckets whose
    output exists, was computed from the same ingest output and last week (its footer says) and
    is newer than their input are skipped; temporaries of a killed run are removed.
    ``out_dir/manifest.json`` is written last, with ``made_from`` and ``fingerprint``; when one
    computed from the same exists already, the step is complete and its contents are returned
    without computing anything. Without ``client`` a cluster is
    opened with :func:`hpcpipe.runtime.dask_cluster.open_cluster`. With ``metrics`` a ``kind="summary"``
    line (rows_in, rows_out, seconds, rows_per_s, peak_worker_memory_bytes, buckets_done,
    buckets_skipped, n_workers) is appended.
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    made = made_from(in_dir, cfg, last_week)
    done = _complete(out_dir, made)
    if done is not None:
        return done
    last_week = made["last_week"]
    fp = fingerprint(made)

    if client is None:
        from hpcpipe.runtime.dask_cluster import open_cluster

        with open_cluster(cfg) as own_client:
            if own_client is None:  # a scheduler/worker rank under SLURMRunner: nothing to do
                return {}
            return build_features(in_dir, out_dir, cfg, last_week, metrics, own_client, progress)

    from distributed import as_completed
    from tqdm import tqdm  # type: ignore[import-untyped]

    start = time.perf_counter()
    buckets = _input_buckets(in_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(out_dir, buckets)

    rows_in = {b: _rows(files) for b, files in buckets.items()}
    rows_out: dict[int, int] = {}
    todo: list[int] = []
    for b, files in buckets.items():
        kept = _reusable_rows(bucket_output(out_dir, b), files, fp)
        if kept is not None:
            log.info("bucket %05d already done, skipped", b)
            rows_out[b] = kept
        else:
            todo.append(b)
    skipped = len(buckets) - len(todo)
    n_workers = len(client.scheduler_info(n_workers=-1)["workers"])
    log.info("%d buckets to compute, %d already done, on %d Dask workers", len(todo), skipped,
             n_workers)

    # Biggest buckets first so that the last ones to finish are short.
    todo.sort(key=lambda b: -rows_in[b])
    tag = uuid.uuid4().hex[:8]
    futures = {
        client.submit(process_bucket, buckets[b], str(bucket_output(out_dir, b)), last_week, fp,
                      key=f"features-bucket-{b:05d}-{tag}"): b
        for b in todo
    }
    rows_done = 0
    bar = tqdm(total=sum(rows_in[b] for b in todo), unit="rows", unit_scale=True,
               desc="features", disable=not progress or not todo, mininterval=1.0)
    try:
        for future in as_completed(futures):
            b = futures.pop(future)
            result = future.result()
            # Let the cluster forget the finished bucket now: while a worker holds the result,
            # its death makes Dask compute (and write) the bucket again.
            future.release()
            if result.get("kept"):
                log.info("bucket %05d already written from the same input (its worker died "
                         "before the result was collected), kept", b)
            rows_out[b] = result["rows_out"]
            rows_done += result["rows_in"]
            bar.update(result["rows_in"])
            bar.set_postfix_str(f"{len(rows_out) - skipped}/{len(todo)} buckets", refresh=False)
    finally:
        bar.close()
    # A worker killed between writing a bucket and renaming it (Dask retries the bucket on
    # another worker) leaves its temporary behind: a finished step leaves none.
    _clean_leftovers(out_dir, buckets, left_by="a killed worker")

    seconds = time.perf_counter() - start
    peaks = client.run(_peak_rss_bytes)
    peak = max(peaks.values(), default=0)
    manifest = {
        "n_buckets": len(buckets),
        "rows_in": sum(rows_in.values()),
        "rows_out": sum(rows_out.values()),
        "seconds": round(seconds, 3),
        "last_week": last_week,
        "buckets_done": len(todo),
        "buckets_skipped": skipped,
        "n_workers": n_workers,
        "columns": OUTPUT_SCHEMA.names,
        "made_from": made,
        "fingerprint": fp,
    }
    summary = {
        "rows_in": manifest["rows_in"],
        "rows_out": manifest["rows_out"],
        "seconds": manifest["seconds"],
        # Throughput of what this run computed (skipped buckets cost nothing).
        "rows_per_s": round(rows_done / seconds, 1) if seconds > 0 else 0.0,
        "peak_worker_memory_bytes": int(peak),
        "buckets_done": len(todo),
        "buckets_skipped": skipped,
        "n_workers": n_workers,
    }
    log.info("features summary: %s", " ".join(f"{k}={v}" for k, v in summary.items()))
    if metrics is not None:
        metrics.write("summary", **summary)
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def run(layout: RunLayout, cfg: RunConfig, metrics: MetricsWriter,
        env: JobEnvironment | None = None) -> dict[str, Any]:
    """The features step of a run: ``layout.ingest`` -> ``layout.features`` (see the module doc).

    Under ``srun`` on several nodes every rank calls this; only the client rank computes, the
    scheduler and worker ranks return ``{}`` when the cluster shuts down.
    """
    made = made_from(layout.ingest, cfg.features)
    done = _complete(layout.features, made)
    if done is not None:
        return done
    last_week = made["last_week"]

    from hpcpipe.runtime.dask_cluster import open_cluster

    if env is None:
        env = JobEnvironment.from_environ()
    # A requeued job keeps its id: the restart count keeps the previous attempt's file, which
    # names a dead scheduler, from being read.
    job_id = env.job_id if env.in_slurm else "local"
    layout.features.mkdir(parents=True, exist_ok=True)
    scheduler_file = layout.features / f".dask-scheduler-{job_id}-{env.restart_count}.json"
    with open_cluster(cfg.features, scheduler_file=scheduler_file, env=env) as client:
        if client is None:
            return {}
        return build_features(layout.ingest, layout.features, cfg.features, last_week,
                              metrics=metrics, client=client)


__all__: list[str] = [
    "INPUT_COLUMNS", "OUTPUT_SCHEMA", "build_features", "bucket_output", "compute_bucket",
    "process_bucket", "run", "week_index",
]
